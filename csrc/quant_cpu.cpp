// CPU ops of fastlora.quant (DESIGN.md section 5): NF4 quantize / dequantize (plus an out=
// variant that fills a caller's scratch buffer), the dequantize of the nested 8-bit absmax, row-wise
// int8 quantize / dequantize, and nf4_linear (y = x @ dequantize(W)^T + bias; the fused CUDA
// kernel is in csrc/cuda/nf4_cuda.cu). Every result is bit-identical to the pure-PyTorch twin in
// fastlora/quant/ (which equals bitsandbytes) for finite inputs; only NaN payloads may differ.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>

#include "nf4.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTLORA_X86 1
#endif

// Loops left to the vectorizer get an AVX2 and an AVX-512 clone, picked at load time (the build
// targets baseline x86-64). None of them has a multiply feeding an add, so FMA contraction in the
// clones cannot change a rounding.
#if defined(FASTLORA_X86) && defined(__GNUC__) && !defined(__clang__)
#define FASTLORA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTLORA_CLONES
#endif

namespace fastlora {
namespace {

constexpr float kNF4[16] = {FASTLORA_NF4_CODE};
// quantize_nf4's clamp(min=1e-38): the Python float rounded to (denormal) fp32.
constexpr float kTiny = static_cast<float>(1e-38);
// int8 dequantize multiplies by this constant (bitsandbytes' 1/127), rounded to fp32 as torch
// rounds a Python scalar multiplying an fp32 tensor.
constexpr float kInv127 = static_cast<float>(7.874015718698502e-3);
// Elements per parallel_for task: small weights stay on one thread.
constexpr int64_t kGrain = 1 << 15;
constexpr int64_t kChunk = 1024;  // fp32 staging buffers on the stack

// x > m ? x : m, but NaN wins, as torch's amax / clamp(min=) propagate NaN.
inline float max_nan(float m, float x) { return (x > m || x != x) ? x : m; }

// ---- fp32 -> storage bits of the output dtype, round to nearest even (torch's casts) --------

FASTLORA_CLONES void f32_to_bf16(const float* __restrict__ src, int64_t n, uint16_t* __restrict__ dst) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, 4);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // c10::round_to_nearest_even
    dst[i] = static_cast<uint16_t>(src[i] != src[i] ? 0x7FC0u : r);
  }
}

#ifdef FASTLORA_X86
__attribute__((target("avx,f16c"))) void f32_to_f16_f16c(const float* src, int64_t n, uint16_t* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = c10::Half(src[i]).x;
}
#endif

void f32_to_f16(const float* src, int64_t n, uint16_t* dst) {
#ifdef FASTLORA_X86
  static const bool f16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
  if (f16c) return f32_to_f16_f16c(src, n, dst);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]).x;
}

// dst[i] = T(src[i]) for T in {float, double, BFloat16, Half}.
template <typename T>
void store_as(const float* src, int64_t n, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if constexpr (std::is_same_v<T, double>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    f32_to_bf16(src, n, reinterpret_cast<uint16_t*>(dst));
  } else {
    static_assert(std::is_same_v<T, at::Half>);
    f32_to_f16(src, n, reinterpret_cast<uint16_t*>(dst));
  }
}

// The hand-written AVX-512 kernels run where torch itself runs its AVX-512 kernels, so
// ATEN_CPU_CAPABILITY=default (or avx2) selects the portable code, e.g. to test it.
bool use_avx512() {
#ifdef FASTLORA_X86
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && at::get_cpu_capability() == "AVX512";
  return yes;
#else
  return false;
#endif
}

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": tensors are on different devices (", a.device(), " and ",
              b.device(), ")");
}

// ---- NF4 quantize -----------------------------------------------------------------------------

// Index of the code nearest to s: the number of midpoints strictly below s (ties go to the lower
// code; NaN gets 0), as nf4.py's _nf4_index. The clamp to [-1, 1] nf4.py applies first changes
// no count, since every midpoint lies inside (-1, 1).
inline uint8_t nf4_index(float s, const float* mid) {
  uint8_t q = 0;
  for (int j = 0; j < 15; ++j) q += s > mid[j];
  return q;
}

// packed[i] = codes of x[2i] * inv (high nibble) and x[2i + 1] * inv, for the pairs of a full block.
FASTLORA_CLONES void nf4_encode_mul(const float* __restrict__ x, int64_t pairs, float inv,
                                    uint8_t* __restrict__ packed) {
  float mid[15];
  for (int j = 0; j < 15; ++j) mid[j] = (kNF4[j] + kNF4[j + 1]) / 2.0f;  // fp32, as nf4.py
  for (int64_t i = 0; i < pairs; ++i)
    packed[i] = static_cast<uint8_t>(nf4_index(x[2 * i] * inv, mid) << 4 | nf4_index(x[2 * i + 1] * inv, mid));
}

// The partial last block divides instead (bitsandbytes' tail path); an odd count pads code 7.
void nf4_encode_tail(const float* x, int64_t len, float am, uint8_t* packed) {
  float mid[15];
  for (int j = 0; j < 15; ++j) mid[j] = (kNF4[j] + kNF4[j + 1]) / 2.0f;
  for (int64_t i = 0; 2 * i < len; ++i) {
    const uint8_t hi = nf4_index(x[2 * i] / am, mid);
    const uint8_t lo = 2 * i + 1 < len ? nf4_index(x[2 * i + 1] / am, mid) : 7;
    packed[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
}

FASTLORA_CLONES float abs_max(const float* __restrict__ x, int64_t n) {
  float m = 0.0f;
  int nan = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    m = a > m ? a : m;
    nan |= a != a;
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

std::tuple<at::Tensor, at::Tensor> quantize_nf4(const at::Tensor& weight, int64_t blocksize) {
  constexpr const char* op = "fastlora::quantize_nf4";
  check_float_dtype(weight.scalar_type(), "weight", op);
  TORCH_CHECK(nf4_blocksize_ok(blocksize), op, ": blocksize must be a power of two in [32, 4096], got ",
              blocksize);
  const auto w = weight.contiguous();
  const int64_t n = w.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  auto packed = at::empty({(n + 1) / 2, 1}, w.options().dtype(at::kByte));
  auto absmax = at::empty({nblocks}, w.options().dtype(at::kFloat));
  uint8_t* p = packed.data_ptr<uint8_t>();
  float* am = absmax.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "fastlora_quantize_nf4", [&] {
    const scalar_t* src = w.const_data_ptr<scalar_t>();
    at::parallel_for(0, nblocks, std::max<int64_t>(1, kGrain / blocksize), [&](int64_t b0, int64_t b1) {
      float buf[4096];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t s = b * blocksize, len = std::min(blocksize, n - s);
        for (int64_t j = 0; j < len; ++j) buf[j] = static_cast<float>(src[s + j]);
        const float m = abs_max(buf, len);
        if (len == blocksize) {
          // x * (1 / clamp(absmax, 1e-38)); the unclamped absmax is stored
          am[b] = m;
          nf4_encode_mul(buf, len / 2, 1.0f / max_nan(kTiny, m), p + s / 2);
        } else {
          // x / clamp(absmax, 1e-38); the clamped absmax is stored
          am[b] = max_nan(kTiny, m);
          nf4_encode_tail(buf, len, am[b], p + s / 2);
        }
      }
    });
  });
  return {packed, absmax};
}

// ---- NF4 dequantize ---------------------------------------------------------------------------

template <typename T>
using bits_t = std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;

// out[e] = lut[nibble e] for the len elements whose codes start at packed (high nibble first).
template <typename U>
void nf4_expand(const uint8_t* __restrict__ packed, int64_t len, const U* __restrict__ lut, U* __restrict__ out) {
  const int64_t pairs = len / 2;
  for (int64_t i = 0; i < pairs; ++i) {
    const uint8_t b = packed[i];
    out[2 * i] = lut[b >> 4];
    out[2 * i + 1] = lut[b & 15];
  }
  if (len & 1) out[len - 1] = lut[packed[pairs] >> 4];
}

// Blocks [b0, b1) of n elements: out = T(code[nibble] * absmax[block]), the product in fp32.
template <typename T>
void nf4_decode_portable(const uint8_t* packed, const float* absmax, int64_t n, int64_t bs, int64_t b0, int64_t b1,
                         T* out) {
  using U = bits_t<T>;
  for (int64_t b = b0; b < b1; ++b) {
    float f[16];
    U lut[16];
    for (int k = 0; k < 16; ++k) f[k] = kNF4[k] * absmax[b];
    store_as(f, 16, reinterpret_cast<T*>(lut));
    const int64_t s = b * bs;
    nf4_expand(packed + s / 2, std::min(bs, n - s), lut, reinterpret_cast<U*>(out) + s);
  }
}

#ifdef FASTLORA_X86
#define FASTLORA_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))

// The 16 codes of 16 packed bytes, in element order (high nibble first), as 32 bytes.
FASTLORA_AVX512_TARGET inline __m256i nf4_nibbles(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
  const __m128i lo = _mm_and_si128(b, low4);
  return _mm256_set_m128i(_mm_unpackhi_epi8(hi, lo), _mm_unpacklo_epi8(hi, lo));
}

// One 16-entry table per block, then one permute per 16 (fp32) or 32 (16-bit) outputs.
template <typename T>
FASTLORA_AVX512_TARGET void nf4_decode_avx512(const uint8_t* packed, const float* absmax, int64_t bs, int64_t b0,
                                              int64_t b1, T* out) {
  const __m512 code = _mm512_loadu_ps(kNF4);
  for (int64_t b = b0; b < b1; ++b) {
    const __m512 f = _mm512_mul_ps(code, _mm512_set1_ps(absmax[b]));
    const uint8_t* p = packed + b * bs / 2;
    const uint8_t* const end = p + bs / 2;
    if constexpr (std::is_same_v<T, float>) {
      float* o = out + b * bs;
      for (; p < end; p += 16, o += 32) {
        const __m256i idx = nf4_nibbles(p);
        _mm512_storeu_ps(o, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(idx)), f));
        _mm512_storeu_ps(o + 16, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(idx, 1)), f));
      }
    } else {
      __m256i lut16;
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        const __m512i u = _mm512_castps_si512(f);
        const __m512i one = _mm512_set1_epi32(1);
        __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)),
                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), one));
        r = _mm512_mask_mov_epi32(_mm512_srli_epi32(r, 16), _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q),
                                  _mm512_set1_epi32(0x7FC0));
        lut16 = _mm512_cvtepi32_epi16(r);
      } else {
        static_assert(std::is_same_v<T, at::Half>);
        lut16 = _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      }
      const __m512i lut = _mm512_castsi256_si512(lut16);  // indices < 16 never read the upper half
      auto* o = reinterpret_cast<uint16_t*>(out + b * bs);
      for (; p < end; p += 16, o += 32)
        _mm512_storeu_si512(o, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(nf4_nibbles(p)), lut));
    }
  }
}
#endif

// Blocks [b0, b1) of the n elements into out.
template <typename T>
void nf4_decode_range(const uint8_t* p, const float* am, int64_t n, int64_t bs, int64_t b0, int64_t b1, T* out) {
#ifdef FASTLORA_X86
  if constexpr (!std::is_same_v<T, double>) {
    if (use_avx512()) {  // whole blocks only; a partial last block takes the portable path
      const int64_t whole = std::max(b0, std::min(b1, n / bs));
      nf4_decode_avx512<T>(p, am, bs, b0, whole, out);
      b0 = whole;
    }
  }
#endif
  nf4_decode_portable<T>(p, am, n, bs, b0, b1, out);
}

// out (contiguous, numel n) = the n dequantized elements.
void nf4_decode_into(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize, at::Tensor& out) {
  const int64_t n = out.numel();
  const auto pc = packed.contiguous();
  const auto ac = absmax.contiguous();
  const uint8_t* p = pc.const_data_ptr<uint8_t>();
  const float* am = ac.const_data_ptr<float>();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fastlora_dequantize_nf4", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, nblocks, std::max<int64_t>(1, kGrain / blocksize), [&](int64_t b0, int64_t b1) {
      nf4_decode_range<scalar_t>(p, am, n, blocksize, b0, b1, o);
    });
  });
}

at::Tensor dequantize_nf4(const at::Tensor& packed, const at::Tensor& absmax, at::IntArrayRef shape,
                          int64_t blocksize, at::ScalarType dtype) {
  constexpr const char* op = "fastlora::dequantize_nf4";
  check_float_dtype(dtype, "dtype", op);
  int64_t n = 1;
  for (const int64_t d : shape) {
    TORCH_CHECK(d >= 0, op, ": negative dimension in shape ", shape);
    n *= d;
  }
  check_nf4_args(packed, absmax, n, blocksize, op);
  auto out = at::empty(shape, packed.options().dtype(dtype));
  nf4_decode_into(packed, absmax, blocksize, out);
  return out;
}

void dequantize_nf4_out(const at::Tensor& packed, const at::Tensor& absmax, at::Tensor out, int64_t blocksize) {
  constexpr const char* op = "fastlora::dequantize_nf4_out";
  check_float_dtype(out.scalar_type(), "out", op);
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
  check_same_device(packed, out, op);
  check_nf4_args(packed, absmax, out.numel(), blocksize, op);
  nf4_decode_into(packed, absmax, blocksize, out);
}

// y = x @ dequantize(W)^T + bias with W dequantized to x's dtype (the CUDA kernel fuses the two).
at::Tensor nf4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t N,
                      int64_t blocksize, const std::optional<at::Tensor>& bias) {
  check_nf4_linear_args(x, packed, absmax, N, blocksize, bias, "fastlora::nf4_linear");
  const int64_t K = x.size(-1);
  auto w = at::empty({N, K}, x.options());
  nf4_decode_into(packed, absmax, blocksize, w);
  return at::linear(x, w, bias);
}

// ---- nested (double quant) absmax -------------------------------------------------------------

// code[q[i]] * absmax[i / blocksize] in fp32 (bitsandbytes' dequantize_blockwise).
at::Tensor dequantize_blockwise_8bit(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                                     int64_t blocksize) {
  constexpr const char* op = "fastlora::dequantize_blockwise_8bit";
  TORCH_CHECK(q.scalar_type() == at::kByte, op, ": q must be uint8, got ", q.scalar_type());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && code.scalar_type() == at::kFloat, op,
              ": absmax and code must be float32, got ", absmax.scalar_type(), " and ", code.scalar_type());
  check_same_device(q, absmax, op);
  check_same_device(q, code, op);
  TORCH_CHECK(code.numel() == 256, op, ": code must have 256 entries, got ", code.numel());
  TORCH_CHECK(blocksize > 0, op, ": blocksize must be positive, got ", blocksize);
  const int64_t n = q.numel(), nblocks = (n + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.numel() == nblocks, op, ": absmax has ", absmax.numel(), " entries, ", n,
              " values in blocks of ", blocksize, " need ", nblocks);
  const auto qc = q.contiguous(), ac = absmax.contiguous(), cc = code.contiguous();
  auto out = at::empty({n}, absmax.options());
  const uint8_t* qp = qc.const_data_ptr<uint8_t>();
  const float* a = ac.const_data_ptr<float>();
  const float* c = cc.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, nblocks, std::max<int64_t>(1, kGrain / blocksize), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t i = b * blocksize, e = std::min(n, i + blocksize); i < e; ++i) o[i] = c[qp[i]] * a[b];
  });
  return out;
}

// ---- int8, row-wise absmax ----------------------------------------------------------------------

// cb[j] = round_half_even(x[j] * scale), as nf4.py's (weight * scale).round_().to(int8).
FASTLORA_CLONES void int8_encode_row(const float* __restrict__ x, int64_t n, float scale, int8_t* __restrict__ cb) {
  for (int64_t j = 0; j < n; ++j) cb[j] = static_cast<int8_t>(static_cast<int32_t>(std::nearbyint(x[j] * scale)));
}

std::tuple<at::Tensor, at::Tensor> quantize_int8(const at::Tensor& weight) {
  constexpr const char* op = "fastlora::quantize_int8";
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (N, K), got shape ", weight.sizes());
  check_float_dtype(weight.scalar_type(), "weight", op);
  const auto w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  auto cb = at::empty({N, K}, w.options().dtype(at::kChar));
  auto scb = at::empty({N}, w.options().dtype(at::kFloat));
  int8_t* q = cb.data_ptr<int8_t>();
  float* s = scb.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "fastlora_quantize_int8", [&] {
    const scalar_t* src = w.const_data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, kGrain / std::max<int64_t>(K, 1)), [&](int64_t r0, int64_t r1) {
      float buf[kChunk];
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = src + r * K;
        float m = 0.0f;  // |x| and max are exact in any dtype, so the fp32 copy gives the same SCB
        for (int64_t j0 = 0; j0 < K; j0 += kChunk) {
          const int64_t len = std::min(kChunk, K - j0);
          for (int64_t j = 0; j < len; ++j) buf[j] = static_cast<float>(row[j0 + j]);
          m = max_nan(m, abs_max(buf, len));
        }
        s[r] = m;
        // reciprocal(SCB) * 127, 0 for an all-zero row (no 0 * inf)
        const float scale = m == 0.0f ? 0.0f : (1.0f / m) * 127.0f;
        for (int64_t j0 = 0; j0 < K; j0 += kChunk) {
          const int64_t len = std::min(kChunk, K - j0);
          if constexpr (std::is_same_v<scalar_t, double>) {  // torch multiplies in float64 here
            for (int64_t j = 0; j < len; ++j)
              q[r * K + j0 + j] = static_cast<int8_t>(static_cast<int32_t>(std::nearbyint(row[j0 + j] * scale)));
          } else {
            for (int64_t j = 0; j < len; ++j) buf[j] = static_cast<float>(row[j0 + j]);
            int8_encode_row(buf, len, scale, q + r * K + j0);
          }
        }
      }
    });
  });
  return {cb, scb};
}

// out[j] = (cb[j] * scb) * (1/127) in fp32, as bitsandbytes' int8_vectorwise_dequant.
FASTLORA_CLONES void int8_decode_row(const int8_t* __restrict__ cb, int64_t n, float scb, float* __restrict__ out) {
  for (int64_t j = 0; j < n; ++j) out[j] = (static_cast<float>(cb[j]) * scb) * kInv127;
}

// Rows [r0, r1) of the (N, K) output.
template <typename T>
void int8_decode_rows(const int8_t* q, const float* scb, int64_t K, int64_t r0, int64_t r1, T* out) {
  float buf[kChunk];
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t j0 = 0; j0 < K; j0 += kChunk) {
      const int64_t len = std::min(kChunk, K - j0);
      if constexpr (std::is_same_v<T, float>) {
        int8_decode_row(q + r * K + j0, len, scb[r], out + r * K + j0);
      } else {
        int8_decode_row(q + r * K + j0, len, scb[r], buf);
        store_as(buf, len, out + r * K + j0);
      }
    }
  }
}

void check_int8_args(const at::Tensor& CB, const at::Tensor& SCB, const char* op) {
  TORCH_CHECK(CB.dim() == 2 && CB.scalar_type() == at::kChar, op, ": CB must be an int8 (N, K) tensor, got ",
              CB.scalar_type(), " of shape ", CB.sizes());
  TORCH_CHECK(SCB.scalar_type() == at::kFloat && SCB.dim() == 1 && SCB.numel() == CB.size(0), op,
              ": SCB must be float32 (", CB.size(0), ",), got ", SCB.scalar_type(), " of shape ", SCB.sizes());
  check_same_device(CB, SCB, op);
}

// out (contiguous (N, K)) = the dequantized rows.
void int8_decode_into(const at::Tensor& CB, const at::Tensor& SCB, at::Tensor& out) {
  const auto cb = CB.contiguous(), scb = SCB.contiguous();
  const int64_t N = cb.size(0), K = cb.size(1);
  const int8_t* q = cb.const_data_ptr<int8_t>();
  const float* s = scb.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fastlora_dequantize_int8", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, kGrain / std::max<int64_t>(K, 1)),
                     [&](int64_t r0, int64_t r1) { int8_decode_rows<scalar_t>(q, s, K, r0, r1, o); });
  });
}

at::Tensor dequantize_int8(const at::Tensor& CB, const at::Tensor& SCB, at::ScalarType dtype) {
  constexpr const char* op = "fastlora::dequantize_int8";
  check_float_dtype(dtype, "dtype", op);
  check_int8_args(CB, SCB, op);
  auto out = at::empty(CB.sizes(), CB.options().dtype(dtype));
  int8_decode_into(CB, SCB, out);
  return out;
}

void dequantize_int8_out(const at::Tensor& CB, const at::Tensor& SCB, at::Tensor out) {
  constexpr const char* op = "fastlora::dequantize_int8_out";
  check_float_dtype(out.scalar_type(), "out", op);
  check_int8_args(CB, SCB, op);
  TORCH_CHECK(out.is_contiguous() && out.sizes() == CB.sizes(), op, ": out must be contiguous with shape ",
              CB.sizes(), ", got shape ", out.sizes(), out.is_contiguous() ? "" : " (non-contiguous)");
  check_same_device(CB, out, op);
  int8_decode_into(CB, SCB, out);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlora, m) {
  m.def("quantize_nf4(Tensor weight, int blocksize=64) -> (Tensor packed, Tensor absmax)");
  m.def("dequantize_nf4(Tensor packed, Tensor absmax, int[] shape, int blocksize, ScalarType dtype) -> Tensor");
  // Returns nothing, like dropout_: torch.compile rejects custom ops returning an input alias.
  m.def("dequantize_nf4_out(Tensor packed, Tensor absmax, Tensor(a!) out, int blocksize) -> ()");
  m.def("nf4_linear(Tensor x, Tensor packed, Tensor absmax, int N, int blocksize, Tensor? bias=None) -> Tensor");
  m.def("dequantize_blockwise_8bit(Tensor q, Tensor absmax, Tensor code, int blocksize) -> Tensor");
  m.def("quantize_int8(Tensor weight) -> (Tensor CB, Tensor SCB)");
  m.def("dequantize_int8(Tensor CB, Tensor SCB, ScalarType dtype) -> Tensor");
  m.def("dequantize_int8_out(Tensor CB, Tensor SCB, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("quantize_nf4", &quantize_nf4);
  m.impl("dequantize_nf4", &dequantize_nf4);
  m.impl("dequantize_nf4_out", &dequantize_nf4_out);
  m.impl("nf4_linear", &nf4_linear);
  m.impl("dequantize_blockwise_8bit", &dequantize_blockwise_8bit);
  m.impl("quantize_int8", &quantize_int8);
  m.impl("dequantize_int8", &dequantize_int8);
  m.impl("dequantize_int8_out", &dequantize_int8_out);
}

}  // namespace fastlora
