// Register-blocked tile products of the CPU attention, written for AVX-512 and AVX2 + FMA and picked at run time.
//
// The library targets baseline x86-64 (a wheel must run on any x86-64 CPU), so these functions are compiled with
// per-function target attributes and dispatched on what the CPU reports. AVX-512 keeps an 8-row x 32-column block of
// the output in 16 zmm registers over the whole inner dimension; AVX2 a 6-row x 16-column block in 12 ymm registers
// (BLAS libraries may run narrower code on some CPUs: MKL's sgemm runs AVX2 on AMD Zen, about half of what Zen 4/5
// reach with AVX-512). Row counts need no padding: the last rows of a tile run a shorter block.
#pragma once

#include <cstdint>

namespace metagpt_fast::cpu {

// Keys per packed panel of K^T (the column width of scores_tile's register block).
constexpr int64_t TILE_KEYS = 32;

// True when the CPU runs AVX-512F or AVX2 + FMA, and METAGPT_FAST_CPU_TILES is not "0" (read once; "0" makes the
// portable BLAS path serve every call, "avx2" keeps the AVX2 kernels on an AVX-512 CPU: tests cover both that way).
bool tile_kernels_available();

// s[r][c] = scale * sum_k a[r][k] * packed[c / 32][k][c % 32] for r < rows, c < 32 * panels.
// packed: panels of K^T, each depth x TILE_KEYS floats contiguous (zero past the last key).
void scores_tile(const float* a, int64_t lda, const float* packed, int64_t depth, int64_t panels, float scale, float* s,
                 int64_t lds, int64_t rows);

// acc[r][0, n) = alpha[r] * acc[r][0, n) + sum_{k < depth} p[r][k] * v[k][0, n) for r < rows; alpha may be null (1).
void accumulate_tile(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t depth, int64_t n,
                     const float* alpha, float* acc, int64_t ldacc, int64_t rows);

// c[r][0, n) += scale * sum_{k < depth} a[r * a_row + k * a_col] * b[k][0, n) for r < rows: a is read through two
// strides, so a transposed operand (the backward's P^T dO and dS^T Q) needs no copy.
void product_tile(const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb, int64_t depth, int64_t n,
                  float scale, float* c, int64_t ldc, int64_t rows);

}  // namespace metagpt_fast::cpu
