// CPU kernels of LayerNorm and RMSNorm over the rows of x (M, N), with the optional residual add before the norm
// (``sum = x + residual`` is written and normalised in the same pass). Rows run in parallel (OpenMP through
// at::parallel_for); statistics are float32, and the forward saves the row mean (LayerNorm) and 1/std for the
// backward pass.
//
// The weight and bias gradients are reduced deterministically: the rows are split into a fixed number of blocks
// (kGradBlocks, not one per thread), each block sums its rows in order into its own float32 partial, and the partials
// are then added in block order, so the result is the same for any thread count and schedule.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"

// Row loops compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and baseline, picked when the library loads
// (as row_ops.cpp's): the library itself targets baseline x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MGF_NORM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MGF_NORM_CLONES
#endif

namespace metagpt_fast::cpu {
namespace {

// Blocks of rows for the weight/bias gradient partials: 64 * N floats each for dweight and dbias (384 KiB at
// N = 768), enough blocks to keep any core count of a CPU host busy.
constexpr int64_t kGradBlocks = 64;

MGF_NORM_CLONES float row_sum(const float* x, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < n; ++c) s += x[c];
  return s;
}

// sum (x - shift)^2: the variance's numerator about the row mean (two passes: no cancellation), or mean(x^2) * n.
MGF_NORM_CLONES float row_square_sum(const float* x, int64_t n, float shift) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < n; ++c) {
    const float d = x[c] - shift;
    s += d * d;
  }
  return s;
}

// y = (x - mean) * rstd * w + b; w and b may be null.
MGF_NORM_CLONES void row_normalize(float* y, const float* x, int64_t n, float mean, float rstd, const float* w,
                                   const float* b) {
  if (w != nullptr && b != nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) y[c] = (x[c] - mean) * rstd * w[c] + b[c];
  } else if (w != nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) y[c] = (x[c] - mean) * rstd * w[c];
  } else if (b != nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) y[c] = (x[c] - mean) * rstd + b[c];
  } else {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) y[c] = (x[c] - mean) * rstd;
  }
}

// With xhat = (x - mean) * rstd and wg = w * g (w null: 1): sums of wg * xhat and of wg.
MGF_NORM_CLONES void row_grad_sums(const float* g, const float* x, const float* w, int64_t n, float mean, float rstd,
                                   float* sum_wg_xhat, float* sum_wg) {
  float a = 0.0f, s = 0.0f;
  if (w != nullptr) {
#pragma omp simd reduction(+ : a, s)
    for (int64_t c = 0; c < n; ++c) {
      const float wg = w[c] * g[c];
      a += wg * ((x[c] - mean) * rstd);
      s += wg;
    }
  } else {
#pragma omp simd reduction(+ : a, s)
    for (int64_t c = 0; c < n; ++c) {
      a += g[c] * ((x[c] - mean) * rstd);
      s += g[c];
    }
  }
  *sum_wg_xhat = a;
  *sum_wg = s;
}

// dx = rstd * (w g - c2 - xhat * c1) (+ extra, the gradient reaching the residual sum directly; may be null).
MGF_NORM_CLONES void row_grad_input(float* dx, const float* g, const float* x, const float* w, const float* extra,
                                    int64_t n, float mean, float rstd, float c1, float c2) {
  if (w != nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) dx[c] = rstd * (w[c] * g[c] - c2 - (x[c] - mean) * rstd * c1);
  } else {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) dx[c] = rstd * (g[c] - c2 - (x[c] - mean) * rstd * c1);
  }
  if (extra != nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) dx[c] += extra[c];
  }
}

// dw += g * xhat; db += g (either may be null).
MGF_NORM_CLONES void row_grad_params(float* dw, float* db, const float* g, const float* x, int64_t n, float mean,
                                     float rstd) {
  if (dw != nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) dw[c] += g[c] * ((x[c] - mean) * rstd);
  }
  if (db != nullptr) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) db[c] += g[c];
  }
}

// A parameter (N,) as a float32 vector (empty when absent).
std::vector<float> float_parameter(const c10::optional<at::Tensor>& p, const at::Tensor& x, const char* name) {
  std::vector<float> out;
  if (!p.has_value()) return out;
  TORCH_CHECK(p->device().is_cpu(), name, " must be a CPU tensor, got ", p->device());
  TORCH_CHECK(p->scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type(), ", got ",
              p->scalar_type());
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(1), name, " must have shape (", x.size(1), ",), got ",
              p->sizes());
  const at::Tensor f = p->to(at::kFloat).contiguous();
  out.assign(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
  return out;
}

void check_rows(const at::Tensor& t, const at::Tensor& x, const char* name) {
  check_cpu_float(t, name);
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
}

int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_forward(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& residual_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, bool rms) {
  check_cpu_float(x_in, "x");
  TORCH_CHECK(x_in.dim() == 2, "x must be (rows, features), got ", x_in.sizes());
  TORCH_CHECK(eps >= 0.0, "eps must be >= 0, got ", eps);
  TORCH_CHECK(!(rms && bias.has_value()), "rms_norm takes no bias");
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor residual;
  if (residual_in.has_value()) {
    check_rows(*residual_in, x, "residual");
    residual = residual_in->contiguous();
  }
  const std::vector<float> w = float_parameter(weight, x, "weight"), b = float_parameter(bias, x, "bias");
  const auto stats = x.options().dtype(at::kFloat);
  at::Tensor out = at::empty({rows, n}, x.options());
  at::Tensor total = residual.defined() ? at::empty({rows, n}, x.options()) : at::empty({0}, x.options());
  at::Tensor mean = rms ? at::empty({0}, stats) : at::empty({rows}, stats);
  at::Tensor rstd = at::empty({rows}, stats);
  if (rows == 0 || n == 0) return {out, total, mean, rstd};
  const float* wp = w.empty() ? nullptr : w.data();
  const float* bp = b.empty() ? nullptr : b.data();
  float* mean_p = rms ? nullptr : mean.data_ptr<float>();
  float* rstd_p = rstd.data_ptr<float>();
  const float inv_n = 1.0f / static_cast<float>(n), epsf = static_cast<float>(eps);
  MGF_DISPATCH_FLOATING(x.scalar_type(), "norm_forward", [&] {
    constexpr bool kFloat = std::is_same_v<scalar_t, float>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = residual.defined() ? residual.data_ptr<scalar_t>() : nullptr;
    scalar_t* tp = residual.defined() ? total.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
      std::vector<float> xbuf(static_cast<size_t>(n)), ybuf(kFloat ? 0 : static_cast<size_t>(n));
      for (int64_t r = r0; r < r1; ++r) {
        const float* xr;
        if (rp != nullptr) {  // sum = x + residual, rounded to the dtype: the tensor the unfused norm would see
          const scalar_t* a = xp + r * n;
          const scalar_t* e = rp + r * n;
          scalar_t* t = tp + r * n;
          for (int64_t c = 0; c < n; ++c) {
            t[c] = static_cast<scalar_t>(static_cast<float>(a[c]) + static_cast<float>(e[c]));
            xbuf[c] = static_cast<float>(t[c]);
          }
          xr = xbuf.data();
        } else {
          xr = float_row(xp, r, n, xbuf.data());
        }
        const float mu = rms ? 0.0f : row_sum(xr, n) * inv_n;
        const float rs = 1.0f / std::sqrt(row_square_sum(xr, n, mu) * inv_n + epsf);
        if (mean_p != nullptr) mean_p[r] = mu;
        rstd_p[r] = rs;
        if constexpr (kFloat) {
          row_normalize(reinterpret_cast<float*>(op + r * n), xr, n, mu, rs, wp, bp);
        } else {
          row_normalize(ybuf.data(), xr, n, mu, rs, wp, bp);
          store_row(op + r * n, ybuf.data(), n);
        }
      }
    });
  });
  return {out, total, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward(
    const at::Tensor& grad_out_in, const c10::optional<at::Tensor>& grad_sum_in, const at::Tensor& x_in,
    const c10::optional<at::Tensor>& weight, const at::Tensor& mean_in, const at::Tensor& rstd_in, bool rms,
    bool weight_grad, bool bias_grad) {
  check_cpu_float(x_in, "x");
  TORCH_CHECK(x_in.dim() == 2, "x must be (rows, features), got ", x_in.sizes());
  check_rows(grad_out_in, x_in, "grad_out");
  const at::Tensor x = x_in.contiguous(), grad_out = grad_out_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor grad_sum;
  if (grad_sum_in.has_value()) {
    check_rows(*grad_sum_in, x, "grad_sum");
    grad_sum = grad_sum_in->contiguous();
  }
  TORCH_CHECK(rstd_in.scalar_type() == at::kFloat && rstd_in.numel() == rows, "rstd must be float32 (", rows,
              ",), got ", rstd_in.scalar_type(), " ", rstd_in.sizes());
  TORCH_CHECK(rms || (mean_in.scalar_type() == at::kFloat && mean_in.numel() == rows), "mean must be float32 (",
              rows, ",), got ", mean_in.scalar_type(), " ", mean_in.sizes());
  TORCH_CHECK(!weight_grad || weight.has_value(), "weight_grad needs the weight");
  const std::vector<float> w = float_parameter(weight, x, "weight");
  const at::Tensor mean = rms ? mean_in : mean_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor dx = at::empty({rows, n}, x.options());
  const auto param_options = weight.has_value() ? weight->options() : x.options();
  const int64_t blocks = std::min(rows, kGradBlocks);
  std::vector<float> dw_part(weight_grad ? static_cast<size_t>(blocks * n) : 0, 0.0f);
  std::vector<float> db_part(bias_grad ? static_cast<size_t>(blocks * n) : 0, 0.0f);
  if (rows > 0 && n > 0) {
    const float* wp = w.empty() ? nullptr : w.data();
    const float* mean_p = rms ? nullptr : mean.data_ptr<float>();
    const float* rstd_p = rstd.data_ptr<float>();
    const float inv_n = 1.0f / static_cast<float>(n);
    MGF_DISPATCH_FLOATING(x.scalar_type(), "norm_backward", [&] {
      constexpr bool kFloat = std::is_same_v<scalar_t, float>;
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* gp = grad_out.data_ptr<scalar_t>();
      const scalar_t* sp = grad_sum.defined() ? grad_sum.data_ptr<scalar_t>() : nullptr;
      scalar_t* dp = dx.data_ptr<scalar_t>();
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        const size_t buf = kFloat ? 0 : static_cast<size_t>(n);
        std::vector<float> xbuf(buf), gbuf(buf), sbuf(buf), dbuf(buf);
        for (int64_t blk = b0; blk < b1; ++blk) {
          float* dw = weight_grad ? dw_part.data() + blk * n : nullptr;
          float* db = bias_grad ? db_part.data() + blk * n : nullptr;
          for (int64_t r = blk * rows / blocks; r < (blk + 1) * rows / blocks; ++r) {
            const float* xr = float_row(xp, r, n, xbuf.data());
            const float* gr = float_row(gp, r, n, gbuf.data());
            const float* sr = sp != nullptr ? float_row(sp, r, n, sbuf.data()) : nullptr;
            const float mu = rms ? 0.0f : mean_p[r], rs = rstd_p[r];
            float sum_wg_xhat, sum_wg;
            row_grad_sums(gr, xr, wp, n, mu, rs, &sum_wg_xhat, &sum_wg);
            const float c1 = sum_wg_xhat * inv_n, c2 = rms ? 0.0f : sum_wg * inv_n;
            if constexpr (kFloat) {
              row_grad_input(reinterpret_cast<float*>(dp + r * n), gr, xr, wp, sr, n, mu, rs, c1, c2);
            } else {
              row_grad_input(dbuf.data(), gr, xr, wp, sr, n, mu, rs, c1, c2);
              store_row(dp + r * n, dbuf.data(), n);
            }
            if (dw != nullptr || db != nullptr) row_grad_params(dw, db, gr, xr, n, mu, rs);
          }
        }
      });
    });
  }
  // The partials in block order: the same sum for any thread count.
  auto reduce = [&](const std::vector<float>& part) {
    at::Tensor total = at::zeros({n}, x.options().dtype(at::kFloat));
    float* tp = total.data_ptr<float>();
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int64_t c = 0; c < n; ++c) tp[c] += part[blk * n + c];
    return total.to(param_options.dtype());
  };
  at::Tensor dweight = weight_grad ? reduce(dw_part) : at::empty({0}, param_options);
  at::Tensor dbias = bias_grad ? reduce(db_part) : at::empty({0}, param_options);
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(metagpt_fast, m) {
  m.set_python_module("metagpt_fast.backends.compiled.norms");

  // LayerNorm (rms=False) or RMSNorm (rms=True, no bias) over the rows of x (M, N), of x + residual when given.
  // Returns (out, sum, mean, rstd): sum = x + residual (empty without a residual), float32 row statistics (mean is
  // empty for RMSNorm) saved for the backward pass.
  m.def(
      "norm_forward(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool rms) -> (Tensor out, "
      "Tensor sum, Tensor mean, Tensor rstd)");
  // Gradients of x (plus grad_sum, the gradient reaching the residual sum), of the weight and of the bias (empty
  // unless weight_grad / bias_grad); x is the normalised tensor (the sum when there was a residual).
  m.def(
      "norm_backward(Tensor grad_out, Tensor? grad_sum, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool rms, "
      "bool weight_grad, bool bias_grad) -> (Tensor dx, Tensor dweight, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(metagpt_fast, CPU, m) {
  m.impl("norm_forward", &norm_forward);
  m.impl("norm_backward", &norm_backward);
}

}  // namespace metagpt_fast::cpu
