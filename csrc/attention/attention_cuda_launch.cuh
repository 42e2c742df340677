// The CUDA launcher handed to the launch templates of attention_launch.cuh.
#pragma once

#include <cuda_runtime.h>

#include "attention_launch.cuh"

namespace metagpt_fast {
namespace attention {

struct CudaLaunch {
  cudaStream_t stream;

  template <typename Kernel>
  int operator()(Kernel kernel, const LaunchShape& shape, const AttentionParams& p) const {
    // Above 48 KB, dynamic shared memory must be opted into per kernel.
    if (shape.shared_bytes > 48 * 1024) {
      const cudaError_t error =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shape.shared_bytes);
      if (error != cudaSuccess) return static_cast<int>(error);
    }
    kernel<<<dim3(shape.grid_x, shape.grid_y, shape.grid_z), shape.threads, shape.shared_bytes, stream>>>(p);
    return static_cast<int>(cudaGetLastError());
  }
};

}  // namespace attention
}  // namespace metagpt_fast
