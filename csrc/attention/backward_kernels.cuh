// Fused attention backward (FlashAttention-2, Dao 2023), deterministic: no atomics, every gradient element is
// written by exactly one thread.
//
//   attention_backward_delta_kernel: delta_i = dO_i . O_i (fp32);
//   attention_backward_dkdv_kernel: a CTA owns BLOCK_N keys of one (batch, kv head), 16 per warp, and streams the
//     BLOCK_M-row tiles of Q and dO of every query head of its GQA group that the window lets see those keys,
//     accumulating dK = scale * dS^T Q and dV = dropout(P)^T dO in registers;
//   attention_backward_dq_kernel: a CTA owns BLOCK_M query rows, 16 or 32 per warp, and streams the BLOCK_N-key
//     tiles of K and V its window sees, accumulating dQ = scale * dS K in registers;
// with P recomputed from the forward's lse, dP = dO V^T and dS = P * (dropout(dP) - delta) (times 1 - tanh^2 of the
// capped score under a softcap). Recomputing S and dP in the dQ pass costs two matmuls per tile over an atomic dQ
// and buys bit-identical gradients run to run.
//
// Data movement: the streamed tiles go global -> shared with 16-byte cp.async into STAGES buffers; the copy of tile
// it + STAGES - 1 is issued right after the barrier that opens tile it, so it flies during tile it's math, and one
// barrier per tile suffices (it also retires the buffer the new copy overwrites, read during tile it - 1). Shared
// tiles are XOR-swizzled (tile_io.cuh) and every mma operand comes from ldmatrix: row-major ones (A from K / Q rows,
// B from the rows of the other side) plain, the ones contracted along the rows (B of dV += P^T dO, dK += dS^T Q,
// dQ += dS K) with .trans. The dK/dV kernel keeps each warp's 16 keys for all four products, so S^T and dP^T
// come out of the mma as the A fragments of dK and dV (no shared-memory round trip of P or dS).
//
// Probabilities: p = exp2(s * scale * log2(e) - lse * log2(e)), one FFMA and one ex2 (lse * log2(e) is computed once
// per row); an empty row has lse = +inf, so p = 0 and its gradients vanish. Dropout regenerates the forward's Philox
// mask at offset ((b * Hq + h) * Nq + i) * Nk + j.
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

constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------------------------------
// Backward preprocessing: delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] in fp32. One warp per row, each lane
// reading element pairs; grid (ceil(Nq / 4), Hq, B), 128 threads.
constexpr int kDeltaRowsPerBlock = 4;

template <typename T>
MGF_KERNEL void MGF_LAUNCH_BOUNDS(32 * kDeltaRowsPerBlock, 1) attention_backward_delta_kernel(const AttentionParams p) {
  const int lane = thread_index() & 31;
  const int i = block_index_x() * kDeltaRowsPerBlock + (thread_index() >> 5);
  const int h = block_index_y(), b = block_index_z();
  if (i >= p.n_q) return;  // a whole warp leaves together
  const T* out =
      static_cast<const T*>(p.out) + b * p.out_strides.batch + h * p.out_strides.head + i * p.out_strides.row;
  const T* dout = static_cast<const T*>(p.grad_out) + b * p.grad_out_strides.batch + h * p.grad_out_strides.head +
                  i * p.grad_out_strides.row;
  float sum = 0.0f;
  for (int d = 2 * lane; d < p.head_dim; d += 64) {
    sum += Element<T>::to_float(out[d]) * Element<T>::to_float(dout[d]) +
           Element<T>::to_float(out[d + 1]) * Element<T>::to_float(dout[d + 1]);
  }
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) sum += warp_shfl_xor(sum, mask);
  if (lane == 0) p.delta[(static_cast<int64_t>(b) * p.heads_q + h) * p.n_q + i] = sum;
}

// dS and dropout(P) of one (query i, key j) from the raw score q.k, the raw dP = dO_i . V_j and the row's
// lse * log2(e) and delta.
struct BackwardPointwise {
  float scale_log2;  // scale * log2(e)
  bool capped;
  float cap_exp2;  // 2 * log2(e) * scale / softcap: tanh(x) = 1 - 2 / (2^(cap_exp2 * s) + 1), x = scale * s / softcap
  float cap_log2;  // softcap * log2(e)
  bool dropout;
  uint32_t threshold;
  float dropout_scale;
  uint64_t seed;
  uint64_t dropout_row0;  // (b * Hq + h) * Nq
  int n_k;

  MGF_DEV float operator()(bool visible, int i, int j, float score, float dp, float lse2, float delta,
                           float& p_out) const {
    float prob, d_cap = 1.0f;
    if (capped) {  // the forward's tanh (one ex2 and a division), so p matches the lse it saved
      const float tanh_x = 1.0f - 2.0f / (fast_exp2(score * cap_exp2) + 1.0f);
      d_cap = 1.0f - tanh_x * tanh_x;
      prob = fast_exp2(fmaf(tanh_x, cap_log2, -lse2));
    } else {
      prob = fast_exp2(fmaf(score, scale_log2, -lse2));
    }
    prob = visible ? prob : 0.0f;
    float p_dropped = prob;
    if (dropout) {
      const bool keep = dropout_keep(seed, (dropout_row0 + i) * n_k + j, threshold);
      p_dropped = keep ? prob * dropout_scale : 0.0f;
      dp = keep ? dp * dropout_scale : 0.0f;
    }
    p_out = p_dropped;
    return prob * (dp - delta) * d_cap;
  }
};

MGF_DEV BackwardPointwise make_pointwise(const AttentionParams& p, int b, int h) {
  const bool capped = p.softcap > 0.0f;
  return BackwardPointwise{p.scale * kLog2e,
                           capped,
                           capped ? 2.0f * kLog2e * p.scale / p.softcap : 0.0f,
                           p.softcap * kLog2e,
                           p.dropout,
                           p.dropout_threshold,
                           p.dropout_scale,
                           p.dropout ? static_cast<uint64_t>(*p.seed) : 0,
                           (static_cast<uint64_t>(b) * p.heads_q + h) * p.n_q,
                           p.n_k};
}

// x1 = A1 B1^T and x2 = A2 B2^T over the head dim for this warp's MT * 16 rows of A1, A2 (rows a_row.. of swizzled
// (*, D) tiles) and the NT * 8 rows of B1, B2 (rows 0.. of swizzled (NT * 8, D) tiles): S / dP in the dQ kernel,
// S^T / dP^T in the dK/dV kernel. Per 16-wide step of D: 2 * MT + NT ldmatrix.x4 for 2 * MT * NT mma (each B
// fragment serves the MT row blocks).
template <typename T, int MT, int NT, int D>
MGF_DEV void paired_products(float (&x1)[MT][NT][4], float (&x2)[MT][NT][4], const T* a1, const T* a2, int a_row,
                             const T* b1, const T* b2, int lane) {
  static_assert(NT % 2 == 0, "B tiles come in pairs of 8 rows (one ldmatrix.x4)");
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) x1[mt][nt][e] = x2[mt][nt][e] = 0.0f;
    }
  }
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t f1[MT][4], f2[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      ldsm_a<D>(f1[mt], a1, a_row + mt * 16, kk * 16, lane);
      ldsm_a<D>(f2[mt], a2, a_row + mt * 16, kk * 16, lane);
    }
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t g1[2][2], g2[2][2];
      ldsm_b<D>(g1[0], g1[1], b1, np * 16, kk * 16, lane);
      ldsm_b<D>(g2[0], g2[1], b2, np * 16, kk * 16, lane);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          mma_16816<T>(x1[mt][2 * np + half], f1[mt], g1[half]);
          mma_16816<T>(x2[mt][2 * np + half], f2[mt], g2[half]);
        }
      }
    }
  }
}

// acc[mt][dn] += A_mt B for a 16-deep step: A_mt the A fragments of MT row blocks, B rows b_row.. b_row + 15 of a
// swizzled (*, D) tile read as B(k = row, n = column) with ldmatrix.trans (one per 16 columns, serving MT blocks).
template <typename T, int MT, int D>
MGF_DEV void accumulate_rows(float (&acc)[MT][D / 8][4], const uint32_t (&a)[MT][4], const T* b, int b_row,
                             int lane) {
#pragma unroll
  for (int dp = 0; dp < D / 16; ++dp) {
    uint32_t g[2][2];
    ldsm_b_trans<D>(g[0], g[1], b, b_row, dp * 16, lane);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      mma_16816<T>(acc[mt][2 * dp], a[mt], g[0]);
      mma_16816<T>(acc[mt][2 * dp + 1], a[mt], g[1]);
    }
  }
}

template <int D>
MGF_DEV void zero_accumulator(float (&acc)[D / 8][4]) {
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) acc[dn][0] = acc[dn][1] = acc[dn][2] = acc[dn][3] = 0.0f;
}

// dK/dV: a CTA owns BLOCK_N keys (16 per warp) and streams BLOCK_M query rows at a time through STAGES buffers.
template <int D_, int BLOCK_M_, int BLOCK_N_, int WARPS_, int STAGES_>
struct DkdvTile {
  static constexpr int D = D_, BLOCK_M = BLOCK_M_, BLOCK_N = BLOCK_N_, WARPS = WARPS_, STAGES = STAGES_;
  static constexpr int THREADS = 32 * WARPS_;
  // K, V tiles (BLOCK_N rows); per stage Q, dO tiles (BLOCK_M rows) and lse * log2(e), delta of BLOCK_M rows.
  static constexpr int SHARED_BYTES = 2 * BLOCK_N * D * 2 + STAGES * (2 * BLOCK_M * D * 2 + 2 * BLOCK_M * 4);
  static_assert(BLOCK_N == 16 * WARPS, "each warp owns 16 keys");
  static_assert(D % 64 == 0 && BLOCK_M % 16 == 0, "swizzled tiles of whole m16n8k16 steps");
  static_assert(2 * BLOCK_M <= THREADS, "one thread per row statistic");
  static_assert(STAGES >= 2, "at least one tile in flight");
};

// dQ: a CTA owns BLOCK_M query rows (ROWS = 16 or 32 per warp: with 32, each K / V fragment serves two row blocks)
// and streams BLOCK_N keys at a time through STAGES buffers.
template <int D_, int BLOCK_M_, int BLOCK_N_, int WARPS_, int STAGES_>
struct DqTile {
  static constexpr int D = D_, BLOCK_M = BLOCK_M_, BLOCK_N = BLOCK_N_, WARPS = WARPS_, STAGES = STAGES_;
  static constexpr int THREADS = 32 * WARPS_, ROWS = BLOCK_M_ / WARPS_;
  // Q, dO tiles (BLOCK_M rows); per stage K, V tiles (BLOCK_N rows).
  static constexpr int SHARED_BYTES = 2 * BLOCK_M * D * 2 + STAGES * 2 * BLOCK_N * D * 2;
  static_assert(BLOCK_M == ROWS * WARPS && (ROWS == 16 || ROWS == 32), "each warp owns 16 or 32 query rows");
  static_assert(D % 64 == 0 && BLOCK_N % 16 == 0, "swizzled tiles of whole m16n8k16 steps");
  static_assert(STAGES >= 2, "at least one tile in flight");
};

// ---------------------------------------------------------------------------------------------------------------
// dK, dV. Grid: (ceil(Nk / BLOCK_N), Hk, B).
template <typename T, typename Tile>
MGF_KERNEL void MGF_LAUNCH_BOUNDS(Tile::THREADS, 2) attention_backward_dkdv_kernel(const AttentionParams p) {
  constexpr int D = Tile::D, BLOCK_M = Tile::BLOCK_M, BLOCK_N = Tile::BLOCK_N, STAGES = Tile::STAGES;
  constexpr int THREADS = Tile::THREADS;
  const int tid = thread_index(), lane = tid & 31, warp = tid >> 5, t = lane & 3;
  const int n0 = block_index_x() * BLOCK_N, hk = block_index_y(), b = block_index_z();
  const int group = p.heads_q / p.heads_k;

  T* sk = reinterpret_cast<T*>(dynamic_shared_memory());  // (BLOCK_N, D) swizzled
  T* sv = sk + BLOCK_N * D;                                 // (BLOCK_N, D)
  T* stages = sv + BLOCK_N * D;                             // per stage: Q (BLOCK_M, D), dO (BLOCK_M, D)
  float* stats = reinterpret_cast<float*>(stages + STAGES * 2 * BLOCK_M * D);  // per stage: lse2, delta (BLOCK_M)

  // The queries whose window reaches these keys (the same for every head of the group: the mask is tested per
  // element). The CTA walks (head, query tile) pairs in order, head-major.
  const Visibility window = make_visibility(p, b, hk * group);
  const int m_begin = window.query_begin(n0), m_end = window.query_end(n0 + BLOCK_N);
  const int tiles_per_head = m_end > m_begin ? (m_end - m_begin + BLOCK_M - 1) / BLOCK_M : 0;
  const int n_tiles = group * tiles_per_head;

  // Issues the copies of tile ``it`` into its stage (rows past m_end, which see none of these keys, are zero-filled
  // rather than read); returns the row statistic this thread stores for it.
  auto issue = [&](int it) -> float {
    const int h = hk * group + it / tiles_per_head, m0 = m_begin + (it % tiles_per_head) * BLOCK_M;
    T* sq = stages + (it % STAGES) * 2 * BLOCK_M * D;
    load_tile_async<BLOCK_M, D, THREADS>(sq, static_cast<const T*>(p.q) + b * p.q_strides.batch + h * p.q_strides.head,
                                         p.q_strides.row, m0, m_end, tid);
    load_tile_async<BLOCK_M, D, THREADS>(
        sq + BLOCK_M * D,
        static_cast<const T*>(p.grad_out) + b * p.grad_out_strides.batch + h * p.grad_out_strides.head,
        p.grad_out_strides.row, m0, m_end, tid);
    const int r = tid % BLOCK_M, i = m0 + r;
    const int64_t row = (static_cast<int64_t>(b) * p.heads_q + h) * p.n_q + i;
    if (tid < BLOCK_M) return i < m_end ? p.lse[row] * kLog2e : INFINITY;
    return i < m_end && tid < 2 * BLOCK_M ? p.delta[row] : 0.0f;
  };
  auto store_stat = [&](int it, float value) {
    if (tid < 2 * BLOCK_M) stats[(it % STAGES) * 2 * BLOCK_M + tid] = value;
  };

  float dk[1][D / 8][4], dv[1][D / 8][4];  // one 16-key block per warp
  zero_accumulator<D>(dk[0]);
  zero_accumulator<D>(dv[0]);
  if (n_tiles > 0) {
    load_tile_async<BLOCK_N, D, THREADS>(sk, static_cast<const T*>(p.k) + b * p.k_strides.batch + hk * p.k_strides.head,
                                         p.k_strides.row, n0, p.n_k, tid);
    load_tile_async<BLOCK_N, D, THREADS>(sv, static_cast<const T*>(p.v) + b * p.v_strides.batch + hk * p.v_strides.head,
                                         p.v_strides.row, n0, p.n_k, tid);
  }
  // Prologue: tiles 0 .. STAGES - 2 in flight, one commit group each (the first also holds K and V).
#pragma unroll
  for (int it = 0; it < STAGES - 1; ++it) {
    if (it < n_tiles) store_stat(it, issue(it));
    cp_async_commit();
  }

  const int key_lo = n0 + warp * 16 + (lane >> 2);  // this lane's keys: key_lo and key_lo + 8
  for (int it = 0; it < n_tiles; ++it) {
    cp_async_wait<STAGES - 2>();  // this thread's copies of tile it (and K, V) landed
    block_sync();                 // everyone's landed; every warp is done with tile it - 1 and its buffer
    const int next = it + STAGES - 1;
    float next_stat = 0.0f;
    if (next < n_tiles) next_stat = issue(next);
    cp_async_commit();

    const int h = hk * group + it / tiles_per_head, m0 = m_begin + (it % tiles_per_head) * BLOCK_M;
    const T* sq = stages + (it % STAGES) * 2 * BLOCK_M * D;
    const T* sdo = sq + BLOCK_M * D;
    const float* s_lse2 = stats + (it % STAGES) * 2 * BLOCK_M;
    const float* s_delta = s_lse2 + BLOCK_M;

    // S^T = K Q^T and dP^T = V dO^T: A = this warp's K (V) rows, B(k = d, n = query) = Q[query][d] (dO).
    float st[1][BLOCK_M / 8][4], dpt[1][BLOCK_M / 8][4];
    paired_products<T, 1, BLOCK_M / 8, D>(st, dpt, sk, sv, warp * 16, sq, sdo, lane);

    // Pointwise: st <- dropout(P)^T, dpt <- dS^T. A warp whose 16 keys x BLOCK_M queries lie wholly inside the
    // window and the bounds, without a mask, skips the per-element visibility test.
    const Visibility visible = make_visibility(p, b, h);
    const BackwardPointwise pointwise = make_pointwise(p, b, h);
    const bool whole = visible.whole_tile(m0, m0 + BLOCK_M, n0 + warp * 16, n0 + warp * 16 + 16);
#pragma unroll
    for (int nt = 0; nt < BLOCK_M / 8; ++nt) {
      const int i_local = nt * 8 + 2 * t;
      const float2 lse2 = *reinterpret_cast<const float2*>(s_lse2 + i_local);
      const float2 delta = *reinterpret_cast<const float2*>(s_delta + i_local);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = m0 + i_local + (e & 1), j = key_lo + 8 * (e >> 1);
        float p_dropped;
        dpt[0][nt][e] = pointwise(whole || visible(i, j), i, j, st[0][nt][e], dpt[0][nt][e],
                                  (e & 1) ? lse2.y : lse2.x, (e & 1) ? delta.y : delta.x, p_dropped);
        st[0][nt][e] = p_dropped;
      }
    }

    // dV += dropout(P)^T dO and dK += dS^T Q: B(k = query, n = d) = dO[query][d] (Q), read transposed.
#pragma unroll
    for (int kk = 0; kk < BLOCK_M / 16; ++kk) {
      uint32_t a[1][4];
      c_to_a<T>(a[0], st[0][2 * kk], st[0][2 * kk + 1]);
      accumulate_rows<T, 1, D>(dv, a, sdo, kk * 16, lane);
      c_to_a<T>(a[0], dpt[0][2 * kk], dpt[0][2 * kk + 1]);
      accumulate_rows<T, 1, D>(dk, a, sq, kk * 16, lane);
    }
    // Tile ``next``'s statistics go to a buffer last read during tile it - 1 and next read after a later barrier.
    if (next < n_tiles) store_stat(next, next_stat);
  }
  // No copy is pending here: the groups committed after the last tile's wait are empty.

  const float dk_scale[2] = {p.scale, p.scale}, one[2] = {1.0f, 1.0f};
  store_rows<D>(static_cast<T*>(p.grad_k) + b * p.grad_k_strides.batch + hk * p.grad_k_strides.head,
                p.grad_k_strides.row, dk[0], key_lo, p.n_k, dk_scale, lane);
  store_rows<D>(static_cast<T*>(p.grad_v) + b * p.grad_v_strides.batch + hk * p.grad_v_strides.head,
                p.grad_v_strides.row, dv[0], key_lo, p.n_k, one, lane);
}

// ---------------------------------------------------------------------------------------------------------------
// dQ. Grid: (ceil(Nq / BLOCK_M), Hq, B).
template <typename T, typename Tile>
MGF_KERNEL void MGF_LAUNCH_BOUNDS(Tile::THREADS, 2) attention_backward_dq_kernel(const AttentionParams p) {
  constexpr int D = Tile::D, BLOCK_M = Tile::BLOCK_M, BLOCK_N = Tile::BLOCK_N, STAGES = Tile::STAGES;
  constexpr int THREADS = Tile::THREADS, ROWS = Tile::ROWS, MT = ROWS / 16;
  const int tid = thread_index(), lane = tid & 31, warp = tid >> 5, t = lane & 3;
  const int m0 = block_index_x() * BLOCK_M, h = block_index_y(), b = block_index_z();
  const int hk = h / (p.heads_q / p.heads_k);

  T* sq = reinterpret_cast<T*>(dynamic_shared_memory());  // (BLOCK_M, D) swizzled
  T* sdo = sq + BLOCK_M * D;                                // (BLOCK_M, D)
  T* stages = sdo + BLOCK_M * D;                            // per stage: K (BLOCK_N, D), V (BLOCK_N, D)
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides.batch + hk * p.k_strides.head;
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides.batch + hk * p.v_strides.head;

  const Visibility visible = make_visibility(p, b, h);
  const BackwardPointwise pointwise = make_pointwise(p, b, h);
  const int n_begin = visible.key_begin(m0), n_end = visible.key_end(m0 + BLOCK_M);
  const int n_tiles = n_end > n_begin ? (n_end - n_begin + BLOCK_N - 1) / BLOCK_N : 0;
  // Issues the copies of key tile ``it`` into its stage; keys past n_end (outside the window) are zero-filled.
  auto issue = [&](int it) {
    T* skv = stages + (it % STAGES) * 2 * BLOCK_N * D;
    const int n0 = n_begin + it * BLOCK_N;
    load_tile_async<BLOCK_N, D, THREADS>(skv, k, p.k_strides.row, n0, n_end, tid);
    load_tile_async<BLOCK_N, D, THREADS>(skv + BLOCK_N * D, v, p.v_strides.row, n0, n_end, tid);
  };

  if (n_tiles > 0) {
    load_tile_async<BLOCK_M, D, THREADS>(sq, static_cast<const T*>(p.q) + b * p.q_strides.batch + h * p.q_strides.head,
                                         p.q_strides.row, m0, p.n_q, tid);
    load_tile_async<BLOCK_M, D, THREADS>(
        sdo, static_cast<const T*>(p.grad_out) + b * p.grad_out_strides.batch + h * p.grad_out_strides.head,
        p.grad_out_strides.row, m0, p.n_q, tid);
  }
#pragma unroll
  for (int it = 0; it < STAGES - 1; ++it) {
    if (it < n_tiles) issue(it);
    cp_async_commit();
  }

  const int row0 = m0 + warp * ROWS;               // this warp's rows: row0 .. row0 + ROWS - 1
  const int row_lo = row0 + (lane >> 2);           // this lane's rows: row_lo + 16 mt and row_lo + 16 mt + 8
  const int64_t row_stats = (static_cast<int64_t>(b) * p.heads_q + h) * p.n_q;
  float lse2[MT][2], delta[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = row_lo + 16 * mt + 8 * r;
      lse2[mt][r] = i < p.n_q ? p.lse[row_stats + i] * kLog2e : INFINITY;
      delta[mt][r] = i < p.n_q ? p.delta[row_stats + i] : 0.0f;
    }
  }

  float dq[MT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) zero_accumulator<D>(dq[mt]);
  for (int it = 0; it < n_tiles; ++it) {
    cp_async_wait<STAGES - 2>();  // this thread's copies of tile it (and Q, dO) landed
    block_sync();                 // everyone's landed; every warp is done with tile it - 1 and its buffer
    if (it + STAGES - 1 < n_tiles) issue(it + STAGES - 1);
    cp_async_commit();

    const int n0 = n_begin + it * BLOCK_N;
    const T* sk = stages + (it % STAGES) * 2 * BLOCK_N * D;
    const T* sv = sk + BLOCK_N * D;

    // S = Q K^T and dP = dO V^T: A = this warp's Q (dO) rows, B(k = d, n = key) = K[key][d] (V).
    float s[MT][BLOCK_N / 8][4], dp[MT][BLOCK_N / 8][4];
    paired_products<T, MT, BLOCK_N / 8, D>(s, dp, sq, sdo, warp * ROWS, sk, sv, lane);

    // Pointwise: s <- dS (a warp whose rows x BLOCK_N keys need no visibility test skips it).
    const bool whole = visible.whole_tile(row0, row0 + ROWS, n0, n0 + BLOCK_N);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < BLOCK_N / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = row_lo + 16 * mt + 8 * (e >> 1), j = n0 + nt * 8 + 2 * t + (e & 1);
          float unused;
          s[mt][nt][e] = pointwise(whole || visible(i, j), i, j, s[mt][nt][e], dp[mt][nt][e], lse2[mt][e >> 1],
                                   delta[mt][e >> 1], unused);
        }
      }
    }

    // dQ += dS K: B(k = key, n = d) = K[key][d], read transposed.
#pragma unroll
    for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) c_to_a<T>(a[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
      accumulate_rows<T, MT, D>(dq, a, sk, kk * 16, lane);
    }
  }
  // No copy is pending here: the groups committed after the last tile's wait are empty.

  const float dq_scale[2] = {p.scale, p.scale};
  T* grad_q = static_cast<T*>(p.grad_q) + b * p.grad_q_strides.batch + h * p.grad_q_strides.head;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    store_rows<D>(grad_q, p.grad_q_strides.row, dq[mt], row_lo + 16 * mt, p.n_q, dq_scale, lane);
  }
}

}  // namespace attention
}  // namespace metagpt_fast
