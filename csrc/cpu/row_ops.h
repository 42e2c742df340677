// Hot row loops of the CPU kernels (softmax tile rows, dropout factors), compiled once per CPU level
// (MGF_CPU_CLONES: baseline, AVX2 + FMA, AVX-512) and picked when the library loads. The math is the shared headers'
// (metagpt_fast/online_softmax.h, philox.h), so these loops run what the CUDA kernels run.
#pragma once

#include <cstdint>

namespace metagpt_fast::cpu {

float row_max(const float* s, int64_t n);

// s <- exp(s - shift) (online_softmax.h); returns the row sum.
float softmax_row(float* s, int64_t n, float shift);

// p <- exp(p - lse): the forward's probabilities from the saved log-sum-exp.
void probabilities_row(float* p, int64_t n, float lse);

void scale_row(float* a, int64_t n, float alpha);

void multiply_row(float* out, const float* a, const float* b, int64_t n);

// dS = P * (dP * F - delta), written over dP; F (dropout factors) may be null.
void softmax_grad_row(float* dp, const float* p, const float* f, int64_t n, float delta);

// Dropout factors f[c] = keep(seed, base + c) ? inv_keep : 0 (the Philox stream of metagpt_fast/philox.h).
void philox_factors(float* f, int64_t n, uint64_t seed, uint64_t base, uint32_t threshold, float inv_keep);

}  // namespace metagpt_fast::cpu
