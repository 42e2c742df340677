// Fused scaled-dot-product attention, forward (FlashAttention-2, Dao 2023), on mma.sync.m16n8k16 tensor cores
// (sm_80 and newer).
//
//   S = scale * Q K^T (softcap, window, boolean mask)      P = softmax(S)      O = dropout(P) V
//
// A CTA owns BLOCK_M query rows of one (batch, head); each of its warps owns ROWS (16 or 32) of them. K and V
// stream through shared memory in BLOCK_N-key tiles, double-buffered: the cp.async copies of tile t + 1 are issued
// right after the barrier that opens tile t, so they run under all of tile t's matmuls and softmax, and each tile
// costs one wait and one barrier. Tiles are swizzled (tile_io.cuh) and every mma operand comes from ldmatrix (x4;
// .trans for V). Q fragments stay in registers for the whole loop when QREGS (D = 64, and 16-row warps at D = 128),
// else they are re-read from shared memory each tile (32-row warps at D = 128: 64 more registers per thread would
// not fit next to the 32 x 128 accumulator; ptxas spills 88-248 B). The output leaves through the warp's own rows of
// the Q tile, as 16-byte row chunks.
//
// Softmax: the online row maximum m is kept in raw score units; with c = scale * log2(e) (log2(e) under a softcap,
// whose capped scores are already scaled), a weight is one FFMA and one ex2: p = exp2(s * c - m * c). The row sum
// l adds the weights before dropout; lse = m * c / log2(e) + log(l) per row (natural log), +inf and output 0 for a
// row with no visible key. Only key tiles that the window can show to this CTA are visited (Visibility's bounds),
// and the per-element visibility test runs only on a warp's tiles that the window, the bounds or a mask cut. That
// test and the dropout draws run in rolled loops that build a bit mask (element_bits), one element at a time, so
// that 64 mask loads or Philox draws are never live at once beside the accumulators.
//
// Dropout draws the shared Philox stream (metagpt_fast/philox.h) at offset ((b * Hq + h) * Nq + i) * Nk + j, so the
// mask is the reference's dropout_keep_mask and the backward pass regenerates it.
#pragma once

#include <math.h>
#include <stdint.h>

#include "attention_params.h"
#include "metagpt_fast/philox.h"
#include "tile_io.cuh"
#include "visibility.cuh"
#include "warp_primitives.cuh"

namespace metagpt_fast {
namespace attention {

// Forward tile: WARPS warps of ROWS query rows each, BLOCK_N keys per K / V tile, two K / V stages, Q fragments in
// registers when QREGS, at least MIN_BLOCKS CTAs per SM (the register budget __launch_bounds__ gives ptxas).
template <int D_, int WARPS_, int ROWS_, int BLOCK_N_, bool QREGS_, int MIN_BLOCKS_>
struct ForwardTile {
  static constexpr int D = D_, WARPS = WARPS_, ROWS = ROWS_, BLOCK_N = BLOCK_N_, MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr bool QREGS = QREGS_;
  static constexpr int THREADS = 32 * WARPS, BLOCK_M = WARPS * ROWS, M_TILES = ROWS / 16, STAGES = 2;
  // Q tile, then STAGES x (K tile, V tile); 2-byte elements, no padding.
  static constexpr int SHARED_BYTES = (BLOCK_M + STAGES * 2 * BLOCK_N) * D * 2;
  static_assert(ROWS == 16 || ROWS == 32, "a warp owns one or two m16 row blocks");
  static_assert(D % 16 == 0 && BLOCK_N % 16 == 0, "tiles are whole m16n8k16 steps");
};

// Bit (mt * NT + nt) * 4 + e of the result is test(i, j) for element e of this lane's C fragment nt of row block
// mt, with i, j relative to the warp's first row and the tile's first key. A rolled loop: the test (a Philox draw, a
// mask load) is evaluated one element at a time instead of 64 at once beside the live accumulators.
template <int MT, int NT, typename Test>
MGF_DEV uint64_t element_bits(int lane, const Test& test) {
  static_assert(MT * NT * 4 <= 64, "one bit per element of this lane's score fragments");
  uint64_t bits = 0;
#pragma unroll 1
  for (int idx = 0; idx < MT * NT * 4; ++idx) {
    const int e = idx & 3, nt = (idx >> 2) % NT, mt = (idx >> 2) / NT;
    const int i = (lane >> 2) + 16 * mt + 8 * (e >> 1), j = nt * 8 + 2 * (lane & 3) + (e & 1);
    if (test(i, j)) bits |= uint64_t{1} << idx;
  }
  return bits;
}

// Grid: (ceil(Nq / BLOCK_M), Hq, B).
template <typename T, typename Tile>
MGF_KERNEL void MGF_LAUNCH_BOUNDS(Tile::THREADS, Tile::MIN_BLOCKS) attention_forward_kernel(const AttentionParams p) {
  constexpr int D = Tile::D, BLOCK_M = Tile::BLOCK_M, BLOCK_N = Tile::BLOCK_N, ROWS = Tile::ROWS;
  constexpr int MT = Tile::M_TILES, NT = BLOCK_N / 8, THREADS = Tile::THREADS;
  constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;
  const int tid = thread_index(), lane = tid & 31, warp = tid >> 5, t = lane & 3;
  const int m0 = block_index_x() * BLOCK_M, h = block_index_y(), b = block_index_z();
  const int hk = h / (p.heads_q / p.heads_k);

  T* sq = reinterpret_cast<T*>(dynamic_shared_memory());  // (BLOCK_M, D)
  T* skv = sq + BLOCK_M * D;                                // stage s: K at skv + 2s * BLOCK_N * D, V after it
  const T* q = static_cast<const T*>(p.q) + b * p.q_strides.batch + h * p.q_strides.head;
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides.batch + hk * p.k_strides.head;
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides.batch + hk * p.v_strides.head;

  // Key tiles [n_begin, n_end) can hold a key that the window shows to a row of this CTA.
  const Visibility visible = make_visibility(p, b, h);
  const int m_last = int_min(m0 + BLOCK_M, p.n_q);
  const int n_begin = visible.key_begin(m0) / BLOCK_N * BLOCK_N;
  const int n_end = visible.key_end(m_last);
  const int n_tiles = n_end > n_begin ? (n_end - n_begin + BLOCK_N - 1) / BLOCK_N : 0;

  auto load_kv = [&](int tile) {
    T* sk = skv + (tile & 1) * 2 * BLOCK_N * D;
    const int n0 = n_begin + tile * BLOCK_N;
    load_tile_async<BLOCK_N, D, THREADS>(sk, k, p.k_strides.row, n0, p.n_k, tid);
    load_tile_async<BLOCK_N, D, THREADS>(sk + BLOCK_N * D, v, p.v_strides.row, n0, p.n_k, tid);
  };
  load_tile_async<BLOCK_M, D, THREADS>(sq, q, p.q_strides.row, m0, p.n_q, tid);
  if (n_tiles > 0) load_kv(0);
  cp_async_commit();

  // Softmax constants: scores become c * s (log2 units) after the optional softcap.
  const bool capped = p.softcap > 0.0f;
  // softcap * tanh(x) = softcap - 2 softcap / (exp(2 x) + 1), x = scale * s / softcap: one ex2 and a division per
  // score (the absolute error, a few ulps of softcap, is far below the score's own rounding).
  const float cap_scale = capped ? 2.0f * kLog2e * p.scale / p.softcap : 0.0f, two_cap = 2.0f * p.softcap;
  const float c = capped ? kLog2e : p.scale * kLog2e;
  const bool dropout = p.dropout;
  const uint64_t seed = dropout ? static_cast<uint64_t>(*p.seed) : 0;
  const uint64_t row_base = (static_cast<uint64_t>(b) * p.heads_q + h) * p.n_q;
  const int warp_row0 = m0 + warp * ROWS;
  const int row_lo = warp_row0 + (lane >> 2);  // this lane's rows: row_lo + 16 * mt + 8 * half

  float acc[MT][D / 8][4];
  float row_max[MT][2], row_sum[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) acc[mt][dn][0] = acc[mt][dn][1] = acc[mt][dn][2] = acc[mt][dn][3] = 0.0f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.0f;
  }
  uint32_t qf[Tile::QREGS ? MT : 1][Tile::QREGS ? D / 16 : 1][4];

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int n0 = n_begin + tile * BLOCK_N;
    const T* sk = skv + (tile & 1) * 2 * BLOCK_N * D;
    const T* sv = sk + BLOCK_N * D;
    cp_async_wait<0>();  // this thread's copies of tile `tile` (and of Q) landed
    block_sync();        // everyone's did; every warp is done with tile - 1, whose stage the next copies reuse
    if (tile + 1 < n_tiles) load_kv(tile + 1);
    cp_async_commit();
    if constexpr (Tile::QREGS) {
      if (tile == 0) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk) ldsm_a<D>(qf[mt][kk], sq, warp * ROWS + mt * 16, kk * 16, lane);
        }
      }
    }

    // S = Q K^T: A = this warp's Q rows, B(k = d, n = key) = K[key][d].
    float s[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.0f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (Tile::QREGS) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a[mt][e] = qf[mt][kk][e];
        } else {
          ldsm_a<D>(a[mt], sq, warp * ROWS + mt * 16, kk * 16, lane);
        }
      }
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b0[2], b1[2];
        ldsm_b<D>(b0, b1, sk, np * 16, kk * 16, lane);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(s[mt][2 * np], a[mt], b0);
          mma_16816<T>(s[mt][2 * np + 1], a[mt], b1);
        }
      }
    }

    // Softcap, then -inf where the window, the bounds or the mask hide a key (only on tiles that need the test).
    if (capped) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nt][e] = p.softcap - two_cap / (fast_exp2(s[mt][nt][e] * cap_scale) + 1.0f);
        }
      }
    }
    if (!visible.whole_tile(warp_row0, warp_row0 + ROWS, n0, n0 + BLOCK_N)) {
      const uint64_t shown = element_bits<MT, NT>(lane, [&](int i, int j) { return visible(warp_row0 + i, n0 + j); });
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (!((shown >> ((mt * NT + nt) * 4 + e)) & 1u)) s[mt][nt][e] = -INFINITY;
          }
        }
      }
    }

    // Online softmax of each of this lane's rows.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) tile_max = fmaxf(tile_max, fmaxf(s[mt][nt][2 * half], s[mt][nt][2 * half + 1]));
        const float m_new = fmaxf(row_max[mt][half], quad_max(tile_max));
        const float shift = m_new == -INFINITY ? 0.0f : m_new * c;  // no key yet: keep exp2(-inf - 0) = 0
        const float alpha = fast_exp2(row_max[mt][half] * c - shift);
        row_max[mt][half] = m_new;
        row_sum[mt][half] *= alpha;
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
          acc[mt][dn][2 * half] *= alpha;
          acc[mt][dn][2 * half + 1] *= alpha;
        }
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int e = 2 * half; e < 2 * half + 2; ++e) {
            const float w = fast_exp2(fmaf(s[mt][nt][e], c, -shift));  // 0 for a hidden (-inf) score
            sum += w;
            s[mt][nt][e] = w;
          }
        }
        row_sum[mt][half] += sum;  // this lane's part of the row sum (reduced over the quad at the end)
      }
    }
    if (dropout) {
      const uint64_t kept = element_bits<MT, NT>(lane, [&](int i, int j) {
        return dropout_keep(seed, (row_base + warp_row0 + i) * p.n_k + n0 + j, p.dropout_threshold);
      });
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const bool keep = (kept >> ((mt * NT + nt) * 4 + e)) & 1u;
            s[mt][nt][e] = keep ? s[mt][nt][e] * p.dropout_scale : 0.0f;
          }
        }
      }
    }

    // O += P V: A = P (the C fragments of two 8-key blocks), B(k = key, n = d) = V[key][d] (ldmatrix.trans).
#pragma unroll
    for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) c_to_a<T>(a[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b0[2], b1[2];
        ldsm_b_trans<D>(b0, b1, sv, kk * 16, dp * 16, lane);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(acc[mt][2 * dp], a[mt], b0);
          mma_16816<T>(acc[mt][2 * dp + 1], a[mt], b1);
        }
      }
    }
  }
  // Epilogue: lse, then the normalised rows of this warp go through its own rows of the Q tile (read by no other
  // warp), so that each lane stores whole 16-byte chunks of a row instead of 4-byte pairs.
  cp_async_wait_all();  // no copy is in flight (with no key tile, Q's copies are still pending here)
  block_sync();         // ... in any thread: the Q tile is free to be overwritten
  const float lse_scale = c * kLn2;  // raw score units -> natural-log units
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float l = quad_sum(row_sum[mt][half]);
      const float inv_sum = l > 0.0f ? 1.0f / l : 0.0f;
      const int i = row_lo + 16 * mt + 8 * half;
      if (t == 0 && i < p.n_q) p.lse[row_base + i] = l > 0.0f ? row_max[mt][half] * lse_scale + logf(l) : INFINITY;
      const int r = warp * ROWS + 16 * mt + 8 * half + (lane >> 2);
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        *reinterpret_cast<uint32_t*>(sq + swizzled_index<D>(r, dn * 8 + 2 * t)) =
            pack2_float<T>(acc[mt][dn][2 * half] * inv_sum, acc[mt][dn][2 * half + 1] * inv_sum);
      }
    }
  }
  block_sync();  // the warp's lanes see each other's rows
  T* out = static_cast<T*>(p.out) + b * p.out_strides.batch + h * p.out_strides.head;
  constexpr int CHUNKS = D / 8;
#pragma unroll
  for (int c16 = lane; c16 < ROWS * CHUNKS; c16 += 32) {
    const int r = c16 / CHUNKS, chunk = c16 % CHUNKS, i = warp_row0 + r;
    if (i < p.n_q) {
      *reinterpret_cast<uint4*>(out + i * p.out_strides.row + chunk * 8) =
          *reinterpret_cast<const uint4*>(sq + swizzled_offset<D>(warp * ROWS + r, chunk));
    }
  }
}

}  // namespace attention
}  // namespace metagpt_fast
