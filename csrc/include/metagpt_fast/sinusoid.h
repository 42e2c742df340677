// Sinusoid frequencies and angles of the positional encoding (Vaswani et al. 2017, 3.5) and of rotary embeddings.
//
//   inv_freq(2i, d) = base^(-2i / d)             angle = pos * inv_freq
//   PE[pos, 2i] = sin(angle), PE[pos, 2i+1] = cos(angle);   rotary pairs rotate by angle with d = rotary_dim
//
// The reference computes the angle in float64 and rounds sin/cos once to float32. Kernels match it without float64
// transcendentals: the angle is formed and reduced modulo 2*pi in float64 (one multiply, one rint), and only the
// reduced angle in [-pi, pi] goes through single-precision sin/cos. The error then stays ~1e-7 whatever the position,
// where a float32 angle would err by ~pos * 6e-8 (6e-5 at pos 1000).
#pragma once

#include <math.h>

#include "metagpt_fast/macros.h"

namespace metagpt_fast {

constexpr double kTwoPi = 6.283185307179586476925286766559;

// base^(-two_i / dim), in float64: computed once per feature pair (a table per block / per call), not per element.
MGF_HOST_DEVICE MGF_INLINE double inv_freq(int two_i, int dim, double base) {
  return pow(base, -static_cast<double>(two_i) / static_cast<double>(dim));
}

// pos * inv_freq reduced to [-pi, pi], as float.
MGF_HOST_DEVICE MGF_INLINE float reduced_angle(double pos, double inv_freq_value) {
  const double angle = pos * inv_freq_value;
  return static_cast<float>(angle - rint(angle * (1.0 / kTwoPi)) * kTwoPi);
}

// sin and cos of the position's angle for one frequency.
MGF_HOST_DEVICE MGF_INLINE void position_sincos(double pos, double inv_freq_value, float* s, float* c) {
  const float a = reduced_angle(pos, inv_freq_value);
#if MGF_ON_DEVICE
  // Hardware sin/cos: absolute error <= 2^-21.4 on [-pi, pi] (CUDA programming guide), and no local-memory
  // Payne-Hanek path (sincosf keeps one for huge arguments, which costs a stack frame in every kernel).
  __sincosf(a, s, c);
#else
  *s = sinf(a);
  *c = cosf(a);
#endif
}

}  // namespace metagpt_fast
