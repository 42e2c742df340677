// CPU kernel of the fused bias-add + GELU (exact erf form and tanh form), forward and backward, over the rows of x
// (M, N) with bias (N,). Rows run in parallel (OpenMP through at::parallel_for); everything is computed in float32
// with branch-free exp / erfc approximations that the compiler vectorises (a call to the C library's erff or tanhf
// would keep each loop scalar).
//
// The bias gradient is reduced deterministically: fixed blocks of rows (not one per thread) sum their rows in order
// into float32 partials, which are added in block order.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "metagpt_fast/online_softmax.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MGF_GELU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MGF_GELU_CLONES
#endif

namespace metagpt_fast::cpu {
namespace {

constexpr int64_t kGradBlocks = 64;  // row blocks of the bias gradient's partials (see norms_cpu.cpp)
constexpr float kSqrt2OverPi = 0.7978845608028654f, kCubic = 0.044715f, kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

// GELU (tanh form) as z * sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3): 0.5 (1 + tanh(u)) = sigmoid(2u), which
// has no cancellation for negative z. Writes sigmoid(2u) to *s.
inline __attribute__((always_inline)) float gelu_tanh(float z, float* s) {
  const float u = kSqrt2OverPi * (z + kCubic * z * z * z);
  *s = 1.0f / (1.0f + mgf_exp(-2.0f * u));
  return z * *s;
}

// Phi(z), the standard normal CDF, from erfc (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7, the approximation
// torch's vectorised CPU GELU uses): erfc(a) = t * poly(t) * exp(-a^2), t = 1 / (1 + p a), for a = |z| / sqrt(2);
// Phi = erfc(a) / 2 for z < 0 and 1 - erfc(a) / 2 otherwise. Writes exp(-z^2/2) to *e (for the density).
inline __attribute__((always_inline)) float normal_cdf(float z, float* e) {
  const float a = (z < 0.0f ? -z : z) * kInvSqrt2;
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  *e = mgf_exp(-a * a);
  const float half_erfc = 0.5f * p * t * *e;
  return z < 0.0f ? half_erfc : 1.0f - half_erfc;
}

// y = gelu(x + b); b may be null.
MGF_GELU_CLONES void gelu_row(float* y, const float* x, const float* b, int64_t n, bool tanh) {
  if (tanh) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      float s;
      y[c] = gelu_tanh(x[c] + (b != nullptr ? b[c] : 0.0f), &s);
    }
  } else {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const float z = x[c] + (b != nullptr ? b[c] : 0.0f);
      float e;
      y[c] = z * normal_cdf(z, &e);
    }
  }
}

// dx = g * gelu'(x + b): tanh form s + 2 z s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 z^2) with s = sigmoid(2u); exact
// form Phi(z) + z phi(z).
MGF_GELU_CLONES void gelu_grad_row(float* dx, const float* g, const float* x, const float* b, int64_t n, bool tanh) {
  if (tanh) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const float z = x[c] + (b != nullptr ? b[c] : 0.0f);
      float s;
      gelu_tanh(z, &s);
      const float du = kSqrt2OverPi * (1.0f + 3.0f * kCubic * z * z);
      dx[c] = g[c] * (s + 2.0f * z * s * (1.0f - s) * du);
    }
  } else {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const float z = x[c] + (b != nullptr ? b[c] : 0.0f);
      float e;
      const float cdf = normal_cdf(z, &e);
      dx[c] = g[c] * (cdf + z * e * kInvSqrt2Pi);
    }
  }
}

MGF_GELU_CLONES void accumulate_row(float* acc, const float* v, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) acc[c] += v[c];
}

std::vector<float> float_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& x) {
  std::vector<float> out;
  if (!bias.has_value()) return out;
  TORCH_CHECK(bias->device().is_cpu(), "bias must be a CPU tensor, got ", bias->device());
  TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias must have x's dtype ", x.scalar_type(), ", got ",
              bias->scalar_type());
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x.size(1), "bias must have shape (", x.size(1), ",), got ",
              bias->sizes());
  const at::Tensor f = bias->to(at::kFloat).contiguous();
  out.assign(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
  return out;
}

int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

at::Tensor bias_gelu(const at::Tensor& x_in, const c10::optional<at::Tensor>& bias, bool tanh) {
  check_cpu_float(x_in, "x");
  TORCH_CHECK(x_in.dim() == 2, "x must be (rows, features), got ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  const std::vector<float> b = float_bias(bias, x);
  at::Tensor y = at::empty({rows, n}, x.options());
  if (rows == 0 || n == 0) return y;
  const float* bp = b.empty() ? nullptr : b.data();
  MGF_DISPATCH_FLOATING(x.scalar_type(), "bias_gelu", [&] {
    constexpr bool kFloat = std::is_same_v<scalar_t, float>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
      std::vector<float> xbuf(kFloat ? 0 : static_cast<size_t>(n)), ybuf(kFloat ? 0 : static_cast<size_t>(n));
      for (int64_t r = r0; r < r1; ++r) {
        const float* xr = float_row(xp, r, n, xbuf.data());
        if constexpr (kFloat) {
          gelu_row(reinterpret_cast<float*>(yp + r * n), xr, bp, n, tanh);
        } else {
          gelu_row(ybuf.data(), xr, bp, n, tanh);
          store_row(yp + r * n, ybuf.data(), n);
        }
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                      const c10::optional<at::Tensor>& bias, bool tanh,
                                                      bool bias_grad) {
  check_cpu_float(x_in, "x");
  TORCH_CHECK(x_in.dim() == 2, "x must be (rows, features), got ", x_in.sizes());
  check_cpu_float(grad_in, "grad_out");
  TORCH_CHECK(grad_in.sizes() == x_in.sizes() && grad_in.scalar_type() == x_in.scalar_type(),
              "grad_out must match x's shape and dtype, got ", grad_in.sizes(), " ", grad_in.scalar_type());
  TORCH_CHECK(!bias_grad || bias.has_value(), "bias_grad needs the bias");
  const at::Tensor x = x_in.contiguous(), grad = grad_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  const std::vector<float> b = float_bias(bias, x);
  at::Tensor dx = at::empty({rows, n}, x.options());
  const int64_t blocks = std::min(rows, kGradBlocks);
  std::vector<float> part(bias_grad ? static_cast<size_t>(blocks * n) : 0, 0.0f);
  if (rows > 0 && n > 0) {
    const float* bp = b.empty() ? nullptr : b.data();
    MGF_DISPATCH_FLOATING(x.scalar_type(), "bias_gelu_backward", [&] {
      constexpr bool kFloat = std::is_same_v<scalar_t, float>;
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* gp = grad.data_ptr<scalar_t>();
      scalar_t* dp = dx.data_ptr<scalar_t>();
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        const size_t buf = kFloat ? 0 : static_cast<size_t>(n);
        std::vector<float> xbuf(buf), gbuf(buf), dbuf(buf);
        for (int64_t blk = b0; blk < b1; ++blk) {
          for (int64_t r = blk * rows / blocks; r < (blk + 1) * rows / blocks; ++r) {
            const float* xr = float_row(xp, r, n, xbuf.data());
            const float* gr = float_row(gp, r, n, gbuf.data());
            float* dr = kFloat ? reinterpret_cast<float*>(dp + r * n) : dbuf.data();
            gelu_grad_row(dr, gr, xr, bp, n, tanh);
            if (bias_grad) accumulate_row(part.data() + blk * n, dr, n);
            if constexpr (!kFloat) store_row(dp + r * n, dbuf.data(), n);
          }
        }
      });
    });
  }
  at::Tensor dbias = at::empty({0}, x.options());
  if (bias_grad) {
    at::Tensor total = at::zeros({n}, x.options().dtype(at::kFloat));
    float* tp = total.data_ptr<float>();
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int64_t c = 0; c < n; ++c) tp[c] += part[blk * n + c];
    dbias = total.to(x.scalar_type());
  }
  return {dx, dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(metagpt_fast, m) {
  m.set_python_module("metagpt_fast.backends.compiled.bias_gelu");

  // gelu(x + bias) over the rows of x (M, N), bias (N,) or None; tanh=True is the tanh approximation.
  m.def("bias_gelu(Tensor x, Tensor? bias, bool tanh) -> Tensor");
  // dx = grad_out * gelu'(x + bias) and, if bias_grad, dbias = dx summed over rows (else an empty tensor).
  m.def(
      "bias_gelu_backward(Tensor grad_out, Tensor x, Tensor? bias, bool tanh, bool bias_grad) -> (Tensor dx, "
      "Tensor dbias)");
}

TORCH_LIBRARY_IMPL(metagpt_fast, CPU, m) {
  m.impl("bias_gelu", &bias_gelu);
  m.impl("bias_gelu_backward", &bias_gelu_backward);
}

}  // namespace metagpt_fast::cpu
