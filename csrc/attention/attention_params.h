// Arguments of the fused attention kernels: raw pointers, sizes and element strides (no torch types, so the .cu
// files compile without torch headers).
//
//   q (B, Hq, Nq, D), k / v (B, Hk, Nk, D), out / grad_out / grad_q like q, grad_k / grad_v like k,
//   lse / delta float32 (B, Hq, Nq) contiguous, mask bool read as mask[b*sb + h*sh + i*sq + j*sk] (strides may be 0).
// The last dimension of every tensor has stride 1; the other strides are in elements.
#pragma once

#include <stdint.h>

namespace metagpt_fast {
namespace attention {

struct TensorStrides {
  int64_t batch = 0;
  int64_t head = 0;
  int64_t row = 0;
};

struct AttentionParams {
  // Forward inputs and outputs. Element type (fp16 / bf16) is chosen by the launcher's template argument.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // natural-log log-sum-exp of scale * q.k per query row; +inf for a row with no visible key
  TensorStrides q_strides, k_strides, v_strides, out_strides;

  // Optional boolean mask (true = attend), broadcast through strides.
  const bool* mask = nullptr;
  int64_t mask_stride_batch = 0, mask_stride_head = 0, mask_stride_q = 0, mask_stride_k = 0;

  // Backward only.
  const void* grad_out = nullptr;
  void* grad_q = nullptr;
  void* grad_k = nullptr;
  void* grad_v = nullptr;
  float* delta = nullptr;  // rowsum(grad_out * out), float32 (B, Hq, Nq) scratch
  TensorStrides grad_out_strides, grad_q_strides, grad_k_strides, grad_v_strides;

  int batch = 0;
  int heads_q = 0;
  int heads_k = 0;  // heads_q % heads_k == 0; query head h reads kv head h / (heads_q / heads_k)
  int n_q = 0;
  int n_k = 0;
  int head_dim = 0;
  float scale = 1.0f;
  bool causal = false;  // query i sees keys j <= i (top-left alignment); the same as window_right = 0

  // Local windows (flash-attn's): key j is visible to query i when j - (i + off) lies in [-window_left, window_right],
  // off = bottom_right ? n_k - n_q : 0; -1 leaves that side unbounded. ``causal`` forces window_right = 0.
  int window_left = -1;
  int window_right = -1;
  bool bottom_right = false;
  // Score cap: s = softcap * tanh(scale * q.k / softcap) before the softmax (0: off). The backward multiplies dS by
  // 1 - tanh^2.
  float softcap = 0.0f;

  // Dropout on the attention probabilities: an element is kept iff dropout_keep(seed, offset, threshold) with
  // offset = ((b * Hq + h) * Nq + i) * Nk + j; kept values are multiplied by dropout_scale = 1 / (1 - p).
  bool dropout = false;
  uint32_t dropout_threshold = 0;
  float dropout_scale = 1.0f;
  const int64_t* seed = nullptr;  // device pointer to one int64 (read in the kernel: no host synchronisation)

  // Shared memory per multiprocessor of the device, bytes: the launchers choose tile sizes from it.
  int shared_memory_per_sm = 0;
};

// Head dims with compiled kernels (the Python side routes the others to another backend).
inline bool head_dim_supported(int d) { return d == 64 || d == 128; }

}  // namespace attention
}  // namespace metagpt_fast
