// Launch templates: tile sizes per head dim and architecture, grids, and the order of the backward kernels.
//
// ``launch(kernel, shape, params)`` is supplied by the caller: the CUDA launcher ``CudaLaunch`` in
// attention_cuda_launch.cuh (dynamic shared memory opt-in, <<<>>> on the given stream, launch error returned) or the
// CPU emulation's launcher in attention_emulation.cc (tests). It returns 0 or an error code, and the first error stops
// a sequence of launches.
#pragma once

#include "backward_kernels.cuh"
#include "forward_kernel.cuh"

namespace metagpt_fast {
namespace attention {

struct LaunchShape {
  int grid_x, grid_y, grid_z;
  int threads;
  int shared_bytes;
};

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

template <typename T, typename Tile, typename Launch>
int forward_with_tile(const AttentionParams& p, Launch&& launch) {
  const LaunchShape shape{ceil_div(p.n_q, Tile::BLOCK_M), p.heads_q, p.batch, Tile::THREADS, Tile::SHARED_BYTES};
  return launch(&attention_forward_kernel<T, Tile>, shape, p);
}

// Forward tiles (forward_kernel.cuh): 4 warps of 32 query rows (BLOCK_M = 128) and two CTAs per SM
// (__launch_bounds__(128, 2): up to 255 registers a thread), two K / V stages in shared memory.
//   D = 64: BLOCK_N = 64, Q fragments in registers (233-237 registers); 48 KB, two CTAs fit on every sm_80+ part.
//   D = 128: Q re-read from shared memory each tile (with its 64 registers held, ptxas spills 88-248 B) and
//   BLOCK_N = 32 (64 KB; 252-253 registers): with BLOCK_N = 64 ptxas spills 12-48 B on sm_80 or sm_90 depending on
//   the features compiled in. On the 100 KB parts (sm_86, sm_89) 16-row warps (BLOCK_M = 64, 48 KB) keep two CTAs
//   per SM, with Q in registers (210-216 registers).
template <int D>
struct ForwardTiles;

template <>
struct ForwardTiles<64> {
  using Wide = ForwardTile<64, 4, 32, 64, true, 2>;
  using Narrow = Wide;
};

template <>
struct ForwardTiles<128> {
  using Wide = ForwardTile<128, 4, 32, 32, false, 2>;
  using Narrow = ForwardTile<128, 4, 16, 32, true, 2>;
};

// Two CTAs of ``Tile`` fit in ``shared_per_sm`` bytes (1 KB of each CTA's share is reserved by the hardware).
template <typename Tile>
bool two_ctas_fit(int shared_per_sm) {
  return 2 * (Tile::SHARED_BYTES + 1024) <= shared_per_sm;
}

template <typename T, int D, typename Launch>
int forward(const AttentionParams& p, Launch&& launch) {
  using Tiles = ForwardTiles<D>;
  if (two_ctas_fit<typename Tiles::Wide>(p.shared_memory_per_sm)) {
    return forward_with_tile<T, typename Tiles::Wide>(p, launch);
  }
  return forward_with_tile<T, typename Tiles::Narrow>(p, launch);
}

// Backward tiles (backward_kernels.cuh): 4 warps, two cp.async stages. dK/dV (64 keys per CTA, 16 per warp) holds
// two D-wide fp32 accumulators per warp (dK, dV) beside its 16 x BLOCK_M S^T and dP^T tiles, so it steps through
// 64 query rows at D = 64 (232-240 registers, 49 KB of shared memory) and 32 at D = 128 (238-246 registers, 64.5
// KB; 64 spills). dQ gives each warp 32 query rows (128 per CTA), so every K / V fragment serves two 16-row mma
// blocks: 32-key steps at D = 64 (248-249 registers, 48 KB), 16-key steps at D = 128 (241-243 registers, 80 KB).
// At more than 168 registers a thread, registers bound every SM to two CTAs (8 warps). Where two Wide CTAs do not
// fit in shared memory (D = 128 on the 100 KB sm_86 / sm_89), the Narrow tiles (dK/dV 16-row steps, 48.3 KB; dQ
// 16 rows a warp, 16-key steps, 48 KB) keep two.
template <int D>
struct BackwardTiles;

template <>
struct BackwardTiles<64> {
  using WideDkdv = DkdvTile<64, 64, 64, 4, 2>;
  using WideDq = DqTile<64, 128, 32, 4, 2>;
  using NarrowDkdv = WideDkdv;
  using NarrowDq = WideDq;
};

template <>
struct BackwardTiles<128> {
  using WideDkdv = DkdvTile<128, 32, 64, 4, 2>;
  using WideDq = DqTile<128, 128, 16, 4, 2>;
  using NarrowDkdv = DkdvTile<128, 16, 64, 4, 2>;
  using NarrowDq = DqTile<128, 64, 16, 4, 2>;
};

template <typename T, typename Dkdv, typename Dq, typename Launch>
int backward_with_tiles(const AttentionParams& p, Launch&& launch) {
  const LaunchShape delta{ceil_div(p.n_q, kDeltaRowsPerBlock), p.heads_q, p.batch, 32 * kDeltaRowsPerBlock, 0};
  int error = launch(&attention_backward_delta_kernel<T>, delta, p);
  if (error != 0) return error;
  const LaunchShape dkdv{ceil_div(p.n_k, Dkdv::BLOCK_N), p.heads_k, p.batch, Dkdv::THREADS, Dkdv::SHARED_BYTES};
  error = launch(&attention_backward_dkdv_kernel<T, Dkdv>, dkdv, p);
  if (error != 0) return error;
  const LaunchShape dq{ceil_div(p.n_q, Dq::BLOCK_M), p.heads_q, p.batch, Dq::THREADS, Dq::SHARED_BYTES};
  return launch(&attention_backward_dq_kernel<T, Dq>, dq, p);
}

// Needs p.out, p.grad_out, p.lse and scratch p.delta; writes grad_q, grad_k, grad_v (every element).
template <typename T, int D, typename Launch>
int backward(const AttentionParams& p, Launch&& launch) {
  using Tiles = BackwardTiles<D>;
  if (two_ctas_fit<typename Tiles::WideDkdv>(p.shared_memory_per_sm) &&
      two_ctas_fit<typename Tiles::WideDq>(p.shared_memory_per_sm)) {
    return backward_with_tiles<T, typename Tiles::WideDkdv, typename Tiles::WideDq>(p, launch);
  }
  return backward_with_tiles<T, typename Tiles::NarrowDkdv, typename Tiles::NarrowDq>(p, launch);
}

template <typename T, typename Launch>
int forward_any_head_dim(const AttentionParams& p, Launch&& launch) {
  return p.head_dim == 64 ? forward<T, 64>(p, launch) : forward<T, 128>(p, launch);
}

template <typename T, typename Launch>
int backward_any_head_dim(const AttentionParams& p, Launch&& launch) {
  return p.head_dim == 64 ? backward<T, 64>(p, launch) : backward<T, 128>(p, launch);
}

}  // namespace attention
}  // namespace metagpt_fast
