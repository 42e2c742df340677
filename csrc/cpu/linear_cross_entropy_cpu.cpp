// CPU kernel of linear + cross-entropy (the LM head's loss) without the (N, V) logits.
//
// Rows go chunk_size at a time. Per chunk: the logits z = h W^T + b from torch's BLAS (its sgemm_ directly in
// float32, gemm.h; at::addmm otherwise), then one OpenMP pass over the chunk's rows, in place: the softcap, the row
// maximum, sum exp(z - max) (online_softmax.h's exp), the row's loss, and (when gradients are wanted) the logit
// gradient written over the logits,
//
//   dz_j = scale_i * (softmax(z)_j - eps / V - (1 - eps) [j == t_i]) * (1 - (z_j / c)^2 with a softcap c),
//
// then grad_hidden[chunk] = dz W and grad_weight += dz^T h[chunk], grad_bias += colsum(dz). Row statistics and the
// loss are float32 (the losses summed in float64); bfloat16 / float16 rows are converted to a float32 row buffer
// and their logit gradient rounded back for the products, whose weight and bias sums accumulate in float32.
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "gemm.h"
#include "metagpt_fast/online_softmax.h"

// The row loops are also compiled for x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512) and picked at load time, as
// in row_ops.cpp.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MGF_LCE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MGF_LCE_CLONES
#endif

namespace metagpt_fast::cpu {
namespace {

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// z <- c * tanh(z / c). std::tanh (not vectorised): an approximation would move the logits by ~1e-7 * c.
void softcap_row(float* z, int64_t n, float cap) {
  const float inv = 1.0f / cap;
  for (int64_t j = 0; j < n; ++j) z[j] = cap * std::tanh(z[j] * inv);
}

MGF_LCE_CLONES float max_row(const float* z, int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = z[j] > m ? z[j] : m;
  return m;
}

MGF_LCE_CLONES float exp_sum_row(const float* z, int64_t n, float shift) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += mgf_exp(z[j] - shift);
  return s;
}

// Sum of the row in float64 (the label-smoothing term: V terms of the size of the logits).
MGF_LCE_CLONES double sum_row(const float* z, int64_t n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += z[j];
  return s;
}

// z_j <- scale * (exp(z_j - m) / l - smooth) [* (1 - (z_j / c)^2)]: the logit gradient but for the target's term.
// exp(z - m) / l rather than exp(z - lse): the rounding of lse = m + log(l) (~|lse| ulps) would scale the whole row's
// probabilities alike, that of 1 / l is one ulp.
MGF_LCE_CLONES void grad_row(float* z, int64_t n, float shift, float inv_sum, float scale, float smooth, float cap) {
  if (cap > 0.0f) {
    const float inv = 1.0f / cap;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float t = z[j] * inv;
      z[j] = scale * (mgf_exp(z[j] - shift) * inv_sum - smooth) * (1.0f - t * t);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) z[j] = scale * (mgf_exp(z[j] - shift) * inv_sum - smooth);
  }
}

struct RowParams {
  int64_t vocab;
  int64_t ignore_index;
  float eps;     // label smoothing
  float cap;     // softcap, 0 for none
  bool grads;    // write the logit gradient over the logits
};

// One row of logits z (float32, in place): returns its loss; with p.grads, z holds the logit gradient after.
float row_pass(float* z, int64_t target, float scale, const RowParams& p) {
  const int64_t n = p.vocab;
  if (target == p.ignore_index) {
    if (p.grads)
      for (int64_t j = 0; j < n; ++j) z[j] = 0.0f;
    return 0.0f;
  }
  if (p.cap > 0.0f) softcap_row(z, n, p.cap);
  const float m = max_row(z, n);
  // An infinite maximum (an overflowed product): the softmax is NaN, as torch's is.
  const float shift = std::isfinite(m) ? m : 0.0f;
  const float sum = exp_sum_row(z, n, shift);
  const float lse = shift + std::log(sum);
  const float zt = z[target];
  double loss = static_cast<double>(lse) - (1.0 - p.eps) * static_cast<double>(zt);
  if (p.eps > 0.0f) loss -= p.eps * (sum_row(z, n) / static_cast<double>(n));
  if (p.grads) {
    const float smooth = p.eps / static_cast<float>(n);
    const float inv_sum = 1.0f / sum;
    grad_row(z, n, shift, inv_sum, scale, smooth, p.cap);
    const float t = p.cap > 0.0f ? zt / p.cap : 0.0f;
    z[target] = scale * (mgf_exp(zt - shift) * inv_sum - smooth - (1.0f - p.eps)) * (1.0f - t * t);
  }
  return static_cast<float>(loss);
}

// The fused row pass over a chunk of logits (rows, V) of scalar_t, in place; losses[r] for each row.
void chunk_pass(at::Tensor& logits, const int64_t* targets, const float* grad_rows, float grad_scale, float* losses,
                const RowParams& p) {
  const int64_t rows = logits.size(0), n = p.vocab;
  MGF_DISPATCH_FLOATING(logits.scalar_type(), "linear_cross_entropy", [&] {
    scalar_t* base = logits.data_ptr<scalar_t>();
    const int64_t ld = logits.stride(0);
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      std::vector<float> buffer(std::is_same_v<scalar_t, float> ? 0 : static_cast<size_t>(n));
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* row = base + r * ld;
        const float scale = grad_scale * (grad_rows != nullptr ? grad_rows[r] : 1.0f);
        if constexpr (std::is_same_v<scalar_t, float>) {  // not a template: both branches compile, one runs
          losses[r] = row_pass(reinterpret_cast<float*>(row), targets[r], scale, p);
        } else {
          for (int64_t j = 0; j < n; ++j) buffer[j] = to_float(row[j]);
          losses[r] = row_pass(buffer.data(), targets[r], scale, p);
          if (p.grads)
            for (int64_t j = 0; j < n; ++j) row[j] = from_float<scalar_t>(buffer[j]);
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& grad_rows, int64_t ignore_index, int64_t reduction, double label_smoothing,
    double softcap, int64_t chunk_size, bool grad_hidden, bool grad_weight, bool grad_bias) {
  check_cpu_float(hidden, "hidden");
  check_cpu_float(weight, "weight");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden must be (N, d) and weight (V, d), got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "hidden and weight must share a dtype, got ",
              hidden.scalar_type(), " and ", weight.scalar_type());
  const int64_t rows = hidden.size(0), vocab = weight.size(0), d = hidden.size(1);
  TORCH_CHECK(targets.device().is_cpu() && targets.scalar_type() == at::kLong && targets.dim() == 1 &&
                  targets.size(0) == rows,
              "targets must be a CPU int64 tensor of shape (", rows, ",), got ", targets.sizes(), " ",
              targets.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_cpu_float(*bias, "bias");
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type() && bias->dim() == 1 && bias->size(0) == vocab,
                "bias must be (", vocab, ",) of hidden's dtype, got ", bias->sizes(), " ", bias->scalar_type());
  }
  TORCH_CHECK(!grad_rows.has_value() || (grad_rows->scalar_type() == at::kFloat && grad_rows->numel() == rows &&
                                         grad_rows->device().is_cpu()),
              "grad_rows must be a CPU float32 tensor of ", rows, " elements");
  TORCH_CHECK(reduction == kNone || reduction == kMean || reduction == kSum,
              "reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, "label_smoothing must be in [0, 1], got ",
              label_smoothing);
  TORCH_CHECK(softcap >= 0.0, "softcap must be >= 0 (0: none), got ", softcap);
  TORCH_CHECK(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);

  const at::Tensor tgt = targets.contiguous();
  const int64_t* tp = tgt.data_ptr<int64_t>();
  int64_t valid = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = tp[r];
    if (t == ignore_index) continue;
    TORCH_CHECK(t >= 0 && t < vocab, "targets must lie in [0, ", vocab, ") or equal ignore_index, found ", t);
    ++valid;
  }
  // mean: every row's gradient is divided by the number of rows not ignored.
  const float grad_scale = reduction == kMean ? 1.0f / static_cast<float>(valid) : 1.0f;
  const bool grads = grad_hidden || grad_weight || grad_bias;
  const bool low = hidden.scalar_type() != at::kFloat;
  const at::Tensor rows_scale = grad_rows.has_value() ? grad_rows->reshape({rows}).contiguous() : at::Tensor();
  const float* gp = rows_scale.defined() ? rows_scale.data_ptr<float>() : nullptr;

  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor losses = at::empty({rows}, f32);
  at::Tensor dh = grad_hidden ? at::empty({rows, d}, hidden.options()) : at::empty({0}, hidden.options());
  // float32 with a BLAS: the products go to sgemm directly, the first chunk's weight gradient with beta = 0 (no
  // zero-filled (V, d) accumulator first); otherwise through ATen.
  const bool direct = !low && gemm_uses_blas();
  const auto rows_ok = [](const at::Tensor& t) { return t.stride(1) == 1 && t.stride(0) >= t.size(1); };
  const at::Tensor hid = direct && !rows_ok(hidden) ? hidden.contiguous() : hidden;
  const at::Tensor wei = direct && !rows_ok(weight) ? weight.contiguous() : weight;
  // Weight and bias gradients accumulate in float32 over the chunks (rounded once at the end for 16-bit inputs).
  at::Tensor dw_acc;
  if (grad_weight) dw_acc = direct && rows > 0 ? at::empty({vocab, d}, f32) : at::zeros({vocab, d}, f32);
  at::Tensor db_acc = grad_bias ? at::zeros({vocab}, f32) : at::Tensor();
  const RowParams params{vocab, ignore_index, static_cast<float>(label_smoothing), static_cast<float>(softcap),
                         grads};
  const at::Tensor wt = weight.t();
  const int64_t chunk = std::min(chunk_size, std::max<int64_t>(rows, 1));
  at::Tensor buffer = at::empty({chunk, vocab}, hidden.options());
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t c = std::min(chunk, rows - r0);
    const at::Tensor h = hid.narrow(0, r0, c);
    at::Tensor z = buffer.narrow(0, 0, c);
    if (has_bias) {
      at::addmm_out(z, *bias, h, wt);
    } else if (direct) {  // z (c, V) = h (c, d) W^T
      gemm(false, true, c, vocab, d, 1.0f, h.data_ptr<float>(), hid.stride(0), wei.data_ptr<float>(), wei.stride(0),
           0.0f, z.data_ptr<float>(), vocab);
    } else {
      at::mm_out(z, h, wt);
    }
    chunk_pass(z, tp + r0, gp != nullptr ? gp + r0 : nullptr, grad_scale, losses.data_ptr<float>() + r0, params);
    if (!grads) continue;
    if (grad_hidden) {
      at::Tensor out = dh.narrow(0, r0, c);
      if (direct) {  // dh (c, d) = dz (c, V) W (V, d)
        gemm(false, false, c, d, vocab, 1.0f, z.data_ptr<float>(), vocab, wei.data_ptr<float>(), wei.stride(0), 0.0f,
             out.data_ptr<float>(), d);
      } else {
        at::mm_out(out, z, weight);
      }
    }
    if (grad_weight) {
      if (direct) {  // dW (V, d) += dz^T (V, c) h (c, d)
        gemm(true, false, vocab, d, c, 1.0f, z.data_ptr<float>(), vocab, h.data_ptr<float>(), hid.stride(0),
             r0 == 0 ? 0.0f : 1.0f, dw_acc.data_ptr<float>(), d);
      } else if (low) {
        dw_acc.add_(at::mm(z.t(), h));
      } else {
        dw_acc.addmm_(z.t(), h);
      }
    }
    if (grad_bias) db_acc.add_(at::sum(z, {0}, false, at::kFloat));
  }
  at::Tensor dw = grad_weight ? (low ? dw_acc.to(weight.scalar_type()) : dw_acc) : at::empty({0}, weight.options());
  at::Tensor db = grad_bias ? (low ? db_acc.to(hidden.scalar_type()) : db_acc) : at::empty({0}, hidden.options());

  at::Tensor loss;
  if (reduction == kNone) {
    loss = losses;
  } else {
    const float* lp = losses.data_ptr<float>();
    double total = 0.0;
    for (int64_t r = 0; r < rows; ++r) total += lp[r];
    if (reduction == kMean) total /= static_cast<double>(valid);  // 0 / 0 = NaN when every row is ignored (torch's)
    loss = at::empty({}, f32);
    loss.fill_(total);
  }
  return {loss, dh, dw, db};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(metagpt_fast, m) {
  m.set_python_module("metagpt_fast.backends.compiled.linear_cross_entropy");

  // Cross-entropy of the logits softcap(hidden (N, d) @ weight (V, d)^T + bias) against targets (N,) int64, chunk
  // by chunk of rows. reduction: 0 none (loss (N,)), 1 mean over the rows not ignored, 2 sum (loss ()); float32.
  // softcap 0: none. grad_*: also return that gradient of the loss (else an empty tensor), each row's scaled by
  // grad_rows[i] (float32 (N,)) when given: the backward of reduction none.
  m.def(
      "linear_cross_entropy(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, Tensor? grad_rows, "
      "int ignore_index, int reduction, float label_smoothing, float softcap, int chunk_size, bool grad_hidden, "
      "bool grad_weight, bool grad_bias) -> (Tensor loss, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(metagpt_fast, CPU, m) { m.impl("linear_cross_entropy", &linear_cross_entropy); }

}  // namespace metagpt_fast::cpu
