// CPU ops of the seeded dropout generator (definition: fastlora/_philox.py) and the one
// TORCH_LIBRARY block of the fastlora namespace; Python adds further ops as FRAGMENTs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <ATen/Version.h>

#include "philox_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace fastlora {

// philox_batch (declared in philox_cpu.h): the same Philox4x32-10 as philox.h on kPhiloxBatch
// consecutive counters. The build targets baseline x86-64 (SSE2), where gcc vectorizes the plain
// loops below; on CPUs with AVX-512 the hand-written version runs them 3.5x faster (gcc's own
// AVX-512 code of the loops widens to 64-bit multiplies, vpmullq, and is only 2x faster; its
// AVX2 code is slower than SSE2's).
namespace {

void philox_batch_generic(uint64_t c, uint32_t k0, uint32_t k1, uint32_t* __restrict__ r) {
  // Rounds outermost so each inner loop is a plain lane-wise loop over uint32 arrays.
  constexpr int64_t kBatch = kPhiloxBatch;
  alignas(64) uint32_t x0[kBatch], x1[kBatch], x2[kBatch], x3[kBatch];
  for (int64_t i = 0; i < kBatch; ++i) {
    x0[i] = static_cast<uint32_t>(c + i);
    x1[i] = static_cast<uint32_t>((c + i) >> 32);
    x2[i] = 0;
    x3[i] = 0;
  }
  for (int round = 0; round < kPhiloxRounds; ++round) {
    for (int64_t i = 0; i < kBatch; ++i) philox_round(x0[i], x1[i], x2[i], x3[i], k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int64_t i = 0; i < kBatch; ++i) {
    r[4 * i] = x0[i];
    r[4 * i + 1] = x1[i];
    r[4 * i + 2] = x2[i];
    r[4 * i + 3] = x3[i];
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTLORA_AVX512_PHILOX 1

// 16 counters per register, 4 registers per state word. A round: the 32x32->64 products of the
// even and odd lanes (vpmuludq), their high halves gathered with one permute, the low halves
// with vpmulld, the XORs with one ternary-logic op each.
__attribute__((target("avx512f"))) void philox_batch_avx512(uint64_t c, uint32_t k0, uint32_t k1,
                                                            uint32_t* __restrict__ r) {
  static_assert(kPhiloxBatch == 64, "philox_batch_avx512 holds 64 counters in 4 x 16 lanes");
  constexpr int V = 4;
  __m512i x0[V], x1[V], x2[V], x3[V];
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int v = 0; v < V; ++v) {
    // counter c + 16v + lane as (low, high) words; the high word carries where the low wraps
    const uint64_t base = c + 16 * v;
    const __m512i blo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base)));
    const __m512i bhi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32)));
    x0[v] = _mm512_add_epi32(blo, iota);
    x1[v] = _mm512_mask_add_epi32(bhi, _mm512_cmplt_epu32_mask(x0[v], blo), bhi, _mm512_set1_epi32(1));
    x2[v] = _mm512_setzero_si512();
    x3[v] = _mm512_setzero_si512();
  }
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  // dword i of the result: odd dword (the high half) of product i, from the even-lane products
  // (first operand) for even i and the odd-lane products (second operand) for odd i
  const __m512i hi_idx = _mm512_setr_epi32(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const __m512i kk0 = _mm512_set1_epi32(static_cast<int>(k0));
    const __m512i kk1 = _mm512_set1_epi32(static_cast<int>(k1));
    for (int v = 0; v < V; ++v) {
      const __m512i pe0 = _mm512_mul_epu32(x0[v], m0);
      const __m512i po0 = _mm512_mul_epu32(_mm512_srli_epi64(x0[v], 32), m0);
      const __m512i pe1 = _mm512_mul_epu32(x2[v], m1);
      const __m512i po1 = _mm512_mul_epu32(_mm512_srli_epi64(x2[v], 32), m1);
      const __m512i hi0 = _mm512_permutex2var_epi32(pe0, hi_idx, po0);
      const __m512i hi1 = _mm512_permutex2var_epi32(pe1, hi_idx, po1);
      const __m512i lo0 = _mm512_mullo_epi32(x0[v], m0);
      const __m512i lo1 = _mm512_mullo_epi32(x2[v], m1);
      x0[v] = _mm512_ternarylogic_epi32(hi1, x1[v], kk0, 0x96);  // hi1 ^ c1 ^ k0
      x2[v] = _mm512_ternarylogic_epi32(hi0, x3[v], kk1, 0x96);  // hi0 ^ c3 ^ k1
      x1[v] = lo1;
      x3[v] = lo0;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  // r[4 * i + j] = word j of counter i: a 4x4 transpose per 128-bit lane, then lanes reordered
  for (int v = 0; v < V; ++v) {
    const __m512i a = _mm512_unpacklo_epi32(x0[v], x1[v]);
    const __m512i b = _mm512_unpackhi_epi32(x0[v], x1[v]);
    const __m512i cc = _mm512_unpacklo_epi32(x2[v], x3[v]);
    const __m512i d = _mm512_unpackhi_epi32(x2[v], x3[v]);
    // e_k, 128-bit lane L: the 4 words of counter 4L + k
    const __m512i e0 = _mm512_unpacklo_epi64(a, cc);
    const __m512i e1 = _mm512_unpackhi_epi64(a, cc);
    const __m512i e2 = _mm512_unpacklo_epi64(b, d);
    const __m512i e3 = _mm512_unpackhi_epi64(b, d);
    const __m512i f0 = _mm512_shuffle_i32x4(e0, e1, 0x44);  // e0.L0 e0.L1 e1.L0 e1.L1
    const __m512i f1 = _mm512_shuffle_i32x4(e2, e3, 0x44);  // e2.L0 e2.L1 e3.L0 e3.L1
    const __m512i f2 = _mm512_shuffle_i32x4(e0, e1, 0xEE);  // e0.L2 e0.L3 e1.L2 e1.L3
    const __m512i f3 = _mm512_shuffle_i32x4(e2, e3, 0xEE);  // e2.L2 e2.L3 e3.L2 e3.L3
    uint32_t* out = r + 64 * v;
    _mm512_storeu_si512(out, _mm512_shuffle_i32x4(f0, f1, 0x88));       // counters 0-3
    _mm512_storeu_si512(out + 16, _mm512_shuffle_i32x4(f0, f1, 0xDD));  // counters 4-7
    _mm512_storeu_si512(out + 32, _mm512_shuffle_i32x4(f2, f3, 0x88));  // counters 8-11
    _mm512_storeu_si512(out + 48, _mm512_shuffle_i32x4(f2, f3, 0xDD));  // counters 12-15
  }
}
#endif

using PhiloxBatchFn = void (*)(uint64_t, uint32_t, uint32_t, uint32_t* __restrict__);

PhiloxBatchFn pick_philox_batch() {
#ifdef FASTLORA_AVX512_PHILOX
  if (cpu_avx512()) return &philox_batch_avx512;
#endif
  return &philox_batch_generic;
}

}  // namespace

// Declared in philox_cpu.h. Hand-written AVX-512 code runs where torch itself runs its AVX-512
// kernels, so ATEN_CPU_CAPABILITY=default (or avx2) selects the portable code, e.g. to test it.
bool cpu_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool yes = __builtin_cpu_supports("avx512f") && at::get_cpu_capability() == "AVX512";
  return yes;
#else
  return false;
#endif
}

void philox_batch(uint64_t c, uint32_t k0, uint32_t k1, uint32_t* __restrict__ r) {
  static const PhiloxBatchFn fn = pick_philox_batch();
  fn(c, k0, k1, r);
}

namespace {

// Counters per parallel_for task: 16K elements, so small tensors stay on one thread.
constexpr int64_t kGrain = 4096;

void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (M, K), got ", x.dim(), "-D");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": x must be float32, float64, float16 or bfloat16, got ", t);
}

at::Tensor dropout_mask(int64_t M, int64_t K, double p, int64_t seed, int64_t row_offset) {
  check_dropout_args(M, K, p, seed, row_offset);
  auto mask = at::empty({M, K}, at::TensorOptions().dtype(at::kBool));
  bool* out = mask.data_ptr<bool>();
  const uint32_t t = dropout_threshold(p);
  for_each_word(row_offset * K, M * K, seed, kGrain, [&](int64_t i, const uint32_t* r, int64_t n) {
    for (int64_t j = 0; j < n; ++j) out[i + j] = r[j] >= t;
  });
  return mask;
}

// out = where(keep, x * scale, 0), multiplied in opmath (fp32 for half/bf16); out may alias x.
void dropout_into(const at::Tensor& x, at::Tensor& out, double p, int64_t seed, int64_t row_offset) {
  const uint32_t t = dropout_threshold(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastlora_dropout", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto scale = static_cast<opmath_t>(1.0 / (1.0 - p));
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for_each_word(row_offset * x.size(1), x.numel(), seed, kGrain, [&](int64_t i, const uint32_t* r, int64_t n) {
      for (int64_t j = 0; j < n; ++j)
        o[i + j] = keep_or_zero(static_cast<scalar_t>(static_cast<opmath_t>(in[i + j]) * scale), r[j] >= t);
    });
  });
}

at::Tensor dropout(const at::Tensor& x, double p, int64_t seed, int64_t row_offset) {
  check_input(x, "fastlora::dropout");
  check_dropout_args(x.size(0), x.size(1), p, seed, row_offset);
  const auto xc = x.contiguous();
  auto out = at::empty_like(xc, at::MemoryFormat::Contiguous);
  dropout_into(xc, out, p, seed, row_offset);
  return out;
}

void dropout_(at::Tensor x, double p, int64_t seed, int64_t row_offset) {
  check_input(x, "fastlora::dropout_");
  TORCH_CHECK(x.is_contiguous(), "fastlora::dropout_: x must be contiguous");
  check_dropout_args(x.size(0), x.size(1), p, seed, row_offset);
  if (p > 0.0) dropout_into(x, x, p, seed, row_offset);
}

}  // namespace

TORCH_LIBRARY(fastlora, m) {
  m.def("dropout_mask(int M, int K, float p, int seed, int row_offset=0) -> Tensor");
  m.def("dropout(Tensor x, float p, int seed, int row_offset=0) -> Tensor");
  // Returns nothing: functionalization (torch.compile) rejects custom ops whose outputs
  // alias an input, so the in-place op cannot return x.
  m.def("dropout_(Tensor(a!) x, float p, int seed, int row_offset=0) -> ()");
}

// dropout_mask takes no tensor, so no backend key selects a kernel: register it for all
// backends. CompositeExplicitAutograd (unlike CompositeImplicitAutograd) still lets
// fastlora/_ext.py add the fake impl that torch.compile traces with.
TORCH_LIBRARY_IMPL(fastlora, CompositeExplicitAutograd, m) { m.impl("dropout_mask", &dropout_mask); }

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("dropout", &dropout);
  m.impl("dropout_", &dropout_);
}

}  // namespace fastlora

// Importing fastlora._C runs the registrations above; the module itself exports nothing.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
