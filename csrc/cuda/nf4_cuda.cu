// CUDA kernels of fastlora.quant (schemas: csrc/quant_cpu.cpp; format: DESIGN.md section 5).
//
// - dequantize_nf4 / dequantize_nf4_out: out = T(code[nibble] * absmax[block]), the product in
//   fp32 and rounded to nearest even, so the bytes equal the CPU op's.
// - nf4_linear: y = x @ dequantize(W, x.dtype)^T + bias. For decode-sized inputs (M <= 16 rows,
//   bf16/fp16, K % 128 == 0, sm_80+) one kernel reads the 4-bit W once and feeds tensor cores
//   (mma.m16n8k16, fp32 accumulate) straight from registers; any other shape dequantizes into a
//   scratch buffer and calls cuBLAS (bitsandbytes' choice for large M).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <optional>

#include "../nf4.h"

namespace fastlora {
namespace {

__constant__ float kNF4Code[16] = {FASTLORA_NF4_CODE};

int log2_of(int64_t blocksize) { return 63 - __builtin_clzll(static_cast<unsigned long long>(blocksize)); }

// ---- dequantize ---------------------------------------------------------------------------------

constexpr int kDequantThreads = 256;

// Each thread decodes groups of 8 elements (4 packed bytes); 8 divides every blocksize, so a group
// shares one absmax. vec: packed and out are 16-byte aligned, so whole groups use wide accesses.
template <typename T>
__global__ void __launch_bounds__(kDequantThreads)
    nf4_dequantize_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax, int64_t n,
                          int bs_log2, bool vec, T* __restrict__ out) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = kNF4Code[threadIdx.x];
  __syncthreads();
  const int64_t groups = (n + 7) / 8, nbytes = (n + 1) / 2;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e0 = 8 * g;
    const bool whole = e0 + 8 <= n;
    uint32_t word = 0;
    if (whole && vec) {
      word = __ldg(reinterpret_cast<const uint32_t*>(packed + e0 / 2));
    } else {
      for (int i = 0; i < 4 && e0 / 2 + i < nbytes; ++i) word |= static_cast<uint32_t>(packed[e0 / 2 + i]) << (8 * i);
    }
    const float am = absmax[e0 >> bs_log2];
    alignas(16) T v[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t b = (word >> (8 * i)) & 0xFF;
      v[2 * i] = static_cast<T>(code[b >> 4] * am);  // c10 casts round to nearest even
      v[2 * i + 1] = static_cast<T>(code[b & 15] * am);
    }
    if (whole && vec) {
      static_assert(sizeof(v) % 16 == 0, "8 outputs are whole 16-byte vectors");
#pragma unroll
      for (int i = 0; i < static_cast<int>(sizeof(v) / 16); ++i)
        reinterpret_cast<uint4*>(out + e0)[i] = reinterpret_cast<const uint4*>(v)[i];
    } else {
      for (int i = 0; i < 8 && e0 + i < n; ++i) out[e0 + i] = v[i];
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// out (contiguous, numel n, on packed's device) = the n dequantized elements.
void nf4_dequantize_into(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize, at::Tensor& out) {
  const int64_t n = out.numel();
  if (n == 0) return;
  const auto pc = packed.contiguous(), ac = absmax.contiguous();
  const int64_t groups = (n + 7) / 8;
  const int64_t blocks = std::min<int64_t>((groups + kDequantThreads - 1) / kDequantThreads, int64_t{1} << 20);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fastlora_dequantize_nf4_cuda", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const uint8_t* p = pc.const_data_ptr<uint8_t>();
    nf4_dequantize_kernel<scalar_t><<<static_cast<unsigned>(blocks), kDequantThreads, 0, stream>>>(
        p, ac.const_data_ptr<float>(), n, log2_of(blocksize), aligned16(p) && aligned16(o), o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor dequantize_nf4_cuda(const at::Tensor& packed, const at::Tensor& absmax, at::IntArrayRef shape,
                               int64_t blocksize, at::ScalarType dtype) {
  constexpr const char* op = "fastlora::dequantize_nf4";
  check_float_dtype(dtype, "dtype", op);
  int64_t n = 1;
  for (const int64_t d : shape) {
    TORCH_CHECK(d >= 0, op, ": negative dimension in shape ", shape);
    n *= d;
  }
  check_nf4_args(packed, absmax, n, blocksize, op);
  const c10::cuda::CUDAGuard guard(packed.device());
  auto out = at::empty(shape, packed.options().dtype(dtype));
  nf4_dequantize_into(packed, absmax, blocksize, out);
  return out;
}

void dequantize_nf4_out_cuda(const at::Tensor& packed, const at::Tensor& absmax, at::Tensor out, int64_t blocksize) {
  constexpr const char* op = "fastlora::dequantize_nf4_out";
  check_float_dtype(out.scalar_type(), "out", op);
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
  TORCH_CHECK(out.device() == packed.device(), op, ": out is on ", out.device(), ", packed on ", packed.device());
  check_nf4_args(packed, absmax, out.numel(), blocksize, op);
  const c10::cuda::CUDAGuard guard(packed.device());
  nf4_dequantize_into(packed, absmax, blocksize, out);
}

// ---- fused small-M linear ---------------------------------------------------------------------

constexpr int kMaxM = 16;          // rows of x: one mma tile of 16
constexpr int kWarps = 4;          // a CTA's warps split K; their partial sums meet in shared memory
constexpr int kTiles = 2;          // n-tiles of 8 W rows per warp
constexpr int kRows = 8 * kTiles;  // outputs (W rows) per CTA
constexpr int kKStep = 128;        // k per iteration: 4 threads x 32 consecutive k

template <typename T>
struct MmaType;
template <>
struct MmaType<at::BFloat16> {
  // Two fp32 values -> one register of two bf16 (a in the low half), round to nearest even.
  __device__ static uint32_t pack(float a, float b) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();  // the host launches this kernel on sm_80+ only
#endif
  }
};
template <>
struct MmaType<at::Half> {
  __device__ static uint32_t pack(float a, float b) {
    const __half2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();
#endif
  }
};

// y (M, N) = x (M, K) @ W^T + bias, W (N, K) as NF4. Fragment layout of mma.m16n8k16 (lane =
// 4 * grp + tig): A holds x[grp | grp + 8][kk] and B holds W[n0 + grp][kk] for the mma-k indices
// kk in {2 tig, 2 tig + 1, 2 tig + 8, 2 tig + 9}. A dot product does not care in which order k
// is summed, so mma step j of an iteration maps those four kk to the real k
// k0 + 32 tig + 4 j + {0, 1, 2, 3}: each thread then reads 32 consecutive k of its W row (16
// bytes, one absmax) and of its two x rows, with no shuffles. Rows of x past M are zeros.
template <typename T>
__global__ void __launch_bounds__(32 * kWarps)
    nf4_linear_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                      const T* __restrict__ bias, T* __restrict__ y, int M, int N, int K, int bs_log2) {
  __shared__ float code[16];
  __shared__ float partial[kWarps][kTiles][4][32];
  if (threadIdx.x < 16) code[threadIdx.x] = kNF4Code[threadIdx.x];
  __syncthreads();

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int grp = lane / 4, tig = lane % 4;
  const int n_cta = blockIdx.x * kRows;
  const int steps = K / kKStep;
  const bool lo_row = grp < M, hi_row = grp + 8 < M;
  const T* x_lo = x + static_cast<int64_t>(grp) * K;
  const T* x_hi = x + static_cast<int64_t>(grp + 8) * K;

  float acc[kTiles][4] = {};
  for (int s = steps * warp / kWarps; s < steps * (warp + 1) / kWarps; ++s) {
    const int k = s * kKStep + 32 * tig;
    // x[row][k .. k + 31] as 16 registers of 2 values; register r holds k + 2r, k + 2r + 1.
    alignas(16) uint32_t a_lo[16] = {};
    alignas(16) uint32_t a_hi[16] = {};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (lo_row) reinterpret_cast<uint4*>(a_lo)[i] = __ldg(reinterpret_cast<const uint4*>(x_lo + k) + i);
      if (hi_row) reinterpret_cast<uint4*>(a_hi)[i] = __ldg(reinterpret_cast<const uint4*>(x_hi + k) + i);
    }
    uint4 w[kTiles];
    float am[kTiles];
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      const int n = n_cta + 8 * t + grp;
      w[t] = make_uint4(0, 0, 0, 0);
      am[t] = 0.0f;
      if (n < N) {
        const int64_t e = static_cast<int64_t>(n) * K + k;  // even, and a multiple of 32
        w[t] = __ldg(reinterpret_cast<const uint4*>(packed + e / 2));
        am[t] = __ldg(absmax + (e >> bs_log2));  // 32 | blocksize: the 32 codes share a block
      }
    }
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      const uint32_t bytes[4] = {w[t].x, w[t].y, w[t].z, w[t].w};
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        // Bytes 2j, 2j + 1 hold k + 4j .. k + 4j + 3, the first of each pair in the high nibble.
        const uint32_t pair = bytes[j / 2] >> (16 * (j % 2));
        const uint32_t b0 = pair & 0xFF, b1 = (pair >> 8) & 0xFF;
        const uint32_t b[2] = {MmaType<T>::pack(code[b0 >> 4] * am[t], code[b0 & 15] * am[t]),
                               MmaType<T>::pack(code[b1 >> 4] * am[t], code[b1 & 15] * am[t])};
        const uint32_t a[4] = {a_lo[2 * j], a_hi[2 * j], a_lo[2 * j + 1], a_hi[2 * j + 1]};
        MmaType<T>::mma(acc[t], a, b);
      }
    }
  }

  // C fragment: acc[t][i] is y[grp + 8 * (i / 2)][n_cta + 8 t + 2 tig + i % 2]. Summing the
  // warps in a fixed order keeps the result deterministic.
#pragma unroll
  for (int t = 0; t < kTiles; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][t][i][lane] = acc[t][i];
  __syncthreads();
  for (int idx = threadIdx.x; idx < kTiles * 4 * 32; idx += blockDim.x) {
    const int t = idx / 128, i = (idx / 32) % 4, l = idx % 32;
    const int m = l / 4 + 8 * (i / 2), n = n_cta + 8 * t + 2 * (l % 4) + i % 2;
    if (m >= M || n >= N) continue;
    float sum = 0.0f;
    for (int v = 0; v < kWarps; ++v) sum += partial[v][t][i][l];
    if (bias != nullptr) sum += static_cast<float>(bias[n]);
    y[static_cast<int64_t>(m) * N + n] = static_cast<T>(sum);
  }
}

at::Tensor nf4_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t N,
                           int64_t blocksize, const std::optional<at::Tensor>& bias) {
  check_nf4_linear_args(x, packed, absmax, N, blocksize, bias, "fastlora::nf4_linear");
  const auto dt = x.scalar_type();
  const int64_t K = x.size(-1);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = K > 0 ? x.numel() / K : 0;
  const auto xc = x.reshape({M, K}).contiguous();
  const auto pc = packed.contiguous(), ac = absmax.contiguous();
  int major = 0;  // the runtime query keeps cuBLAS/cuSPARSE headers (ATen/cuda/CUDAContext.h) out
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
  const bool fused = M >= 1 && M <= kMaxM && K % kKStep == 0 && N >= 1 && N <= INT32_MAX && K <= INT32_MAX &&
                     (dt == at::kHalf || dt == at::kBFloat16) && major >= 8 &&
                     aligned16(xc.const_data_ptr()) && aligned16(pc.const_data_ptr());
  if (!fused) {
    auto w = at::empty({N, K}, x.options());
    nf4_dequantize_into(pc, ac, blocksize, w);
    return at::linear(x, w, bias);
  }
  auto y = at::empty({M, N}, x.options());
  std::optional<at::Tensor> bc;
  if (bias.has_value()) bc = bias->contiguous();
  const dim3 grid(static_cast<unsigned>((N + kRows - 1) / kRows));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(dt, "fastlora_nf4_linear_cuda", [&] {
    nf4_linear_kernel<scalar_t><<<grid, 32 * kWarps, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), pc.const_data_ptr<uint8_t>(), ac.const_data_ptr<float>(),
        bc.has_value() ? bc->const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(),
        static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), log2_of(blocksize));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  return y.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlora, CUDA, m) {
  m.impl("dequantize_nf4", &dequantize_nf4_cuda);
  m.impl("dequantize_nf4_out", &dequantize_nf4_out_cuda);
  m.impl("nf4_linear", &nf4_linear_cuda);
}

}  // namespace fastlora
