#include "tile_kernels.h"

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MGF_TILES_AVX512 1
#define MGF_AVX512 __attribute__((target("avx512f")))
#else
#define MGF_TILES_AVX512 0
#endif

namespace metagpt_fast::cpu {

namespace {

// 2: AVX-512F, 1: AVX2 + FMA, 0: neither (or METAGPT_FAST_CPU_TILES=0; "avx2" caps it at 1). Read once.
int tile_level() {
  static const int level = [] {
#if MGF_TILES_AVX512
    const char* env = std::getenv("METAGPT_FAST_CPU_TILES");
    if (env != nullptr && std::strcmp(env, "0") == 0) return 0;
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (__builtin_cpu_supports("avx512f") && avx2 && !(env != nullptr && std::strcmp(env, "avx2") == 0)) return 2;
    return avx2 ? 1 : 0;
#else
    return 0;
#endif
  }();
  return level;
}

}  // namespace

bool tile_kernels_available() { return tile_level() > 0; }

namespace {

// Portable loops with the same contracts (used where AVX-512 is not compiled in; callers check availability first).
void scores_tile_loops(const float* a, int64_t lda, const float* packed, int64_t depth, int64_t panels, float scale,
                       float* s, int64_t lds, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t p = 0; p < panels; ++p) {
      float acc[TILE_KEYS] = {};
      const float* panel = packed + p * depth * TILE_KEYS;
      for (int64_t k = 0; k < depth; ++k)
        for (int64_t c = 0; c < TILE_KEYS; ++c) acc[c] += a[r * lda + k] * panel[k * TILE_KEYS + c];
      for (int64_t c = 0; c < TILE_KEYS; ++c) s[r * lds + p * TILE_KEYS + c] = scale * acc[c];
    }
}

void accumulate_tile_loops(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t depth, int64_t n,
                           const float* alpha, float* acc, int64_t ldacc, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) {
    float* arow = acc + r * ldacc;
    if (alpha != nullptr)
      for (int64_t c = 0; c < n; ++c) arow[c] *= alpha[r];
    for (int64_t k = 0; k < depth; ++k) {
      const float pk = p[r * ldp + k];
      for (int64_t c = 0; c < n; ++c) arow[c] += pk * v[k * ldv + c];
    }
  }
}

void product_tile_loops(const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb, int64_t depth,
                        int64_t n, float scale, float* c, int64_t ldc, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) {
      float sum = 0.0f;
      for (int64_t k = 0; k < depth; ++k) sum += a[r * a_row + k * a_col] * b[k * ldb + j];
      c[r * ldc + j] += scale * sum;
    }
}

#if MGF_TILES_AVX512

// MR rows x 32 keys of scores: 2 * MR accumulators over the whole depth, one broadcast of a per row and step.
template <int MR>
MGF_AVX512 void scores_block(const float* a, int64_t lda, const float* panel, int64_t depth, float scale, float* s,
                             int64_t lds) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < depth; ++k) {
    const __m512 b0 = _mm512_loadu_ps(panel + k * TILE_KEYS), b1 = _mm512_loadu_ps(panel + k * TILE_KEYS + 16);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r * lda + k]);
      c0[r] = _mm512_fmadd_ps(ar, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(ar, b1, c1[r]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(s + r * lds, _mm512_mul_ps(c0[r], sc));
    _mm512_storeu_ps(s + r * lds + 16, _mm512_mul_ps(c1[r], sc));
  }
}

// MR rows x up to 32 columns of the accumulator (masked to n), rescaled by alpha, plus p v over depth.
template <int MR>
MGF_AVX512 void accumulate_block(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t depth,
                                 const float* alpha, float* acc, int64_t ldacc, __mmask16 m0, __mmask16 m1) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    c0[r] = _mm512_maskz_loadu_ps(m0, acc + r * ldacc);
    c1[r] = _mm512_maskz_loadu_ps(m1, acc + r * ldacc + 16);
    if (alpha != nullptr) {
      const __m512 ar = _mm512_set1_ps(alpha[r]);
      c0[r] = _mm512_mul_ps(c0[r], ar);
      c1[r] = _mm512_mul_ps(c1[r], ar);
    }
  }
  for (int64_t k = 0; k < depth; ++k) {
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, v + k * ldv), b1 = _mm512_maskz_loadu_ps(m1, v + k * ldv + 16);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 pr = _mm512_set1_ps(p[r * ldp + k]);
      c0[r] = _mm512_fmadd_ps(pr, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(pr, b1, c1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(acc + r * ldacc, m0, c0[r]);
    _mm512_mask_storeu_ps(acc + r * ldacc + 16, m1, c1[r]);
  }
}

// MR rows x up to 32 columns of c (masked to n): c += scale * (a b over depth), the sum kept apart from c.
template <int MR>
MGF_AVX512 void product_block(const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb,
                              int64_t depth, float scale, float* c, int64_t ldc, __mmask16 m0, __mmask16 m1) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < depth; ++k) {
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, b + k * ldb), b1 = _mm512_maskz_loadu_ps(m1, b + k * ldb + 16);
    const float* ak = a + k * a_col;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 ar = _mm512_set1_ps(ak[r * a_row]);
      c0[r] = _mm512_fmadd_ps(ar, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(ar, b1, c1[r]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * ldc;
    _mm512_mask_storeu_ps(cr, m0, _mm512_fmadd_ps(c0[r], sc, _mm512_maskz_loadu_ps(m0, cr)));
    _mm512_mask_storeu_ps(cr + 16, m1, _mm512_fmadd_ps(c1[r], sc, _mm512_maskz_loadu_ps(m1, cr + 16)));
  }
}

constexpr int MR = 8;

// Masks of the columns [c, c + 32) that are below n.
inline void column_masks(int64_t n, int64_t c, __mmask16* m0, __mmask16* m1) {
  const int64_t w = n - c < 32 ? n - c : 32;
  *m0 = w >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << w) - 1u);
  *m1 = w >= 32 ? __mmask16(0xFFFF) : w <= 16 ? __mmask16(0) : __mmask16((1u << (w - 16)) - 1u);
}

MGF_AVX512 void product_tile_avx512(const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb,
                                    int64_t depth, int64_t n, float scale, float* c, int64_t ldc, int64_t rows) {
  for (int64_t j = 0; j < n; j += 32) {
    __mmask16 m0, m1;
    column_masks(n, j, &m0, &m1);
    int64_t r = 0;
    for (; r + MR <= rows; r += MR)
      product_block<MR>(a + r * a_row, a_row, a_col, b + j, ldb, depth, scale, c + r * ldc + j, ldc, m0, m1);
    const float* ar = a + r * a_row;
    float* cr = c + r * ldc + j;
    switch (rows - r) {
      case 7: product_block<7>(ar, a_row, a_col, b + j, ldb, depth, scale, cr, ldc, m0, m1); break;
      case 6: product_block<6>(ar, a_row, a_col, b + j, ldb, depth, scale, cr, ldc, m0, m1); break;
      case 5: product_block<5>(ar, a_row, a_col, b + j, ldb, depth, scale, cr, ldc, m0, m1); break;
      case 4: product_block<4>(ar, a_row, a_col, b + j, ldb, depth, scale, cr, ldc, m0, m1); break;
      case 3: product_block<3>(ar, a_row, a_col, b + j, ldb, depth, scale, cr, ldc, m0, m1); break;
      case 2: product_block<2>(ar, a_row, a_col, b + j, ldb, depth, scale, cr, ldc, m0, m1); break;
      case 1: product_block<1>(ar, a_row, a_col, b + j, ldb, depth, scale, cr, ldc, m0, m1); break;
      default: break;
    }
  }
}

MGF_AVX512 void scores_tile_avx512(const float* a, int64_t lda, const float* packed, int64_t depth, int64_t panels,
                                   float scale, float* s, int64_t lds, int64_t rows) {
  for (int64_t p = 0; p < panels; ++p) {
    const float* panel = packed + p * depth * TILE_KEYS;
    float* sp = s + p * TILE_KEYS;
    int64_t r = 0;
    for (; r + MR <= rows; r += MR) scores_block<MR>(a + r * lda, lda, panel, depth, scale, sp + r * lds, lds);
    const float* ar = a + r * lda;
    float* sr = sp + r * lds;
    switch (rows - r) {
      case 7: scores_block<7>(ar, lda, panel, depth, scale, sr, lds); break;
      case 6: scores_block<6>(ar, lda, panel, depth, scale, sr, lds); break;
      case 5: scores_block<5>(ar, lda, panel, depth, scale, sr, lds); break;
      case 4: scores_block<4>(ar, lda, panel, depth, scale, sr, lds); break;
      case 3: scores_block<3>(ar, lda, panel, depth, scale, sr, lds); break;
      case 2: scores_block<2>(ar, lda, panel, depth, scale, sr, lds); break;
      case 1: scores_block<1>(ar, lda, panel, depth, scale, sr, lds); break;
      default: break;
    }
  }
}

MGF_AVX512 void accumulate_tile_avx512(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t depth,
                                       int64_t n, const float* alpha, float* acc, int64_t ldacc, int64_t rows) {
  for (int64_t c = 0; c < n; c += 32) {
    __mmask16 m0, m1;
    column_masks(n, c, &m0, &m1);
    const float* vc = v + c;
    float* ac = acc + c;
    int64_t r = 0;
    for (; r + MR <= rows; r += MR)
      accumulate_block<MR>(p + r * ldp, ldp, vc, ldv, depth, alpha ? alpha + r : nullptr, ac + r * ldacc, ldacc, m0,
                           m1);
    const float* pr = p + r * ldp;
    const float* al = alpha ? alpha + r : nullptr;
    float* ar = ac + r * ldacc;
    switch (rows - r) {
      case 7: accumulate_block<7>(pr, ldp, vc, ldv, depth, al, ar, ldacc, m0, m1); break;
      case 6: accumulate_block<6>(pr, ldp, vc, ldv, depth, al, ar, ldacc, m0, m1); break;
      case 5: accumulate_block<5>(pr, ldp, vc, ldv, depth, al, ar, ldacc, m0, m1); break;
      case 4: accumulate_block<4>(pr, ldp, vc, ldv, depth, al, ar, ldacc, m0, m1); break;
      case 3: accumulate_block<3>(pr, ldp, vc, ldv, depth, al, ar, ldacc, m0, m1); break;
      case 2: accumulate_block<2>(pr, ldp, vc, ldv, depth, al, ar, ldacc, m0, m1); break;
      case 1: accumulate_block<1>(pr, ldp, vc, ldv, depth, al, ar, ldacc, m0, m1); break;
      default: break;
    }
  }
}


// ---- AVX2 + FMA: the same blocks on 8-wide registers, 6 rows x 16 columns (12 accumulators of 16 registers); a
// 32-key panel runs as two 16-column halves.

#define MGF_AVX2 __attribute__((target("avx2,fma")))

constexpr int MR2 = 6;

template <int MR>
MGF_AVX2 void scores_block2(const float* a, int64_t lda, const float* panel, int64_t depth, float scale, float* s,
                            int64_t lds) {
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < depth; ++k) {
    const __m256 b0 = _mm256_loadu_ps(panel + k * TILE_KEYS), b1 = _mm256_loadu_ps(panel + k * TILE_KEYS + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 ar = _mm256_broadcast_ss(a + r * lda + k);
      c0[r] = _mm256_fmadd_ps(ar, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(ar, b1, c1[r]);
    }
  }
  const __m256 sc = _mm256_set1_ps(scale);
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(s + r * lds, _mm256_mul_ps(c0[r], sc));
    _mm256_storeu_ps(s + r * lds + 8, _mm256_mul_ps(c1[r], sc));
  }
}

// Lane masks of the columns [c, c + 16) below n.
MGF_AVX2 inline void column_masks2(int64_t n, int64_t c, __m256i* m0, __m256i* m1) {
  const int64_t w = n - c < 16 ? n - c : 16;
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), width = _mm256_set1_epi32(static_cast<int>(w));
  *m0 = _mm256_cmpgt_epi32(width, lanes);
  *m1 = _mm256_cmpgt_epi32(width, _mm256_add_epi32(lanes, _mm256_set1_epi32(8)));
}

// c[r][cols] = alpha[r] * c (when alpha is given; rescale) or c + scale * sum (when not; product), 16 columns masked:
// accumulate_tile is (rescale = true, scale = 1), product_tile is (rescale = false, scale).
template <int MR>
MGF_AVX2 void product_block2(const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb, int64_t depth,
                             const float* alpha, float scale, float* c, int64_t ldc, __m256i m0, __m256i m1) {
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < depth; ++k) {
    const __m256 b0 = _mm256_maskload_ps(b + k * ldb, m0), b1 = _mm256_maskload_ps(b + k * ldb + 8, m1);
    const float* ak = a + k * a_col;
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 ar = _mm256_broadcast_ss(ak + r * a_row);
      c0[r] = _mm256_fmadd_ps(ar, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(ar, b1, c1[r]);
    }
  }
  const __m256 sc = _mm256_set1_ps(scale);
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * ldc;
    __m256 o0 = _mm256_maskload_ps(cr, m0), o1 = _mm256_maskload_ps(cr + 8, m1);
    if (alpha != nullptr) {
      const __m256 al = _mm256_set1_ps(alpha[r]);
      o0 = _mm256_mul_ps(o0, al);
      o1 = _mm256_mul_ps(o1, al);
    }
    _mm256_maskstore_ps(cr, m0, _mm256_fmadd_ps(c0[r], sc, o0));
    _mm256_maskstore_ps(cr + 8, m1, _mm256_fmadd_ps(c1[r], sc, o1));
  }
}

MGF_AVX2 void scores_tile_avx2(const float* a, int64_t lda, const float* packed, int64_t depth, int64_t panels,
                               float scale, float* s, int64_t lds, int64_t rows) {
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t half = 0; half < TILE_KEYS; half += 16) {
      const float* panel = packed + p * depth * TILE_KEYS + half;
      float* sp = s + p * TILE_KEYS + half;
      int64_t r = 0;
      for (; r + MR2 <= rows; r += MR2) scores_block2<MR2>(a + r * lda, lda, panel, depth, scale, sp + r * lds, lds);
      const float* ar = a + r * lda;
      float* sr = sp + r * lds;
      switch (rows - r) {
        case 5: scores_block2<5>(ar, lda, panel, depth, scale, sr, lds); break;
        case 4: scores_block2<4>(ar, lda, panel, depth, scale, sr, lds); break;
        case 3: scores_block2<3>(ar, lda, panel, depth, scale, sr, lds); break;
        case 2: scores_block2<2>(ar, lda, panel, depth, scale, sr, lds); break;
        case 1: scores_block2<1>(ar, lda, panel, depth, scale, sr, lds); break;
        default: break;
      }
    }
  }
}

MGF_AVX2 void product_tile_avx2(const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb,
                                int64_t depth, int64_t n, const float* alpha, float scale, float* c, int64_t ldc,
                                int64_t rows) {
  for (int64_t j = 0; j < n; j += 16) {
    __m256i m0, m1;
    column_masks2(n, j, &m0, &m1);
    int64_t r = 0;
    for (; r + MR2 <= rows; r += MR2)
      product_block2<MR2>(a + r * a_row, a_row, a_col, b + j, ldb, depth, alpha ? alpha + r : nullptr, scale,
                          c + r * ldc + j, ldc, m0, m1);
    const float* ar = a + r * a_row;
    const float* al = alpha ? alpha + r : nullptr;
    float* cr = c + r * ldc + j;
    switch (rows - r) {
      case 5: product_block2<5>(ar, a_row, a_col, b + j, ldb, depth, al, scale, cr, ldc, m0, m1); break;
      case 4: product_block2<4>(ar, a_row, a_col, b + j, ldb, depth, al, scale, cr, ldc, m0, m1); break;
      case 3: product_block2<3>(ar, a_row, a_col, b + j, ldb, depth, al, scale, cr, ldc, m0, m1); break;
      case 2: product_block2<2>(ar, a_row, a_col, b + j, ldb, depth, al, scale, cr, ldc, m0, m1); break;
      case 1: product_block2<1>(ar, a_row, a_col, b + j, ldb, depth, al, scale, cr, ldc, m0, m1); break;
      default: break;
    }
  }
}

#endif  // MGF_TILES_AVX512

}  // namespace

void scores_tile(const float* a, int64_t lda, const float* packed, int64_t depth, int64_t panels, float scale, float* s,
                 int64_t lds, int64_t rows) {
#if MGF_TILES_AVX512
  if (tile_level() == 2) return scores_tile_avx512(a, lda, packed, depth, panels, scale, s, lds, rows);
  if (tile_level() == 1) return scores_tile_avx2(a, lda, packed, depth, panels, scale, s, lds, rows);
#endif
  scores_tile_loops(a, lda, packed, depth, panels, scale, s, lds, rows);
}

void accumulate_tile(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t depth, int64_t n,
                     const float* alpha, float* acc, int64_t ldacc, int64_t rows) {
#if MGF_TILES_AVX512
  if (tile_level() == 2) return accumulate_tile_avx512(p, ldp, v, ldv, depth, n, alpha, acc, ldacc, rows);
  if (tile_level() == 1) return product_tile_avx2(p, ldp, 1, v, ldv, depth, n, alpha, 1.0f, acc, ldacc, rows);
#endif
  accumulate_tile_loops(p, ldp, v, ldv, depth, n, alpha, acc, ldacc, rows);
}

void product_tile(const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb, int64_t depth, int64_t n,
                  float scale, float* c, int64_t ldc, int64_t rows) {
#if MGF_TILES_AVX512
  if (tile_level() == 2) return product_tile_avx512(a, a_row, a_col, b, ldb, depth, n, scale, c, ldc, rows);
  if (tile_level() == 1) return product_tile_avx2(a, a_row, a_col, b, ldb, depth, n, nullptr, scale, c, ldc, rows);
#endif
  product_tile_loops(a, a_row, a_col, b, ldb, depth, n, scale, c, ldc, rows);
}

}  // namespace metagpt_fast::cpu
