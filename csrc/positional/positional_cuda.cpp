// CUDA bindings of the positional ops: argument checks (TORCH_CHECK naming the argument), dtype mapping, the current
// stream, and the launch error. c10's stream header, not ATen/cuda/CUDAContext.h: that one needs the cuSPARSE
// headers, which a minimal CUDA toolkit lacks. The kernels (positional_kernels.cu, rotary_kernels.cu) see no torch type.
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "launch.h"
#include "metagpt_fast/philox.h"

namespace metagpt_fast::cuda {
namespace {

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

Dropout make_dropout(const c10::optional<at::Tensor>& seed, double dropout_p, const at::Tensor& like,
                     const char* op) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  Dropout dropout;
  if (dropout_p == 0.0) return dropout;
  TORCH_CHECK(seed.has_value(), op, ": seed is required when dropout_p > 0");
  TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong, op,
              ": seed must be a 1-element int64 tensor, got ", seed->sizes(), " ", seed->scalar_type());
  TORCH_CHECK(seed->device() == like.device(), op, ": seed must be on ", like.device(), ", got ", seed->device());
  dropout.seed = seed->data_ptr<int64_t>();
  dropout.threshold = dropout_threshold(dropout_p);
  dropout.inv_keep = static_cast<float>(1.0 / (1.0 - dropout_p));
  return dropout;
}

at::Tensor tokens_int64(const at::Tensor& tokens, const at::Tensor& like) {
  TORCH_CHECK(tokens.dim() == 2 && !at::isFloatingType(tokens.scalar_type()) && tokens.scalar_type() != at::kBool,
              "tokens must be a (B, T) integer tensor, got ", tokens.sizes(), " ", tokens.scalar_type());
  TORCH_CHECK(tokens.device() == like.device(), "tokens must be on ", like.device(), ", got ", tokens.device());
  return tokens.to(at::kLong).contiguous();
}

at::Tensor embed_positions_fwd_cuda(const at::Tensor& tokens, const at::Tensor& weight, double scale, int64_t offset,
                               double dropout_p, bool sinusoidal, const c10::optional<at::Tensor>& seed) {
  check_cuda(weight, "weight");
  TORCH_CHECK(weight.dim() == 2, "weight must be (num_embeddings, d), got shape ", weight.sizes());
  TORCH_CHECK(offset >= 0, "offset must be >= 0, got ", offset);
  const DType dtype = dtype_of(weight, "weight");
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor ids = tokens_int64(tokens, weight), w = weight.contiguous();
  at::Tensor out = at::empty({tokens.size(0), tokens.size(1), w.size(1)}, w.options());
  EmbedFwdParams p{ids.data_ptr<int64_t>(), w.data_ptr(), out.data_ptr(), ids.numel(), tokens.size(1), w.size(1),
                   offset, static_cast<float>(scale), sinusoidal,
                   make_dropout(seed, dropout_p, weight, "embed_positions_fwd")};
  check_launch(embed_positions_fwd(p, dtype, c10::cuda::getCurrentCUDAStream()), "embed_positions_fwd");
  return out;
}

at::Tensor embed_positions_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& tokens, int64_t num_embeddings,
                               double scale, double dropout_p, const c10::optional<at::Tensor>& seed) {
  check_cuda(grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() == 3 && tokens.dim() == 2 && grad_out.size(0) == tokens.size(0) &&
                  grad_out.size(1) == tokens.size(1),
              "grad_out must be (B, T, d) for tokens (B, T), got ", grad_out.sizes(), " and ", tokens.sizes());
  TORCH_CHECK(num_embeddings >= 0, "num_embeddings must be >= 0, got ", num_embeddings);
  const DType dtype = dtype_of(grad_out, "grad_out");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor ids = tokens_int64(tokens, grad_out).reshape({-1}), g = grad_out.contiguous();
  // A stable sort groups equal tokens and keeps their rows in order: one block sums each group, deterministically.
  const auto [sorted, order] = at::sort(ids, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor grad_weight = at::zeros({num_embeddings, g.size(2)}, g.options());
  EmbedBwdParams p{sorted.data_ptr<int64_t>(), order.data_ptr<int64_t>(), g.data_ptr(), grad_weight.data_ptr(),
                   ids.numel(), g.size(2), static_cast<float>(scale),
                   make_dropout(seed, dropout_p, grad_out, "embed_positions_bwd")};
  check_launch(embed_positions_bwd(p, dtype, c10::cuda::getCurrentCUDAStream()), "embed_positions_bwd");
  return grad_weight;
}

at::Tensor add_positional_encoding_fwd_cuda(const at::Tensor& x, int64_t offset, double dropout_p,
                                       const c10::optional<at::Tensor>& seed) {
  check_cuda(x, "x");
  TORCH_CHECK(x.dim() == 3, "x must be (B, T, d), got shape ", x.sizes());
  TORCH_CHECK(offset >= 0, "offset must be >= 0, got ", offset);
  const DType dtype = dtype_of(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xs = x.size(2) <= 1 || x.stride(2) == 1 ? x : x.contiguous();
  at::Tensor out = at::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  AddPeFwdParams p{xs.data_ptr(), out.data_ptr(), x.size(0), x.size(1), x.size(2), xs.stride(0), xs.stride(1),
                   offset, make_dropout(seed, dropout_p, x, "add_positional_encoding_fwd")};
  check_launch(add_positional_encoding_fwd(p, dtype, c10::cuda::getCurrentCUDAStream()),
               "add_positional_encoding_fwd");
  return out;
}

at::Tensor add_positional_encoding_bwd_cuda(const at::Tensor& grad_out, double dropout_p,
                                       const c10::optional<at::Tensor>& seed) {
  check_cuda(grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() == 3, "grad_out must be (B, T, d), got shape ", grad_out.sizes());
  const DType dtype = dtype_of(grad_out, "grad_out");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor g = grad_out.contiguous();
  at::Tensor grad_x = at::empty(g.sizes(), g.options());
  Dropout dropout = make_dropout(seed, dropout_p, grad_out, "add_positional_encoding_bwd");
  if (dropout_p == 0.0) return grad_x.copy_(g);
  check_launch(dropout_bwd(g.data_ptr(), grad_x.data_ptr(), g.numel(), dropout, dtype,
                           c10::cuda::getCurrentCUDAStream()),
               "add_positional_encoding_bwd");
  return grad_x;
}

struct Positions {
  at::Tensor ids;  // (P, T) int64 contiguous, or undefined
  int64_t rows = 1;
};

Positions positions(const c10::optional<at::Tensor>& position_ids, const at::Tensor& q) {
  Positions pos;
  if (!position_ids.has_value()) return pos;
  const at::Tensor& p = *position_ids;
  const int64_t batch = q.size(0), seq_len = q.size(2);
  TORCH_CHECK(p.device() == q.device(), "position_ids must be on ", q.device(), ", got ", p.device());
  TORCH_CHECK(!at::isFloatingType(p.scalar_type()) && p.scalar_type() != at::kBool,
              "position_ids must be an integer tensor, got ", p.scalar_type());
  TORCH_CHECK((p.dim() == 1 || (p.dim() == 2 && (p.size(0) == 1 || p.size(0) == batch))) && p.size(-1) == seq_len,
              "position_ids must have shape (", seq_len, ",) or (1 | ", batch, ", ", seq_len, "), got ", p.sizes());
  pos.ids = p.reshape({-1, seq_len}).to(at::kLong).contiguous();
  pos.rows = pos.ids.size(0);
  return pos;
}

void check_rotary(const at::Tensor& q, const at::Tensor& k, int64_t rotary_dim, int64_t offset) {
  check_cuda(q, "q");
  check_cuda(k, "k");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "q and k must be (B, H, T, D), got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "q and k must share a dtype, got ", q.scalar_type(), " and ",
              k.scalar_type());
  TORCH_CHECK(q.device() == k.device(), "k must be on q's device ", q.device(), ", got ", k.device());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3),
              "k must match q's batch, length and head dim, got q ", q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(rotary_dim >= 2 && rotary_dim % 2 == 0 && rotary_dim <= q.size(3),
              "rotary_dim must be even, >= 2 and <= head dim ", q.size(3), ", got ", rotary_dim);
  TORCH_CHECK(offset >= 0, "offset must be >= 0, got ", offset);
}

void launch_rotary(const at::Tensor& x, at::Tensor& out, const Positions& pos, int64_t offset, int64_t rotary_dim,
                   double base, bool interleaved, bool conjugate, const char* name) {
  RotaryParams p{x.data_ptr(),
                 out.data_ptr(),
                 x.size(0),
                 x.size(1),
                 x.size(2),
                 x.size(3),
                 {x.stride(0), x.stride(1), x.stride(2)},
                 {out.stride(0), out.stride(1), out.stride(2)},
                 pos.ids.defined() ? pos.ids.data_ptr<int64_t>() : nullptr,
                 pos.rows,
                 offset,
                 static_cast<int>(rotary_dim),
                 base,
                 interleaved,
                 conjugate};
  check_launch(rotary(p, dtype_of(x, name), c10::cuda::getCurrentCUDAStream()), "rotary");
}

std::tuple<at::Tensor, at::Tensor> rotary_cuda(const at::Tensor& q, const at::Tensor& k,
                                              const c10::optional<at::Tensor>& position_ids, int64_t offset,
                                              int64_t rotary_dim, double base, bool interleaved, bool conjugate) {
  check_rotary(q, k, rotary_dim, offset);
  const c10::cuda::CUDAGuard guard(q.device());
  const Positions pos = positions(position_ids, q);
  const at::Tensor qs = q.size(3) <= 1 || q.stride(3) == 1 ? q : q.contiguous();
  const at::Tensor ks = k.size(3) <= 1 || k.stride(3) == 1 ? k : k.contiguous();
  at::Tensor q_out = at::empty(q.sizes(), q.options()), k_out = at::empty(k.sizes(), k.options());
  launch_rotary(qs, q_out, pos, offset, rotary_dim, base, interleaved, conjugate, "q");
  launch_rotary(ks, k_out, pos, offset, rotary_dim, base, interleaved, conjugate, "k");
  return {q_out, k_out};
}

void rotary_inplace_cuda(at::Tensor& q, at::Tensor& k, const c10::optional<at::Tensor>& position_ids, int64_t offset,
                    int64_t rotary_dim, double base, bool interleaved) {
  check_rotary(q, k, rotary_dim, offset);
  const c10::cuda::CUDAGuard guard(q.device());
  const Positions pos = positions(position_ids, q);
  for (auto [x, name] : {std::pair<at::Tensor*, const char*>{&q, "q"}, {&k, "k"}}) {
    if (x->size(3) <= 1 || x->stride(3) == 1) {
      launch_rotary(*x, *x, pos, offset, rotary_dim, base, interleaved, false, name);
    } else {  // rotate a unit-stride copy, then write it back through x's strides
      at::Tensor tmp = x->contiguous();
      launch_rotary(tmp, tmp, pos, offset, rotary_dim, base, interleaved, false, name);
      x->copy_(tmp);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(metagpt_fast, CUDA, m) {
  m.impl("embed_positions_fwd", &embed_positions_fwd_cuda);
  m.impl("embed_positions_bwd", &embed_positions_bwd_cuda);
  m.impl("add_positional_encoding_fwd", &add_positional_encoding_fwd_cuda);
  m.impl("add_positional_encoding_bwd", &add_positional_encoding_bwd_cuda);
  m.impl("rotary", &rotary_cuda);
  m.impl("rotary_", &rotary_inplace_cuda);
}

}  // namespace metagpt_fast::cuda
