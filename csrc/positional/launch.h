// Launchers of the CUDA positional kernels (positional_kernels.cu, rotary_kernels.cu). Torch-free: raw pointers,
// sizes, element strides and the stream, so the .cu files compile in seconds. positional_cuda.cpp checks the
// tensors and calls these; each returns the launch error (cudaGetLastError) for the binding to check.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace metagpt_fast::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// Dropout of one call: keep iff (philox(seed, offset) >> 8) >= threshold; kept values scaled by inv_keep.
struct Dropout {
  const int64_t* seed = nullptr;  // device pointer to the 1-element int64 seed; null when p == 0
  uint32_t threshold = 0;
  float inv_keep = 1.0f;
};

// out (rows = B*T, d) contiguous = dropout(weight[tokens[r]] * scale + PE[offset + r % seq_len]).
struct EmbedFwdParams {
  const int64_t* tokens;  // (rows,) contiguous
  const void* weight;     // (vocab, d) contiguous
  void* out;
  int64_t rows, seq_len, d, offset;
  float scale;
  bool sinusoidal;
  Dropout dropout;
};
cudaError_t embed_positions_fwd(const EmbedFwdParams& p, DType dtype, cudaStream_t stream);

// grad_weight (vocab, d), zero-filled by the caller, += scale * dropout'(grad_out) rows grouped by token. Rows of one
// token are summed in float32 by one thread per column in their original order (stable sort): deterministic.
struct EmbedBwdParams {
  const int64_t* sorted_tokens;  // (rows,) token ids sorted stably
  const int64_t* order;          // (rows,) original row of each sorted entry
  const void* grad_out;          // (rows, d) contiguous
  void* grad_weight;             // (vocab, d) contiguous, zero-filled
  int64_t rows, d;
  float scale;
  Dropout dropout;
};
cudaError_t embed_positions_bwd(const EmbedBwdParams& p, DType dtype, cudaStream_t stream);

// out (B, T, d) contiguous = dropout(x + PE[offset + t]); x with element strides (stride_b, stride_t, 1).
struct AddPeFwdParams {
  const void* x;
  void* out;
  int64_t batch, seq_len, d, stride_b, stride_t, offset;
  Dropout dropout;
};
cudaError_t add_positional_encoding_fwd(const AddPeFwdParams& p, DType dtype, cudaStream_t stream);

// grad_x = dropout'(grad_out) over n contiguous elements (offset = linear index).
cudaError_t dropout_bwd(const void* grad_out, void* grad_x, int64_t n, Dropout dropout, DType dtype,
                        cudaStream_t stream);

// Rotary on one (B, H, T, D) tensor with element strides (last = 1) into out (may alias x).
struct RotaryParams {
  const void* x;
  void* out;
  int64_t batch, heads, seq_len, d;
  int64_t x_stride[3];    // (b, h, t)
  int64_t out_stride[3];  // (b, h, t)
  const int64_t* position_ids;  // (P, T) contiguous with P in {1, B}, or null: positions offset + t
  int64_t position_rows, offset;
  int rotary_dim;
  double base;
  bool interleaved, conjugate;  // conjugate: rotate by -angle (backward)
};
cudaError_t rotary(const RotaryParams& p, DType dtype, cudaStream_t stream);

}  // namespace metagpt_fast::cuda
