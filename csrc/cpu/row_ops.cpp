#include "row_ops.h"

#include <cmath>

#include "metagpt_fast/online_softmax.h"
#include "metagpt_fast/philox.h"

// Hot row loops are also compiled for x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512) and picked when the library
// loads (function multi-versioning), while the library itself targets baseline x86-64: 2-4x wider vectors for the
// softmax and dropout loops on current CPUs, no illegal instruction on old ones.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MGF_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MGF_CPU_CLONES
#endif

namespace metagpt_fast::cpu {

MGF_CPU_CLONES float row_max(const float* s, int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < n; ++c) m = s[c] > m ? s[c] : m;
  return m;
}

// s <- exp(s - shift) (online_softmax.h); returns the row sum.
MGF_CPU_CLONES float softmax_row(float* s, int64_t n, float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) {
    const float p = softmax_weight(s[c], shift);
    s[c] = p;
    sum += p;
  }
  return sum;
}

// p <- exp(p - lse): the forward's probabilities from the saved log-sum-exp.
MGF_CPU_CLONES void probabilities_row(float* p, int64_t n, float lse) {
  for (int64_t c = 0; c < n; ++c) p[c] = softmax_weight_from_lse(p[c], lse);
}

MGF_CPU_CLONES void scale_row(float* a, int64_t n, float alpha) {
  for (int64_t c = 0; c < n; ++c) a[c] *= alpha;
}

MGF_CPU_CLONES void multiply_row(float* out, const float* a, const float* b, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] = a[c] * b[c];
}

// dS = P * (dP * F - delta), written over dP; F (dropout factors) may be null.
MGF_CPU_CLONES void softmax_grad_row(float* dp, const float* p, const float* f, int64_t n, float delta) {
  if (f != nullptr) {
    for (int64_t c = 0; c < n; ++c) dp[c] = p[c] * (dp[c] * f[c] - delta);
  } else {
    for (int64_t c = 0; c < n; ++c) dp[c] = p[c] * (dp[c] - delta);
  }
}

MGF_CPU_CLONES void philox_factors(float* f, int64_t n, uint64_t seed, uint64_t base, uint32_t threshold,
                                   float inv_keep) {
  for (int64_t c = 0; c < n; ++c)
    f[c] = dropout_keep(seed, base + static_cast<uint64_t>(c), threshold) ? inv_keep : 0.0f;
}

}  // namespace metagpt_fast::cpu
