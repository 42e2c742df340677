// Fused scaled-dot-product attention, backward (FlashAttention-2 algorithm, Dao 2023), on mma.sync.m16n8k16 tensor
// cores (sm_80 and newer; also runs on sm_90). The forward kernel, which saves lse = log sum_j exp(S_ij) per row for
// this pass, is in forward_kernel.cuh.
//
//   S = scale * Q K^T (+ causal / boolean mask)      P = softmax(S)      O = dropout(P) V
//
// Backward, deterministic (no atomics): delta_i = dO_i . O_i (attention_backward_delta_kernel); then
//   attention_backward_dkdv_kernel: a CTA owns BLOCK_N keys of one (batch, kv head) and loops over every query head
//     of its GQA group and every query tile, accumulating dK = scale * dS^T Q and dV = dropout(P)^T dO in registers;
//   attention_backward_dq_kernel: a CTA owns BLOCK_M query rows and loops over key tiles, accumulating
//     dQ = scale * dS K in registers;
// with P recomputed from lse and dS = P * (dropout(dP) - delta), dP = dO V^T. Recomputing S and dP in the dQ pass
// costs two extra matmuls per tile over an atomic dQ, and buys bit-identical gradients run to run.
//
// Dropout draws the shared Philox stream (metagpt_fast/philox.h) at offset ((b * Hq + h) * Nq + i) * Nk + j, so the
// mask is the reference's dropout_keep_mask and the backward pass regenerates it instead of storing it.
//
// Conventions: a warp's rows are g and g + 8 of its 16-row slice (see warp_primitives.cuh); masked scores are
// excluded with an explicit ``visible`` test (keys past Nk, causal j > i, mask false, padding query rows), so a
// row with no visible key gets weights 0, output 0, lse = +inf and zero gradients.
#pragma once

#include <math.h>
#include <stdint.h>

#include "attention_params.h"
#include "tile_io.cuh"
#include "visibility.cuh"
#include "metagpt_fast/online_softmax.h"
#include "metagpt_fast/philox.h"
#include "warp_primitives.cuh"

namespace metagpt_fast {
namespace attention {

// Row pitch of shared tiles in elements: 8 elements (16 bytes) of padding put the rows of a fragment load in
// different banks (pitch of 36 or 68 words: rows g = 0..7 land 4 banks apart).
template <int D>
constexpr int kSharedPitch = D + 8;

// The backward's two score-like products, which contract over the head dim D with the same operand layout:
// x1[nt] = A1 B1^T and x2[nt] = A2 B2^T for this warp's 16-row A tiles (row pitch PITCH) and NT * 8 B rows.
// dK/dV uses it for S^T = K Q^T and dP^T = V dO^T, dQ for S = Q K^T and dP = dO V^T.
template <typename T, int NT, int D, int PITCH>
MGF_DEV void paired_row_products(float (&x1)[NT][4], float (&x2)[NT][4], const T* a1, const T* a2, const T* b1,
                                 const T* b2, int lane) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) x1[nt][e] = x2[nt][e] = 0.0f;
  }
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t f1[4], f2[4];
    load_a<PITCH, 1>(f1, a1 + kk * 16, lane);
    load_a<PITCH, 1>(f2, a2 + kk * 16, lane);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t g1[2], g2[2];
      load_b<1, PITCH>(g1, b1 + nt * 8 * PITCH + kk * 16, lane);
      load_b<1, PITCH>(g2, b2 + nt * 8 * PITCH + kk * 16, lane);
      mma_16816<T>(x1[nt], f1, g1);
      mma_16816<T>(x2[nt], f2, g2);
    }
  }
}

// dK/dV: a CTA owns BLOCK_N keys (16 per warp) and steps through BLOCK_M query rows at a time.
template <int D_, int BLOCK_M_, int BLOCK_N_, int WARPS_>
struct DkdvTile {
  static constexpr int D = D_, BLOCK_M = BLOCK_M_, BLOCK_N = BLOCK_N_, WARPS = WARPS_, THREADS = 32 * WARPS_;
  static constexpr int PITCH = kSharedPitch<D_>;
  // K, V tiles (BLOCK_N rows), Q, dO tiles (BLOCK_M rows), lse and delta of BLOCK_M rows.
  static constexpr int SHARED_BYTES = 2 * (BLOCK_N + BLOCK_M) * PITCH * 2 + 2 * BLOCK_M * 4;
  static_assert(BLOCK_N == 16 * WARPS, "each warp owns 16 keys");
  static_assert(D % 16 == 0 && BLOCK_M % 16 == 0, "tiles are whole m16n8k16 steps");
};

// dQ: a CTA owns BLOCK_M query rows (16 per warp) and steps through BLOCK_N keys at a time.
template <int D_, int BLOCK_M_, int BLOCK_N_, int WARPS_>
struct DqTile {
  static constexpr int D = D_, BLOCK_M = BLOCK_M_, BLOCK_N = BLOCK_N_, WARPS = WARPS_, THREADS = 32 * WARPS_;
  static constexpr int PITCH = kSharedPitch<D_>;
  // Q, dO tiles (BLOCK_M rows), K, V tiles (BLOCK_N rows).
  static constexpr int SHARED_BYTES = 2 * (BLOCK_M + BLOCK_N) * PITCH * 2;
  static_assert(BLOCK_M == 16 * WARPS, "each warp owns 16 query rows");
  static_assert(D % 16 == 0 && BLOCK_N % 16 == 0, "tiles are whole m16n8k16 steps");
};

// Copies rows [row0, row0 + ROWS) of a (rows, D) matrix with row stride ``row_stride`` into a shared tile; rows at
// or past ``n_rows`` are zero-filled. 16-byte accesses: the binding guarantees 16-byte aligned rows.
template <int ROWS, int D, int THREADS, typename T>
MGF_DEV void load_tile(T* tile, const T* matrix, int64_t row_stride, int row0, int n_rows, int tid) {
  constexpr int CHUNKS_PER_ROW = D / 8;
  constexpr int PITCH = kSharedPitch<D>;
  for (int c = tid; c < ROWS * CHUNKS_PER_ROW; c += THREADS) {
    const int r = c / CHUNKS_PER_ROW, col = (c % CHUNKS_PER_ROW) * 8;
    uint4 chunk = {0u, 0u, 0u, 0u};
    if (row0 + r < n_rows) chunk = *reinterpret_cast<const uint4*>(matrix + (row0 + r) * row_stride + col);
    *reinterpret_cast<uint4*>(tile + r * PITCH + col) = chunk;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward preprocessing: delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] in fp32. One warp per row;
// grid (ceil(Nq / 4), Hq, B), 128 threads.
constexpr int kDeltaRowsPerBlock = 4;

template <typename T>
MGF_KERNEL void MGF_LAUNCH_BOUNDS(32 * kDeltaRowsPerBlock, 1) attention_backward_delta_kernel(const AttentionParams p) {
  const int lane = thread_index() & 31;
  const int i = block_index_x() * kDeltaRowsPerBlock + (thread_index() >> 5);
  const int h = block_index_y(), b = block_index_z();
  if (i >= p.n_q) return;  // a whole warp leaves together
  const T* out = static_cast<const T*>(p.out) + b * p.out_strides.batch + h * p.out_strides.head +
                 i * p.out_strides.row;
  const T* dout = static_cast<const T*>(p.grad_out) + b * p.grad_out_strides.batch + h * p.grad_out_strides.head +
                  i * p.grad_out_strides.row;
  float sum = 0.0f;
  for (int d = lane; d < p.head_dim; d += 32) sum += Element<T>::to_float(out[d]) * Element<T>::to_float(dout[d]);
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) sum += warp_shfl_xor(sum, mask);
  if (lane == 0) p.delta[(static_cast<int64_t>(b) * p.heads_q + h) * p.n_q + i] = sum;
}

// The recomputed probability of (i, j) and dS_ij, from the raw score, the raw dP = dO_i . V_j, the row's lse and
// delta. ``p_out`` gets dropout(P)_ij (what multiplied V in the forward pass).
struct BackwardPointwise {
  float scale;
  bool dropout;
  uint32_t threshold;
  float dropout_scale;
  uint64_t seed;
  uint64_t dropout_row0;  // (b * Hq + h) * Nq
  int n_k;

  MGF_DEV float operator()(bool visible, int i, int j, float score, float dp, float lse, float delta,
                           float& p_out) const {
    const float prob = visible ? softmax_weight_from_lse(score * scale, lse) : 0.0f;
    float p_dropped = prob;
    if (dropout) {
      const bool keep = dropout_keep(seed, (dropout_row0 + i) * n_k + j, threshold);
      p_dropped = keep ? prob * dropout_scale : 0.0f;
      dp = keep ? dp * dropout_scale : 0.0f;
    }
    p_out = p_dropped;
    return prob * (dp - delta);
  }
};

MGF_DEV BackwardPointwise make_pointwise(const AttentionParams& p, int b, int h) {
  return BackwardPointwise{p.scale,
                           p.dropout,
                           p.dropout_threshold,
                           p.dropout_scale,
                           p.dropout ? static_cast<uint64_t>(*p.seed) : 0,
                           (static_cast<uint64_t>(b) * p.heads_q + h) * p.n_q,
                           p.n_k};
}

// ---------------------------------------------------------------------------------------------------------------
// dK, dV. Grid: (ceil(Nk / BLOCK_N), Hk, B). Each warp owns 16 keys; S^T and dP^T are computed key-major so that
// dS^T and P^T come out as A fragments for dK += dS^T Q and dV += P^T dO.
template <typename T, typename Tile>
MGF_KERNEL void MGF_LAUNCH_BOUNDS(Tile::THREADS, 1) attention_backward_dkdv_kernel(const AttentionParams p) {
  constexpr int D = Tile::D, BLOCK_M = Tile::BLOCK_M, BLOCK_N = Tile::BLOCK_N, PITCH = Tile::PITCH;
  const int tid = thread_index(), lane = tid & 31, warp = tid >> 5, t = lane & 3;
  const int n0 = block_index_x() * BLOCK_N, hk = block_index_y(), b = block_index_z();
  const int group = p.heads_q / p.heads_k;

  T* sk = reinterpret_cast<T*>(dynamic_shared_memory());  // (BLOCK_N, PITCH)
  T* sv = sk + BLOCK_N * PITCH;                             // (BLOCK_N, PITCH)
  T* sq = sv + BLOCK_N * PITCH;                             // (BLOCK_M, PITCH)
  T* sdo = sq + BLOCK_M * PITCH;                            // (BLOCK_M, PITCH)
  float* s_lse = reinterpret_cast<float*>(sdo + BLOCK_M * PITCH);
  float* s_delta = s_lse + BLOCK_M;
  load_tile<BLOCK_N, D, Tile::THREADS>(sk, static_cast<const T*>(p.k) + b * p.k_strides.batch + hk * p.k_strides.head,
                                       p.k_strides.row, n0, p.n_k, tid);
  load_tile<BLOCK_N, D, Tile::THREADS>(sv, static_cast<const T*>(p.v) + b * p.v_strides.batch + hk * p.v_strides.head,
                                       p.v_strides.row, n0, p.n_k, tid);
  const T* sk_warp = sk + warp * 16 * PITCH;
  const T* sv_warp = sv + warp * 16 * PITCH;
  const int key_lo = n0 + warp * 16 + (lane >> 2);  // this lane's keys: key_lo and key_lo + 8

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dn][e] = dv[dn][e] = 0.0f;
  }

  // Causal: queries before n0 see none of these keys; start at the query tile holding row n0.
  const int m_begin = p.causal ? (n0 / BLOCK_M) * BLOCK_M : 0;
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const T* q = static_cast<const T*>(p.q) + b * p.q_strides.batch + h * p.q_strides.head;
    const T* dout = static_cast<const T*>(p.grad_out) + b * p.grad_out_strides.batch + h * p.grad_out_strides.head;
    const int64_t row_stats = (static_cast<int64_t>(b) * p.heads_q + h) * p.n_q;
    const Visibility visible = make_visibility(p, b, h);
    const BackwardPointwise pointwise = make_pointwise(p, b, h);

    for (int m0 = m_begin; m0 < p.n_q; m0 += BLOCK_M) {
      block_sync();  // every warp is done with the previous Q / dO tile
      load_tile<BLOCK_M, D, Tile::THREADS>(sq, q, p.q_strides.row, m0, p.n_q, tid);
      load_tile<BLOCK_M, D, Tile::THREADS>(sdo, dout, p.grad_out_strides.row, m0, p.n_q, tid);
      for (int r = tid; r < BLOCK_M; r += Tile::THREADS) {
        const bool inside = m0 + r < p.n_q;
        s_lse[r] = inside ? p.lse[row_stats + m0 + r] : INFINITY;
        s_delta[r] = inside ? p.delta[row_stats + m0 + r] : 0.0f;
      }
      block_sync();

      // S^T = K Q^T and dP^T = V dO^T: A = this warp's K (V) rows, B(k = d, n = query) = Q[query][d] (dO).
      float st[BLOCK_M / 8][4], dpt[BLOCK_M / 8][4];
      paired_row_products<T, BLOCK_M / 8, D, PITCH>(st, dpt, sk_warp, sv_warp, sq, sdo, lane);

      // Pointwise: st <- dropout(P)^T, dpt <- dS^T.
#pragma unroll
      for (int nt = 0; nt < BLOCK_M / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i_local = nt * 8 + 2 * t + (e & 1), j = key_lo + 8 * (e >> 1), i = m0 + i_local;
          float p_dropped;
          dpt[nt][e] = pointwise(visible(i, j), i, j, st[nt][e], dpt[nt][e], s_lse[i_local], s_delta[i_local],
                                 p_dropped);
          st[nt][e] = p_dropped;
        }
      }

      // dV += dropout(P)^T dO and dK += dS^T Q: B(k = query, n = d) = dO[query][d] (Q).
#pragma unroll
      for (int kk = 0; kk < BLOCK_M / 16; ++kk) {
        uint32_t ap[4], ads[4];
        c_to_a<T>(ap, st[2 * kk], st[2 * kk + 1]);
        c_to_a<T>(ads, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
          uint32_t bdo[2], bq[2];
          load_b<PITCH, 1>(bdo, sdo + kk * 16 * PITCH + dn * 8, lane);
          load_b<PITCH, 1>(bq, sq + kk * 16 * PITCH + dn * 8, lane);
          mma_16816<T>(dv[dn], ap, bdo);
          mma_16816<T>(dk[dn], ads, bq);
        }
      }
    }
  }

  const float dk_scale[2] = {p.scale, p.scale}, one[2] = {1.0f, 1.0f};
  store_rows<D>(static_cast<T*>(p.grad_k) + b * p.grad_k_strides.batch + hk * p.grad_k_strides.head,
                p.grad_k_strides.row, dk, key_lo, p.n_k, dk_scale, lane);
  store_rows<D>(static_cast<T*>(p.grad_v) + b * p.grad_v_strides.batch + hk * p.grad_v_strides.head,
                p.grad_v_strides.row, dv, key_lo, p.n_k, one, lane);
}

// ---------------------------------------------------------------------------------------------------------------
// dQ. Grid: (ceil(Nq / BLOCK_M), Hq, B). Each warp owns 16 query rows.
template <typename T, typename Tile>
MGF_KERNEL void MGF_LAUNCH_BOUNDS(Tile::THREADS, 1) attention_backward_dq_kernel(const AttentionParams p) {
  constexpr int D = Tile::D, BLOCK_M = Tile::BLOCK_M, BLOCK_N = Tile::BLOCK_N, PITCH = Tile::PITCH;
  const int tid = thread_index(), lane = tid & 31, warp = tid >> 5, t = lane & 3;
  const int m0 = block_index_x() * BLOCK_M, h = block_index_y(), b = block_index_z();
  const int hk = h / (p.heads_q / p.heads_k);

  T* sq = reinterpret_cast<T*>(dynamic_shared_memory());  // (BLOCK_M, PITCH)
  T* sdo = sq + BLOCK_M * PITCH;                            // (BLOCK_M, PITCH)
  T* sk = sdo + BLOCK_M * PITCH;                            // (BLOCK_N, PITCH)
  T* sv = sk + BLOCK_N * PITCH;                             // (BLOCK_N, PITCH)
  load_tile<BLOCK_M, D, Tile::THREADS>(sq, static_cast<const T*>(p.q) + b * p.q_strides.batch + h * p.q_strides.head,
                                       p.q_strides.row, m0, p.n_q, tid);
  load_tile<BLOCK_M, D, Tile::THREADS>(
      sdo, static_cast<const T*>(p.grad_out) + b * p.grad_out_strides.batch + h * p.grad_out_strides.head,
      p.grad_out_strides.row, m0, p.n_q, tid);
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides.batch + hk * p.k_strides.head;
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides.batch + hk * p.v_strides.head;
  const T* sq_warp = sq + warp * 16 * PITCH;
  const T* sdo_warp = sdo + warp * 16 * PITCH;

  const Visibility visible = make_visibility(p, b, h);
  const BackwardPointwise pointwise = make_pointwise(p, b, h);
  const int row_lo = m0 + warp * 16 + (lane >> 2);  // this lane's rows: row_lo and row_lo + 8
  const int64_t row_stats = (static_cast<int64_t>(b) * p.heads_q + h) * p.n_q;
  float lse[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row_lo + 8 * r;
    lse[r] = i < p.n_q ? p.lse[row_stats + i] : INFINITY;
    delta[r] = i < p.n_q ? p.delta[row_stats + i] : 0.0f;
  }

  float dq[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) dq[dn][0] = dq[dn][1] = dq[dn][2] = dq[dn][3] = 0.0f;

  const int n_end = p.causal ? min(p.n_k, m0 + BLOCK_M) : p.n_k;
  for (int n0 = 0; n0 < n_end; n0 += BLOCK_N) {
    block_sync();  // every warp is done with the previous K / V tile
    load_tile<BLOCK_N, D, Tile::THREADS>(sk, k, p.k_strides.row, n0, p.n_k, tid);
    load_tile<BLOCK_N, D, Tile::THREADS>(sv, v, p.v_strides.row, n0, p.n_k, tid);
    block_sync();

    // S = Q K^T and dP = dO V^T: A = this warp's Q (dO) rows, B(k = d, n = key) = K[key][d] (V).
    float s[BLOCK_N / 8][4], dp[BLOCK_N / 8][4];
    paired_row_products<T, BLOCK_N / 8, D, PITCH>(s, dp, sq_warp, sdo_warp, sk, sv, lane);

    // Pointwise: s <- dS.
#pragma unroll
    for (int nt = 0; nt < BLOCK_N / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = row_lo + 8 * (e >> 1), j = n0 + nt * 8 + 2 * t + (e & 1);
        float unused;
        s[nt][e] = pointwise(visible(i, j), i, j, s[nt][e], dp[nt][e], lse[e >> 1], delta[e >> 1], unused);
      }
    }

    // dQ += dS K: B(k = key, n = d) = K[key][d].
#pragma unroll
    for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
      uint32_t a[4];
      c_to_a<T>(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        uint32_t bf[2];
        load_b<PITCH, 1>(bf, sk + kk * 16 * PITCH + dn * 8, lane);
        mma_16816<T>(dq[dn], a, bf);
      }
    }
  }

  const float dq_scale[2] = {p.scale, p.scale};
  store_rows<D>(static_cast<T*>(p.grad_q) + b * p.grad_q_strides.batch + h * p.grad_q_strides.head,
                p.grad_q_strides.row, dq, row_lo, p.n_q, dq_scale, lane);
}

}  // namespace attention
}  // namespace metagpt_fast
