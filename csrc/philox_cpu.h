// CPU building blocks of the seeded dropout generator (definition: fastlora/_philox.py), shared
// by the C++ ops: csrc/philox_dropout.cpp (dropout, mask) and csrc/lora_cpu.cpp (fused LoRA
// ops that never materialise dropout(x)). Not for CUDA sources (csrc/philox.h is).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "philox.h"

namespace fastlora {

// Counters per Philox batch: 4 x 64 words of state stay in L1 and give the vectorizer a
// fixed trip count.
constexpr int64_t kPhiloxBatch = 64;

// r[4*i + j] = word j of philox(counter c + i), i < kPhiloxBatch, key (k0, k1). Vectorized;
// defined in philox_dropout.cpp (hand-written AVX-512 where cpu_avx512()).
void philox_batch(uint64_t c, uint32_t k0, uint32_t k1, uint32_t* __restrict__ r);

// True where the hand-written AVX-512 code runs: the CPU has AVX-512F and torch runs its own
// AVX-512 kernels (ATEN_CPU_CAPABILITY=default or avx2 selects the portable code). Defined in
// philox_dropout.cpp.
bool cpu_avx512();

struct PhiloxKey {
  uint32_t k0, k1;
  explicit PhiloxKey(int64_t seed)
      : k0(static_cast<uint32_t>(seed)), k1(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32)) {}
};

// Serially calls body(i, r, n) over the elements [e_begin, e_end) in contiguous runs: run
// elements are e_begin + i .. e_begin + i + n - 1 and r[j] is the Philox word of element
// e_begin + i + j. Only the counters covering the range are generated (rounded up to a batch).
template <typename Body>
inline void for_each_word_serial(int64_t e_begin, int64_t e_end, PhiloxKey key, const Body& body) {
  if (e_end <= e_begin) return;
  alignas(64) uint32_t r[4 * kPhiloxBatch];
  const int64_t c_end = (e_end + 3) >> 2;
  for (int64_t c = e_begin >> 2; c < c_end; c += kPhiloxBatch) {
    philox_batch(static_cast<uint64_t>(c), key.k0, key.k1, r);
    const int64_t lo = std::max(4 * c, e_begin);
    const int64_t hi = std::min(4 * (c + kPhiloxBatch), e_end);
    body(lo - e_begin, r + (lo - 4 * c), hi - lo);
  }
}

// Parallel for_each_word_serial over [e_begin, e_begin + numel): threads split on whole
// counters (grain: counters per task), so no two threads touch one group of 4.
template <typename Body>
inline void for_each_word(int64_t e_begin, int64_t numel, int64_t seed, int64_t grain, const Body& body) {
  if (numel == 0) return;
  const PhiloxKey key(seed);
  const int64_t e_end = e_begin + numel;
  at::parallel_for(e_begin >> 2, (e_end + 3) >> 2, grain, [&](int64_t cb, int64_t ce) {
    const int64_t lo = std::max(4 * cb, e_begin);
    for_each_word_serial(lo, std::min(4 * ce, e_end), key, [&](int64_t i, const uint32_t* r, int64_t n) {
      body(lo - e_begin + i, r, n);
    });
  });
}

// For a block of `rows` logical rows of K elements whose first element has offset e0: calls
// body(row, col, r, n) for runs of n elements of one row (cols col .. col + n - 1), r[j] the
// word of (row, col + j). Serial.
template <typename Body>
inline void for_each_word_rows(int64_t e0, int64_t rows, int64_t K, PhiloxKey key, const Body& body) {
  for_each_word_serial(e0, e0 + rows * K, key, [&](int64_t i, const uint32_t* r, int64_t n) {
    int64_t row = i / K, col = i - row * K;
    while (n > 0) {
      const int64_t len = std::min(n, K - col);
      body(row, col, r, len);
      r += len;
      n -= len;
      ++row;
      col = 0;
    }
  });
}

// keep ? v : +0 as a bit mask. A select would stay a branch (under -ftrapping-math gcc will
// not compute the multiply unconditionally), which blocks vectorization.
template <typename T>
inline T keep_or_zero(T v, bool keep) {
  using Bits =
      std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;
  static_assert(sizeof(Bits) == sizeof(T));
  Bits b;
  std::memcpy(&b, &v, sizeof b);
  b &= -static_cast<Bits>(keep);
  std::memcpy(&v, &b, sizeof b);
  return v;
}

// p, seed, row_offset and the element offsets of an (M, K) operand at logical row row_offset.
inline void check_dropout_args(int64_t M, int64_t K, double p, int64_t seed, int64_t row_offset) {
  TORCH_CHECK(M >= 0 && K >= 0, "fastlora dropout: negative shape (", M, ", ", K, ")");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fastlora dropout: p must be in [0, 1), got ", p);
  TORCH_CHECK(seed >= 0, "fastlora dropout: seed must be in [0, 2**63), got ", seed);
  TORCH_CHECK(row_offset >= 0, "fastlora dropout: row_offset must be >= 0, got ", row_offset);
  int64_t rows = 0, end = 0;
  TORCH_CHECK(!__builtin_add_overflow(row_offset, M, &rows) && !__builtin_mul_overflow(rows, K, &end),
              "fastlora dropout: element offsets (row_offset + M) * K overflow int64");
}

}  // namespace fastlora
