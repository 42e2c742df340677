// Host entry points of the CUDA attention kernels (declared for the torch binding; defined in the .cu files).
// Each launches on ``stream`` and returns cudaSuccess or the first launch error. p.head_dim must be 64 or 128.
#pragma once

#include <cuda_runtime_api.h>

#include "attention_params.h"

namespace metagpt_fast {
namespace attention {

// Fills p.out and p.lse.
cudaError_t attention_forward_fp16(const AttentionParams& p, cudaStream_t stream);
cudaError_t attention_forward_bf16(const AttentionParams& p, cudaStream_t stream);

// Fills p.grad_q, p.grad_k, p.grad_v (and the p.delta scratch) from p.grad_out, p.out and p.lse.
cudaError_t attention_backward_fp16(const AttentionParams& p, cudaStream_t stream);
cudaError_t attention_backward_bf16(const AttentionParams& p, cudaStream_t stream);

}  // namespace attention
}  // namespace metagpt_fast
