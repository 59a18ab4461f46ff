// CPU ops of the seeded dropout generator (definition: fastlora/_philox.py) and the one
// TORCH_LIBRARY block of the fastlora namespace; Python adds further ops as FRAGMENTs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "philox.h"

namespace fastlora {
namespace {

// Counters per Philox batch: 4 x 64 words of state stay in L1 and give the vectorizer a
// fixed trip count.
constexpr int64_t kBatch = 64;
// Counters per parallel_for task: 16K elements, so small tensors stay on one thread.
constexpr int64_t kGrain = 4096;

// The build targets baseline x86-64 (SSE2); an AVX-512 clone, picked at load time, runs the
// Philox rounds 2.2x faster where the CPU has it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTLORA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define FASTLORA_CPU_CLONES
#endif

// r[4*i + j] = word j of philox(counter c + i). Rounds outermost so each inner loop is a
// plain lane-wise loop over uint32 arrays that gcc -O3 vectorizes.
FASTLORA_CPU_CLONES void philox_batch(uint64_t c, uint32_t k0, uint32_t k1, uint32_t* __restrict__ r) {
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

// Calls body(i, r, n) over the elements [e_begin, e_begin + numel) in contiguous runs: run
// elements are e_begin + i .. e_begin + i + n - 1 and r[j] is the Philox word of element
// e_begin + i + j. Threads split on whole counters, so no two threads touch one group of 4.
template <typename Body>
void for_each_word(int64_t e_begin, int64_t numel, int64_t seed, const Body& body) {
  if (numel == 0) return;
  const auto k0 = static_cast<uint32_t>(seed);
  const auto k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  const int64_t e_end = e_begin + numel;
  at::parallel_for(e_begin >> 2, (e_end + 3) >> 2, kGrain, [&](int64_t cb, int64_t ce) {
    alignas(64) uint32_t r[4 * kBatch];
    for (int64_t c = cb; c < ce; c += kBatch) {
      philox_batch(static_cast<uint64_t>(c), k0, k1, r);
      const int64_t lo = std::max(4 * c, e_begin);
      const int64_t hi = std::min({4 * (c + kBatch), 4 * ce, e_end});
      body(lo - e_begin, r + (lo - 4 * c), hi - lo);
    }
  });
}

void check_args(int64_t M, int64_t K, double p, int64_t seed, int64_t row_offset) {
  TORCH_CHECK(M >= 0 && K >= 0, "fastlora dropout: negative shape (", M, ", ", K, ")");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fastlora dropout: p must be in [0, 1), got ", p);
  TORCH_CHECK(seed >= 0, "fastlora dropout: seed must be in [0, 2**63), got ", seed);
  TORCH_CHECK(row_offset >= 0, "fastlora dropout: row_offset must be >= 0, got ", row_offset);
  int64_t rows = 0, end = 0;
  TORCH_CHECK(!__builtin_add_overflow(row_offset, M, &rows) && !__builtin_mul_overflow(rows, K, &end),
              "fastlora dropout: element offsets (row_offset + M) * K overflow int64");
}

void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (M, K), got ", x.dim(), "-D");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": x must be float32, float64, float16 or bfloat16, got ", t);
}

at::Tensor dropout_mask(int64_t M, int64_t K, double p, int64_t seed, int64_t row_offset) {
  check_args(M, K, p, seed, row_offset);
  auto mask = at::empty({M, K}, at::TensorOptions().dtype(at::kBool));
  bool* out = mask.data_ptr<bool>();
  const uint32_t t = dropout_threshold(p);
  for_each_word(row_offset * K, M * K, seed, [&](int64_t i, const uint32_t* r, int64_t n) {
    for (int64_t j = 0; j < n; ++j) out[i + j] = r[j] >= t;
  });
  return mask;
}

// keep ? v : +0 as a bit mask. A select would stay a branch (under -ftrapping-math gcc will
// not compute the multiply unconditionally), which blocks vectorization.
template <typename T>
T keep_or_zero(T v, bool keep) {
  using Bits =
      std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;
  static_assert(sizeof(Bits) == sizeof(T));
  Bits b;
  std::memcpy(&b, &v, sizeof b);
  b &= -static_cast<Bits>(keep);
  std::memcpy(&v, &b, sizeof b);
  return v;
}

// out = where(keep, x * scale, 0), multiplied in opmath (fp32 for half/bf16); out may alias x.
void dropout_into(const at::Tensor& x, at::Tensor& out, double p, int64_t seed, int64_t row_offset) {
  const uint32_t t = dropout_threshold(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastlora_dropout", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto scale = static_cast<opmath_t>(1.0 / (1.0 - p));
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for_each_word(row_offset * x.size(1), x.numel(), seed, [&](int64_t i, const uint32_t* r, int64_t n) {
      for (int64_t j = 0; j < n; ++j)
        o[i + j] = keep_or_zero(static_cast<scalar_t>(static_cast<opmath_t>(in[i + j]) * scale), r[j] >= t);
    });
  });
}

at::Tensor dropout(const at::Tensor& x, double p, int64_t seed, int64_t row_offset) {
  check_input(x, "fastlora::dropout");
  check_args(x.size(0), x.size(1), p, seed, row_offset);
  const auto xc = x.contiguous();
  auto out = at::empty_like(xc, at::MemoryFormat::Contiguous);
  dropout_into(xc, out, p, seed, row_offset);
  return out;
}

void dropout_(at::Tensor x, double p, int64_t seed, int64_t row_offset) {
  check_input(x, "fastlora::dropout_");
  TORCH_CHECK(x.is_contiguous(), "fastlora::dropout_: x must be contiguous");
  check_args(x.size(0), x.size(1), p, seed, row_offset);
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
