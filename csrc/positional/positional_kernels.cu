// CUDA kernels of the positional ops: fused embedding + sinusoidal encoding + dropout, the positional-encoding add,
// the dropout backward, and the deterministic embedding backward. 128-bit loads/stores when the feature dim and
// strides allow (VEC = 16 bytes / element size), else one element per access. The sinusoid and dropout math come
// from the shared headers (metagpt_fast/sinusoid.h, philox.h), the same code the CPU kernels run.
#include <algorithm>

#include "cuda_utils.cuh"
#include "metagpt_fast/philox.h"
#include "metagpt_fast/sinusoid.h"

namespace metagpt_fast::cuda {
namespace {

constexpr double kBase = 10000.0;
// Frequencies live in shared memory (one float64 per pair) up to 48 KiB; wider rows compute them per element.
constexpr int64_t kMaxTablePairs = 48 * 1024 / sizeof(double);

__device__ __forceinline__ uint64_t load_seed(const Dropout& dropout) {
  return dropout.seed != nullptr ? static_cast<uint64_t>(*dropout.seed) : 0ull;
}

// Fills the block's frequency table (when it fits) with base^(-2i / d).
__device__ __forceinline__ bool fill_freq_table(double* freq, int64_t pairs, int dim, double base) {
  const bool table = pairs <= kMaxTablePairs;
  if (table)
    for (int64_t i = threadIdx.x; i < pairs; i += blockDim.x) freq[i] = inv_freq(static_cast<int>(2 * i), dim, base);
  __syncthreads();
  return table;
}

__device__ __forceinline__ double freq_at(const double* freq, bool table, int64_t i, int dim, double base) {
  return table ? freq[i] : inv_freq(static_cast<int>(2 * i), dim, base);
}

// Adds PE[pos, j0 .. j0 + VEC) to y (sin at even features, cos at odd; for VEC > 1, j0 is even and all pairs full).
template <int VEC>
__device__ __forceinline__ void add_sinusoid(float (&y)[VEC], double pos, int64_t j0, int64_t d, const double* freq,
                                             bool table) {
#pragma unroll
  for (int e = 0; e < VEC; e += (VEC > 1 ? 2 : 1)) {
    const int64_t j = j0 + e;
    float s, c;
    position_sincos(pos, freq_at(freq, table, j / 2, static_cast<int>(d), kBase), &s, &c);
    if (VEC > 1) {
      y[e] += s;
      y[e + 1] += c;
    } else {
      y[e] += (j & 1) ? c : s;
    }
  }
}

// Rounds y to T, then applies dropout at linear offsets base .. base + VEC (dropout after rounding, as the reference).
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> round_and_drop(const float (&y)[VEC], bool drop, uint64_t seed,
                                                      uint64_t base, const Dropout& dropout) {
  Vec<T, VEC> o;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    o.v[e] = from_float<T>(y[e]);
    if (drop) {
      const bool keep = dropout_keep(seed, base + e, dropout.threshold);
      o.v[e] = from_float<T>(keep ? to_float(o.v[e]) * dropout.inv_keep : 0.0f);
    }
  }
  return o;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) embed_fwd_kernel(EmbedFwdParams p) {
  extern __shared__ double freq[];
  const int64_t pairs = (p.d + 1) / 2;
  const bool table = p.sinusoidal ? fill_freq_table(freq, pairs, static_cast<int>(p.d), kBase) : false;
  const bool drop = p.dropout.seed != nullptr;
  const uint64_t seed = load_seed(p.dropout);
  const T* weight = static_cast<const T*>(p.weight);
  T* out = static_cast<T*>(p.out);
  const int64_t chunks = p.d / VEC, total = p.rows * chunks;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / chunks, j0 = (idx - r * chunks) * VEC;
    const Vec<T, VEC> w = *reinterpret_cast<const Vec<T, VEC>*>(weight + p.tokens[r] * p.d + j0);
    float y[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) y[e] = to_float(w.v[e]) * p.scale;
    if (p.sinusoidal) add_sinusoid<VEC>(y, static_cast<double>(p.offset + r % p.seq_len), j0, p.d, freq, table);
    *reinterpret_cast<Vec<T, VEC>*>(out + r * p.d + j0) =
        round_and_drop<T, VEC>(y, drop, seed, static_cast<uint64_t>(r * p.d + j0), p.dropout);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) add_pe_fwd_kernel(AddPeFwdParams p) {
  extern __shared__ double freq[];
  const bool table = fill_freq_table(freq, (p.d + 1) / 2, static_cast<int>(p.d), kBase);
  const bool drop = p.dropout.seed != nullptr;
  const uint64_t seed = load_seed(p.dropout);
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const int64_t chunks = p.d / VEC, total = p.batch * p.seq_len * chunks;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / chunks, j0 = (idx - r * chunks) * VEC, b = r / p.seq_len, t = r - b * p.seq_len;
    const Vec<T, VEC> xv = *reinterpret_cast<const Vec<T, VEC>*>(x + b * p.stride_b + t * p.stride_t + j0);
    float y[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) y[e] = to_float(xv.v[e]);
    add_sinusoid<VEC>(y, static_cast<double>(p.offset + t), j0, p.d, freq, table);
    *reinterpret_cast<Vec<T, VEC>*>(out + r * p.d + j0) =
        round_and_drop<T, VEC>(y, drop, seed, static_cast<uint64_t>(r * p.d + j0), p.dropout);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) dropout_bwd_kernel(const T* grad_out, T* grad_x, int64_t n,
                                                               Dropout dropout) {
  const uint64_t seed = load_seed(dropout);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n / VEC;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Vec<T, VEC> g = reinterpret_cast<const Vec<T, VEC>*>(grad_out)[idx];
    Vec<T, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const bool keep = dropout_keep(seed, static_cast<uint64_t>(idx * VEC + e), dropout.threshold);
      o.v[e] = from_float<T>(keep ? to_float(g.v[e]) * dropout.inv_keep : 0.0f);
    }
    reinterpret_cast<Vec<T, VEC>*>(grad_x)[idx] = o;
  }
}

// One block per run of equal tokens in the sorted list (the block at the run's first entry does the work; the
// others exit), one thread per VEC columns of the row: sums the run's gradient rows in original order.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) embed_bwd_kernel(EmbedBwdParams p) {
  const int64_t j0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  const bool drop = p.dropout.seed != nullptr;
  const uint64_t seed = load_seed(p.dropout);
  const T* grad = static_cast<const T*>(p.grad_out);
  T* grad_weight = static_cast<T*>(p.grad_weight);
  for (int64_t s = blockIdx.x; s < p.rows; s += gridDim.x) {
    const int64_t token = p.sorted_tokens[s];
    if ((s > 0 && p.sorted_tokens[s - 1] == token) || j0 >= p.d) continue;
    float acc[VEC] = {};
    for (int64_t q = s; q < p.rows && p.sorted_tokens[q] == token; ++q) {
      const int64_t row = p.order[q];
      const Vec<T, VEC> g = *reinterpret_cast<const Vec<T, VEC>*>(grad + row * p.d + j0);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const bool keep = !drop || dropout_keep(seed, static_cast<uint64_t>(row * p.d + j0 + e), p.dropout.threshold);
        acc[e] += keep ? to_float(g.v[e]) : 0.0f;
      }
    }
    Vec<T, VEC> o;
    const float scale = drop ? p.scale * p.dropout.inv_keep : p.scale;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o.v[e] = from_float<T>(acc[e] * scale);
    *reinterpret_cast<Vec<T, VEC>*>(grad_weight + token * p.d + j0) = o;
  }
}

size_t table_bytes(int64_t pairs) { return pairs <= kMaxTablePairs ? static_cast<size_t>(pairs) * sizeof(double) : 0; }

}  // namespace

cudaError_t embed_positions_fwd(const EmbedFwdParams& p, DType dtype, cudaStream_t stream) {
  if (p.rows == 0 || p.d == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    constexpr int V = vec_width<T>();
    const bool vec = p.d % V == 0 && aligned16(p.weight) && aligned16(p.out);
    const size_t smem = p.sinusoidal ? table_bytes((p.d + 1) / 2) : 0;
    if (vec)
      embed_fwd_kernel<T, V><<<grid_for(p.rows * p.d / V), kThreads, smem, stream>>>(p);
    else
      embed_fwd_kernel<T, 1><<<grid_for(p.rows * p.d), kThreads, smem, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t add_positional_encoding_fwd(const AddPeFwdParams& p, DType dtype, cudaStream_t stream) {
  const int64_t n = p.batch * p.seq_len * p.d;
  if (n == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    constexpr int V = vec_width<T>();
    const bool vec = p.d % V == 0 && p.stride_b % V == 0 && p.stride_t % V == 0 && aligned16(p.x) && aligned16(p.out);
    const size_t smem = table_bytes((p.d + 1) / 2);
    if (vec)
      add_pe_fwd_kernel<T, V><<<grid_for(n / V), kThreads, smem, stream>>>(p);
    else
      add_pe_fwd_kernel<T, 1><<<grid_for(n), kThreads, smem, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t dropout_bwd(const void* grad_out, void* grad_x, int64_t n, Dropout dropout, DType dtype,
                        cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    constexpr int V = vec_width<T>();
    const T* g = static_cast<const T*>(grad_out);
    T* o = static_cast<T*>(grad_x);
    if (n % V == 0 && aligned16(g) && aligned16(o))
      dropout_bwd_kernel<T, V><<<grid_for(n / V), kThreads, 0, stream>>>(g, o, n, dropout);
    else
      dropout_bwd_kernel<T, 1><<<grid_for(n), kThreads, 0, stream>>>(g, o, n, dropout);
    return cudaGetLastError();
  });
}

cudaError_t embed_positions_bwd(const EmbedBwdParams& p, DType dtype, cudaStream_t stream) {
  if (p.rows == 0 || p.d == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    constexpr int V = vec_width<T>();
    const bool vec = p.d % V == 0 && aligned16(p.grad_out) && aligned16(p.grad_weight);
    const int64_t chunks = vec ? p.d / V : p.d;
    // Threads cover a row's columns (a multiple of 32 up to kThreads); blockIdx.y takes the rest of a wide row.
    const int threads = static_cast<int>(std::min<int64_t>(kThreads, (chunks + 31) / 32 * 32));
    const dim3 grid(static_cast<unsigned int>(std::min<int64_t>(p.rows, 1 << 20)),
                    static_cast<unsigned int>((chunks + threads - 1) / threads));
    if (vec)
      embed_bwd_kernel<T, V><<<grid, threads, 0, stream>>>(p);
    else
      embed_bwd_kernel<T, 1><<<grid, threads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace metagpt_fast::cuda
