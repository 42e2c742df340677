// Register-blocked tile products of the CPU attention forward, written for AVX-512 and picked at run time.
//
// The library targets baseline x86-64 (a wheel must run on any x86-64 CPU), so these functions are compiled with a
// per-function target attribute and called only when tile_kernels_available() says the CPU has AVX-512F. They keep an
// 8-row x 32-column block of the output in 16 zmm registers over the whole inner dimension, the shape that keeps both
// FMA pipes busy (BLAS libraries may run narrower code on some CPUs: MKL's sgemm runs AVX2 on AMD Zen, about half of
// what Zen 4/5 reach with AVX-512). Row counts need no padding: the last rows of a tile run a shorter block.
#pragma once

#include <cstdint>

namespace metagpt_fast::cpu {

// Keys per packed panel of K^T (the column width of scores_tile's register block).
constexpr int64_t TILE_KEYS = 32;

// True when the CPU runs AVX-512F and METAGPT_FAST_CPU_TILES is not "0" (read once; the portable path
// then serves every call, which tests use to cover it on AVX-512 machines).
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
