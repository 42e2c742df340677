// CPU flash attention, forward and backward: tiles of queries x keys, online softmax, O(N) extra memory.
//
// Forward, per (batch, query head, block of BLOCK_Q queries), over blocks of BLOCK_K keys:
//   S = scale * Q K^T (+ mask / causal -inf)  ->  online-softmax update (metagpt_fast/online_softmax.h)
//   acc = alpha * acc + dropout(exp(S - m)) V;   finally out = acc / l, lse = m + log(l)
//   With an additive mask, (m, log(l)) are saved apart instead (lse (2, B, Hq, Nq)): a row of scores at finfo.min
//   has |m| ~ 3.4e38, where m + log(l) rounds back to m (metagpt_fast/online_softmax.h).
// Backward, per (batch, kv head) so dK / dV accumulate without races (GQA: the group's query heads in turn):
//   P = exp(S - lse) (or exp((S - m) - log(l)));  dV += dropout(P)^T dO;  dP = dropout'(dO V^T);  dS = P * (dP - rowsum(dO * O))
//   dQ += scale * dS K;  dK += scale * dS^T Q
// Matrix products: on CPUs with AVX-512F or AVX2, the register-blocked tile kernels of tile_kernels.h (K^T, and V^T in the
// backward, packed once per head per thread); elsewhere (or with METAGPT_FAST_CPU_TILES=0) gemm.h's BLAS sgemm.
// Measured against torch's SDPA on a Zen 5 core, 1 thread, (1, 8, N, D) float32: the BLAS path ran the forward at
// 0.80-0.94x without causal (MKL's sgemm runs AVX2 there), the tiles at 1.4-1.8x (docs/benchmarks.md).
// Softmax, masks and the Philox dropout (metagpt_fast/philox.h, offsets in the (B, Hq, Nq, Nk) probability tensor)
// run in vectorisable row loops.
// Inputs float32 / bfloat16 / float16, all arithmetic in float32.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "gemm.h"
#include "row_ops.h"
#include "tile_kernels.h"
#include "metagpt_fast/online_softmax.h"
#include "metagpt_fast/philox.h"

namespace metagpt_fast::cpu {
namespace {

// Tile sizes: a (BLOCK_Q x BLOCK_K) float score tile is 64 KiB and stays in L2 next to its Q, K and V panels.
constexpr int64_t BLOCK_Q = 64;
constexpr int64_t BLOCK_K = 256;

struct Mask {
  const void* data = nullptr;
  bool is_bool = false;
  int64_t stride[4] = {0, 0, 0, 0};  // (B, Hq, Nq, Nk) broadcast strides: 0 on broadcast dims
};

struct Problem {
  int64_t batch, heads_q, heads_k, nq, nk, d, dv;
  float scale;
  bool causal;
  double dropout_p;
  uint64_t seed;
  uint32_t threshold;
  float inv_keep;
  Mask mask;
  bool split_lse;  // additive mask: the saved statistics are (m, log(l)) apart, lse (2, B, Hq, Nq)
};

// Strides of a (B, H, N, D) tensor with unit last stride, in elements.
struct Layout {
  int64_t b, h, n;
  explicit Layout(const at::Tensor& t) : b(t.stride(0)), h(t.stride(1)), n(t.stride(2)) {}
  int64_t at(int64_t bi, int64_t hi, int64_t ni) const { return bi * b + hi * h + ni * n; }
};

// Masks one row of scores s[0, n) for query i, keys j0 + c: causal keys after i and masked-out keys become -inf,
// additive mask values are added.
template <typename T>
void mask_row(const Problem& pb, float* s, int64_t n, int64_t b, int64_t h, int64_t i, int64_t j0) {
  if (pb.causal) {
    for (int64_t c = std::max<int64_t>(0, i + 1 - j0); c < n; ++c) s[c] = -INFINITY;
  }
  const Mask& mk = pb.mask;
  if (mk.data == nullptr) return;
  const int64_t base = b * mk.stride[0] + h * mk.stride[1] + i * mk.stride[2] + j0 * mk.stride[3];
  const int64_t sj = mk.stride[3];
  if (mk.is_bool) {
    const bool* m = static_cast<const bool*>(mk.data) + base;
    for (int64_t c = 0; c < n; ++c) s[c] = m[c * sj] ? s[c] : -INFINITY;
  } else {
    const T* m = static_cast<const T*>(mk.data) + base;
    for (int64_t c = 0; c < n; ++c) s[c] += to_float(m[c * sj]);
  }
}

// Dropout factors of one row: keep / (1 - p) or 0, Philox offsets ((b * Hq + h) * Nq + i) * Nk + j0 + c.
void dropout_factors(const Problem& pb, float* f, int64_t n, int64_t b, int64_t h, int64_t i, int64_t j0) {
  const uint64_t base = static_cast<uint64_t>(((b * pb.heads_q + h) * pb.nq + i) * pb.nk + j0);
  philox_factors(f, n, pb.seed, base, pb.threshold, pb.inv_keep);
}

// Keys a query block [i0, i1) can see: all, or j < i1 when causal (top-left alignment: query i sees j <= i).
int64_t key_end(const Problem& pb, int64_t i1) { return pb.causal ? std::min(pb.nk, i1) : pb.nk; }

// Writes rows [0, rows) of a query block: out = acc / l, and the saved row statistics.
template <typename T>
void write_rows(const Problem& pb, const std::vector<float>& acc, const std::vector<OnlineSoftmax>& state, int64_t rows,
                int64_t b, int64_t h, int64_t i0, T* out, float* lse) {
  T* orow0 = out + ((b * pb.heads_q + h) * pb.nq + i0) * pb.dv;
  float* lrow = lse + (b * pb.heads_q + h) * pb.nq + i0;
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = online_softmax_inv_sum(state[r]);
    const float* arow = acc.data() + r * pb.dv;
    T* orow = orow0 + r * pb.dv;
    for (int64_t c = 0; c < pb.dv; ++c) orow[c] = from_float<T>(arow[c] * inv);
    if (pb.split_lse) {
      lrow[r] = online_softmax_saved_max(state[r]);
      lrow[pb.batch * pb.heads_q * pb.nq + r] = online_softmax_log_sum(state[r]);
    } else {
      lrow[r] = online_softmax_lse(state[r]);
    }
  }
}

template <typename T>
void forward_blas(const Problem& pb, const T* q, Layout lq, const T* k, Layout lk, const T* v, Layout lv, T* out,
             float* lse) {
  const int64_t group = pb.heads_q / pb.heads_k, q_blocks = (pb.nq + BLOCK_Q - 1) / BLOCK_Q;
  at::parallel_for(0, pb.batch * pb.heads_q * q_blocks, 1, [&](int64_t t0, int64_t t1) {
    const SequentialBlas sequential;
    std::vector<float> qbuf(BLOCK_Q * pb.d), kbuf(BLOCK_K * pb.d), vbuf(BLOCK_K * pb.dv);
    std::vector<float> s(BLOCK_Q * BLOCK_K), f(BLOCK_K), acc(BLOCK_Q * pb.dv);
    std::vector<OnlineSoftmax> state(BLOCK_Q);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t qb = task % q_blocks, h = (task / q_blocks) % pb.heads_q, b = task / (q_blocks * pb.heads_q);
      const int64_t hk = h / group, i0 = qb * BLOCK_Q, rows = std::min(BLOCK_Q, pb.nq - i0);
      int64_t ldq, ldk, ldv;
      const float* qf = float_rows(q + lq.at(b, h, i0), rows, pb.d, lq.n, qbuf.data(), &ldq);
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(state.begin(), state.end(), online_softmax_init());
      const int64_t jend = key_end(pb, i0 + rows);
      for (int64_t j0 = 0; j0 < jend; j0 += BLOCK_K) {
        const int64_t cols = std::min(BLOCK_K, jend - j0);
        const float* kf = float_rows(k + lk.at(b, hk, j0), cols, pb.d, lk.n, kbuf.data(), &ldk);
        const float* vf = float_rows(v + lv.at(b, hk, j0), cols, pb.dv, lv.n, vbuf.data(), &ldv);
        gemm(false, true, rows, cols, pb.d, pb.scale, qf, ldq, kf, ldk, 0.0f, s.data(), BLOCK_K);
        for (int64_t r = 0; r < rows; ++r) {
          float* srow = s.data() + r * BLOCK_K;
          mask_row<T>(pb, srow, cols, b, h, i0 + r, j0);
          const float alpha = online_softmax_update(state[r], row_max(srow, cols));
          state[r].l += softmax_row(srow, cols, online_softmax_shift(state[r].m));
          if (alpha != 1.0f) scale_row(acc.data() + r * pb.dv, pb.dv, alpha);
          if (pb.dropout_p > 0.0) {
            dropout_factors(pb, f.data(), cols, b, h, i0 + r, j0);
            multiply_row(srow, srow, f.data(), cols);
          }
        }
        gemm(false, false, rows, pb.dv, cols, 1.0f, s.data(), BLOCK_K, vf, ldv, 1.0f, acc.data(), pb.dv);
      }
      write_rows(pb, acc, state, rows, b, h, i0, out, lse);
    }
  });
}

// Forward on the AVX-512 tile kernels (tile_kernels.h). Each thread keeps the current kv head's K^T packed in panels
// of TILE_KEYS keys (and, for 16-bit inputs, V in float32), filled lazily up to the keys its query blocks reach, so
// consecutive query blocks of one head reuse them; a query block of TILE_Q rows then runs scores_tile and
// accumulate_tile over key tiles of TILE_K, with the online softmax between them.
constexpr int64_t TILE_Q = 64;
constexpr int64_t TILE_K = 256;  // a multiple of TILE_KEYS
// Per-thread cap on the packed head (floats): beyond it (nk * d > 2^23, e.g. N = 65536 at D = 128) the BLAS path
// serves the call.
constexpr int64_t MAX_PACKED = int64_t(1) << 23;

bool tiles_fit(const Problem& pb) {
  const int64_t panels = (pb.nk + TILE_KEYS - 1) / TILE_KEYS;
  return tile_kernels_available() && panels * TILE_KEYS * std::max(pb.d, pb.dv) <= MAX_PACKED;
}

// Keys [p0 * TILE_KEYS, p1 * TILE_KEYS) of head (b, hk) of x (width values per key) as panels of x^T in float32:
// dst[p][c][j] = x[p * TILE_KEYS + j][c], zero past nk.
template <typename T>
void pack_panels(const T* x, Layout lx, int64_t b, int64_t hk, int64_t nk, int64_t width, int64_t p0, int64_t p1,
                 float* dst) {
  for (int64_t p = p0; p < p1; ++p) {
    float* panel = dst + p * width * TILE_KEYS;
    for (int64_t j = 0; j < TILE_KEYS; ++j) {
      const int64_t key = p * TILE_KEYS + j;
      if (key < nk) {
        const T* row = x + lx.at(b, hk, key);
        for (int64_t c = 0; c < width; ++c) panel[c * TILE_KEYS + j] = to_float(row[c]);
      } else {
        for (int64_t c = 0; c < width; ++c) panel[c * TILE_KEYS + j] = 0.0f;
      }
    }
  }
}

// Query block of task t within its head, ordered (0, last, 1, last - 1, ...): a causal head's cheap and expensive
// blocks alternate, so the contiguous task ranges of at::parallel_for get balanced work.
int64_t zigzag_block(int64_t t, int64_t blocks) { return t % 2 == 0 ? t / 2 : blocks - 1 - t / 2; }

template <typename T>
void forward_tiles(const Problem& pb, const T* q, Layout lq, const T* k, Layout lk, const T* v, Layout lv, T* out,
                   float* lse) {
  const int64_t group = pb.heads_q / pb.heads_k, q_blocks = (pb.nq + TILE_Q - 1) / TILE_Q, d = pb.d, dv = pb.dv;
  const int64_t all_panels = (pb.nk + TILE_KEYS - 1) / TILE_KEYS;
  at::parallel_for(0, pb.batch * pb.heads_q * q_blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qbuf(TILE_Q * d), s(TILE_Q * TILE_K), f(TILE_K), acc(TILE_Q * dv), alpha(TILE_Q);
    std::vector<float> packed(all_panels * TILE_KEYS * d), vbuf;
    if constexpr (!std::is_same_v<T, float>) vbuf.resize(pb.nk * dv);
    std::vector<OnlineSoftmax> state(TILE_Q);
    int64_t head = -1, packed_panels = 0;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t qb = zigzag_block(task % q_blocks, q_blocks), h = (task / q_blocks) % pb.heads_q;
      const int64_t b = task / (q_blocks * pb.heads_q), hk = h / group;
      if (b * pb.heads_k + hk != head) {
        head = b * pb.heads_k + hk;
        packed_panels = 0;
      }
      const int64_t i0 = qb * TILE_Q, rows = std::min(TILE_Q, pb.nq - i0), jend = key_end(pb, i0 + rows);
      const int64_t need = (jend + TILE_KEYS - 1) / TILE_KEYS;
      if (packed_panels < need) {  // K^T panels (zero past nk); V in float32 for 16-bit inputs
        pack_panels(k, lk, b, hk, pb.nk, d, packed_panels, need, packed.data());
        if constexpr (!std::is_same_v<T, float>) {
          for (int64_t j = packed_panels * TILE_KEYS; j < std::min(pb.nk, need * TILE_KEYS); ++j)
            for (int64_t x = 0; x < dv; ++x) vbuf[j * dv + x] = to_float(v[lv.at(b, hk, j) + x]);
        }
        packed_panels = need;
      }
      const float* vf;
      int64_t ldv = dv;
      if constexpr (std::is_same_v<T, float>) {
        vf = v + lv.at(b, hk, 0);
        ldv = lv.n;
      } else {
        vf = vbuf.data();
      }
      int64_t ldq;
      const float* qf = float_rows(q + lq.at(b, h, i0), rows, d, lq.n, qbuf.data(), &ldq);
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(state.begin(), state.end(), online_softmax_init());
      for (int64_t j0 = 0; j0 < jend; j0 += TILE_K) {
        const int64_t cols = std::min(TILE_K, jend - j0);
        scores_tile(qf, ldq, packed.data() + (j0 / TILE_KEYS) * d * TILE_KEYS, d, (cols + TILE_KEYS - 1) / TILE_KEYS,
                    pb.scale, s.data(), TILE_K, rows);
        for (int64_t r = 0; r < rows; ++r) {
          float* srow = s.data() + r * TILE_K;
          mask_row<T>(pb, srow, cols, b, h, i0 + r, j0);
          alpha[r] = online_softmax_update(state[r], row_max(srow, cols));
          state[r].l += softmax_row(srow, cols, online_softmax_shift(state[r].m));
          if (pb.dropout_p > 0.0) {
            dropout_factors(pb, f.data(), cols, b, h, i0 + r, j0);
            multiply_row(srow, srow, f.data(), cols);
          }
        }
        accumulate_tile(s.data(), TILE_K, vf + j0 * ldv, ldv, cols, dv, j0 == 0 ? nullptr : alpha.data(), acc.data(),
                        dv, rows);
      }
      write_rows(pb, acc, state, rows, b, h, i0, out, lse);
    }
  });
}

template <typename T>
void forward(const Problem& pb, const T* q, Layout lq, const T* k, Layout lk, const T* v, Layout lv, T* out,
             float* lse) {
  if (tiles_fit(pb)) {
    forward_tiles(pb, q, lq, k, lk, v, lv, out, lse);
  } else {
    forward_blas(pb, q, lq, k, lk, v, lv, out, lse);
  }
}

template <typename T>
void backward_blas(const Problem& pb, const T* dout, Layout ldo, const T* q, Layout lq, const T* k, Layout lk,
                   const T* v, Layout lv, const T* out, Layout lo, const float* lse, T* dq, T* dk, T* dv) {
  const int64_t group = pb.heads_q / pb.heads_k, d = pb.d, dvd = pb.dv;
  at::parallel_for(0, pb.batch * pb.heads_k, 1, [&](int64_t t0, int64_t t1) {
    const SequentialBlas sequential;
    std::vector<float> qbuf(BLOCK_Q * d), dobuf(BLOCK_Q * dvd), kbuf(BLOCK_K * d), vbuf(BLOCK_K * dvd);
    std::vector<float> p(BLOCK_Q * BLOCK_K), pd, f, dp(BLOCK_Q * BLOCK_K), dq_acc(BLOCK_Q * d), delta(BLOCK_Q);
    std::vector<float> dk_acc(pb.nk * d), dv_acc(pb.nk * dvd);
    if (pb.dropout_p > 0.0) {
      pd.resize(BLOCK_Q * BLOCK_K);
      f.resize(BLOCK_Q * BLOCK_K);
    }
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t hk = task % pb.heads_k, b = task / pb.heads_k;
      std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
      std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i0 = 0; i0 < pb.nq; i0 += BLOCK_Q) {
          const int64_t rows = std::min(BLOCK_Q, pb.nq - i0);
          int64_t ldq, lddo, ldk, ldv;
          const float* qf = float_rows(q + lq.at(b, h, i0), rows, d, lq.n, qbuf.data(), &ldq);
          const float* dof = float_rows(dout + ldo.at(b, h, i0), rows, dvd, ldo.n, dobuf.data(), &lddo);
          const float* lrow = lse + (b * pb.heads_q + h) * pb.nq + i0;
          for (int64_t r = 0; r < rows; ++r) {  // delta = rowsum(dO * O): the softmax-Jacobian correction
            const T* orow = out + lo.at(b, h, i0 + r);
            const float* drow = dof + r * lddo;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t c = 0; c < dvd; ++c) acc += drow[c] * to_float(orow[c]);
            delta[r] = acc;
          }
          std::fill(dq_acc.begin(), dq_acc.end(), 0.0f);
          const int64_t jend = key_end(pb, i0 + rows);
          for (int64_t j0 = 0; j0 < jend; j0 += BLOCK_K) {
            const int64_t cols = std::min(BLOCK_K, jend - j0);
            const float* kf = float_rows(k + lk.at(b, hk, j0), cols, d, lk.n, kbuf.data(), &ldk);
            const float* vf = float_rows(v + lv.at(b, hk, j0), cols, dvd, lv.n, vbuf.data(), &ldv);
            gemm(false, true, rows, cols, d, pb.scale, qf, ldq, kf, ldk, 0.0f, p.data(), BLOCK_K);
            for (int64_t r = 0; r < rows; ++r) {  // P = exp(S - lse), the forward's probabilities
              float* prow = p.data() + r * BLOCK_K;
              mask_row<T>(pb, prow, cols, b, h, i0 + r, j0);
              if (pb.split_lse) {
                const float m = lrow[r], log_l = lrow[pb.batch * pb.heads_q * pb.nq + r];
                for (int64_t c = 0; c < cols; ++c) prow[c] = softmax_weight_from_stats(prow[c], m, log_l);
              } else {
                probabilities_row(prow, cols, lrow[r]);
              }
              if (pb.dropout_p > 0.0) {
                float* frow = f.data() + r * BLOCK_K;
                dropout_factors(pb, frow, cols, b, h, i0 + r, j0);
                multiply_row(pd.data() + r * BLOCK_K, prow, frow, cols);
              }
            }
            const float* pdrop = pb.dropout_p > 0.0 ? pd.data() : p.data();
            gemm(true, false, cols, dvd, rows, 1.0f, pdrop, BLOCK_K, dof, lddo, 1.0f, dv_acc.data() + j0 * dvd, dvd);
            gemm(false, true, rows, cols, dvd, 1.0f, dof, lddo, vf, ldv, 0.0f, dp.data(), BLOCK_K);
            for (int64_t r = 0; r < rows; ++r) {  // dS = P * (dP - delta), written over dP
              const float* frow = pb.dropout_p > 0.0 ? f.data() + r * BLOCK_K : nullptr;
              softmax_grad_row(dp.data() + r * BLOCK_K, p.data() + r * BLOCK_K, frow, cols, delta[r]);
            }
            gemm(false, false, rows, d, cols, pb.scale, dp.data(), BLOCK_K, kf, ldk, 1.0f, dq_acc.data(), d);
            gemm(true, false, cols, d, rows, pb.scale, dp.data(), BLOCK_K, qf, ldq, 1.0f, dk_acc.data() + j0 * d, d);
          }
          T* dqrow = dq + ((b * pb.heads_q + h) * pb.nq + i0) * d;
          for (int64_t x = 0; x < rows * d; ++x) dqrow[x] = from_float<T>(dq_acc[x]);
        }
      }
      T* dkp = dk + (b * pb.heads_k + hk) * pb.nk * d;
      T* dvp = dv + (b * pb.heads_k + hk) * pb.nk * dvd;
      for (int64_t x = 0; x < pb.nk * d; ++x) dkp[x] = from_float<T>(dk_acc[x]);
      for (int64_t x = 0; x < pb.nk * dvd; ++x) dvp[x] = from_float<T>(dv_acc[x]);
    }
  });
}

// Backward on the tile kernels: the BLAS path's loop nest, with K^T and V^T packed once per (batch, kv head) (and K
// in float32 for 16-bit inputs); the transposed products (P^T dO, dS^T Q) read their left operand through strides.
template <typename T>
void backward_tiles(const Problem& pb, const T* dout, Layout ldo, const T* q, Layout lq, const T* k, Layout lk,
                    const T* v, Layout lv, const T* out, Layout lo, const float* lse, T* dq, T* dk, T* dv) {
  const int64_t group = pb.heads_q / pb.heads_k, d = pb.d, dvd = pb.dv;
  const int64_t all_panels = (pb.nk + TILE_KEYS - 1) / TILE_KEYS;
  at::parallel_for(0, pb.batch * pb.heads_k, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qbuf(BLOCK_Q * d), dobuf(BLOCK_Q * dvd), kpack(all_panels * TILE_KEYS * d);
    std::vector<float> vpack(all_panels * TILE_KEYS * dvd), krows;
    if constexpr (!std::is_same_v<T, float>) krows.resize(pb.nk * d);
    std::vector<float> p(BLOCK_Q * BLOCK_K), pd, f, dp(BLOCK_Q * BLOCK_K), dq_acc(BLOCK_Q * d), delta(BLOCK_Q);
    std::vector<float> dk_acc(pb.nk * d), dv_acc(pb.nk * dvd);
    if (pb.dropout_p > 0.0) {
      pd.resize(BLOCK_Q * BLOCK_K);
      f.resize(BLOCK_Q * BLOCK_K);
    }
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t hk = task % pb.heads_k, b = task / pb.heads_k;
      pack_panels(k, lk, b, hk, pb.nk, d, 0, all_panels, kpack.data());
      pack_panels(v, lv, b, hk, pb.nk, dvd, 0, all_panels, vpack.data());
      const float* kf;
      int64_t ldk;
      if constexpr (std::is_same_v<T, float>) {
        kf = k + lk.at(b, hk, 0);
        ldk = lk.n;
      } else {
        for (int64_t j = 0; j < pb.nk; ++j)
          for (int64_t c = 0; c < d; ++c) krows[j * d + c] = to_float(k[lk.at(b, hk, j) + c]);
        kf = krows.data();
        ldk = d;
      }
      std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
      std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i0 = 0; i0 < pb.nq; i0 += BLOCK_Q) {
          const int64_t rows = std::min(BLOCK_Q, pb.nq - i0);
          int64_t ldq, lddo;
          const float* qf = float_rows(q + lq.at(b, h, i0), rows, d, lq.n, qbuf.data(), &ldq);
          const float* dof = float_rows(dout + ldo.at(b, h, i0), rows, dvd, ldo.n, dobuf.data(), &lddo);
          const float* lrow = lse + (b * pb.heads_q + h) * pb.nq + i0;
          for (int64_t r = 0; r < rows; ++r) {  // delta = rowsum(dO * O): the softmax-Jacobian correction
            const T* orow = out + lo.at(b, h, i0 + r);
            const float* drow = dof + r * lddo;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t c = 0; c < dvd; ++c) acc += drow[c] * to_float(orow[c]);
            delta[r] = acc;
          }
          std::fill(dq_acc.begin(), dq_acc.end(), 0.0f);
          const int64_t jend = key_end(pb, i0 + rows);
          for (int64_t j0 = 0; j0 < jend; j0 += BLOCK_K) {
            const int64_t cols = std::min(BLOCK_K, jend - j0), panels = (cols + TILE_KEYS - 1) / TILE_KEYS;
            scores_tile(qf, ldq, kpack.data() + (j0 / TILE_KEYS) * d * TILE_KEYS, d, panels, pb.scale, p.data(),
                        BLOCK_K, rows);
            for (int64_t r = 0; r < rows; ++r) {  // P = exp(S - lse), the forward's probabilities
              float* prow = p.data() + r * BLOCK_K;
              mask_row<T>(pb, prow, cols, b, h, i0 + r, j0);
              if (pb.split_lse) {
                const float m = lrow[r], log_l = lrow[pb.batch * pb.heads_q * pb.nq + r];
                for (int64_t c = 0; c < cols; ++c) prow[c] = softmax_weight_from_stats(prow[c], m, log_l);
              } else {
                probabilities_row(prow, cols, lrow[r]);
              }
              if (pb.dropout_p > 0.0) {
                float* frow = f.data() + r * BLOCK_K;
                dropout_factors(pb, frow, cols, b, h, i0 + r, j0);
                multiply_row(pd.data() + r * BLOCK_K, prow, frow, cols);
              }
            }
            const float* pdrop = pb.dropout_p > 0.0 ? pd.data() : p.data();
            // dV += P^T dO;  dP = dO V^T
            product_tile(pdrop, 1, BLOCK_K, dof, lddo, rows, dvd, 1.0f, dv_acc.data() + j0 * dvd, dvd, cols);
            scores_tile(dof, lddo, vpack.data() + (j0 / TILE_KEYS) * dvd * TILE_KEYS, dvd, panels, 1.0f, dp.data(),
                        BLOCK_K, rows);
            for (int64_t r = 0; r < rows; ++r) {  // dS = P * (dP - delta), written over dP
              const float* frow = pb.dropout_p > 0.0 ? f.data() + r * BLOCK_K : nullptr;
              softmax_grad_row(dp.data() + r * BLOCK_K, p.data() + r * BLOCK_K, frow, cols, delta[r]);
            }
            // dQ += scale * dS K;  dK += scale * dS^T Q
            product_tile(dp.data(), BLOCK_K, 1, kf + j0 * ldk, ldk, cols, d, pb.scale, dq_acc.data(), d, rows);
            product_tile(dp.data(), 1, BLOCK_K, qf, ldq, rows, d, pb.scale, dk_acc.data() + j0 * d, d, cols);
          }
          T* dqrow = dq + ((b * pb.heads_q + h) * pb.nq + i0) * d;
          for (int64_t x = 0; x < rows * d; ++x) dqrow[x] = from_float<T>(dq_acc[x]);
        }
      }
      T* dkp = dk + (b * pb.heads_k + hk) * pb.nk * d;
      T* dvp = dv + (b * pb.heads_k + hk) * pb.nk * dvd;
      for (int64_t x = 0; x < pb.nk * d; ++x) dkp[x] = from_float<T>(dk_acc[x]);
      for (int64_t x = 0; x < pb.nk * dvd; ++x) dvp[x] = from_float<T>(dv_acc[x]);
    }
  });
}

template <typename T>
void backward(const Problem& pb, const T* dout, Layout ldo, const T* q, Layout lq, const T* k, Layout lk, const T* v,
              Layout lv, const T* out, Layout lo, const float* lse, T* dq, T* dk, T* dv) {
  if (tiles_fit(pb)) {
    backward_tiles(pb, dout, ldo, q, lq, k, lk, v, lv, out, lo, lse, dq, dk, dv);
  } else {
    backward_blas(pb, dout, ldo, q, lq, k, lk, v, lv, out, lo, lse, dq, dk, dv);
  }
}

// Checks the inputs shared by forward and backward and fills the problem description.
Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& attn_mask, at::Tensor& mask_view, double dropout_p,
                     bool is_causal, double scale, const c10::optional<at::Tensor>& seed, const char* op) {
  check_cpu_float(q, "q");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k and v must be (B, H, N, D), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu(), op, ": k and v must be CPU tensors");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), op, ": q, k and v must share the batch size");
  TORCH_CHECK(k.size(3) == q.size(3), op, ": k's head dim must equal q's (", q.size(3), "), got ", k.size(3));
  TORCH_CHECK(v.size(1) == k.size(1) && v.size(2) == k.size(2), op, ": v must be (B, Hk, Nk, Dv) for k ", k.sizes(),
              ", got ", v.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": k's heads (", k.size(1),
              ") must divide q's heads (", q.size(1), ")");
  Problem pb{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3),
             static_cast<float>(scale), is_causal, dropout_p, read_seed(seed, dropout_p, op),
             dropout_threshold(dropout_p), static_cast<float>(1.0 / (1.0 - dropout_p)), Mask{}, false};
  if (attn_mask.has_value()) {
    const at::Tensor& m = *attn_mask;
    TORCH_CHECK(!is_causal, op, ": attn_mask and is_causal cannot be combined");
    TORCH_CHECK(m.device().is_cpu(), op, ": attn_mask must be a CPU tensor, got ", m.device());
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type(), op,
                ": attn_mask must be bool or q's dtype ", q.scalar_type(), ", got ", m.scalar_type());
    TORCH_CHECK(m.dim() <= 4, op, ": attn_mask must have at most 4 dimensions, got ", m.sizes());
    mask_view = m.expand({pb.batch, pb.heads_q, pb.nq, pb.nk});  // a view: broadcast dims get stride 0
    pb.mask.data = mask_view.data_ptr();
    pb.mask.is_bool = m.scalar_type() == at::kBool;
    pb.split_lse = !pb.mask.is_bool;
    for (int dim = 0; dim < 4; ++dim) pb.mask.stride[dim] = mask_view.stride(dim);
  }
  return pb;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const c10::optional<at::Tensor>& attn_mask, double dropout_p,
                                                 bool is_causal, double scale, const c10::optional<at::Tensor>& seed) {
  at::Tensor mask_view;
  const Problem pb = make_problem(q, k, v, attn_mask, mask_view, dropout_p, is_causal, scale, seed, "attention_fwd");
  const at::Tensor qs = unit_last_stride(q), ks = unit_last_stride(k), vs = unit_last_stride(v);
  at::Tensor out = at::empty({pb.batch, pb.heads_q, pb.nq, pb.dv}, q.options());
  at::Tensor lse = pb.split_lse ? at::empty({2, pb.batch, pb.heads_q, pb.nq}, q.options().dtype(at::kFloat))
                                 : at::empty({pb.batch, pb.heads_q, pb.nq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  MGF_DISPATCH_FLOATING(q.scalar_type(), "attention_fwd", [&] {
    forward<scalar_t>(pb, qs.data_ptr<scalar_t>(), Layout(qs), ks.data_ptr<scalar_t>(), Layout(ks),
                      vs.data_ptr<scalar_t>(), Layout(vs), out.data_ptr<scalar_t>(), lse.data_ptr<float>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal, double scale,
    const c10::optional<at::Tensor>& seed) {
  at::Tensor mask_view;
  const Problem pb = make_problem(q, k, v, attn_mask, mask_view, dropout_p, is_causal, scale, seed, "attention_bwd");
  const std::vector<int64_t> out_shape{pb.batch, pb.heads_q, pb.nq, pb.dv};
  TORCH_CHECK(grad_out.sizes() == out_shape && grad_out.scalar_type() == q.scalar_type(),
              "attention_bwd: grad_out must be ", out_shape, " of q's dtype, got ", grad_out.sizes(), " ",
              grad_out.scalar_type());
  TORCH_CHECK(out.sizes() == out_shape && out.scalar_type() == q.scalar_type(), "attention_bwd: out must be ",
              out_shape, " of q's dtype, got ", out.sizes(), " ", out.scalar_type());
  const std::vector<int64_t> lse_shape = pb.split_lse ? std::vector<int64_t>{2, pb.batch, pb.heads_q, pb.nq}
                                                       : std::vector<int64_t>{pb.batch, pb.heads_q, pb.nq};
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == lse_shape, "attention_bwd: lse must be float32 ",
              lse_shape, (pb.split_lse ? " (additive mask: max and log sum)" : ""), ", got ", lse.sizes(), " ",
              lse.scalar_type());
  const at::Tensor qs = unit_last_stride(q), ks = unit_last_stride(k), vs = unit_last_stride(v);
  const at::Tensor gs = unit_last_stride(grad_out), os = unit_last_stride(out), ls = lse.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (dq.numel() + dk.numel() + dv.numel() == 0) return {dq, dk, dv};
  MGF_DISPATCH_FLOATING(q.scalar_type(), "attention_bwd", [&] {
    backward<scalar_t>(pb, gs.data_ptr<scalar_t>(), Layout(gs), qs.data_ptr<scalar_t>(), Layout(qs),
                       ks.data_ptr<scalar_t>(), Layout(ks), vs.data_ptr<scalar_t>(), Layout(vs),
                       os.data_ptr<scalar_t>(), Layout(os), ls.data_ptr<float>(), dq.data_ptr<scalar_t>(),
                       dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

}  // namespace

// The op's schema, declared beside its CPU kernel (one slice per op); the CUDA kernels register for it
// elsewhere. The Python side (fake kernel, autograd) is the module named by set_python_module.
TORCH_LIBRARY_FRAGMENT(metagpt_fast, m) {
  m.set_python_module("metagpt_fast.backends.compiled.attention");

  // Flash attention. q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv); Hq % Hk == 0 (GQA: query head h reads
  // kv head h / (Hq / Hk)). attn_mask: bool (True = attend) or additive of q's dtype, broadcastable to
  // (B, Hq, Nq, Nk); never combined with is_causal (top-left alignment). seed: 1-element int64 (Philox key) iff
  // dropout_p > 0. out (B, Hq, Nq, Dv) of q's dtype; lse float32 (B, Hq, Nq), +inf for rows with no visible key;
  // with an additive mask lse is (2, B, Hq, Nq): the row maximum (+inf for an empty row) and log of the row sum
  // (0 for an empty row), apart (the Triton backend's contract; the CUDA kernels take boolean masks only).
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float dropout_p, bool is_causal, float scale, "
      "Tensor? seed) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_mask, "
      "float dropout_p, bool is_causal, float scale, Tensor? seed) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}

TORCH_LIBRARY_IMPL(metagpt_fast, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

}  // namespace metagpt_fast::cpu
