// CUDA kernels of metagpt_fast::attention_fwd / attention_bwd (schemas beside their CPU kernels) and of the CUDA-only
// attention_window_fwd / attention_window_bwd (schemas below: the same arguments plus flash-attn's local window and
// softcap): input checks, strides, and the launch on the current stream. The kernels themselves (attention_*.cu)
// include no torch header.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "attention_api.h"
#include "metagpt_fast/philox.h"

namespace {

using metagpt_fast::attention::AttentionParams;
using metagpt_fast::attention::TensorStrides;

constexpr int64_t kMaxGridYZ = 65535;  // heads and batch index the grid's y and z dimensions

// The kernels read rows with 16-byte vector loads: the last dim must be contiguous and every row start 16-byte
// aligned. Any other layout is copied to a contiguous tensor (an aligned fresh allocation).
at::Tensor rows_aligned(const at::Tensor& t) {
  bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3 && ok; ++d) ok = t.size(d) == 1 || (t.stride(d) * t.element_size()) % 16 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

TensorStrides strides_of(const at::Tensor& t) { return TensorStrides{t.stride(0), t.stride(1), t.stride(2)}; }

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
                            const c10::optional<at::Tensor>& seed) {
  TORCH_CHECK(q.is_cuda(), "attention (CUDA): q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "attention (CUDA): k and v must be on q's device ", q.device(), ", got ", k.device(), " and ",
              v.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "attention (CUDA): q must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "attention (CUDA): k and v must have q's dtype ", q.scalar_type(), ", got ", k.scalar_type(), " and ",
              v.scalar_type());
  TORCH_CHECK(q.dim() == 4, "attention (CUDA): q must be (B, Hq, Nq, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "attention (CUDA): k must be (B, Hk, Nk, D), got shape ", k.sizes());
  TORCH_CHECK(v.dim() == 4, "attention (CUDA): v must be (B, Hk, Nk, D), got shape ", v.sizes());
  const int64_t d = q.size(3);
  TORCH_CHECK(metagpt_fast::attention::head_dim_supported(static_cast<int>(d)),
              "attention (CUDA): q's head dim must be 64 or 128 (the compiled kernels), got ", d);
  TORCH_CHECK(k.size(3) == d, "attention (CUDA): k's head dim must equal q's (", d, "), got ", k.size(3));
  TORCH_CHECK(v.size(3) == d, "attention (CUDA): v's head dim must equal q's (", d, "), got ", v.size(3));
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "attention (CUDA): k and v must have q's batch (",
              q.size(0), "), got ", k.size(0), " and ", v.size(0));
  TORCH_CHECK(v.size(1) == k.size(1) && v.size(2) == k.size(2), "attention (CUDA): v must have k's heads and length ",
              k.sizes().slice(1, 2), ", got ", v.sizes().slice(1, 2));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "attention (CUDA): k's heads (", k.size(1),
              ") must divide q's heads (", q.size(1), ")");
  TORCH_CHECK(q.size(0) <= kMaxGridYZ && q.size(1) <= kMaxGridYZ, "attention (CUDA): batch and heads must be <= ",
              kMaxGridYZ, ", got ", q.size(0), " and ", q.size(1));
  TORCH_CHECK(q.size(2) < std::numeric_limits<int>::max() && k.size(2) < std::numeric_limits<int>::max(),
              "attention (CUDA): sequence lengths must fit in int32");
  if (attn_mask.has_value()) {
    const at::Tensor& mask = *attn_mask;
    TORCH_CHECK(mask.scalar_type() == at::kBool,
                "attention (CUDA): attn_mask must be boolean (additive float masks are not supported), got ",
                mask.scalar_type());
    TORCH_CHECK(mask.device() == q.device(), "attention (CUDA): attn_mask must be on q's device ", q.device(),
                ", got ", mask.device());
    TORCH_CHECK(mask.dim() <= 4, "attention (CUDA): attn_mask must have at most 4 dims, got shape ", mask.sizes());
    TORCH_CHECK(!is_causal, "attention (CUDA): attn_mask and is_causal cannot be combined");
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "attention (CUDA): dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value(), "attention (CUDA): seed is required when dropout_p > 0");
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1,
                "attention (CUDA): seed must be a 1-element int64 tensor, got ", seed->scalar_type(), " of shape ",
                seed->sizes());
    TORCH_CHECK(seed->device() == q.device(), "attention (CUDA): seed must be on q's device ", q.device(), ", got ",
                seed->device());
  }
}

void check_cuda(cudaError_t error, const char* op) {
  TORCH_CHECK(error == cudaSuccess, op, " (CUDA): ", cudaGetErrorString(error));
}

// flash-attn's local window (bottom-right aligned when bottom_right; -1: unbounded side) and score cap (0: off).
struct Window {
  int64_t left = -1, right = -1;
  bool bottom_right = false;
  double softcap = 0.0;
};

void check_window(const Window& w) {
  TORCH_CHECK(w.left >= -1 && w.left < std::numeric_limits<int>::max(),
              "attention_window (CUDA): window_left must be -1 (unbounded) or a key count >= 0, got ", w.left);
  TORCH_CHECK(w.right >= -1 && w.right < std::numeric_limits<int>::max(),
              "attention_window (CUDA): window_right must be -1 (unbounded) or a key count >= 0, got ", w.right);
  TORCH_CHECK(w.softcap >= 0.0 && w.softcap < std::numeric_limits<float>::infinity(),
              "attention_window (CUDA): softcap must be 0 (off) or a finite positive cap, got ", w.softcap);
}

// Needs p.n_q and p.n_k. A side at least n_q + n_k wide excludes nothing, so it becomes -1 (unbounded): the kernels'
// tile bounds add it to row indices in int, where a window near INT_MAX would overflow.
void set_window(AttentionParams& p, const Window& w) {
  const int64_t span = static_cast<int64_t>(p.n_q) + p.n_k;
  p.window_left = w.left >= span ? -1 : static_cast<int>(w.left);
  p.window_right = w.right >= span ? -1 : static_cast<int>(w.right);
  p.bottom_right = w.bottom_right;
  p.softcap = static_cast<float>(w.softcap);
}

// Everything but the tensor pointers of the two directions.
AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
                            double scale, const c10::optional<at::Tensor>& seed, at::Tensor& mask_view) {
  AttentionParams p;
  p.batch = static_cast<int>(q.size(0));
  p.heads_q = static_cast<int>(q.size(1));
  p.heads_k = static_cast<int>(k.size(1));
  p.n_q = static_cast<int>(q.size(2));
  p.n_k = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(q.size(3));
  p.scale = static_cast<float>(scale);
  p.causal = is_causal;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_strides = strides_of(q);
  p.k_strides = strides_of(k);
  p.v_strides = strides_of(v);
  if (attn_mask.has_value()) {
    // A broadcast view: stride 0 on broadcast dims, nothing materialised (expand checks broadcastability).
    mask_view = attn_mask->expand({q.size(0), q.size(1), q.size(2), k.size(2)});
    p.mask = mask_view.data_ptr<bool>();
    p.mask_stride_batch = mask_view.stride(0);
    p.mask_stride_head = mask_view.stride(1);
    p.mask_stride_q = mask_view.stride(2);
    p.mask_stride_k = mask_view.stride(3);
  }
  if (dropout_p > 0.0) {
    p.dropout = true;
    p.dropout_threshold = metagpt_fast::dropout_threshold(dropout_p);
    p.dropout_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
    p.seed = seed->data_ptr<int64_t>();
  }
  const int device = q.get_device();
  int major = 0, minor = 0, shared_per_sm = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "attention");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "attention");
  check_cuda(cudaDeviceGetAttribute(&shared_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device), "attention");
  TORCH_CHECK(major >= 8, "attention (CUDA): needs compute capability >= 8.0 (mma.sync fp16/bf16), got ", major, ".",
              minor);
  p.shared_memory_per_sm = shared_per_sm;
  return p;
}


std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                           const c10::optional<at::Tensor>& attn_mask, double dropout_p,
                                           bool is_causal, double scale, const c10::optional<at::Tensor>& seed,
                                           const Window& window) {
  check_attention_inputs(q_in, k_in, v_in, attn_mask, dropout_p, is_causal, seed);
  check_window(window);
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor out = at::empty(q_in.sizes(), q_in.options());
  at::Tensor lse = at::empty({q_in.size(0), q_in.size(1), q_in.size(2)}, q_in.options().dtype(at::kFloat));
  if (q_in.numel() == 0) return {out, lse};
  if (k_in.size(2) == 0) {  // no key at all: every row is empty
    out.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  const at::Tensor q = rows_aligned(q_in), k = rows_aligned(k_in), v = rows_aligned(v_in);
  at::Tensor mask_view;
  AttentionParams p = make_params(q, k, v, attn_mask, dropout_p, is_causal, scale, seed, mask_view);
  set_window(p, window);
  p.out = out.data_ptr();
  p.out_strides = strides_of(out);
  p.lse = lse.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_cuda(q.scalar_type() == at::kHalf ? metagpt_fast::attention::attention_forward_fp16(p, stream)
                                            : metagpt_fast::attention::attention_forward_bf16(p, stream),
               "attention_fwd");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const c10::optional<at::Tensor>& attn_mask, double dropout_p,
    bool is_causal, double scale, const c10::optional<at::Tensor>& seed, const Window& window) {
  check_attention_inputs(q_in, k_in, v_in, attn_mask, dropout_p, is_causal, seed);
  check_window(window);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && grad_out_in.scalar_type() == q_in.scalar_type() &&
                  grad_out_in.device() == q_in.device(),
              "attention_bwd (CUDA): grad_out must match q's shape ", q_in.sizes(), ", dtype and device, got ",
              grad_out_in.sizes(), " ", grad_out_in.scalar_type(), " on ", grad_out_in.device());
  TORCH_CHECK(out_in.sizes() == q_in.sizes() && out_in.scalar_type() == q_in.scalar_type() &&
                  out_in.device() == q_in.device(),
              "attention_bwd (CUDA): out must match q's shape ", q_in.sizes(), ", dtype and device, got ",
              out_in.sizes(), " ", out_in.scalar_type(), " on ", out_in.device());
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == q_in.size(0) && lse_in.size(1) == q_in.size(1) &&
                  lse_in.size(2) == q_in.size(2) && lse_in.scalar_type() == at::kFloat &&
                  lse_in.device() == q_in.device(),
              "attention_bwd (CUDA): lse must be float32 (B, Hq, Nq) = ", q_in.sizes().slice(0, 3), " on ",
              q_in.device(), ", got ", lse_in.scalar_type(), " ", lse_in.sizes(), " on ", lse_in.device());
  const c10::cuda::CUDAGuard guard(q_in.device());
  if (q_in.numel() == 0 || k_in.numel() == 0) {  // an empty side: every gradient is 0 (or empty)
    return {at::zeros(q_in.sizes(), q_in.options()), at::zeros(k_in.sizes(), k_in.options()),
            at::zeros(v_in.sizes(), v_in.options())};
  }
  const at::Tensor q = rows_aligned(q_in), k = rows_aligned(k_in), v = rows_aligned(v_in);
  const at::Tensor grad_out = rows_aligned(grad_out_in), out = rows_aligned(out_in);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k = at::empty(k.sizes(), k.options());
  at::Tensor grad_v = at::empty(v.sizes(), v.options());
  at::Tensor delta = at::empty(lse.sizes(), lse.options());
  at::Tensor mask_view;
  AttentionParams p = make_params(q, k, v, attn_mask, dropout_p, is_causal, scale, seed, mask_view);
  set_window(p, window);
  p.out = const_cast<void*>(out.data_ptr());
  p.out_strides = strides_of(out);
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.grad_out = grad_out.data_ptr();
  p.grad_out_strides = strides_of(grad_out);
  p.grad_q = grad_q.data_ptr();
  p.grad_k = grad_k.data_ptr();
  p.grad_v = grad_v.data_ptr();
  p.grad_q_strides = strides_of(grad_q);
  p.grad_k_strides = strides_of(grad_k);
  p.grad_v_strides = strides_of(grad_v);
  p.delta = delta.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_cuda(q.scalar_type() == at::kHalf ? metagpt_fast::attention::attention_backward_fp16(p, stream)
                                            : metagpt_fast::attention::attention_backward_bf16(p, stream),
               "attention_bwd");
  return {grad_q, grad_k, grad_v};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const c10::optional<at::Tensor>& attn_mask, double dropout_p,
                                                      bool is_causal, double scale,
                                                      const c10::optional<at::Tensor>& seed) {
  return forward(q, k, v, attn_mask, dropout_p, is_causal, scale, seed, Window{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal, double scale,
    const c10::optional<at::Tensor>& seed) {
  return backward(grad_out, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, seed, Window{});
}

std::tuple<at::Tensor, at::Tensor> attention_window_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v,
                                                             const c10::optional<at::Tensor>& attn_mask,
                                                             double dropout_p, int64_t window_left,
                                                             int64_t window_right, bool bottom_right, double softcap,
                                                             double scale, const c10::optional<at::Tensor>& seed) {
  return forward(q, k, v, attn_mask, dropout_p, false, scale, seed,
                 Window{window_left, window_right, bottom_right, softcap});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_window_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& attn_mask, double dropout_p, int64_t window_left,
    int64_t window_right, bool bottom_right, double softcap, double scale, const c10::optional<at::Tensor>& seed) {
  return backward(grad_out, q, k, v, out, lse, attn_mask, dropout_p, false, scale, seed,
                  Window{window_left, window_right, bottom_right, softcap});
}

}  // namespace

// attention_fwd / attention_bwd with flash-attn's local window and softcap, on (B, H, N, D) tensors: key j is visible
// to query i when j - (i + off) lies in [-window_left, window_right] (-1: unbounded side), off = Nk - Nq when
// bottom_right else 0 (causal is window_right = 0), and the attn_mask, if given, is true at (i, j); scores are
// softcap * tanh(scale * q.k / softcap) when softcap > 0. lse is +inf (and the output 0) for a row with no visible
// key. CUDA only: declared here, with the kernels that implement it.
TORCH_LIBRARY_FRAGMENT(metagpt_fast, m) {
  m.def(
      "attention_window_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float dropout_p, int window_left, "
      "int window_right, bool bottom_right, float softcap, float scale, Tensor? seed) -> (Tensor, Tensor)");
  m.def(
      "attention_window_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_mask, "
      "float dropout_p, int window_left, int window_right, bool bottom_right, float softcap, float scale, "
      "Tensor? seed) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metagpt_fast, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
  m.impl("attention_window_fwd", &attention_window_fwd_cuda);
  m.impl("attention_window_bwd", &attention_window_bwd_cuda);
}
