// Forward attention kernels for bf16 (both head dims; one file per direction and dtype so they compile in parallel).
#include "attention_api.h"
#include "attention_cuda_launch.cuh"

namespace metagpt_fast {
namespace attention {

cudaError_t attention_forward_bf16(const AttentionParams& p, cudaStream_t stream) {
  return static_cast<cudaError_t>(forward_any_head_dim<__nv_bfloat16>(p, CudaLaunch{stream}));
}

}  // namespace attention
}  // namespace metagpt_fast
