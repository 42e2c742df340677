// CPU decode attention (flash-decoding): a few queries per sequence against a contiguous or paged key/value cache.
//
// Decode is bound by reading the cache, so the kernel reads each cached key and value once:
// - a task is (sequence b, split s of its keys) and covers every head: for one key, the Hk heads' rows are adjacent
//   in the (.., N, Hk, D) cache layout, so a task streams one contiguous slab (the CPU's prefetchers follow it; a
//   per-head walk jumps Hk * D elements per key, a new 4 KiB page each time at Hk * D * 4 >= 4096 bytes);
// - the Hq / Hk query heads of a GQA group, times the Nq queries, are packed into one tile of rows against each key;
// - with several splits per sequence (num_splits; 0: enough tasks for the threads, at least MIN_SPLIT_KEYS keys
//   each), each split keeps its own online softmax and writes a normalised partial output and its log-sum-exp,
//   which a second pass combines: out = sum_s exp(lse_s - lse) out_s, lse = log sum_s exp(lse_s).
// Scores: s = (scale q) . k, optionally softcap * tanh(s / softcap), minus slope * |pos - j| (ALiBi); keys outside
// [0, seqlen), the causal / window range of the query (bottom-right aligned: query i of Nq sits at
// pos = i + seqlen - Nq) are -inf. Inputs float32 / bfloat16 / float16, arithmetic in float32; the hot loops are
// compiled per CPU level (baseline, AVX2 + FMA, AVX-512) and picked when the library loads.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "row_ops.h"
#include "metagpt_fast/online_softmax.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MGF_DECODE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MGF_DECODE_CLONES
#endif

namespace metagpt_fast::cpu {
namespace {

// Keys per block: the block's K and V rows of every head (BLOCK_KEYS * Hk * D floats each, 64 KiB at Hk = 8,
// D = 64) stay in L2 between the score pass and the value pass.
constexpr int64_t BLOCK_KEYS = 32;
// Fewest keys per split when the kernel chooses: below this, the combine pass and the per-task setup cost more
// than the parallelism gains.
constexpr int64_t MIN_SPLIT_KEYS = 256;

// Scores of every head's packed query rows against n keys, key by key so the cache is read in address order (all
// heads of a key are adjacent): s[(hk * g + r) * ld + c] = q_(hk, r) . k_(c, hk), with q (Hk * g) x d row-major and
// keys[c] the row of head 0 of key c (head hk at keys[c] + hk * head_stride).
MGF_DECODE_CLONES void block_scores(const float* q, int64_t heads, int64_t g, int64_t d, const float* const* keys,
                                    int64_t head_stride, int64_t n, float* s, int64_t ld) {
  for (int64_t c = 0; c < n; ++c) {
    if (c + 2 < n) __builtin_prefetch(keys[c + 2] + heads * head_stride - 1);
    for (int64_t hk = 0; hk < heads; ++hk) {
      const float* k = keys[c] + hk * head_stride;
      for (int64_t r = 0; r < g; ++r) {
        const float* qr = q + (hk * g + r) * d;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t e = 0; e < d; ++e) acc += qr[e] * k[e];
        s[(hk * g + r) * ld + c] = acc;
      }
    }
  }
}

// acc_(hk, r) += sum_c p[(hk * g + r) * ld + c] v_(c, hk), key by key (address order, as block_scores).
MGF_DECODE_CLONES void block_accumulate(float* acc, int64_t heads, int64_t g, int64_t d, const float* p, int64_t ld,
                                        const float* const* values, int64_t head_stride, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    if (c + 2 < n) __builtin_prefetch(values[c + 2] + heads * head_stride - 1);
    for (int64_t hk = 0; hk < heads; ++hk) {
      const float* v = values[c] + hk * head_stride;
      for (int64_t r = 0; r < g; ++r) {
        const float w = p[(hk * g + r) * ld + c];
        if (w == 0.0f) continue;
        float* a = acc + (hk * g + r) * d;
#pragma omp simd
        for (int64_t e = 0; e < d; ++e) a[e] += w * v[e];
      }
    }
  }
}

struct Problem {
  int64_t batch, nq, heads_q, heads_k, d, group;  // group: Hq / Hk
  int64_t page_size;                               // paged: tokens per page; contiguous: 0
  int64_t max_blocks;                              // paged: block_table's columns
  int64_t stride_row, stride_slot, stride_head;    // cache strides (elements) of dims 0, 1, 2; dim 3 is unit
  float scale, softcap;
  int64_t window_left, window_right;  // -1: unbounded
  const int* seqlens;
  const int* batch_idx;    // may be null
  const int* block_table;  // may be null (contiguous)
  const float* slopes;     // (B, Hq) or null
  int64_t splits, split_keys;
};

// Element offset of key j of sequence b in the cache (head 0, feature 0).
inline int64_t key_offset(const Problem& pb, int64_t b, int64_t j) {
  if (pb.block_table != nullptr) {
    const int64_t page = pb.block_table[b * pb.max_blocks + j / pb.page_size];
    return page * pb.stride_row + (j % pb.page_size) * pb.stride_slot;
  }
  const int64_t row = pb.batch_idx != nullptr ? pb.batch_idx[b] : b;
  return row * pb.stride_row + j * pb.stride_slot;
}

// Visible keys [lo, hi) of the query at position pos in a sequence of n keys.
inline void visible_range(const Problem& pb, int64_t pos, int64_t n, int64_t* lo, int64_t* hi) {
  *lo = pb.window_left >= 0 ? std::max<int64_t>(0, pos - pb.window_left) : 0;
  *hi = pb.window_right >= 0 ? std::min<int64_t>(n, pos + pb.window_right + 1) : n;
}

// Packed rows of key head hk: r = i * group + (h - hk * group), for query i and query head h.
template <typename T>
void process_task(const Problem& pb, const T* q, const int64_t* q_stride, const T* k_cache, const T* v_cache,
                  int64_t b, int64_t split, float* out_rows, float* lse_rows, std::vector<float>& qf,
                  std::vector<float>& acc, std::vector<float>& s, std::vector<OnlineSoftmax>& state,
                  std::vector<float>& kbuf, std::vector<float>& vbuf, std::vector<const float*>& kptr,
                  std::vector<const float*>& vptr) {
  const int64_t n = pb.seqlens[b], g = pb.group * pb.nq, d = pb.d, hk_count = pb.heads_k;
  const int64_t rows = hk_count * g;
  // Per packed row: position and visible range; the task's keys are the union, cut to its split.
  std::vector<int64_t> lo(static_cast<size_t>(pb.nq)), hi(static_cast<size_t>(pb.nq));
  int64_t task_lo = n, task_hi = 0;
  for (int64_t i = 0; i < pb.nq; ++i) {
    visible_range(pb, i + n - pb.nq, n, &lo[i], &hi[i]);
    if (lo[i] < hi[i]) {
      task_lo = std::min(task_lo, lo[i]);
      task_hi = std::max(task_hi, hi[i]);
    }
  }
  task_lo = std::max(task_lo, split * pb.split_keys);
  task_hi = std::min(task_hi, (split + 1) * pb.split_keys);

  for (int64_t hk = 0; hk < hk_count; ++hk)
    for (int64_t i = 0; i < pb.nq; ++i)
      for (int64_t gi = 0; gi < pb.group; ++gi) {
        const int64_t h = hk * pb.group + gi;
        const T* src = q + b * q_stride[0] + i * q_stride[1] + h * q_stride[2];
        float* dst = qf.data() + (hk * g + i * pb.group + gi) * d;
        for (int64_t e = 0; e < d; ++e) dst[e] = pb.scale * to_float(src[e]);
      }
  std::fill(acc.begin(), acc.begin() + rows * d, 0.0f);
  std::fill(state.begin(), state.begin() + rows, online_softmax_init());

  // Head 0 of each key of the block; float caches are read in place, others converted to float (key, head, d).
  const int64_t head_stride = std::is_same_v<T, float> ? pb.stride_head : d;
  for (int64_t j0 = task_lo; j0 < task_hi; j0 += BLOCK_KEYS) {
    const int64_t cols = std::min(BLOCK_KEYS, task_hi - j0);
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t base = key_offset(pb, b, j0 + c);
      if constexpr (std::is_same_v<T, float>) {
        kptr[c] = k_cache + base;
        vptr[c] = v_cache + base;
      } else {
        float* kb = kbuf.data() + c * hk_count * d;
        float* vb = vbuf.data() + c * hk_count * d;
        for (int64_t hk = 0; hk < hk_count; ++hk)
          for (int64_t e = 0; e < d; ++e) {
            kb[hk * d + e] = to_float(k_cache[base + hk * pb.stride_head + e]);
            vb[hk * d + e] = to_float(v_cache[base + hk * pb.stride_head + e]);
          }
        kptr[c] = kb;
        vptr[c] = vb;
      }
    }
    block_scores(qf.data(), hk_count, g, d, kptr.data(), head_stride, cols, s.data(), BLOCK_KEYS);
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t hk = row / g, r = row % g;
      const int64_t i = r / pb.group, h = hk * pb.group + r % pb.group, pos = i + n - pb.nq;
      float* srow = s.data() + row * BLOCK_KEYS;
      if (pb.softcap > 0.0f)
        for (int64_t c = 0; c < cols; ++c) srow[c] = pb.softcap * std::tanh(srow[c] / pb.softcap);
      if (pb.slopes != nullptr) {
        const float slope = pb.slopes[b * pb.heads_q + h];
        for (int64_t c = 0; c < cols; ++c) srow[c] -= slope * static_cast<float>(std::abs(pos - (j0 + c)));
      }
      if (j0 < lo[i] || j0 + cols > hi[i])  // the block straddles the row's visible range
        for (int64_t c = 0; c < cols; ++c)
          if (j0 + c < lo[i] || j0 + c >= hi[i]) srow[c] = -INFINITY;
      const float block_max = row_max(srow, cols);
      if (block_max == -INFINITY) {  // nothing visible here: weights all 0
        std::fill(srow, srow + cols, 0.0f);
        continue;
      }
      OnlineSoftmax& st = state[row];
      const float alpha = online_softmax_update(st, block_max);
      st.l += softmax_row(srow, cols, online_softmax_shift(st.m));
      if (alpha != 1.0f) scale_row(acc.data() + row * d, d, alpha);
    }
    block_accumulate(acc.data(), hk_count, g, d, s.data(), BLOCK_KEYS, vptr.data(), head_stride, cols);
  }
  // Normalised partial rows (B-major output layout is the caller's: out_rows[(i, h)], lse_rows[(h, i)]).
  for (int64_t hk = 0; hk < hk_count; ++hk)
    for (int64_t r = 0; r < g; ++r) {
      const int64_t i = r / pb.group, h = hk * pb.group + r % pb.group;
      const OnlineSoftmax& st = state[hk * g + r];
      const float inv = online_softmax_inv_sum(st);
      const float* a = acc.data() + (hk * g + r) * d;
      float* o = out_rows + (i * pb.heads_q + h) * d;
      for (int64_t e = 0; e < d; ++e) o[e] = a[e] * inv;
      lse_rows[h * pb.nq + i] = st.l > 0.0f ? st.m + std::log(st.l) : -INFINITY;
    }
}

// Splits per sequence: num_splits if given, else enough (b, split) tasks for the threads with at least
// MIN_SPLIT_KEYS keys each.
int64_t choose_splits(int64_t num_splits, int64_t batch, int64_t max_len) {
  if (num_splits > 0) return num_splits;
  const int64_t threads = at::get_num_threads();
  const int64_t by_threads = (threads + batch - 1) / std::max<int64_t>(batch, 1);
  const int64_t by_length = std::max<int64_t>(1, max_len / MIN_SPLIT_KEYS);
  return std::max<int64_t>(1, std::min(by_threads, by_length));
}

template <typename T>
void run(const Problem& pb, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
         at::Tensor& out, at::Tensor& lse) {
  const int64_t batch = pb.batch, nq = pb.nq, hq = pb.heads_q, d = pb.d, splits = pb.splits;
  const int64_t q_stride[3] = {q.stride(0), q.stride(1), q.stride(2)};
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  // One split: the task writes its rows straight into float32 staging (converted below); several: partials.
  const int64_t row_elems = nq * hq * d, lse_elems = hq * nq;
  std::vector<float> part_out(static_cast<size_t>(splits * batch * row_elems));
  std::vector<float> part_lse(static_cast<size_t>(splits * batch * lse_elems));
  const int64_t rows = hq * nq;
  at::parallel_for(0, batch * splits, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qf(rows * d), acc(rows * d), s(rows * BLOCK_KEYS);
    std::vector<OnlineSoftmax> state(rows);
    const bool convert = !std::is_same_v<T, float>;
    std::vector<float> kbuf(convert ? pb.heads_k * BLOCK_KEYS * d : 0), vbuf(kbuf.size());
    std::vector<const float*> kptr(BLOCK_KEYS), vptr(BLOCK_KEYS);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / splits, split = task % splits;
      process_task<T>(pb, qp, q_stride, kp, vp, b, split, part_out.data() + (split * batch + b) * row_elems,
                      part_lse.data() + (split * batch + b) * lse_elems, qf, acc, s, state, kbuf, vbuf, kptr,
                      vptr);
    }
  });
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  // The combine reads splits * d floats per row: a few microseconds in all at decode sizes, so it runs on the
  // calling thread unless it is large (a second parallel region costs a barrier, milliseconds on a busy machine
  // where a worker waits for a core).
  const int64_t combine_grain = std::max<int64_t>(16, (int64_t{1} << 18) / std::max<int64_t>(1, splits * d));
  at::parallel_for(0, batch * rows, combine_grain, [&](int64_t r0, int64_t r1) {
    for (int64_t task = r0; task < r1; ++task) {
      const int64_t b = task / rows, r = task % rows, h = r / nq, i = r % nq;  // r: (h, i) order of lse
      float m = -INFINITY;
      for (int64_t sp = 0; sp < splits; ++sp) m = std::max(m, part_lse[(sp * batch + b) * lse_elems + r]);
      T* o = op + ((b * nq + i) * hq + h) * d;
      if (m == -INFINITY) {
        for (int64_t e = 0; e < d; ++e) o[e] = from_float<T>(0.0f);
        lp[b * lse_elems + r] = -INFINITY;
        continue;
      }
      float total = 0.0f;
      float* acc = nullptr;
      std::vector<float> tmp;
      if (splits > 1) tmp.assign(static_cast<size_t>(d), 0.0f);
      for (int64_t sp = 0; sp < splits; ++sp) {
        const float l = part_lse[(sp * batch + b) * lse_elems + r];
        const float* po = part_out.data() + (sp * batch + b) * row_elems + (i * hq + h) * d;
        if (splits == 1) {
          acc = const_cast<float*>(po);
          total = 1.0f;
          break;
        }
        if (l == -INFINITY) continue;
        const float w = std::exp(l - m);
        total += w;
        for (int64_t e = 0; e < d; ++e) tmp[e] += w * po[e];
      }
      if (splits > 1) acc = tmp.data();
      const float inv = 1.0f / total;
      for (int64_t e = 0; e < d; ++e) o[e] = from_float<T>(acc[e] * inv);
      lp[b * lse_elems + r] = m + std::log(total);
    }
  });
}

void check_int32(const c10::optional<at::Tensor>& t, const char* name, int64_t dim) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kInt && t->dim() == dim, "decode_attention: ", name,
              " must be a ", dim, "-D int32 CPU tensor, got ", t->scalar_type(), " ", t->sizes(), " on ",
              t->device());
}

std::tuple<at::Tensor, at::Tensor> decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                                    const at::Tensor& v_cache, const at::Tensor& seqlens,
                                                    const c10::optional<at::Tensor>& batch_idx,
                                                    const c10::optional<at::Tensor>& block_table, double scale,
                                                    int64_t window_left, int64_t window_right, double softcap,
                                                    const c10::optional<at::Tensor>& alibi_slopes,
                                                    int64_t num_splits) {
  check_cpu_float(q, "q");
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "decode_attention: q (B, Nq, Hq, D) and caches of one 4-D shape expected, got ", q.sizes(), ", ",
              k_cache.sizes(), ", ", v_cache.sizes());
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "decode_attention: caches must have q's dtype");
  TORCH_CHECK(k_cache.device().is_cpu() && v_cache.device().is_cpu(), "decode_attention: caches must be on CPU");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1 && k_cache.strides() == v_cache.strides(),
              "decode_attention: k_cache and v_cache need one layout with a unit last stride, got ", k_cache.strides(),
              " and ", v_cache.strides());
  check_int32(seqlens, "seqlens", 1);
  check_int32(batch_idx, "batch_idx", 1);
  check_int32(block_table, "block_table", 2);
  Problem pb{};
  pb.batch = q.size(0);
  pb.nq = q.size(1);
  pb.heads_q = q.size(2);
  pb.d = q.size(3);
  pb.heads_k = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == pb.d && pb.heads_k > 0 && pb.heads_q % pb.heads_k == 0,
              "decode_attention: cache heads must divide q's heads and share its head dim");
  TORCH_CHECK(seqlens.size(0) == pb.batch, "decode_attention: seqlens must have shape (B,)");
  pb.group = pb.heads_q / pb.heads_k;
  pb.stride_row = k_cache.stride(0);
  pb.stride_slot = k_cache.stride(1);
  pb.stride_head = k_cache.stride(2);
  pb.scale = static_cast<float>(scale);
  pb.softcap = static_cast<float>(softcap);
  pb.window_left = window_left;
  pb.window_right = window_right;
  const at::Tensor sl = seqlens.contiguous();
  pb.seqlens = sl.data_ptr<int>();
  const int64_t rows = k_cache.size(0);
  at::Tensor bt, bi, slopes;
  int64_t capacity = k_cache.size(1);
  if (block_table.has_value()) {
    TORCH_CHECK(!batch_idx.has_value(), "decode_attention: batch_idx and block_table are exclusive");
    bt = block_table->contiguous();
    TORCH_CHECK(bt.size(0) == pb.batch, "decode_attention: block_table must have B rows");
    pb.block_table = bt.data_ptr<int>();
    pb.page_size = k_cache.size(1);
    pb.max_blocks = bt.size(1);
    capacity = pb.page_size * pb.max_blocks;
  } else if (batch_idx.has_value()) {
    bi = batch_idx->contiguous();
    TORCH_CHECK(bi.size(0) == pb.batch, "decode_attention: batch_idx must have shape (B,)");
    pb.batch_idx = bi.data_ptr<int>();
  } else {
    TORCH_CHECK(rows >= pb.batch, "decode_attention: the cache needs a row per sequence");
  }
  int64_t max_len = 0;
  for (int64_t b = 0; b < pb.batch; ++b) {  // every index the kernel follows, checked before any read
    const int64_t n = pb.seqlens[b];
    TORCH_CHECK(n >= 0 && n <= capacity, "decode_attention: seqlens[", b, "] = ", n, " outside [0, ", capacity, "]");
    max_len = std::max(max_len, n);
    if (pb.block_table != nullptr) {
      for (int64_t p = 0; p * pb.page_size < n; ++p) {
        const int page = pb.block_table[b * pb.max_blocks + p];
        TORCH_CHECK(page >= 0 && page < rows, "decode_attention: block_table[", b, ", ", p, "] = ", page,
                    " outside [0, ", rows, ")");
      }
    } else if (pb.batch_idx != nullptr) {
      TORCH_CHECK(pb.batch_idx[b] >= 0 && pb.batch_idx[b] < rows, "decode_attention: batch_idx[", b, "] = ",
                  pb.batch_idx[b], " outside [0, ", rows, ")");
    }
  }
  if (alibi_slopes.has_value()) {
    slopes = alibi_slopes->contiguous();
    TORCH_CHECK(slopes.scalar_type() == at::kFloat && slopes.device().is_cpu() &&
                    slopes.numel() == pb.batch * pb.heads_q,
                "decode_attention: alibi_slopes must be float32 (B, Hq) on CPU");
    pb.slopes = slopes.data_ptr<float>();
  }
  TORCH_CHECK(num_splits >= 0, "decode_attention: num_splits must be >= 0, got ", num_splits);
  pb.splits = choose_splits(num_splits, pb.batch, max_len);
  pb.split_keys = std::max<int64_t>(1, (max_len + pb.splits - 1) / pb.splits);

  at::Tensor out = at::empty({pb.batch, pb.nq, pb.heads_q, pb.d}, q.options());
  at::Tensor lse = at::empty({pb.batch, pb.heads_q, pb.nq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    lse.fill_(-INFINITY);
    return {out, lse};
  }
  MGF_DISPATCH_FLOATING(q.scalar_type(), "decode_attention", [&] { run<scalar_t>(pb, q, k_cache, v_cache, out, lse); });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(metagpt_fast, m) {
  m.set_python_module("metagpt_fast.backends.compiled.decode");

  // Decode attention against a key/value cache (flash-decoding). q (B, Nq, Hq, D); k_cache, v_cache
  // (B_c, N_max, Hk, D) (row batch_idx[b], or b, per sequence) or, with block_table (B, max_blocks) int32, pages
  // (num_blocks, page_size, Hk, D); unit last stride. seqlens (B,) int32: keys per sequence. Query i sits at
  // position i + seqlens[b] - Nq and sees keys in [pos - window_left, pos + window_right] (-1: unbounded).
  // softcap > 0 caps the scaled scores; alibi_slopes (B, Hq) float32 subtracts slope * |pos - j|. num_splits:
  // pieces per sequence (0: chosen). out (B, Nq, Hq, D) of q's dtype; lse (B, Hq, Nq) float32, -inf on empty rows.
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens, Tensor? batch_idx, "
      "Tensor? block_table, float scale, int window_left, int window_right, float softcap, Tensor? alibi_slopes, "
      "int num_splits) -> (Tensor out, Tensor lse)");
}

TORCH_LIBRARY_IMPL(metagpt_fast, CPU, m) { m.impl("decode_attention", &decode_attention); }

}  // namespace metagpt_fast::cpu
