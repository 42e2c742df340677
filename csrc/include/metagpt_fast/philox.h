// Philox-4x32-10 dropout stream shared by every backend (metagpt_fast/ops/reference/random.py is the oracle).
//
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (offset & 0xffffffff, offset >> 32, 0, 0)
//   word    = first 32-bit output word after 10 rounds
//   keep    = (word >> 8) >= threshold,   threshold = round(p * 2^24)
//
// ``offset`` is the element's linear index in the contiguous output of the op (attention: in the (B, Hq, Nq, Nk)
// probability tensor). Integer compare only: every backend draws bit-identical masks.
#pragma once

#include <math.h>
#include <stdint.h>

#include "metagpt_fast/macros.h"

namespace metagpt_fast {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// First output word of Philox-4x32-10 for (seed, offset). Branch-free: vectorises in a CPU loop over offsets.
MGF_HOST_DEVICE MGF_INLINE uint32_t philox_word(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t prod_b = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint64_t prod_a = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    const uint32_t n0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(prod_b);
    c3 = static_cast<uint32_t>(prod_a);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// The 24-bit threshold below which an element is dropped: round(p * 2^24) capped at 2^24. rint rounds half to
// even in the default rounding mode, like Python's round() in the reference.
MGF_HOST_DEVICE MGF_INLINE uint32_t dropout_threshold(double p) {
  const double t = rint(p * 16777216.0);
  return t >= 16777216.0 ? 16777216u : (t <= 0.0 ? 0u : static_cast<uint32_t>(t));
}

// True when the element at linear index ``offset`` survives dropout.
MGF_HOST_DEVICE MGF_INLINE bool dropout_keep(uint64_t seed, uint64_t offset, uint32_t threshold) {
  return (philox_word(seed, offset) >> 8) >= threshold;
}

}  // namespace metagpt_fast
