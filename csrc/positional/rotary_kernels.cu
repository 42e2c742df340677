// CUDA kernel of the rotary embedding, both layouts, forward (+angle) and backward (-angle), out of place or in
// place. Each thread rotates VEC pairs with 128-bit loads/stores when the rotary dim and strides allow: VEC
// consecutive first elements and their VEC partners half a rotary dim away (half-split), or VEC / 2 adjacent pairs
// (interleaved). The angle math is metagpt_fast/sinusoid.h and the rotation metagpt_fast/rotary.h, as on the CPU.
#include "cuda_utils.cuh"
#include "metagpt_fast/rotary.h"
#include "metagpt_fast/sinusoid.h"

namespace metagpt_fast::cuda {
namespace {

constexpr int64_t kMaxTablePairs = 48 * 1024 / sizeof(double);

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) rotary_kernel(RotaryParams p) {
  extern __shared__ double freq[];
  const int half = p.rotary_dim / 2;
  const bool table = half <= kMaxTablePairs;
  if (table)
    for (int i = threadIdx.x; i < half; i += blockDim.x) freq[i] = inv_freq(2 * i, p.rotary_dim, p.base);
  __syncthreads();
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const bool copy_rest = p.x != p.out;
  // Per row: rotation chunks (VEC pairs each: half / VEC for half-split, rotary_dim / VEC for interleaved), then
  // pass-through chunks of VEC features.
  const int64_t rot_chunks = p.interleaved ? p.rotary_dim / VEC : half / VEC;
  const int64_t pass_chunks = copy_rest ? (p.d - p.rotary_dim) / VEC : 0;
  const int64_t per_row = rot_chunks + pass_chunks, total = p.batch * p.heads * p.seq_len * per_row;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / per_row, c = idx - row * per_row;
    const int64_t t = row % p.seq_len, bh = row / p.seq_len, h = bh % p.heads, b = bh / p.heads;
    const T* xr = x + b * p.x_stride[0] + h * p.x_stride[1] + t * p.x_stride[2];
    T* outr = out + b * p.out_stride[0] + h * p.out_stride[1] + t * p.out_stride[2];
    if (c >= rot_chunks) {  // features past rotary_dim pass through
      const int64_t j = p.rotary_dim + (c - rot_chunks) * VEC;
      *reinterpret_cast<Vec<T, VEC>*>(outr + j) = *reinterpret_cast<const Vec<T, VEC>*>(xr + j);
      continue;
    }
    const int64_t prow = p.position_rows == 1 ? 0 : b;
    const double pos = static_cast<double>(p.position_ids != nullptr ? p.position_ids[prow * p.seq_len + t]
                                                                     : p.offset + t);
    const float sign = p.conjugate ? -1.0f : 1.0f;
    if (p.interleaved) {  // VEC elements = pairs (2i, 2i + 1); VEC == 1 rotates one pair element-wise
      const int64_t j0 = c * VEC;
      if (VEC == 1) {
        const int64_t i = j0 / 2;
        if (j0 & 1) continue;  // the even element's thread rotates the pair
        float s, co;
        position_sincos(pos, table ? freq[i] : inv_freq(static_cast<int>(2 * i), p.rotary_dim, p.base), &s, &co);
        float y1, y2;
        rotate_pair(to_float(xr[j0]), to_float(xr[j0 + 1]), co, sign * s, &y1, &y2);
        outr[j0] = from_float<T>(y1);
        outr[j0 + 1] = from_float<T>(y2);
        continue;
      }
      const Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(xr + j0);
      Vec<T, VEC> o;
#pragma unroll
      for (int e = 0; e < VEC; e += 2) {
        const int64_t i = (j0 + e) / 2;
        float s, co, y1, y2;
        position_sincos(pos, table ? freq[i] : inv_freq(static_cast<int>(2 * i), p.rotary_dim, p.base), &s, &co);
        rotate_pair(to_float(v.v[e]), to_float(v.v[e + 1]), co, sign * s, &y1, &y2);
        o.v[e] = from_float<T>(y1);
        o.v[e + 1] = from_float<T>(y2);
      }
      *reinterpret_cast<Vec<T, VEC>*>(outr + j0) = o;
    } else {  // pairs (i, i + half) for i in [c * VEC, c * VEC + VEC)
      const int64_t i0 = c * VEC;
      const Vec<T, VEC> v1 = *reinterpret_cast<const Vec<T, VEC>*>(xr + i0);
      const Vec<T, VEC> v2 = *reinterpret_cast<const Vec<T, VEC>*>(xr + i0 + half);
      Vec<T, VEC> o1, o2;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int64_t i = i0 + e;
        float s, co, y1, y2;
        position_sincos(pos, table ? freq[i] : inv_freq(static_cast<int>(2 * i), p.rotary_dim, p.base), &s, &co);
        rotate_pair(to_float(v1.v[e]), to_float(v2.v[e]), co, sign * s, &y1, &y2);
        o1.v[e] = from_float<T>(y1);
        o2.v[e] = from_float<T>(y2);
      }
      *reinterpret_cast<Vec<T, VEC>*>(outr + i0) = o1;
      *reinterpret_cast<Vec<T, VEC>*>(outr + i0 + half) = o2;
    }
  }
}

}  // namespace

cudaError_t rotary(const RotaryParams& p, DType dtype, cudaStream_t stream) {
  const int64_t rows = p.batch * p.heads * p.seq_len;
  if (rows == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    constexpr int V = vec_width<T>();
    const int half = p.rotary_dim / 2;
    bool vec = (p.interleaved ? p.rotary_dim % V == 0 : half % V == 0) && p.rotary_dim % V == 0 && p.d % V == 0 &&
               aligned16(p.x) && aligned16(p.out);
    for (int s = 0; s < 3; ++s) vec = vec && p.x_stride[s] % V == 0 && p.out_stride[s] % V == 0;
    const size_t smem = half <= kMaxTablePairs ? static_cast<size_t>(half) * sizeof(double) : 0;
    if (vec)
      rotary_kernel<T, V><<<grid_for(rows * (p.d / V)), kThreads, smem, stream>>>(p);
    else
      rotary_kernel<T, 1><<<grid_for(rows * p.d), kThreads, smem, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace metagpt_fast::cuda
