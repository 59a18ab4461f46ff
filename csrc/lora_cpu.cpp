// Fused CPU ops of the LoRA branch (DESIGN.md sections 1-2). With seeded dropout, the products
// with dropout(x) or dropout(dz @ A) are computed per row block through a small reused buffer,
// so no M x K temporary is written (the mask is regenerated, as everywhere, from the seed;
// bits: fastlora/_philox.py). Each op also runs with p == 0 (plain products, blocked alike).
//
//   dropout_shrink(x, A)          z  = dropout(x) @ A^T          (M, r)
//   dropout_dA(dz, x)             dA = dz^T @ dropout(x)         (r, K), fp32/fp64 accumulation
//   dropout_tail_add_(dx, dz, A)  dx += dropout(dz @ A)          (M, K) in place
//   dropout_dA_tail_add_(dx, dz, x, A)  both of the last two in one pass over the row blocks,
//                                 each block's mask drawn once (the backward needs both)
//   lora_expand(z, B, bias, s)    y = s * z @ B^T + bias         (M, N), no dropout
//   lora_gpass(g, B, z, s)        (s * g @ B, s * g^T @ z)       one pass over g, no dropout
//
// The dropout ops take row_offset (row 0 is logical row row_offset, as fastlora::dropout); all
// take block_rows (rows per block; 0 picks one so that a block stays in L2).
//
// The rank-r products are skinny GEMMs (r is 8-64) on which MKL reaches about half of the FMA
// peak, erratically; for float32 on AVX-512 CPUs they run on the small kernels below (near peak),
// each block's dropout fused into one pass. Other dtypes and CPUs use at::mm on the blocks
// (lora_expand / lora_gpass: plain ATen calls).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "philox_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FASTLORA_AVX512_KERNELS 1
#define FASTLORA_AVX512 __attribute__((target("avx512f")))
#endif

namespace fastlora {
namespace {

// Elements of x per row block when block_rows == 0: 256 KiB of fp32, which (with the block's
// products) stays in L2 and keeps the per-block GEMM calls long enough.
constexpr int64_t kBlockElems = 64 * 1024;
// Elements per parallel task at the least, so small problems stay on one thread.
constexpr int64_t kMinTaskElems = 32 * 1024;

#ifdef FASTLORA_AVX512_KERNELS
// ------------------------------------------------------------------ float32 AVX-512 kernels
namespace avx512 {

inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// z[i, c*16 + l] = sum_k x[i, k] * Ap[c][k][l] for R rows (x row stride ldx), one 16-column
// chunk c of A^T packed as Ap (K x 16, zero padded past r); w valid columns stored.
template <int R>
FASTLORA_AVX512 void shrink_rows(const float* x, int64_t ldx, const float* ap, int64_t K, float* z, int64_t ldz,
                                 __mmask16 w) {
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 a = _mm512_loadu_ps(ap + 16 * k);
    for (int i = 0; i < R; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(x[i * ldx + k]), a, acc[i]);
  }
  for (int i = 0; i < R; ++i) _mm512_mask_storeu_ps(z + i * ldz, w, acc[i]);
}

// z (rows x r, row stride ldz) = x (rows x K, row stride ldx) @ A^T, A^T packed by pack_At.
FASTLORA_AVX512 void shrink(const float* x, int64_t ldx, const float* Ap, int64_t K, int64_t r, float* z, int64_t ldz,
                            int64_t rows) {
  for (int64_t c = 0; 16 * c < r; ++c) {
    const float* ap = Ap + c * K * 16;
    const __mmask16 w = tail_mask(r - 16 * c);
    int64_t m = 0;
    for (; m + 8 <= rows; m += 8) shrink_rows<8>(x + m * ldx, ldx, ap, K, z + m * ldz + 16 * c, ldz, w);
    if (m + 4 <= rows) {
      shrink_rows<4>(x + m * ldx, ldx, ap, K, z + m * ldz + 16 * c, ldz, w);
      m += 4;
    }
    for (; m < rows; ++m) shrink_rows<1>(x + m * ldx, ldx, ap, K, z + m * ldz + 16 * c, ldz, w);
  }
}

// Loads and stores of 16 floats, masked only where Masked (a row's last, partial chunk). gcc keeps
// the accumulators of the kernels below in registers only when the loads in their loops are
// unmasked (masked ones make it store them to the stack on every iteration), hence the template
// parameter instead of a runtime mask everywhere.
template <bool Masked>
FASTLORA_AVX512 inline __m512 load16(const float* p, __mmask16 m) {
  if constexpr (Masked) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    return _mm512_loadu_ps(p);
  }
}

template <bool Masked>
FASTLORA_AVX512 inline void store16(float* p, __mmask16 m, __m512 v) {
  if constexpr (Masked) {
    _mm512_mask_storeu_ps(p, m, v);
  } else {
    _mm512_storeu_ps(p, v);
  }
}

// P[j, 16c + l] += sum_m dz[m, j] * xd[m, 16c + l] for j < J, c < C (the last chunk masked by
// `last` when Masked).
template <int J, int C, bool Masked>
FASTLORA_AVX512 void dA_tile(const float* dz, int64_t lddz, const float* xd, int64_t ldx, float* P, int64_t K,
                             int64_t rows, __mmask16 last) {
  static_assert(!Masked || C == 1, "a masked tile is one chunk");
  __m512 acc[J][C];
  for (int j = 0; j < J; ++j)
    for (int c = 0; c < C; ++c) acc[j][c] = load16<Masked>(P + j * K + 16 * c, last);
  for (int64_t m = 0; m < rows; ++m) {
    __m512 v[C];
    for (int c = 0; c < C; ++c) v[c] = load16<Masked>(xd + m * ldx + 16 * c, last);
    const float* d = dz + m * lddz;
    for (int j = 0; j < J; ++j) {
      const __m512 b = _mm512_set1_ps(d[j]);
      for (int c = 0; c < C; ++c) acc[j][c] = _mm512_fmadd_ps(b, v[c], acc[j][c]);
    }
  }
  for (int j = 0; j < J; ++j)
    for (int c = 0; c < C; ++c) store16<Masked>(P + j * K + 16 * c, last, acc[j][c]);
}

// Columns [0, K) of P's rows j0 .. j0 + J - 1 in tiles of C chunks of 16, then single chunks.
template <int J, int C>
FASTLORA_AVX512 void dA_rows(const float* dz, int64_t lddz, const float* xd, int64_t ldx, float* P, int64_t K,
                             int64_t rows) {
  int64_t k = 0;
  for (; k + 16 * C <= K; k += 16 * C) dA_tile<J, C, false>(dz, lddz, xd + k, ldx, P + k, K, rows, 0xFFFF);
  for (; k + 16 <= K; k += 16) dA_tile<J, 1, false>(dz, lddz, xd + k, ldx, P + k, K, rows, 0xFFFF);
  if (k < K) dA_tile<J, 1, true>(dz, lddz, xd + k, ldx, P + k, K, rows, tail_mask(K - k));
}

template <int J>
FASTLORA_AVX512 void dA_group(const float* dz, int64_t lddz, const float* xd, int64_t ldx, float* P, int64_t K,
                              int64_t rows) {
  // J * C accumulators: enough independent FMAs to cover their latency, at most 16 registers
  constexpr int C = J <= 4 ? 4 : J <= 8 ? 2 : 1;
  dA_rows<J, C>(dz, lddz, xd, ldx, P, K, rows);
}

// P (r x K, row stride K) += dz^T @ xd for dz (rows x r, row stride lddz), xd (rows x K, row
// stride ldx).
FASTLORA_AVX512 void dA(const float* dz, int64_t lddz, const float* xd, int64_t ldx, float* P, int64_t r, int64_t K,
                        int64_t rows) {
  for (int64_t j0 = 0; j0 < r; j0 += 16) {
    const float* d = dz + j0;
    float* p = P + j0 * K;
    switch (std::min<int64_t>(16, r - j0)) {
#define FASTLORA_DA_CASE(J) \
  case J:                   \
    dA_group<J>(d, lddz, xd, ldx, p, K, rows); \
    break;
      FASTLORA_DA_CASE(1) FASTLORA_DA_CASE(2) FASTLORA_DA_CASE(3) FASTLORA_DA_CASE(4)
      FASTLORA_DA_CASE(5) FASTLORA_DA_CASE(6) FASTLORA_DA_CASE(7) FASTLORA_DA_CASE(8)
      FASTLORA_DA_CASE(9) FASTLORA_DA_CASE(10) FASTLORA_DA_CASE(11) FASTLORA_DA_CASE(12)
      FASTLORA_DA_CASE(13) FASTLORA_DA_CASE(14) FASTLORA_DA_CASE(15) FASTLORA_DA_CASE(16)
#undef FASTLORA_DA_CASE
      default:
        break;
    }
  }
}

// How the tail kernel starts its sums: from zero (t = dz @ A), from t (t += dz @ A), or from a
// bias row (t = bias + dz @ A).
enum TailInit : int { kInitZero = 0, kInitLoad = 1, kInitBias = 2 };

// t[i, 16c + l] = init + sum_j dz[i, j] * A[j, 16c + l] for R rows and C column chunks (the last
// masked by `last` when Masked).
template <int R, int C, bool Masked, int Init>
FASTLORA_AVX512 void tail_tile(const float* dz, int64_t lddz, const float* A, int64_t K, int64_t r, float* t,
                               int64_t ldt, const float* bias, __mmask16 last) {
  static_assert(!Masked || C == 1, "a masked tile is one chunk");
  __m512 acc[R][C];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) {
      if constexpr (Init == kInitLoad) {
        acc[i][c] = load16<Masked>(t + i * ldt + 16 * c, last);
      } else if constexpr (Init == kInitBias) {
        acc[i][c] = load16<Masked>(bias + 16 * c, last);
      } else {
        acc[i][c] = _mm512_setzero_ps();
      }
    }
  for (int64_t j = 0; j < r; ++j) {
    __m512 a[C];
    for (int c = 0; c < C; ++c) a[c] = load16<Masked>(A + j * K + 16 * c, last);
    for (int i = 0; i < R; ++i) {
      const __m512 d = _mm512_set1_ps(dz[i * lddz + j]);
      for (int c = 0; c < C; ++c) acc[i][c] = _mm512_fmadd_ps(d, a[c], acc[i][c]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) store16<Masked>(t + i * ldt + 16 * c, last, acc[i][c]);
}

template <int R, int Init>
FASTLORA_AVX512 void tail_rows(const float* dz, int64_t lddz, const float* A, int64_t K, int64_t r, float* t,
                               int64_t ldt, const float* bias) {
  const auto b = [&](int64_t k) { return Init == kInitBias ? bias + k : nullptr; };
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) tail_tile<R, 4, false, Init>(dz, lddz, A + k, K, r, t + k, ldt, b(k), 0xFFFF);
  for (; k + 16 <= K; k += 16) tail_tile<R, 1, false, Init>(dz, lddz, A + k, K, r, t + k, ldt, b(k), 0xFFFF);
  if (k < K) tail_tile<R, 1, true, Init>(dz, lddz, A + k, K, r, t + k, ldt, b(k), tail_mask(K - k));
}

// t (rows x K, row stride ldt) = init + dz (rows x r, row stride lddz) @ A (r x K, contiguous);
// bias: K floats (kInitBias) or null.
template <int Init>
FASTLORA_AVX512 void tail(const float* dz, int64_t lddz, const float* A, int64_t K, int64_t r, float* t, int64_t ldt,
                          int64_t rows, const float* bias) {
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4) tail_rows<4, Init>(dz + m * lddz, lddz, A, K, r, t + m * ldt, ldt, bias);
  for (; m < rows; ++m) tail_rows<1, Init>(dz + m * lddz, lddz, A, K, r, t + m * ldt, ldt, bias);
}

// One run of n elements of a row: Tail: d += keep ? tb * scale : 0; DropX: xb = keep ? x * scale
// : 0. xb may alias tb (read first).
template <bool Tail, bool DropX>
FASTLORA_AVX512 void run_f32(const uint32_t* r, int64_t n, uint32_t thr, float scale, const float* x, float* d,
                             const float* tb, float* xb) {
  const __m512i t = _mm512_set1_epi32(static_cast<int>(thr));
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 in = tail_mask(n - j);
    const __mmask16 keep = _mm512_mask_cmpge_epu32_mask(in, _mm512_maskz_loadu_epi32(in, r + j), t);
    if (Tail) {
      const __m512 v = _mm512_maskz_mul_ps(keep, _mm512_maskz_loadu_ps(in, tb + j), s);
      _mm512_mask_storeu_ps(d + j, in, _mm512_add_ps(_mm512_maskz_loadu_ps(in, d + j), v));
    }
    if (DropX) _mm512_mask_storeu_ps(xb + j, in, _mm512_maskz_mul_ps(keep, _mm512_maskz_loadu_ps(in, x + j), s));
  }
}

}  // namespace avx512
#endif  // FASTLORA_AVX512_KERNELS

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_2d(const at::Tensor& t, const char* op, const char* name, const char* dims) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D ", dims, ", got ", t.dim(), "-D");
  TORCH_CHECK(is_float_type(t.scalar_type()), op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

void check_same_dtype(const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb, const char* op) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", na, " and ", nb, " must share a dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
}

bool rows_have_unit_stride(const at::Tensor& t) {
  return t.size(0) <= 1 || t.size(1) <= 1 || (t.stride(1) == 1 && t.stride(0) >= t.size(1));
}

// Rows of unit stride are read in place (a reshape of the caller's tensor usually is); others
// are copied once.
at::Tensor rows_unit_stride(const at::Tensor& t) {
  if (t.size(0) <= 1 || t.size(1) <= 1) return t.contiguous();
  return rows_have_unit_stride(t) ? t : t.contiguous();
}

struct Blocking {
  int64_t rows;    // rows per block
  int64_t blocks;  // number of blocks
  int64_t grain;   // blocks per parallel task at the least
};

Blocking blocking(int64_t M, int64_t K, int64_t block_rows) {
  TORCH_CHECK(block_rows >= 0, "fastlora: block_rows must be >= 0, got ", block_rows);
  const int64_t Kc = std::max<int64_t>(K, 1);
  int64_t rows = block_rows;
  if (rows == 0) {
    rows = std::max<int64_t>(1, kBlockElems / Kc);
    // every thread gets a block when there is enough work for several
    if (M * Kc >= 2 * kMinTaskElems) {
      const int64_t nt = std::max<int>(1, at::get_num_threads());
      rows = std::min(rows, std::max<int64_t>(1, (M + nt - 1) / nt));
    }
  }
  rows = std::max<int64_t>(1, std::min(rows, std::max<int64_t>(M, 1)));
  const int64_t blocks = (M + rows - 1) / rows;
  const int64_t grain = std::max<int64_t>(1, kMinTaskElems / (rows * Kc));
  return {rows, blocks, grain};
}

// The float32 AVX-512 kernels run for float32 operands on CPUs where cpu_avx512().
bool fast_f32(at::ScalarType t) {
#ifdef FASTLORA_AVX512_KERNELS
  return t == at::kFloat && cpu_avx512();
#else
  return false;
#endif
}

// One pass over a block of `rows` rows (logical rows row0 ..) applying the mask drawn once:
//   Tail:  d += where(keep, scalar_t(tb * scale), 0)     (tb: the block's dz @ A)
//   DropX: xb = acc_t(where(keep, scalar_t(x * scale), 0))
// Products are formed in opmath and rounded to x's dtype, as fastlora::dropout; sums as torch
// adds (opmath, rounded). xb may alias tb (each element is read before it is written).
// Row strides: x ldx, d ldd, tb and xb K.
template <typename scalar_t, typename acc_t, bool Tail, bool DropX>
void block_pass(int64_t rows, int64_t K, int64_t row0, PhiloxKey key, uint32_t thr, at::opmath_type<scalar_t> scale,
                const scalar_t* x, int64_t ldx, scalar_t* d, int64_t ldd, const scalar_t* tb, acc_t* xb) {
  using opmath_t = at::opmath_type<scalar_t>;
#ifdef FASTLORA_AVX512_KERNELS
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if (cpu_avx512()) {
      for_each_word_rows(row0 * K, rows, K, key, [&](int64_t row, int64_t col, const uint32_t* r, int64_t n) {
        avx512::run_f32<Tail, DropX>(r, n, thr, scale, DropX ? x + row * ldx + col : nullptr,
                                     Tail ? d + row * ldd + col : nullptr, Tail ? tb + row * K + col : nullptr,
                                     DropX ? xb + row * K + col : nullptr);
      });
      return;
    }
  }
#endif
  for_each_word_rows(row0 * K, rows, K, key, [&](int64_t row, int64_t col, const uint32_t* r, int64_t n) {
    for (int64_t j = 0; j < n; ++j) {
      const bool keep = r[j] >= thr;
      const int64_t i = row * K + col + j;
      if constexpr (Tail) {
        scalar_t& o = d[row * ldd + col + j];
        const auto v = keep_or_zero(static_cast<scalar_t>(static_cast<opmath_t>(tb[i]) * scale), keep);
        o = static_cast<scalar_t>(static_cast<opmath_t>(o) + static_cast<opmath_t>(v));
      }
      if constexpr (DropX) {
        const auto v = static_cast<scalar_t>(static_cast<opmath_t>(x[row * ldx + col + j]) * scale);
        xb[i] = keep_or_zero(static_cast<acc_t>(v), keep);
      }
    }
  });
}

// The dropout factor in the compute type: 1/(1-p) computed in double, rounded to opmath.
template <typename opmath_t>
opmath_t dropout_scale(double p) {
  return static_cast<opmath_t>(1.0 / (1.0 - p));
}

// A^T packed for avx512::shrink: [ceil(r/16)][K][16], zero padded past r.
// (float32; plain loops: these small copies run on every call, where a chain of ATen ops costs
// more than the copy.) scale multiplies the packed values; A may have any strides.
at::Tensor pack_At(const at::Tensor& A, float scale = 1.0f) {
  const int64_t r = A.size(0), K = A.size(1), chunks = (r + 15) / 16;
  at::Tensor out = at::empty({chunks, K, 16}, A.options().memory_format(at::MemoryFormat::Contiguous));
  const float* a = A.const_data_ptr<float>();
  const int64_t s0 = A.stride(0), s1 = A.stride(1);
  float* o = out.mutable_data_ptr<float>();
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t l = 0; l < 16; ++l) {
        const int64_t j = 16 * c + l;
        o[(c * K + k) * 16 + l] = j < r ? scale * a[j * s0 + k * s1] : 0.0f;
      }
  return out;
}

// scale * B^T as a contiguous (r, N) float32 tensor, for B (N, r) of any strides.
at::Tensor scaled_transpose(const at::Tensor& B, float scale) {
  const int64_t N = B.size(0), r = B.size(1);
  at::Tensor out = at::empty({r, N}, B.options().memory_format(at::MemoryFormat::Contiguous));
  const float* b = B.const_data_ptr<float>();
  const int64_t s0 = B.stride(0), s1 = B.stride(1);
  float* o = out.mutable_data_ptr<float>();
  for (int64_t j = 0; j < r; ++j)
    for (int64_t n = 0; n < N; ++n) o[j * N + n] = scale * b[n * s0 + j * s1];
  return out;
}

// The float32 kernels behind fast_f32, as templates so that the dispatch lambdas compile them
// for float only; each returns false (nothing done) for other types or CPUs.
template <typename T>
bool kernel_shrink(bool fast, const T* x, int64_t ldx, const at::Tensor& Ap, int64_t K, int64_t r, T* z, int64_t rows) {
#ifdef FASTLORA_AVX512_KERNELS
  if constexpr (std::is_same_v<T, float>) {
    if (fast) {
      avx512::shrink(x, ldx, Ap.const_data_ptr<float>(), K, r, z, r, rows);
      return true;
    }
  }
#endif
  return false;
}

template <typename T>
bool kernel_tail(bool fast, bool accumulate, const T* dz, const at::Tensor& A, int64_t K, int64_t r, T* t, int64_t ldt,
                 int64_t rows) {
#ifdef FASTLORA_AVX512_KERNELS
  if constexpr (std::is_same_v<T, float>) {
    if (fast) {
      if (accumulate) {
        avx512::tail<avx512::kInitLoad>(dz, r, A.const_data_ptr<float>(), K, r, t, ldt, rows, nullptr);
      } else {
        avx512::tail<avx512::kInitZero>(dz, r, A.const_data_ptr<float>(), K, r, t, ldt, rows, nullptr);
      }
      return true;
    }
  }
#endif
  return false;
}

template <typename T>
bool kernel_dA(bool fast, const T* dz, const T* xd, int64_t ldxd, T* P, int64_t r, int64_t K, int64_t rows) {
#ifdef FASTLORA_AVX512_KERNELS
  if constexpr (std::is_same_v<T, float>) {
    if (fast) {
      avx512::dA(dz, r, xd, ldxd, P, r, K, rows);
      return true;
    }
  }
#endif
  return false;
}

// y (rows x N, row stride N) = [bias +] z @ Bt for float32 on AVX-512 (only called there).
void kernel_expand(const float* z, int64_t r, const float* Bt, int64_t N, float* y, int64_t rows, const float* bias) {
#ifdef FASTLORA_AVX512_KERNELS
  if (bias != nullptr) {
    avx512::tail<avx512::kInitBias>(z, r, Bt, N, r, y, N, rows, bias);
  } else {
    avx512::tail<avx512::kInitZero>(z, r, Bt, N, r, y, N, rows, nullptr);
  }
#else
  TORCH_CHECK(false, "fastlora: kernel_expand without the AVX-512 kernels");
#endif
}

// ---------------------------------------------------------------------------------- shrink

at::Tensor dropout_shrink(const at::Tensor& x_in, const at::Tensor& A_in, double p, int64_t seed, int64_t row_offset,
                          int64_t block_rows) {
  constexpr const char* op = "fastlora::dropout_shrink";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the inner ATen calls
  check_2d(x_in, op, "x", "(M, K)");
  check_2d(A_in, op, "A", "(r, K)");
  check_same_dtype(x_in, "x", A_in, "A", op);
  const int64_t M = x_in.size(0), K = x_in.size(1), r = A_in.size(0);
  TORCH_CHECK(A_in.size(1) == K, op, ": A must be (r, K) with K = x.size(1) = ", K, ", got ", A_in.sizes());
  check_dropout_args(M, K, p, seed, row_offset);
  const at::Tensor x = rows_unit_stride(x_in);
  const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor z = at::empty({M, r}, opts);
  if (M == 0 || r == 0) return z;
  if (K == 0) return z.zero_();
  const bool fast = fast_f32(x.scalar_type());
  const at::Tensor At = fast ? pack_At(A_in) : A_in.t();
  const Blocking b = blocking(M, K, block_rows);
  const uint32_t thr = dropout_threshold(p);
  const PhiloxKey key(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastlora_dropout_shrink", [&] {
    const auto scale = dropout_scale<at::opmath_type<scalar_t>>(p);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t ldx = x.stride(0);
    at::parallel_for(0, b.blocks, b.grain, [&](int64_t b0, int64_t b1) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd_here;  // TLS: per worker thread
      at::Tensor buf;
      if (p > 0.0) buf = at::empty({b.rows, K}, opts);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t m0 = blk * b.rows, n = std::min(b.rows, M - m0);
        const scalar_t* src = xp + m0 * ldx;
        int64_t ld = ldx;
        if (p > 0.0) {
          scalar_t* bp = buf.mutable_data_ptr<scalar_t>();
          block_pass<scalar_t, scalar_t, false, true>(n, K, row_offset + m0, key, thr, scale, src, ldx, nullptr, 0,
                                                        nullptr, bp);
          src = bp;
          ld = K;
        }
        if (kernel_shrink<scalar_t>(fast, src, ld, At, K, r, z.mutable_data_ptr<scalar_t>() + m0 * r, n)) continue;
        at::Tensor zb = z.narrow(0, m0, n);
        at::mm_out(zb, p > 0.0 ? buf.narrow(0, 0, n) : x.narrow(0, m0, n), At);
      }
    });
  });
  return z;
}

// ------------------------------------------------------------------ dA and the dx tail

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_dz(const at::Tensor& dz, int64_t M, int64_t r_expected, const char* op) {
  check_2d(dz, op, "dz", "(M, r)");
  TORCH_CHECK(dz.size(0) == M, op, ": dz must have M = ", M, " rows, got ", dz.sizes());
  if (r_expected >= 0)
    TORCH_CHECK(dz.size(1) == r_expected, op, ": dz must be (M, r) with r = ", r_expected, ", got ", dz.sizes());
}

// The shared body of the dA / tail ops. Over row blocks, with each block's mask drawn once:
//   want_dA: returns dA = dz^T @ dropout(x) (fp32 partials per chunk of blocks, fp64 for fp64,
//            summed in chunk order: deterministic for a thread count; in x's dtype);
//   tail:    dx += dropout(dz @ A).
at::Tensor dA_and_tail(const at::Tensor& dz_in, const at::Tensor& x_in, const at::Tensor& dx, const at::Tensor& A_in,
                       bool want_dA, bool tail, double p, int64_t seed, int64_t row_offset, int64_t block_rows) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the inner ATen calls
  const at::Tensor& ref = want_dA ? x_in : dx;
  const int64_t M = ref.size(0), K = ref.size(1), r = dz_in.size(1);
  const auto dtype = ref.scalar_type();
  const auto acc = acc_type(dtype);
  const bool same = acc == dtype;
  const bool fast = fast_f32(dtype);
  const auto opts = ref.options().memory_format(at::MemoryFormat::Contiguous);
  if (M == 0 || K == 0 || r == 0) return want_dA ? at::zeros({r, K}, opts) : at::Tensor();
  const at::Tensor x = want_dA ? rows_unit_stride(x_in) : at::Tensor();
  const at::Tensor dz = dz_in.contiguous();
  // dz in the accumulation type (M x r: small) so that the dA products run in it
  const at::Tensor dz_acc = !want_dA || same ? dz : dz.to(acc);
  const at::Tensor A = tail ? A_in.contiguous() : at::Tensor();
  const auto acc_opts = opts.dtype(acc);
  const Blocking b = blocking(M, K, block_rows);
  const int64_t nthreads = std::max<int>(1, at::get_num_threads());
  const int64_t chunks = std::max<int64_t>(1, std::min(nthreads, b.blocks / b.grain));
  at::Tensor partials = want_dA ? at::zeros({chunks, r, K}, acc_opts) : at::Tensor();
  const uint32_t thr = dropout_threshold(p);
  const PhiloxKey key(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastlora_dropout_dA_tail", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto scale = dropout_scale<at::opmath_type<scalar_t>>(p);
    const scalar_t* xp = want_dA ? x.const_data_ptr<scalar_t>() : nullptr;
    const int64_t ldx = want_dA ? x.stride(0) : 0;
    scalar_t* dxp = tail ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t lddx = tail ? dx.stride(0) : 0;
    const scalar_t* dzp = dz.const_data_ptr<scalar_t>();
    const acc_t* dzap = want_dA ? dz_acc.const_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd_here;  // TLS: per worker thread
      // tbuf: the block's dz @ A; xbuf: the block's dropout(x) in acc_t (one buffer when both
      // are float or double: xb overwrites tb element by element)
      at::Tensor tbuf, xbuf;
      if (tail && p > 0.0) tbuf = at::empty({b.rows, K}, opts);
      // (with p == 0 the float32 kernel still reads a copy: walking 16-column chunks down the
      // rows of x in place, from L3, runs at a third of the speed of the L2-resident copy)
      if (want_dA && (p > 0.0 || !same || fast))
        xbuf = same && tbuf.defined() ? tbuf : at::empty({b.rows, K}, acc_opts);
      scalar_t* tb = tbuf.defined() ? tbuf.mutable_data_ptr<scalar_t>() : nullptr;
      acc_t* xb = xbuf.defined() ? xbuf.mutable_data_ptr<acc_t>() : nullptr;
      for (int64_t c = c0; c < c1; ++c) {
        at::Tensor P = want_dA ? partials[c] : at::Tensor();
        const int64_t blk_begin = c * b.blocks / chunks, blk_end = (c + 1) * b.blocks / chunks;
        for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
          const int64_t m0 = blk * b.rows, n = std::min(b.rows, M - m0), row0 = row_offset + m0;
          scalar_t* d = tail ? dxp + m0 * lddx : nullptr;
          const scalar_t* xs = want_dA ? xp + m0 * ldx : nullptr;
          // 1. the tail product dz_blk @ A: into tb, or (p == 0) added to dx's rows directly
          if (tail) {
            const bool add = p == 0.0;
            if (!kernel_tail<scalar_t>(fast, add, dzp + m0 * r, A, K, r, add ? d : tb, add ? lddx : K, n)) {
              if (add) {
                dx.narrow(0, m0, n).addmm_(dz.narrow(0, m0, n), A);
              } else {
                at::Tensor tbn = tbuf.narrow(0, 0, n);
                at::mm_out(tbn, dz.narrow(0, m0, n), A);
              }
            }
          }
          // 2. one pass drawing the block's mask: the masked tail into dx, dropout(x) into xb
          if (p > 0.0) {
            if (tail && want_dA) {
              block_pass<scalar_t, acc_t, true, true>(n, K, row0, key, thr, scale, xs, ldx, d, lddx, tb, xb);
            } else if (tail) {
              block_pass<scalar_t, acc_t, true, false>(n, K, row0, key, thr, scale, xs, ldx, d, lddx, tb, xb);
            } else {
              block_pass<scalar_t, acc_t, false, true>(n, K, row0, key, thr, scale, xs, ldx, d, lddx, tb, xb);
            }
          } else if (xb != nullptr) {
            xbuf.narrow(0, 0, n).copy_(x.narrow(0, m0, n));
          }
          if (!want_dA) continue;
          // 3. the chunk's dA partial += dz_blk^T @ xd_blk (xd: x itself when p == 0 and no copy)
          const acc_t* xd = xb != nullptr ? xb : reinterpret_cast<const acc_t*>(xs);
          if (kernel_dA<acc_t>(fast, dzap + m0 * r, xd, xb != nullptr ? K : ldx, P.mutable_data_ptr<acc_t>(), r, K, n))
            continue;
          P.addmm_(dz_acc.narrow(0, m0, n).t(), xb != nullptr ? xbuf.narrow(0, 0, n) : x.narrow(0, m0, n));
        }
      }
    });
  });
  if (!want_dA) return at::Tensor();
  at::Tensor dA = chunks == 1 ? partials.view({r, K}) : partials[0].clone();
  for (int64_t c = 1; c < chunks; ++c) dA.add_(partials[c]);
  return dA.scalar_type() == dtype ? dA : dA.to(dtype);
}

at::Tensor dropout_dA(const at::Tensor& dz, const at::Tensor& x, double p, int64_t seed, int64_t row_offset,
                      int64_t block_rows) {
  constexpr const char* op = "fastlora::dropout_dA";
  check_2d(x, op, "x", "(M, K)");
  check_dz(dz, x.size(0), -1, op);
  check_same_dtype(dz, "dz", x, "x", op);
  check_dropout_args(x.size(0), x.size(1), p, seed, row_offset);
  return dA_and_tail(dz, x, at::Tensor(), at::Tensor(), true, false, p, seed, row_offset, block_rows);
}

void check_tail_args(const at::Tensor& dx, const at::Tensor& dz, const at::Tensor& A, const char* op) {
  check_2d(dx, op, "dx", "(M, K)");
  TORCH_CHECK(rows_have_unit_stride(dx), op,
              ": dx must have rows of unit stride (it is written in place), got strides ", dx.strides());
  check_2d(A, op, "A", "(r, K)");
  check_dz(dz, dx.size(0), A.size(0), op);
  TORCH_CHECK(A.size(1) == dx.size(1), op, ": A must be (r, K) with K = dx.size(1) = ", dx.size(1), ", got ",
              A.sizes());
  check_same_dtype(dx, "dx", dz, "dz", op);
  check_same_dtype(dx, "dx", A, "A", op);
}

void check_x_like_dx(const at::Tensor& x, const at::Tensor& dx, const char* op) {
  check_2d(x, op, "x", "(M, K)");
  TORCH_CHECK(x.sizes() == dx.sizes(), op, ": x and dx must have the same shape (M, K), got ", x.sizes(), " and ",
              dx.sizes());
  check_same_dtype(dx, "dx", x, "x", op);
}

void dropout_tail_add_(at::Tensor dx, const at::Tensor& dz, const at::Tensor& A, double p, int64_t seed,
                       int64_t row_offset, int64_t block_rows) {
  constexpr const char* op = "fastlora::dropout_tail_add_";
  check_tail_args(dx, dz, A, op);
  check_dropout_args(dx.size(0), dx.size(1), p, seed, row_offset);
  dA_and_tail(dz, at::Tensor(), dx, A, false, true, p, seed, row_offset, block_rows);
}

at::Tensor dropout_dA_tail_add_(at::Tensor dx, const at::Tensor& dz, const at::Tensor& x, const at::Tensor& A,
                                double p, int64_t seed, int64_t row_offset, int64_t block_rows) {
  constexpr const char* op = "fastlora::dropout_dA_tail_add_";
  check_tail_args(dx, dz, A, op);
  check_x_like_dx(x, dx, op);
  check_dropout_args(x.size(0), x.size(1), p, seed, row_offset);
  return dA_and_tail(dz, x, dx, A, true, true, p, seed, row_offset, block_rows);
}

// ------------------------------------------- the other rank-r products (no dropout)
// The forward's y = scale * z @ B^T + bias (before the base GEMM adds x @ W^T into y) and the
// backward's dz = scale * g @ B, dB = scale * g^T @ z (one pass over g). MKL runs these skinny
// products at a fraction of its speed on the base GEMM, and erratically (2048 x 1024 by 1024 x
// 8: 5 ms for g^T @ z, 0.5 ms for the same product as (z^T @ g)^T); the float32 kernels above run
// them near the FMA peak. Other dtypes and CPUs: the plain ATen calls.

at::Tensor lora_expand(const at::Tensor& z_in, const at::Tensor& B_in, const std::optional<at::Tensor>& bias_in,
                       double scale, int64_t block_rows) {
  constexpr const char* op = "fastlora::lora_expand";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_2d(z_in, op, "z", "(M, r)");
  check_2d(B_in, op, "B", "(N, r)");
  check_same_dtype(z_in, "z", B_in, "B", op);
  const int64_t M = z_in.size(0), r = z_in.size(1), N = B_in.size(0);
  TORCH_CHECK(B_in.size(1) == r, op, ": B must be (N, r) with r = z.size(1) = ", r, ", got ", B_in.sizes());
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  if (has_bias) {
    const at::Tensor& bias = *bias_in;
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == N, op, ": bias must be (N,) with N = ", N, ", got ", bias.sizes());
    check_same_dtype(z_in, "z", bias, "bias", op);
  }
  if (!fast_f32(z_in.scalar_type()) || M == 0 || N == 0) {
    // as the torch backend: scale the (M, r) factor, not the (M, N) product
    return has_bias ? at::addmm(*bias_in, z_in, B_in.t(), 1.0, scale)
                    : at::mm(scale == 1.0 ? z_in : z_in * scale, B_in.t());
  }
  const at::Tensor z = z_in.contiguous();
  const at::Tensor Bt = scaled_transpose(B_in, static_cast<float>(scale));  // scale folded into the small factor
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, z.options().memory_format(at::MemoryFormat::Contiguous));
  const Blocking b = blocking(M, N, block_rows);
  const float* zp = z.const_data_ptr<float>();
  const float* bp = Bt.const_data_ptr<float>();
  const float* biasp = has_bias ? bias.const_data_ptr<float>() : nullptr;
  float* yp = y.mutable_data_ptr<float>();
  at::parallel_for(0, b.blocks, b.grain, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * b.rows, n = std::min(b.rows, M - m0);
      if (has_bias) {
        kernel_expand(zp + m0 * r, r, bp, N, yp + m0 * N, n, biasp);
      } else {
        kernel_expand(zp + m0 * r, r, bp, N, yp + m0 * N, n, nullptr);
      }
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> lora_gpass(const at::Tensor& g_in, const at::Tensor& B_in,
                                              const std::optional<at::Tensor>& z_in, double scale,
                                              int64_t block_rows) {
  constexpr const char* op = "fastlora::lora_gpass";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_2d(g_in, op, "g", "(M, N)");
  check_2d(B_in, op, "B", "(N, r)");
  check_same_dtype(g_in, "g", B_in, "B", op);
  const int64_t M = g_in.size(0), N = g_in.size(1), r = B_in.size(1);
  TORCH_CHECK(B_in.size(0) == N, op, ": B must be (N, r) with N = g.size(1) = ", N, ", got ", B_in.sizes());
  const bool want_dB = z_in.has_value() && z_in->defined();
  if (want_dB) {
    check_2d(*z_in, op, "z", "(M, r)");
    check_same_dtype(g_in, "g", *z_in, "z", op);
    TORCH_CHECK(z_in->size(0) == M && z_in->size(1) == r, op, ": z must be (M, r) = (", M, ", ", r, "), got ",
                z_in->sizes());
  }
  const auto opts = g_in.options().memory_format(at::MemoryFormat::Contiguous);
  if (!fast_f32(g_in.scalar_type()) || M == 0 || N == 0 || r == 0) {
    at::Tensor dz = at::mm(g_in, B_in).mul_(scale);
    at::Tensor dB = want_dB ? at::mm(g_in.t(), *z_in).mul_(scale) : at::empty({0}, opts);
    return {dz, dB};
  }
  const at::Tensor g = rows_unit_stride(g_in);
  const at::Tensor Bp = pack_At(B_in.t(), static_cast<float>(scale));  // dz = g @ (scale B): shrink's A^T
  const at::Tensor z = want_dB ? z_in->contiguous() : at::Tensor();
  at::Tensor dz = at::empty({M, r}, opts);
  const Blocking b = blocking(M, N, block_rows);
  const int64_t nthreads = std::max<int>(1, at::get_num_threads());
  const int64_t chunks = std::max<int64_t>(1, std::min(nthreads, b.blocks / b.grain));
  // dB^T partials (r x N) per chunk of blocks, summed in chunk order
  at::Tensor partials = want_dB ? at::empty({chunks, r, N}, opts) : at::Tensor();
  const float* gp = g.const_data_ptr<float>();
  const int64_t ldg = g.stride(0);
  float* dzp = dz.mutable_data_ptr<float>();
  const float* zp = want_dB ? z.const_data_ptr<float>() : nullptr;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float* P = want_dB ? partials.mutable_data_ptr<float>() + c * r * N : nullptr;
      if (want_dB) std::fill(P, P + r * N, 0.0f);
      for (int64_t blk = c * b.blocks / chunks; blk < (c + 1) * b.blocks / chunks; ++blk) {
        const int64_t m0 = blk * b.rows, n = std::min(b.rows, M - m0);
        kernel_shrink<float>(true, gp + m0 * ldg, ldg, Bp, N, r, dzp + m0 * r, n);
        if (want_dB) kernel_dA<float>(true, zp + m0 * r, gp + m0 * ldg, ldg, P, r, N, n);
      }
    }
  });
  if (!want_dB) return {dz, at::empty({0}, opts)};
  // dB[n, j] = scale * sum_c partials[c, j, n], the chunks added in order
  at::Tensor dB = at::empty({N, r}, opts);
  const float* pp = partials.const_data_ptr<float>();
  float* dBp = dB.mutable_data_ptr<float>();
  const auto s = static_cast<float>(scale);
  for (int64_t j = 0; j < r; ++j)
    for (int64_t n = 0; n < N; ++n) {
      float acc = pp[j * N + n];
      for (int64_t c = 1; c < chunks; ++c) acc += pp[(c * r + j) * N + n];
      dBp[n * r + j] = s * acc;
    }
  return {dz, dB};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlora, m) {
  m.def("dropout_shrink(Tensor x, Tensor A, float p, int seed, int row_offset=0, int block_rows=0) -> Tensor");
  m.def("dropout_dA(Tensor dz, Tensor x, float p, int seed, int row_offset=0, int block_rows=0) -> Tensor");
  // In-place ops return nothing, or only new tensors: functionalization (torch.compile)
  // rejects custom ops whose outputs alias an input.
  m.def(
      "dropout_tail_add_(Tensor(a!) dx, Tensor dz, Tensor A, float p, int seed, int row_offset=0, "
      "int block_rows=0) -> ()");
  m.def(
      "dropout_dA_tail_add_(Tensor(a!) dx, Tensor dz, Tensor x, Tensor A, float p, int seed, int row_offset=0, "
      "int block_rows=0) -> Tensor");
  // y = scale * z @ B^T + bias;  (dz, dB) = (scale * g @ B, scale * g^T @ z), dB empty without z
  m.def("lora_expand(Tensor z, Tensor B, Tensor? bias, float scale, int block_rows=0) -> Tensor");
  m.def("lora_gpass(Tensor g, Tensor B, Tensor? z, float scale, int block_rows=0) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("dropout_shrink", &dropout_shrink);
  m.impl("dropout_dA", &dropout_dA);
  m.impl("dropout_tail_add_", &dropout_tail_add_);
  m.impl("dropout_dA_tail_add_", &dropout_dA_tail_add_);
  m.impl("lora_expand", &lora_expand);
  m.impl("lora_gpass", &lora_gpass);
}

}  // namespace fastlora
