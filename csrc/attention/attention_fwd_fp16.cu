// Forward attention kernels for fp16 (both head dims; one file per direction and dtype so they compile in parallel).
#include "attention_api.h"
#include "attention_cuda_launch.cuh"

namespace metagpt_fast {
namespace attention {

cudaError_t attention_forward_fp16(const AttentionParams& p, cudaStream_t stream) {
  return static_cast<cudaError_t>(forward_any_head_dim<__half>(p, CudaLaunch{stream}));
}

}  // namespace attention
}  // namespace metagpt_fast
