// CPU kernel of the rotary embedding (both layouts, forward = rotation by +angle, backward = by -angle), out of place
// or in place. OpenMP (torch's pool) across (batch, head, position) rows.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common.h"
#include "metagpt_fast/rotary.h"
#include "metagpt_fast/sinusoid.h"

namespace metagpt_fast::cpu {
namespace {

// cos / sin tables (P, T, rotary_dim / 2) for P position rows (1, or B with per-batch position_ids).
struct Angles {
  std::vector<float> cos, sin;
  int64_t rows = 1;
};

Angles rotary_angles(const c10::optional<at::Tensor>& position_ids, int64_t batch, int64_t seq_len, int64_t offset,
                     int64_t rotary_dim, double base, bool conjugate) {
  Angles angles;
  at::Tensor pos;
  if (position_ids.has_value()) {
    const at::Tensor& p = *position_ids;
    TORCH_CHECK(p.device().is_cpu(), "position_ids must be a CPU tensor, got ", p.device());
    TORCH_CHECK(!at::isFloatingType(p.scalar_type()) && p.scalar_type() != at::kBool,
                "position_ids must be an integer tensor, got ", p.scalar_type());
    TORCH_CHECK((p.dim() == 1 || (p.dim() == 2 && (p.size(0) == 1 || p.size(0) == batch))) && p.size(-1) == seq_len,
                "position_ids must have shape (", seq_len, ",) or (1 | ", batch, ", ", seq_len, "), got ", p.sizes());
    pos = p.reshape({-1, seq_len}).to(at::kLong).contiguous();
    angles.rows = pos.size(0);
  }
  const int64_t half = rotary_dim / 2, n = angles.rows * seq_len;
  angles.cos.resize(static_cast<size_t>(n * half));
  angles.sin.resize(static_cast<size_t>(n * half));
  std::vector<double> freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) freq[i] = inv_freq(static_cast<int>(2 * i), static_cast<int>(rotary_dim), base);
  const int64_t* pp = pos.defined() ? pos.data_ptr<int64_t>() : nullptr;
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const double position = static_cast<double>(pp ? pp[r] : offset + r);
      for (int64_t i = 0; i < half; ++i) {
        float s, c;
        position_sincos(position, freq[i], &s, &c);
        angles.cos[r * half + i] = c;
        angles.sin[r * half + i] = conjugate ? -s : s;
      }
    }
  });
  return angles;
}

// Rotates x (B, H, T, D), last stride 1, into out (same shape, own strides; may alias x).
void rotate(const at::Tensor& x, at::Tensor& out, const Angles& angles, int64_t rotary_dim, bool interleaved) {
  const int64_t batch = x.size(0), heads = x.size(1), seq_len = x.size(2), d = x.size(3), half = rotary_dim / 2;
  if (x.numel() == 0) return;
  const bool aliased = x.data_ptr() == out.data_ptr();
  MGF_DISPATCH_FLOATING(x.scalar_type(), "rotary", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * heads * seq_len, 8, [&](int64_t r0, int64_t r1) {
      std::vector<float> y(static_cast<size_t>(rotary_dim));
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r % seq_len, h = (r / seq_len) % heads, b = r / (seq_len * heads);
        const scalar_t* xrow = xp + b * x.stride(0) + h * x.stride(1) + t * x.stride(2);
        scalar_t* orow = op + b * out.stride(0) + h * out.stride(1) + t * out.stride(2);
        const int64_t arow = (angles.rows == 1 ? 0 : b) * seq_len + t;
        const float* c = angles.cos.data() + arow * half;
        const float* s = angles.sin.data() + arow * half;
        for (int64_t i = 0; i < half; ++i) {
          const int a = rotary_first(static_cast<int>(i), static_cast<int>(rotary_dim), interleaved);
          const int e = rotary_second(static_cast<int>(i), static_cast<int>(rotary_dim), interleaved);
          rotate_pair(to_float(xrow[a]), to_float(xrow[e]), c[i], s[i], &y[a], &y[e]);
        }
        for (int64_t j = 0; j < rotary_dim; ++j) orow[j] = from_float<scalar_t>(y[j]);
        if (!aliased)
          for (int64_t j = rotary_dim; j < d; ++j) orow[j] = xrow[j];
      }
    });
  });
}

void check_rotary(const at::Tensor& q, const at::Tensor& k, int64_t rotary_dim, int64_t offset) {
  check_cpu_float(q, "q");
  check_cpu_float(k, "k");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "q and k must be (B, H, T, D), got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "q and k must share a dtype, got ", q.scalar_type(), " and ",
              k.scalar_type());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3),
              "k must match q's batch, length and head dim, got q ", q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(rotary_dim >= 2 && rotary_dim % 2 == 0 && rotary_dim <= q.size(3),
              "rotary_dim must be even, >= 2 and <= head dim ", q.size(3), ", got ", rotary_dim);
  TORCH_CHECK(offset >= 0, "offset must be >= 0, got ", offset);
}

std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k,
                                          const c10::optional<at::Tensor>& position_ids, int64_t offset,
                                          int64_t rotary_dim, double base, bool interleaved, bool conjugate) {
  check_rotary(q, k, rotary_dim, offset);
  const Angles angles = rotary_angles(position_ids, q.size(0), q.size(2), offset, rotary_dim, base, conjugate);
  const at::Tensor qs = unit_last_stride(q), ks = unit_last_stride(k);
  at::Tensor q_out = at::empty(q.sizes(), q.options()), k_out = at::empty(k.sizes(), k.options());
  rotate(qs, q_out, angles, rotary_dim, interleaved);
  rotate(ks, k_out, angles, rotary_dim, interleaved);
  return {q_out, k_out};
}

void rotary_(at::Tensor& q, at::Tensor& k, const c10::optional<at::Tensor>& position_ids, int64_t offset,
             int64_t rotary_dim, double base, bool interleaved) {
  check_rotary(q, k, rotary_dim, offset);
  const Angles angles = rotary_angles(position_ids, q.size(0), q.size(2), offset, rotary_dim, base, false);
  for (at::Tensor* x : {&q, &k}) {
    if (x->size(-1) <= 1 || x->stride(-1) == 1) {
      rotate(*x, *x, angles, rotary_dim, interleaved);
    } else {  // rotate a unit-stride copy, then write it back through x's strides
      at::Tensor tmp = x->contiguous();
      rotate(tmp, tmp, angles, rotary_dim, interleaved);
      x->copy_(tmp);
    }
  }
}

}  // namespace

// The op's schema, declared beside its CPU kernel (one slice per op); the CUDA kernels register for it
// elsewhere. The Python side (fake kernel, autograd) is the module named by set_python_module.
TORCH_LIBRARY_FRAGMENT(metagpt_fast, m) {
  m.set_python_module("metagpt_fast.backends.compiled.rotary");

  // Rotary embedding of q (B, Hq, T, D) and k (B, Hk, T, D) over the first rotary_dim features; positions are
  // position_ids ((T,) or (1 | B, T)) or offset + t. conjugate=True rotates by -angle (the backward pass).
  m.def(
      "rotary(Tensor q, Tensor k, Tensor? position_ids, SymInt offset, int rotary_dim, float base, bool interleaved, "
      "bool conjugate) -> (Tensor q_out, Tensor k_out)");
  // In-place variant for inference (no autograd).
  m.def(
      "rotary_(Tensor(a!) q, Tensor(b!) k, Tensor? position_ids, SymInt offset, int rotary_dim, float base, "
      "bool interleaved) -> ()");
}

TORCH_LIBRARY_IMPL(metagpt_fast, CPU, m) {
  m.impl("rotary", &rotary);
  m.impl("rotary_", &rotary_);
}

}  // namespace metagpt_fast::cpu
