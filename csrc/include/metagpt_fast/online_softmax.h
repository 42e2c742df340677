// The online-softmax update of flash attention (Milakov & Gimelshein 2018; Dao et al. 2022), one query row at a time.
//
// A row keeps a running maximum ``m`` and running sum ``l = sum_j exp(s_j - m)`` over the key blocks seen so far, and
// an output accumulator ``acc = sum_j exp(s_j - m) v_j``. For each new block with row maximum ``block_max``:
//
//   m_new = max(m, block_max);  alpha = exp(m - m_new);  l = alpha * l;  acc = alpha * acc;  m = m_new
//   p_j   = exp(s_j - m)  (softmax_weight),  l += sum_j p_j,  acc += sum_j p_j v_j
//
// Masked scores are -inf. A row with no visible key so far has m = -inf; its weights use a finite stand-in maximum
// (0) so exp(-inf - m) is 0, never NaN. At the end, out = acc / l (0 for an empty row) and the log-sum-exp
// ``lse = m + log(l)`` is saved for the backward pass, which recomputes p_j = exp(s_j - lse). An empty row stores
// lse = +inf so the recomputed weights are exactly 0 and its gradients vanish.
//
// When finite scores can reach float32's extremes (an additive mask at finfo.min: |m| ~ 3.4e38, whose ulp is
// ~2e31), m + log(l) rounds back to m and the recomputed weights become exp(0) = 1 instead of 1 / l. A kernel that
// serves such masks saves the two statistics apart (m, or +inf for an empty row, and log(l), 0 for an empty row)
// and recomputes p_j = exp((s_j - m) - log(l)), where s_j - m is small and exact enough.
//
// A CPU kernel calls these per row on its tile of scores; a CUDA kernel calls them per thread on its fragment of a
// row after reducing ``block_max`` / the block sum across the threads that share the row.
#pragma once

#include <math.h>

#include "metagpt_fast/macros.h"

namespace metagpt_fast {

struct OnlineSoftmax {
  float m;  // running maximum of the scores seen (-inf before any visible key)
  float l;  // running sum of exp(score - m)
};

MGF_HOST_DEVICE MGF_INLINE OnlineSoftmax online_softmax_init() { return OnlineSoftmax{-INFINITY, 0.0f}; }

// exp(x) for scores. On the device: the fast hardware exp2 path. On the host: a branch-free Cody-Waite reduction and
// degree-6 polynomial (relative error < 3e-7) that compilers vectorise inside a loop, which a call to the C
// library's expf prevents; arguments below -87.3 (including -inf, masked scores) give exactly 0.
MGF_HOST_DEVICE MGF_INLINE float mgf_exp(float x) {
#if MGF_ON_DEVICE
  return __expf(x);
#else
  // Written with ternaries and the 1.5 * 2^23 rounding trick (no fminf / rintf calls): baseline x86-64 (SSE2) has
  // no instruction for rintf, and a library call would stop the loop from vectorising.
  const float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f, kRound = 12582912.0f;
  float xc = x < -87.3f ? -87.3f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  const float n = (xc * kLog2e + kRound) - kRound;  // round to nearest, |n| <= 127
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;    // |r| <= ln2 / 2
  float p = 1.3981999507e-3f;                        // Taylor coefficients of exp on [-ln2/2, ln2/2]
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  union {
    float f;
    int i;
  } bits;
  bits.i = (static_cast<int>(n) + 127) << 23;  // 2^n
  const float y = p * bits.f;
  return x < -87.3f ? 0.0f : y;
#endif
}

// Maximum to subtract before exponentiating: the running maximum, or 0 while the row has seen no visible key.
MGF_HOST_DEVICE MGF_INLINE float online_softmax_shift(float m) { return m == -INFINITY ? 0.0f : m; }

// Folds a new block's row maximum into the state; returns the factor ``alpha`` that rescales ``l`` (done here) and
// the caller's output accumulator (done by the caller). After it, the block's weights are exp(s - shift(m)).
MGF_HOST_DEVICE MGF_INLINE float online_softmax_update(OnlineSoftmax& state, float block_max) {
  const float m_new = fmaxf(state.m, block_max);
  const float alpha = mgf_exp(online_softmax_shift(state.m) - online_softmax_shift(m_new));
  state.l *= alpha;
  state.m = m_new;
  return alpha;
}

// Weight of one score under the current state (0 for a masked score).
MGF_HOST_DEVICE MGF_INLINE float softmax_weight(float score, float shift) { return mgf_exp(score - shift); }

// 1 / l for the final normalisation; 0 for a row whose every key was masked (its output is 0).
MGF_HOST_DEVICE MGF_INLINE float online_softmax_inv_sum(const OnlineSoftmax& state) {
  return state.l > 0.0f ? 1.0f / state.l : 0.0f;
}

// log-sum-exp of the row saved for the backward pass; +inf for an empty row (recomputed weights are then 0).
MGF_HOST_DEVICE MGF_INLINE float online_softmax_lse(const OnlineSoftmax& state) {
  return state.l > 0.0f ? state.m + logf(state.l) : INFINITY;
}

// Weight recomputed in the backward pass from the saved log-sum-exp.
MGF_HOST_DEVICE MGF_INLINE float softmax_weight_from_lse(float score, float lse) { return mgf_exp(score - lse); }

// The row statistics saved apart: the maximum (+inf for an empty row, so the recomputed weights are 0) and log(l)
// (0 for an empty row).
MGF_HOST_DEVICE MGF_INLINE float online_softmax_saved_max(const OnlineSoftmax& state) {
  return state.l > 0.0f ? state.m : INFINITY;
}
MGF_HOST_DEVICE MGF_INLINE float online_softmax_log_sum(const OnlineSoftmax& state) {
  return state.l > 0.0f ? logf(state.l) : 0.0f;
}

// Weight recomputed in the backward pass from the statistics saved apart: exp((score - m) - log(l)).
MGF_HOST_DEVICE MGF_INLINE float softmax_weight_from_stats(float score, float m, float log_l) {
  return mgf_exp((score - m) - log_l);
}

}  // namespace metagpt_fast
