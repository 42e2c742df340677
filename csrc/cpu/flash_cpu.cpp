// CPU flash attention over packed variable-length sequences (flash-attn 2's varlen semantics): sliding windows with
// bottom-right alignment, logit softcapping, ALiBi and GQA, forward and backward, O(N) extra memory.
//
// Sequence b holds queries [cu_q[b], cu_q[b+1]) and keys [cu_k[b], cu_k[b+1]) of the packed (T, H, D) tensors;
// with Lq, Lk its lengths and shift = Lk - Lq, local query i sees key j iff
//   (window_right < 0 or j <= i + shift + window_right) and (window_left < 0 or j >= i + shift - window_left).
// So query i sees the contiguous key range [lo(i), hi(i)) (struct Window), and both ends grow with i: a block of
// queries [i0, i1) sees at most [lo(i0), hi(i1 - 1)). Only that range is visited, key block by key block, so a
// window of w costs O(N w) and causal attention half of the dense cost; rows of a block whose own range is smaller
// are masked to -inf per row.
//
// Scores (score_tile): s = scale <q_i, k_j>; softcap > 0: s = softcap tanh(s / softcap); ALiBi: s -= slope[b, h]
// |i + shift - j|; keys outside the row's range: -inf.
// Forward, per (query head, block of BLOCK_Q queries of one sequence): online softmax over key blocks
// (metagpt_fast/online_softmax.h); out = acc / l, lse = m + log(l) ((Hq, Tq) float32, +inf for a row with no key).
// Backward: P = exp(S - lse);  dV += P^T dO;  dP = dO V^T;  dS = P * (dP - rowsum(dO * O));  softcap:
// dS *= 1 - tanh^2;  dQ += scale dS K;  dK += scale dS^T Q. Every output element is written by exactly one task,
// without races or atomics: per (sequence, kv head) in one pass, dK and dV accumulating in the task's own buffers
// (GQA: the group's query heads in turn); or, when there are fewer such pairs than threads, in two passes (dK / dV
// per (kv head, key block) over the queries that see the block, then dQ per (query head, query block)).
// Tasks are handed to the threads from a shared counter (dynamic scheduling: causal blocks and packed documents
// differ in cost), and every task's arithmetic is the same whichever thread runs it, so results do not depend on
// scheduling (nor, within one backward scheme, on the thread count). Inputs float32 / bfloat16 / float16, all
// arithmetic in float32. No dropout (the reference serves it).
// Tile products: on CPUs with AVX-512F, the register-blocked kernels of tile_kernels.h over K^T (and V^T) panels
// that each thread packs per kv head as its query blocks reach them (class KeySource); elsewhere, or with
// METAGPT_FAST_CPU_TILES=0, gemm.h's BLAS sgemm.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "gemm.h"
#include "row_ops.h"
#include "tile_kernels.h"
#include "metagpt_fast/online_softmax.h"

// The score-row loops are also compiled for x86-64-v3 and x86-64-v4 and picked when the library loads (as in
// row_ops.cpp).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MGF_FLASH_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MGF_FLASH_CLONES
#endif

namespace metagpt_fast::cpu {

namespace flash_rows {

// tanh in a form compilers vectorise (the C library's tanhf is a call per element and doubled the cost of a
// softcapped step): the odd Taylor series to x^19 below |x| = 0.5 (truncation < 1e-9 relative), (1 - e) / (1 + e)
// with e = exp(-2|x|) (online_softmax.h's exp) above. Within 4.1 ulp of the exact tanh over [-20, 20], checked on a
// grid of 4e6 points (the C library's: 2.1).
inline float fast_tanh(float x) {
  const float ax = x < 0.0f ? -x : x, x2 = x * x;
  float p = -2.3912911424355248e-4f;  // Taylor coefficients of tanh(x) / x - 1 in x^2, from x^18 down to x^2
  p = p * x2 + 5.9002744094558595e-4f;
  p = p * x2 - 1.4558343870513183e-3f;
  p = p * x2 + 3.5921280365724810e-3f;
  p = p * x2 - 8.8632355299021966e-3f;
  p = p * x2 + 2.1869488536155203e-2f;
  p = p * x2 - 5.3968253968253968e-2f;
  p = p * x2 + 1.3333333333333333e-1f;
  p = p * x2 - 3.3333333333333333e-1f;
  const float small = x + x * x2 * p;
  const float e = mgf_exp(-2.0f * ax);
  const float big = (1.0f - e) / (1.0f + e);
  return ax < 0.5f ? small : (x < 0.0f ? -big : big);
}

// s <- cap * tanh(s / cap); t <- tanh(s / cap) for the backward's 1 - tanh^2 (t may be null).
MGF_FLASH_CLONES void softcap_row(float* s, float* t, int64_t n, float cap) {
  const float inv = 1.0f / cap;
  if (t == nullptr) {
    for (int64_t c = 0; c < n; ++c) s[c] = cap * fast_tanh(s[c] * inv);
  } else {
    for (int64_t c = 0; c < n; ++c) {
      const float th = fast_tanh(s[c] * inv);
      t[c] = th;
      s[c] = cap * th;
    }
  }
}

// s[c] -= slope * |offset - c|, offset = i + shift - j0 (the ALiBi distance of key j0 + c).
MGF_FLASH_CLONES void alibi_row(float* s, int64_t n, float slope, int64_t offset) {
  for (int64_t c = 0; c < n; ++c) {
    const float dist = static_cast<float>(offset - c);
    s[c] -= slope * (dist < 0.0f ? -dist : dist);
  }
}

// ds <- ds * (1 - t^2): through the softcap's tanh.
MGF_FLASH_CLONES void softcap_grad_row(float* ds, const float* t, int64_t n) {
  for (int64_t c = 0; c < n; ++c) ds[c] *= 1.0f - t[c] * t[c];
}

}  // namespace flash_rows

namespace {

// Tile sizes: a (BLOCK_Q x BLOCK_K) float score tile is 64 KiB and stays in L2 next to its Q, K and V panels.
constexpr int64_t BLOCK_Q = 64;
constexpr int64_t BLOCK_K = 256;

struct Problem {
  int64_t batch, heads_q, heads_k, d, dv, total_q, total_k;
  const int32_t* cu_q;
  const int32_t* cu_k;
  float scale, softcap;
  int64_t window_left, window_right;  // -1: unbounded
  const float* alibi;                 // (B, Hq) slopes, or null
  int64_t group() const { return heads_q / heads_k; }
  int64_t len_q(int64_t b) const { return cu_q[b + 1] - cu_q[b]; }
  int64_t len_k(int64_t b) const { return cu_k[b + 1] - cu_k[b]; }
  float slope(int64_t b, int64_t h) const { return alibi == nullptr ? 0.0f : alibi[b * heads_q + h]; }
};

// The keys [lo(i), hi(i)) that local query i of one sequence sees (empty when lo >= hi).
struct Window {
  int64_t lk, shift, left, right;
  Window(const Problem& pb, int64_t b)
      : lk(pb.len_k(b)), shift(pb.len_k(b) - pb.len_q(b)), left(pb.window_left), right(pb.window_right) {}
  int64_t lo(int64_t i) const { return left < 0 ? 0 : std::clamp<int64_t>(i + shift - left, 0, lk); }
  int64_t hi(int64_t i) const { return right < 0 ? lk : std::clamp<int64_t>(i + shift + right + 1, 0, lk); }
};

// Strides of a packed (T, H, D) tensor with unit last stride, in elements.
struct Rows {
  int64_t t, h;
  explicit Rows(const at::Tensor& x) : t(x.stride(0)), h(x.stride(1)) {}
  int64_t at(int64_t ti, int64_t hi) const { return ti * t + hi * h; }
};

// Where the tile products run: AVX-512 register-blocked tiles (tile_kernels.h) when the CPU has them and one
// sequence's packed keys fit the per-thread cap, else gemm.h (BLAS sgemm).
constexpr int64_t MAX_PACKED = int64_t(1) << 23;  // floats per thread for one kv head's packed keys (32 MiB)

// One block of keys [j0, j0 + cols) of one (sequence, kv head) as the products read it: K and V rows in float32,
// and, on the tile path, K^T (and for the backward V^T) panels of TILE_KEYS keys starting at key j0.
struct KeyBlock {
  const float* kf;
  const float* vf;
  const float* kt;
  const float* vt;
  int64_t ldk, ldv;
};

// One thread's view of the keys and values. With a cache (the tile path, or 16-bit inputs that fit), the current
// (sequence, kv head)'s keys are converted once, panel by panel as the thread's tasks reach them, and reused by
// the next query blocks of that head; without one, each block is converted on the spot (float32 is read in place).
template <typename T>
class KeySource {
 public:
  KeySource(const Problem& pb, const T* k, Rows lk, const T* v, Rows lv, bool tiles, bool transposed_v,
            int64_t max_lk)
      : pb_(pb), k_(k), v_(v), lk_(lk), lv_(lv), tiles_(tiles), transposed_v_(transposed_v) {
    const int64_t panels = (max_lk + TILE_KEYS - 1) / TILE_KEYS, keys = panels * TILE_KEYS;
    cached_ = tiles || (!std::is_same_v<T, float> && keys * std::max(pb.d, pb.dv) <= MAX_PACKED);
    if (cached_) {
      ready_.resize(panels);
      if (tiles) kt_.resize(keys * pb.d);
      if (tiles && transposed_v) vt_.resize(keys * pb.dv);
      if constexpr (!std::is_same_v<T, float>) {
        krows_.resize(keys * pb.d);
        vrows_.resize(keys * pb.dv);
      }
    } else if constexpr (!std::is_same_v<T, float>) {
      krows_.resize(BLOCK_K * pb.d);
      vrows_.resize(BLOCK_K * pb.dv);
    }
  }

  bool tiles() const { return tiles_; }

  KeyBlock get(int64_t b, int64_t hk, int64_t j0, int64_t cols) {
    const int64_t tk0 = pb_.cu_k[b];
    KeyBlock kb{nullptr, nullptr, nullptr, nullptr, 0, 0};
    if (!cached_) {
      kb.kf = float_rows(k_ + lk_.at(tk0 + j0, hk), cols, pb_.d, lk_.t, krows_.data(), &kb.ldk);
      kb.vf = float_rows(v_ + lv_.at(tk0 + j0, hk), cols, pb_.dv, lv_.t, vrows_.data(), &kb.ldv);
      return kb;
    }
    if (b * pb_.heads_k + hk != head_) {
      head_ = b * pb_.heads_k + hk;
      std::fill(ready_.begin(), ready_.end(), 0);
    }
    for (int64_t p = j0 / TILE_KEYS; p < (j0 + cols + TILE_KEYS - 1) / TILE_KEYS; ++p) {
      if (!ready_[p]) pack(b, hk, p);
      ready_[p] = 1;
    }
    if constexpr (std::is_same_v<T, float>) {
      kb.kf = k_ + lk_.at(tk0 + j0, hk);
      kb.vf = v_ + lv_.at(tk0 + j0, hk);
      kb.ldk = lk_.t;
      kb.ldv = lv_.t;
    } else {
      kb.kf = krows_.data() + j0 * pb_.d;
      kb.vf = vrows_.data() + j0 * pb_.dv;
      kb.ldk = pb_.d;
      kb.ldv = pb_.dv;
    }
    if (tiles_) {  // panels start at multiples of TILE_KEYS: the callers' key blocks do too
      kb.kt = kt_.data() + (j0 / TILE_KEYS) * pb_.d * TILE_KEYS;
      if (transposed_v_) kb.vt = vt_.data() + (j0 / TILE_KEYS) * pb_.dv * TILE_KEYS;
    }
    return kb;
  }

 private:
  // Keys [p * TILE_KEYS, (p + 1) * TILE_KEYS) of the head: panels of K^T / V^T (zero past the sequence's keys),
  // rows in float32 for 16-bit inputs.
  void pack(int64_t b, int64_t hk, int64_t p) {
    const int64_t tk0 = pb_.cu_k[b], len = pb_.len_k(b), d = pb_.d, dv = pb_.dv;
    float* kpanel = tiles_ ? kt_.data() + p * d * TILE_KEYS : nullptr;
    float* vpanel = tiles_ && transposed_v_ ? vt_.data() + p * dv * TILE_KEYS : nullptr;
    for (int64_t jj = 0; jj < TILE_KEYS; ++jj) {
      const int64_t j = p * TILE_KEYS + jj;
      const bool valid = j < len;
      const T* krow = valid ? k_ + lk_.at(tk0 + j, hk) : nullptr;
      const T* vrow = valid ? v_ + lv_.at(tk0 + j, hk) : nullptr;
      if (kpanel != nullptr)
        for (int64_t c = 0; c < d; ++c) kpanel[c * TILE_KEYS + jj] = valid ? to_float(krow[c]) : 0.0f;
      if (vpanel != nullptr)
        for (int64_t c = 0; c < dv; ++c) vpanel[c * TILE_KEYS + jj] = valid ? to_float(vrow[c]) : 0.0f;
      if constexpr (!std::is_same_v<T, float>) {
        if (valid) {
          for (int64_t c = 0; c < d; ++c) krows_[j * d + c] = to_float(krow[c]);
          for (int64_t c = 0; c < dv; ++c) vrows_[j * dv + c] = to_float(vrow[c]);
        }
      }
    }
  }

  const Problem& pb_;
  const T* k_;
  const T* v_;
  Rows lk_, lv_;
  bool tiles_, transposed_v_, cached_ = false;
  int64_t head_ = -1;
  std::vector<float> kt_, vt_, krows_, vrows_;
  std::vector<char> ready_;
};

// The tile path for this problem (every sequence's keys fit the per-thread cap).
bool use_tiles(const Problem& pb, int64_t max_lk) {
  const int64_t keys = (max_lk + TILE_KEYS - 1) / TILE_KEYS * TILE_KEYS;
  return tile_kernels_available() && keys * std::max(pb.d, pb.dv) <= MAX_PACKED;
}

int64_t max_len_k(const Problem& pb) {
  int64_t longest = 0;
  for (int64_t b = 0; b < pb.batch; ++b) longest = std::max(longest, pb.len_k(b));
  return longest;
}

// The first key block of a query block: its first visible key rounded down to a panel boundary (the extra keys
// are masked like any other outside the window).
int64_t first_key(int64_t jlo) { return jlo - jlo % TILE_KEYS; }

// c (m x n) += alpha op(a) b, op(a) = a (m x k, leading dimension lda) or a^T (a is k x m).
void add_product(bool tiles, bool trans_a, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float* c, int64_t ldc) {
  if (tiles) {
    product_tile(a, trans_a ? 1 : lda, trans_a ? lda : 1, b, ldb, k, n, alpha, c, ldc, m);
  } else {
    gemm(trans_a, false, m, n, k, alpha, a, lda, b, ldb, 1.0f, c, ldc);
  }
}

// s (leading dimension BLOCK_K) = alpha a panel^T: scores_tile over packed panels, or gemm over rows.
void scores(const float* a, int64_t lda, const float* panels, const float* rows_b, int64_t ldb, int64_t depth,
            float alpha, float* s, int64_t rows, int64_t cols) {
  if (panels != nullptr) {
    scores_tile(a, lda, panels, depth, (cols + TILE_KEYS - 1) / TILE_KEYS, alpha, s, BLOCK_K, rows);
  } else {
    gemm(false, true, rows, cols, depth, alpha, a, lda, rows_b, ldb, 0.0f, s, BLOCK_K);
  }
}

// Scores of local queries [i0, i0 + rows) x keys [j0, j0 + cols) of one (sequence, head) into s (leading dimension
// BLOCK_K): scale Q K^T, softcap (tanh kept in t when t is not null), ALiBi, -inf outside each row's key range.
void score_tile(const Problem& pb, const Window& w, float slope, const float* qf, int64_t ldq, const KeyBlock& kb,
                int64_t i0, int64_t rows, int64_t j0, int64_t cols, float* s, float* t) {
  scores(qf, ldq, kb.kt, kb.kf, kb.ldk, pb.d, pb.scale, s, rows, cols);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    float* srow = s + r * BLOCK_K;
    if (pb.softcap > 0.0f) flash_rows::softcap_row(srow, t == nullptr ? nullptr : t + r * BLOCK_K, cols, pb.softcap);
    if (pb.alibi != nullptr) flash_rows::alibi_row(srow, cols, slope, i + w.shift - j0);
    const int64_t lo = std::clamp<int64_t>(w.lo(i) - j0, 0, cols), hi = std::clamp<int64_t>(w.hi(i) - j0, lo, cols);
    std::fill(srow, srow + lo, -INFINITY);
    std::fill(srow + hi, srow + cols, -INFINITY);
  }
}

// Runs task(worker_state, index) for index in [0, n) on torch's threads, each thread taking the next index from a
// shared counter. make_state() builds one thread's scratch buffers.
template <typename MakeState, typename Task>
void dynamic_for(int64_t n, MakeState make_state, Task task) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const SequentialBlas sequential;
    auto state = make_state();
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) task(state, i);
  });
}

struct QueryBlock {
  int64_t b, i0, rows;
};

std::vector<QueryBlock> query_blocks(const Problem& pb) {
  std::vector<QueryBlock> blocks;
  for (int64_t b = 0; b < pb.batch; ++b)
    for (int64_t i0 = 0; i0 < pb.len_q(b); i0 += BLOCK_Q)
      blocks.push_back({b, i0, std::min(BLOCK_Q, pb.len_q(b) - i0)});
  return blocks;
}

template <typename T>
struct ForwardScratch {
  KeySource<T> keys;
  std::vector<float> qbuf, s, acc, alpha;
  std::vector<OnlineSoftmax> state;
};

template <typename T>
void forward(const Problem& pb, const T* q, Rows lq, const T* k, Rows lk, const T* v, Rows lv, T* out, float* lse) {
  const std::vector<QueryBlock> blocks = query_blocks(pb);
  const int64_t nblocks = static_cast<int64_t>(blocks.size()), group = pb.group(), max_lk = max_len_k(pb);
  const bool tiles = use_tiles(pb, max_lk);
  auto make = [&] {
    return ForwardScratch<T>{KeySource<T>(pb, k, lk, v, lv, tiles, false, max_lk), std::vector<float>(BLOCK_Q * pb.d),
                             std::vector<float>(BLOCK_Q * BLOCK_K), std::vector<float>(BLOCK_Q * pb.dv),
                             std::vector<float>(BLOCK_Q), std::vector<OnlineSoftmax>(BLOCK_Q)};
  };
  // Head-major order: neighbouring tasks share a head's keys (converted once per thread on the cached paths).
  dynamic_for(nblocks * pb.heads_q, make, [&](ForwardScratch<T>& sc, int64_t task) {
    const QueryBlock& blk = blocks[task % nblocks];
    const int64_t h = task / nblocks, hk = h / group, b = blk.b, i0 = blk.i0, rows = blk.rows;
    const int64_t tq0 = pb.cu_q[b] + i0;
    const Window w(pb, b);
    const float slope = pb.slope(b, h);
    std::fill(sc.acc.begin(), sc.acc.end(), 0.0f);
    std::fill(sc.state.begin(), sc.state.end(), online_softmax_init());
    const int64_t jlo = w.lo(i0), jhi = w.hi(i0 + rows - 1);
    if (jlo < jhi) {
      int64_t ldq;
      const float* qf = float_rows(q + lq.at(tq0, h), rows, pb.d, lq.t, sc.qbuf.data(), &ldq);
      for (int64_t j0 = first_key(jlo); j0 < jhi; j0 += BLOCK_K) {
        const int64_t cols = std::min(BLOCK_K, jhi - j0);
        const KeyBlock kb = sc.keys.get(b, hk, j0, cols);
        score_tile(pb, w, slope, qf, ldq, kb, i0, rows, j0, cols, sc.s.data(), nullptr);
        for (int64_t r = 0; r < rows; ++r) {
          float* srow = sc.s.data() + r * BLOCK_K;
          sc.alpha[r] = online_softmax_update(sc.state[r], row_max(srow, cols));
          sc.state[r].l += softmax_row(srow, cols, online_softmax_shift(sc.state[r].m));
        }
        if (tiles) {  // acc = alpha acc + P V (acc starts at 0, so the first block's alpha changes nothing)
          accumulate_tile(sc.s.data(), BLOCK_K, kb.vf, kb.ldv, cols, pb.dv, sc.alpha.data(), sc.acc.data(), pb.dv,
                          rows);
        } else {
          for (int64_t r = 0; r < rows; ++r)
            if (sc.alpha[r] != 1.0f) scale_row(sc.acc.data() + r * pb.dv, pb.dv, sc.alpha[r]);
          gemm(false, false, rows, pb.dv, cols, 1.0f, sc.s.data(), BLOCK_K, kb.vf, kb.ldv, 1.0f, sc.acc.data(), pb.dv);
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float inv = online_softmax_inv_sum(sc.state[r]);
      const float* arow = sc.acc.data() + r * pb.dv;
      T* orow = out + ((tq0 + r) * pb.heads_q + h) * pb.dv;
      for (int64_t c = 0; c < pb.dv; ++c) orow[c] = from_float<T>(arow[c] * inv);
      lse[h * pb.total_q + tq0 + r] = online_softmax_lse(sc.state[r]);
    }
  });
}

template <typename T>
struct BackwardScratch {
  KeySource<T> keys;
  std::vector<float> qbuf, dobuf, p, t, dp, dq_acc, delta, dk_acc, dv_acc;
  BackwardScratch(const Problem& pb, const T* k, Rows lk, const T* v, Rows lv, bool tiles, int64_t max_lk,
                  int64_t key_rows)
      : keys(pb, k, lk, v, lv, tiles, true, max_lk) {
    qbuf.resize(BLOCK_Q * pb.d);
    dobuf.resize(BLOCK_Q * pb.dv);
    p.resize(BLOCK_Q * BLOCK_K);
    if (pb.softcap > 0.0f) t.resize(BLOCK_Q * BLOCK_K);
    dp.resize(BLOCK_Q * BLOCK_K);
    dq_acc.resize(BLOCK_Q * pb.d);
    delta.resize(BLOCK_Q);
    dk_acc.resize(key_rows * pb.d);
    dv_acc.resize(key_rows * pb.dv);
  }
};

// The backward's operands of one (query head, block of query rows): Q and dO as float32, delta = rowsum(dO * O)
// (the softmax-Jacobian correction) and the saved lse rows.
struct QueryPanel {
  const float* qf;
  const float* dof;
  const float* lse;
  int64_t ldq, lddo;
};

template <typename T>
QueryPanel query_panel(const Problem& pb, const T* dout, Rows ldo, const T* q, Rows lq, const T* out, Rows lout,
                       const float* lse, int64_t h, int64_t tq0, int64_t rows, BackwardScratch<T>& sc) {
  QueryPanel qp{};
  qp.qf = float_rows(q + lq.at(tq0, h), rows, pb.d, lq.t, sc.qbuf.data(), &qp.ldq);
  qp.dof = float_rows(dout + ldo.at(tq0, h), rows, pb.dv, ldo.t, sc.dobuf.data(), &qp.lddo);
  qp.lse = lse + h * pb.total_q + tq0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* orow = out + lout.at(tq0 + r, h);
    const float* drow = qp.dof + r * qp.lddo;
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < pb.dv; ++c) acc += drow[c] * to_float(orow[c]);
    sc.delta[r] = acc;
  }
  return qp;
}

// One tile of the backward: sc.p <- P = exp(S - lse) (the forward's probabilities), sc.dp <- dS = P * (dO V^T -
// delta), taken through the softcap's tanh (the gradient of the score before capping).
template <typename T>
void grad_tile(const Problem& pb, const Window& w, float slope, const QueryPanel& qp, const KeyBlock& kb, int64_t i0,
               int64_t rows, int64_t j0, int64_t cols, BackwardScratch<T>& sc) {
  float* p = sc.p.data();
  float* t = pb.softcap > 0.0f ? sc.t.data() : nullptr;
  score_tile(pb, w, slope, qp.qf, qp.ldq, kb, i0, rows, j0, cols, p, t);
  for (int64_t r = 0; r < rows; ++r) probabilities_row(p + r * BLOCK_K, cols, qp.lse[r]);
  scores(qp.dof, qp.lddo, kb.vt, kb.vf, kb.ldv, pb.dv, 1.0f, sc.dp.data(), rows, cols);
  for (int64_t r = 0; r < rows; ++r) {
    float* dsrow = sc.dp.data() + r * BLOCK_K;
    softmax_grad_row(dsrow, p + r * BLOCK_K, nullptr, cols, sc.delta[r]);
    if (t != nullptr) flash_rows::softcap_grad_row(dsrow, t + r * BLOCK_K, cols);
  }
}

template <typename T>
void store_rows(T* dst, int64_t row_stride, const float* src, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * row_stride + c] = from_float<T>(src[r * cols + c]);
}

// One pass per (sequence, kv head): dK / dV of the whole sequence accumulate in the task's buffers while it walks
// the group's query heads and their query blocks; each dQ block is finished by its one visit. Five tile products.
template <typename T>
void backward_fused(const Problem& pb, const T* dout, Rows ldo, const T* q, Rows lq, const T* k, Rows lk, const T* v,
                    Rows lv, const T* out, Rows lout, const float* lse, T* dq, T* dk, T* dv) {
  const int64_t group = pb.group(), d = pb.d, dvd = pb.dv, max_lk = max_len_k(pb);
  const bool tiles = use_tiles(pb, max_lk);
  // Tasks (sequence, kv head), the longest sequences first so the short ones fill in at the end.
  std::vector<int64_t> order(pb.batch);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) {
    return pb.len_q(a) * pb.len_k(a) > pb.len_q(c) * pb.len_k(c);
  });
  auto make = [&] { return BackwardScratch<T>(pb, k, lk, v, lv, tiles, max_lk, max_lk); };
  dynamic_for(pb.batch * pb.heads_k, make, [&](BackwardScratch<T>& sc, int64_t task) {
    const int64_t b = order[task / pb.heads_k], hk = task % pb.heads_k;
    const int64_t lq_len = pb.len_q(b), lk_len = pb.len_k(b), tk0 = pb.cu_k[b];
    const Window w(pb, b);
    std::fill(sc.dk_acc.begin(), sc.dk_acc.begin() + lk_len * d, 0.0f);
    std::fill(sc.dv_acc.begin(), sc.dv_acc.begin() + lk_len * dvd, 0.0f);
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      const float slope = pb.slope(b, h);
      for (int64_t i0 = 0; i0 < lq_len; i0 += BLOCK_Q) {
        const int64_t rows = std::min(BLOCK_Q, lq_len - i0), tq0 = pb.cu_q[b] + i0;
        const int64_t jlo = w.lo(i0), jhi = w.hi(i0 + rows - 1);
        std::fill(sc.dq_acc.begin(), sc.dq_acc.end(), 0.0f);
        if (jlo < jhi) {
          const QueryPanel qp = query_panel(pb, dout, ldo, q, lq, out, lout, lse, h, tq0, rows, sc);
          for (int64_t j0 = first_key(jlo); j0 < jhi; j0 += BLOCK_K) {
            const int64_t cols = std::min(BLOCK_K, jhi - j0);
            const KeyBlock kb = sc.keys.get(b, hk, j0, cols);
            grad_tile(pb, w, slope, qp, kb, i0, rows, j0, cols, sc);
            // dV += P^T dO;  dQ += scale dS K;  dK += scale dS^T Q
            add_product(tiles, true, cols, dvd, rows, 1.0f, sc.p.data(), BLOCK_K, qp.dof, qp.lddo,
                        sc.dv_acc.data() + j0 * dvd, dvd);
            add_product(tiles, false, rows, d, cols, pb.scale, sc.dp.data(), BLOCK_K, kb.kf, kb.ldk,
                        sc.dq_acc.data(), d);
            add_product(tiles, true, cols, d, rows, pb.scale, sc.dp.data(), BLOCK_K, qp.qf, qp.ldq,
                        sc.dk_acc.data() + j0 * d, d);
          }
        }
        store_rows(dq + (tq0 * pb.heads_q + h) * d, pb.heads_q * d, sc.dq_acc.data(), rows, d);
      }
    }
    store_rows(dk + (tk0 * pb.heads_k + hk) * d, pb.heads_k * d, sc.dk_acc.data(), lk_len, d);
    store_rows(dv + (tk0 * pb.heads_k + hk) * dvd, pb.heads_k * dvd, sc.dv_acc.data(), lk_len, dvd);
  });
}

// Two passes, for inputs with fewer (sequence, kv head) pairs than threads (one long sequence, MQA): dK / dV per
// (kv head, key block), over the queries that see the block, then dQ per (query head, query block), over its keys.
// Each pass recomputes P and dS (seven tile products instead of five) but has a task per block.
template <typename T>
void backward_split(const Problem& pb, const T* dout, Rows ldo, const T* q, Rows lq, const T* k, Rows lk, const T* v,
                    Rows lv, const T* out, Rows lout, const float* lse, T* dq, T* dk, T* dv) {
  const int64_t group = pb.group(), d = pb.d, dvd = pb.dv, max_lk = max_len_k(pb);
  const bool tiles = use_tiles(pb, max_lk);
  std::vector<QueryBlock> key_blocks;  // (sequence, first key, keys): the same tiling over the keys
  for (int64_t b = 0; b < pb.batch; ++b)
    for (int64_t j0 = 0; j0 < pb.len_k(b); j0 += BLOCK_K)
      key_blocks.push_back({b, j0, std::min(BLOCK_K, pb.len_k(b) - j0)});
  const int64_t nkb = static_cast<int64_t>(key_blocks.size());
  auto make_k = [&] { return BackwardScratch<T>(pb, k, lk, v, lv, tiles, max_lk, BLOCK_K); };
  dynamic_for(nkb * pb.heads_k, make_k, [&](BackwardScratch<T>& sc, int64_t task) {
    const QueryBlock& blk = key_blocks[task % nkb];
    const int64_t hk = task / nkb, b = blk.b, j0 = blk.i0, cols = blk.rows, lq_len = pb.len_q(b);
    const int64_t tk0 = pb.cu_k[b];
    const Window w(pb, b);
    // Queries that see a key of [j0, j0 + cols): hi(i) > j0 and lo(i) < j0 + cols (both ends grow with i).
    const int64_t ilo = w.right < 0 ? 0 : std::clamp<int64_t>(j0 - w.shift - w.right, 0, lq_len);
    const int64_t ihi = w.left < 0 ? lq_len : std::clamp<int64_t>(j0 + cols - w.shift + w.left, 0, lq_len);
    std::fill(sc.dk_acc.begin(), sc.dk_acc.end(), 0.0f);
    std::fill(sc.dv_acc.begin(), sc.dv_acc.end(), 0.0f);
    const KeyBlock kb = sc.keys.get(b, hk, j0, cols);
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      const float slope = pb.slope(b, h);
      for (int64_t i0 = ilo; i0 < ihi; i0 += BLOCK_Q) {
        const int64_t rows = std::min(BLOCK_Q, ihi - i0), tq0 = pb.cu_q[b] + i0;
        const QueryPanel qp = query_panel(pb, dout, ldo, q, lq, out, lout, lse, h, tq0, rows, sc);
        grad_tile(pb, w, slope, qp, kb, i0, rows, j0, cols, sc);
        add_product(tiles, true, cols, dvd, rows, 1.0f, sc.p.data(), BLOCK_K, qp.dof, qp.lddo, sc.dv_acc.data(), dvd);
        add_product(tiles, true, cols, d, rows, pb.scale, sc.dp.data(), BLOCK_K, qp.qf, qp.ldq, sc.dk_acc.data(), d);
      }
    }
    store_rows(dk + ((tk0 + j0) * pb.heads_k + hk) * d, pb.heads_k * d, sc.dk_acc.data(), cols, d);
    store_rows(dv + ((tk0 + j0) * pb.heads_k + hk) * dvd, pb.heads_k * dvd, sc.dv_acc.data(), cols, dvd);
  });
  const std::vector<QueryBlock> blocks = query_blocks(pb);
  const int64_t nqb = static_cast<int64_t>(blocks.size());
  auto make_q = [&] { return BackwardScratch<T>(pb, k, lk, v, lv, tiles, max_lk, 0); };
  dynamic_for(nqb * pb.heads_q, make_q, [&](BackwardScratch<T>& sc, int64_t task) {
    const QueryBlock& blk = blocks[task % nqb];
    const int64_t h = task / nqb, hk = h / group, b = blk.b, i0 = blk.i0, rows = blk.rows;
    const int64_t tq0 = pb.cu_q[b] + i0;
    const Window w(pb, b);
    const int64_t jlo = w.lo(i0), jhi = w.hi(i0 + rows - 1);
    std::fill(sc.dq_acc.begin(), sc.dq_acc.end(), 0.0f);
    if (jlo < jhi) {
      const QueryPanel qp = query_panel(pb, dout, ldo, q, lq, out, lout, lse, h, tq0, rows, sc);
      for (int64_t j0 = first_key(jlo); j0 < jhi; j0 += BLOCK_K) {
        const int64_t cols = std::min(BLOCK_K, jhi - j0);
        const KeyBlock kb = sc.keys.get(b, hk, j0, cols);
        grad_tile(pb, w, pb.slope(b, h), qp, kb, i0, rows, j0, cols, sc);
        add_product(tiles, false, rows, d, cols, pb.scale, sc.dp.data(), BLOCK_K, kb.kf, kb.ldk, sc.dq_acc.data(), d);
      }
    }
    store_rows(dq + (tq0 * pb.heads_q + h) * d, pb.heads_q * d, sc.dq_acc.data(), rows, d);
  });
}

// The fused pass when there are at least as many (sequence, kv head) pairs as threads, else the split passes. Either
// way every output element is written by one task: no atomics, and the same bits on every run with the same inputs
// and thread count.
template <typename T>
void backward(const Problem& pb, const T* dout, Rows ldo, const T* q, Rows lq, const T* k, Rows lk, const T* v,
              Rows lv, const T* out, Rows lout, const float* lse, T* dq, T* dk, T* dv) {
  if (pb.batch * pb.heads_k >= at::get_num_threads() || at::in_parallel_region()) {
    backward_fused(pb, dout, ldo, q, lq, k, lk, v, lv, out, lout, lse, dq, dk, dv);
  } else {
    backward_split(pb, dout, ldo, q, lq, k, lk, v, lv, out, lout, lse, dq, dk, dv);
  }
}

// Checks cu_seqlens: int32, 1-D, on the CPU, non-decreasing from 0 to total. Returns a contiguous copy or view.
at::Tensor checked_cu_seqlens(const at::Tensor& cu, int64_t batch_plus_one, int64_t total, const char* name,
                              const char* op) {
  TORCH_CHECK(cu.device().is_cpu() && cu.scalar_type() == at::kInt && cu.dim() == 1, op, ": ", name,
              " must be a 1-D int32 CPU tensor, got ", cu.sizes(), " ", cu.scalar_type(), " on ", cu.device());
  TORCH_CHECK(cu.size(0) >= 1 && (batch_plus_one < 0 || cu.size(0) == batch_plus_one), op, ": ", name,
              " must have B + 1 entries (as many as the other cu_seqlens), got ", cu.size(0));
  at::Tensor c = cu.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  TORCH_CHECK(p[0] == 0 && p[c.size(0) - 1] == total, op, ": ", name, " must run from 0 to ", total, ", got ", p[0],
              " to ", p[c.size(0) - 1]);
  for (int64_t i = 1; i < c.size(0); ++i)
    TORCH_CHECK(p[i] >= p[i - 1], op, ": ", name, " must be non-decreasing, got ", p[i - 1], " then ", p[i]);
  return c;
}

// Checks the inputs shared by forward and backward and fills the problem description (cu_q / cu_k / slopes keep
// the checked tensors alive).
Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                     const at::Tensor& cu_seqlens_k, double softmax_scale, bool causal, int64_t window_left,
                     int64_t window_right, double softcap, const c10::optional<at::Tensor>& alibi_slopes,
                     double dropout_p, at::Tensor& cu_q, at::Tensor& cu_k, at::Tensor& slopes, const char* op) {
  check_cpu_float(q, "q");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, op, ": q, k and v must be (T, H, D), got ", q.sizes(),
              ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu(), op, ": k and v must be CPU tensors");
  TORCH_CHECK(k.size(2) == q.size(2), op, ": k's head dim must equal q's (", q.size(2), "), got ", k.size(2));
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == k.size(1), op, ": v must be (Tk, Hk, Dv) for k ", k.sizes(),
              ", got ", v.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": k's heads (", k.size(1),
              ") must divide q's heads (", q.size(1), ")");
  TORCH_CHECK(window_left >= -1 && window_right >= -1, op, ": window sizes must be >= -1, got (", window_left, ", ",
              window_right, ")");
  TORCH_CHECK(softcap >= 0.0, op, ": softcap must be >= 0, got ", softcap);
  TORCH_CHECK(dropout_p == 0.0, op, ": the CPU kernel has no dropout (dropout_p must be 0, got ", dropout_p, ")");
  cu_q = checked_cu_seqlens(cu_seqlens_q, -1, q.size(0), "cu_seqlens_q", op);
  cu_k = checked_cu_seqlens(cu_seqlens_k, cu_q.size(0), k.size(0), "cu_seqlens_k", op);
  const int64_t batch = cu_q.size(0) - 1;
  Problem pb{batch, q.size(1), k.size(1), q.size(2), v.size(2), q.size(0), k.size(0),
             cu_q.data_ptr<int32_t>(), cu_k.data_ptr<int32_t>(), static_cast<float>(softmax_scale),
             static_cast<float>(softcap), window_left, causal ? 0 : window_right, nullptr};
  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == at::kFloat && a.dim() == 2 && a.size(0) == batch &&
                    a.size(1) == pb.heads_q,
                op, ": alibi_slopes must be float32 (B, Hq) = (", batch, ", ", pb.heads_q, ") on the CPU, got ",
                a.sizes(), " ", a.scalar_type(), " on ", a.device());
    slopes = a.contiguous();
    pb.alibi = slopes.data_ptr<float>();
  }
  return pb;
}

std::tuple<at::Tensor, at::Tensor> flash_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                       int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                       double softmax_scale, bool causal, int64_t window_left,
                                                       int64_t window_right, double softcap,
                                                       const c10::optional<at::Tensor>& alibi_slopes,
                                                       double dropout_p, const c10::optional<at::Tensor>& seed) {
  at::Tensor cu_q, cu_k, slopes;
  const Problem pb = make_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_left,
                                  window_right, softcap, alibi_slopes, dropout_p, cu_q, cu_k, slopes,
                                  "flash_attention_fwd");
  const at::Tensor qs = unit_last_stride(q), ks = unit_last_stride(k), vs = unit_last_stride(v);
  at::Tensor out = at::empty({pb.total_q, pb.heads_q, pb.dv}, q.options());
  at::Tensor lse = at::empty({pb.heads_q, pb.total_q}, q.options().dtype(at::kFloat));
  if (lse.numel() == 0) return {out, lse};
  MGF_DISPATCH_FLOATING(q.scalar_type(), "flash_attention_fwd", [&] {
    forward<scalar_t>(pb, qs.data_ptr<scalar_t>(), Rows(qs), ks.data_ptr<scalar_t>(), Rows(ks),
                      vs.data_ptr<scalar_t>(), Rows(vs), out.data_ptr<scalar_t>(), lse.data_ptr<float>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double softmax_scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap, const c10::optional<at::Tensor>& alibi_slopes, double dropout_p,
    const c10::optional<at::Tensor>& seed) {
  at::Tensor cu_q, cu_k, slopes;
  const Problem pb = make_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_left,
                                  window_right, softcap, alibi_slopes, dropout_p, cu_q, cu_k, slopes,
                                  "flash_attention_bwd");
  const std::vector<int64_t> out_shape{pb.total_q, pb.heads_q, pb.dv};
  TORCH_CHECK(grad_out.sizes() == out_shape && grad_out.scalar_type() == q.scalar_type() &&
                  grad_out.device().is_cpu(),
              "flash_attention_bwd: grad_out must be ", out_shape, " of q's dtype on the CPU, got ", grad_out.sizes(),
              " ", grad_out.scalar_type());
  TORCH_CHECK(out.sizes() == out_shape && out.scalar_type() == q.scalar_type() && out.device().is_cpu(),
              "flash_attention_bwd: out must be ", out_shape, " of q's dtype on the CPU, got ", out.sizes(), " ",
              out.scalar_type());
  const std::vector<int64_t> lse_shape{pb.heads_q, pb.total_q};
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == lse_shape && lse.device().is_cpu(),
              "flash_attention_bwd: lse must be float32 ", lse_shape, " on the CPU, got ", lse.sizes(), " ",
              lse.scalar_type());
  const at::Tensor qs = unit_last_stride(q), ks = unit_last_stride(k), vs = unit_last_stride(v);
  const at::Tensor gs = unit_last_stride(grad_out), os = unit_last_stride(out), ls = lse.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (dq.numel() + dk.numel() + dv.numel() == 0) return {dq, dk, dv};
  MGF_DISPATCH_FLOATING(q.scalar_type(), "flash_attention_bwd", [&] {
    backward<scalar_t>(pb, gs.data_ptr<scalar_t>(), Rows(gs), qs.data_ptr<scalar_t>(), Rows(qs),
                       ks.data_ptr<scalar_t>(), Rows(ks), vs.data_ptr<scalar_t>(), Rows(vs), os.data_ptr<scalar_t>(),
                       Rows(os), ls.data_ptr<float>(), dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                       dv.data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

}  // namespace

// The op's schema, declared beside its CPU kernel. The Python side (fake kernels, autograd) is the module named by
// set_python_module.
TORCH_LIBRARY_FRAGMENT(metagpt_fast, m) {
  m.set_python_module("metagpt_fast.backends.compiled.flash");

  // Flash attention over packed sequences (flash-attn 2's varlen form). q (Tq, Hq, D), k (Tk, Hk, D),
  // v (Tk, Hk, Dv), last dims contiguous; Hq % Hk == 0 (query head h reads kv head h / (Hq / Hk)). cu_seqlens_q /
  // cu_seqlens_k: int32 (B + 1,), non-decreasing from 0 to Tq / Tk. max_seqlen_*: informational (the kernel reads
  // the lengths). causal: window_right = 0. window_left / window_right: -1 = unbounded, aligned to the bottom right
  // (shift = Lk - Lq). softcap: 0 = off. alibi_slopes: float32 (B, Hq) or None. dropout_p must be 0 (seed unused).
  // out (Tq, Hq, Dv) of q's dtype; lse float32 (Hq, Tq), +inf for rows with no visible key.
  m.def(
      "flash_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, float softmax_scale, bool causal, int window_left, int window_right, float softcap, "
      "Tensor? alibi_slopes, float dropout_p, Tensor? seed) -> (Tensor out, Tensor lse)");
  m.def(
      "flash_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale, "
      "bool causal, int window_left, int window_right, float softcap, Tensor? alibi_slopes, float dropout_p, "
      "Tensor? seed) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}

TORCH_LIBRARY_IMPL(metagpt_fast, CPU, m) {
  m.impl("flash_attention_fwd", &flash_attention_fwd);
  m.impl("flash_attention_bwd", &flash_attention_bwd);
}

}  // namespace metagpt_fast::cpu
