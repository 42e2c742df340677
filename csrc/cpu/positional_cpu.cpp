// CPU kernels of the positional ops: fused token embedding + sinusoidal encoding + dropout, the positional-encoding
// add, and their backward passes. OpenMP (torch's pool) across rows; the inner loops run over contiguous features.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "metagpt_fast/philox.h"
#include "metagpt_fast/sinusoid.h"
#include "row_ops.h"

namespace metagpt_fast::cpu {
namespace {

constexpr double kBase = 10000.0;  // the article's and the reference's sinusoid base

// (T, d) float32 table PE[offset + t] with the shared sinusoid math (sin at even, cos at odd features).
std::vector<float> sinusoid_table(int64_t seq_len, int64_t d, int64_t offset) {
  std::vector<float> table(static_cast<size_t>(seq_len * d));
  const int64_t pairs = (d + 1) / 2;
  std::vector<double> freq(static_cast<size_t>(pairs));
  for (int64_t i = 0; i < pairs; ++i) freq[i] = inv_freq(static_cast<int>(2 * i), static_cast<int>(d), kBase);
  at::parallel_for(0, seq_len, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* row = table.data() + t * d;
      for (int64_t i = 0; i < pairs; ++i) {
        float s, c;
        position_sincos(static_cast<double>(offset + t), freq[i], &s, &c);
        row[2 * i] = s;
        if (2 * i + 1 < d) row[2 * i + 1] = c;
      }
    }
  });
  return table;
}

// Applies dropout in place to one row of already-rounded outputs: y * keep / (1 - p), Philox offsets base + j.
// ``factors`` is scratch of n floats.
template <typename T>
void dropout_row(T* y, int64_t n, uint64_t seed, uint64_t base, uint32_t threshold, float inv_keep, float* factors) {
  philox_factors(factors, n, seed, base, threshold, inv_keep);
  for (int64_t j = 0; j < n; ++j) y[j] = from_float<T>(to_float(y[j]) * factors[j]);
}

at::Tensor embed_positions_fwd(const at::Tensor& tokens, const at::Tensor& weight, double scale, int64_t offset,
                               double dropout_p, bool sinusoidal, const c10::optional<at::Tensor>& seed) {
  check_cpu_float(weight, "weight");
  TORCH_CHECK(weight.dim() == 2, "weight must be (num_embeddings, d), got shape ", weight.sizes());
  TORCH_CHECK(tokens.dim() == 2 && !at::isFloatingType(tokens.scalar_type()),
              "tokens must be a (B, T) integer tensor, got ", tokens.sizes(), " ", tokens.scalar_type());
  TORCH_CHECK(tokens.device().is_cpu(), "tokens must be a CPU tensor, got ", tokens.device());
  TORCH_CHECK(offset >= 0, "offset must be >= 0, got ", offset);
  const uint64_t key = read_seed(seed, dropout_p, "embed_positions_fwd");
  const at::Tensor ids = tokens.to(at::kLong).contiguous();
  const at::Tensor w = weight.contiguous();
  const int64_t batch = tokens.size(0), seq_len = tokens.size(1), d = w.size(1), vocab = w.size(0);
  at::Tensor out = at::empty({batch, seq_len, d}, weight.options());
  if (out.numel() == 0) return out;
  const std::vector<float> table = sinusoidal ? sinusoid_table(seq_len, d, offset) : std::vector<float>();
  const uint32_t threshold = dropout_threshold(dropout_p);
  const float inv_keep = static_cast<float>(1.0 / (1.0 - dropout_p)), fscale = static_cast<float>(scale);
  const int64_t* id = ids.data_ptr<int64_t>();
  MGF_DISPATCH_FLOATING(w.scalar_type(), "embed_positions_fwd", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * seq_len, 1, [&](int64_t r0, int64_t r1) {
      std::vector<float> factors(dropout_p > 0.0 ? d : 0);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t tok = id[r];
        TORCH_CHECK(tok >= 0 && tok < vocab, "tokens must lie in [0, ", vocab, "), found token id ", tok);
        const scalar_t* wrow = wp + tok * d;
        scalar_t* orow = op + r * d;
        if (sinusoidal) {
          const float* pe = table.data() + (r % seq_len) * d;
          for (int64_t j = 0; j < d; ++j) orow[j] = from_float<scalar_t>(to_float(wrow[j]) * fscale + pe[j]);
        } else {
          for (int64_t j = 0; j < d; ++j) orow[j] = from_float<scalar_t>(to_float(wrow[j]) * fscale);
        }
        if (dropout_p > 0.0)
          dropout_row(orow, d, key, static_cast<uint64_t>(r * d), threshold, inv_keep, factors.data());
      }
    });
  });
  return out;
}

at::Tensor embed_positions_bwd(const at::Tensor& grad_out, const at::Tensor& tokens, int64_t num_embeddings,
                               double scale, double dropout_p, const c10::optional<at::Tensor>& seed) {
  check_cpu_float(grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() == 3 && tokens.dim() == 2 && grad_out.size(0) == tokens.size(0) &&
                  grad_out.size(1) == tokens.size(1),
              "grad_out must be (B, T, d) for tokens (B, T), got ", grad_out.sizes(), " and ", tokens.sizes());
  TORCH_CHECK(num_embeddings >= 0, "num_embeddings must be >= 0, got ", num_embeddings);
  const uint64_t key = read_seed(seed, dropout_p, "embed_positions_bwd");
  const at::Tensor ids = tokens.to(at::kLong).contiguous();
  const at::Tensor g = grad_out.contiguous();
  const int64_t rows = tokens.numel(), d = g.size(2);
  // Float32 sums; written straight into the result for float32, converted once otherwise.
  at::Tensor grad_w = at::empty({num_embeddings, d}, g.options().dtype(at::kFloat));
  const uint32_t threshold = dropout_threshold(dropout_p);
  const float keep_scale = static_cast<float>(scale / (1.0 - dropout_p)), fscale = static_cast<float>(scale);
  const int64_t* id = ids.data_ptr<int64_t>();
  float* gw = grad_w.data_ptr<float>();
  MGF_DISPATCH_FLOATING(g.scalar_type(), "embed_positions_bwd", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    // Each thread owns a range of vocabulary rows: it zeroes them (first touch of a large fresh gradient is most of
    // the cost) and adds the gradient rows of its tokens in token order. No atomics, and every sum has the same
    // order on every run whatever the thread count: deterministic.
    at::parallel_for(0, num_embeddings, 16, [&](int64_t v0, int64_t v1) {
      std::fill(gw + v0 * d, gw + v1 * d, 0.0f);
      std::vector<float> factors(dropout_p > 0.0 ? d : 0);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t tok = id[r];
        TORCH_CHECK(tok >= 0 && tok < num_embeddings, "tokens must lie in [0, ", num_embeddings, "), found ", tok);
        if (tok < v0 || tok >= v1) continue;
        const scalar_t* grow = gp + r * d;
        float* wrow = gw + tok * d;
        if (dropout_p > 0.0) {
          philox_factors(factors.data(), d, key, static_cast<uint64_t>(r * d), threshold, keep_scale);
          for (int64_t j = 0; j < d; ++j) wrow[j] += to_float(grow[j]) * factors[j];
        } else {
          for (int64_t j = 0; j < d; ++j) wrow[j] += to_float(grow[j]) * fscale;
        }
      }
    });
  });
  return grad_out.scalar_type() == at::kFloat ? grad_w : grad_w.to(grad_out.scalar_type());
}

at::Tensor add_positional_encoding_fwd(const at::Tensor& x, int64_t offset, double dropout_p,
                                       const c10::optional<at::Tensor>& seed) {
  check_cpu_float(x, "x");
  TORCH_CHECK(x.dim() == 3, "x must be (B, T, d), got shape ", x.sizes());
  TORCH_CHECK(offset >= 0, "offset must be >= 0, got ", offset);
  const uint64_t key = read_seed(seed, dropout_p, "add_positional_encoding_fwd");
  const at::Tensor xs = unit_last_stride(x);
  const int64_t batch = x.size(0), seq_len = x.size(1), d = x.size(2);
  at::Tensor out = at::empty({batch, seq_len, d}, x.options());
  if (out.numel() == 0) return out;
  const std::vector<float> table = sinusoid_table(seq_len, d, offset);
  const uint32_t threshold = dropout_threshold(dropout_p);
  const float inv_keep = static_cast<float>(1.0 / (1.0 - dropout_p));
  const int64_t sb = xs.stride(0), st = xs.stride(1);
  MGF_DISPATCH_FLOATING(x.scalar_type(), "add_positional_encoding_fwd", [&] {
    const scalar_t* xp = xs.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * seq_len, 1, [&](int64_t r0, int64_t r1) {
      std::vector<float> factors(dropout_p > 0.0 ? d : 0);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / seq_len, t = r % seq_len;
        const scalar_t* xrow = xp + b * sb + t * st;
        const float* pe = table.data() + t * d;
        scalar_t* orow = op + r * d;
        for (int64_t j = 0; j < d; ++j) orow[j] = from_float<scalar_t>(to_float(xrow[j]) + pe[j]);
        if (dropout_p > 0.0)
          dropout_row(orow, d, key, static_cast<uint64_t>(r * d), threshold, inv_keep, factors.data());
      }
    });
  });
  return out;
}

at::Tensor add_positional_encoding_bwd(const at::Tensor& grad_out, double dropout_p,
                                       const c10::optional<at::Tensor>& seed) {
  check_cpu_float(grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() == 3, "grad_out must be (B, T, d), got shape ", grad_out.sizes());
  const uint64_t key = read_seed(seed, dropout_p, "add_positional_encoding_bwd");
  const at::Tensor g = grad_out.contiguous();
  at::Tensor grad_x = at::empty_like(g);
  const int64_t n = g.numel();
  if (n == 0) return grad_x;
  const uint32_t threshold = dropout_threshold(dropout_p);
  const float inv_keep = static_cast<float>(1.0 / (1.0 - dropout_p));
  MGF_DISPATCH_FLOATING(g.scalar_type(), "add_positional_encoding_bwd", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* op = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
      constexpr int64_t kChunk = 1024;
      float factors[kChunk];
      for (int64_t c0 = i0; c0 < i1; c0 += kChunk) {
        const int64_t len = std::min(kChunk, i1 - c0);
        if (dropout_p > 0.0) {
          philox_factors(factors, len, key, static_cast<uint64_t>(c0), threshold, inv_keep);
        } else {
          std::fill(factors, factors + len, 1.0f);
        }
        for (int64_t i = 0; i < len; ++i) op[c0 + i] = from_float<scalar_t>(to_float(gp[c0 + i]) * factors[i]);
      }
    });
  });
  return grad_x;
}

}  // namespace

// The op's schema, declared beside its CPU kernel (one slice per op); the CUDA kernels register for it
// elsewhere. The Python side (fake kernel, autograd) is the module named by set_python_module.
TORCH_LIBRARY_FRAGMENT(metagpt_fast, m) {
  m.set_python_module("metagpt_fast.backends.compiled.positional");

  // dropout(weight[tokens] * scale + PE[offset : offset + T]): tokens (B, T) integer, weight (V, d); out (B, T, d)
  // of weight's dtype. Dropout offsets: (b * T + t) * d + j.
  m.def(
      "embed_positions_fwd(Tensor tokens, Tensor weight, float scale, SymInt offset, float dropout_p, "
      "bool sinusoidal, Tensor? seed) -> Tensor");
  // Gradient of the weight (num_embeddings, d), summed in float32 in token order (deterministic).
  m.def(
      "embed_positions_bwd(Tensor grad_out, Tensor tokens, SymInt num_embeddings, float scale, float dropout_p, "
      "Tensor? seed) -> Tensor");

  // dropout(x + PE[offset : offset + T]) for x (B, T, d); out of x's dtype.
  m.def("add_positional_encoding_fwd(Tensor x, SymInt offset, float dropout_p, Tensor? seed) -> Tensor");
  // grad_out * keep / (1 - p): the gradient of x (the encoding is a constant).
  m.def("add_positional_encoding_bwd(Tensor grad_out, float dropout_p, Tensor? seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(metagpt_fast, CPU, m) {
  m.impl("embed_positions_fwd", &embed_positions_fwd);
  m.impl("embed_positions_bwd", &embed_positions_bwd);
  m.impl("add_positional_encoding_fwd", &add_positional_encoding_fwd);
  m.impl("add_positional_encoding_bwd", &add_positional_encoding_bwd);
}

}  // namespace metagpt_fast::cpu
