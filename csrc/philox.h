// Philox4x32-10 (Random123) for the seeded dropout generator; the bit-exact definition is
// the module docstring of fastlora/_philox.py. Header-only and usable from CUDA device code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTLORA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTLORA_HOST_DEVICE inline
#endif

namespace fastlora {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// One round on counter (c0, c1, c2, c3) with round key (k0, k1). Written with 64-bit
// products (not __umulhi) so that the same code vectorizes on CPU.
FASTLORA_HOST_DEVICE void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                       uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
  const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
  c0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
  c1 = static_cast<uint32_t>(p1);
  c2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
  c3 = static_cast<uint32_t>(p0);
}

// Philox4x32-10 in place on the counter.
FASTLORA_HOST_DEVICE void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                        uint32_t k0, uint32_t k1) {
  for (int i = 0; i < kPhiloxRounds; ++i) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// Element e (logical row-major offset) is kept iff word (e & 3) of philox(counter e >> 2,
// key seed) is >= dropout_threshold(p); p in [0, 1), so the product is exact and < 2^32.
FASTLORA_HOST_DEVICE uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(p * 4294967296.0);
}

}  // namespace fastlora
