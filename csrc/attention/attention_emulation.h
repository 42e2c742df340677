// CPU emulation of the primitives in warp_primitives.cuh, so the attention kernels run without a GPU in tests.
//
// Compiled only with MGF_ATTENTION_EMULATION defined, by a host C++ compiler (never part of the extension). Every
// CUDA thread of a block becomes a fiber (ucontext) on one OS thread; fibers switch only inside the block barrier
// and the warp-collective operations (shuffle, mma), which gather all 32 lanes' operands before any lane reads the
// result — the semantics of the real instructions, including the mma.m16n8k16 fragment layout. A barrier that can
// never complete (a divergent __syncthreads) aborts with a message instead of hanging.
#pragma once

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#define MGF_KERNEL
#define MGF_DEV inline
#define MGF_LAUNCH_BOUNDS(threads, min_blocks)

namespace metagpt_fast {
namespace attention {
namespace emulation {

struct Dim3 {
  int x = 1, y = 1, z = 1;
};

enum class FiberState { kRunnable, kWaitWarp, kWaitBlock, kDone };

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  FiberState state = FiberState::kRunnable;
};

// Operands of one warp-collective operation, one slot per lane. Two slots alternate: a lane can only write slot s
// again after the next operation's barrier, which every lane reaches only after reading slot s.
struct WarpExchange {
  uint32_t a[32][4];
  uint32_t b[32][2];
  float value[32];
};

struct Warp {
  int arrived = 0;
  int parity = 0;
  WarpExchange slots[2];
};

struct Block {
  Dim3 index;
  int threads = 0;
  std::vector<char> shared;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int block_arrived = 0;
  int current = 0;
  ucontext_t scheduler;
  std::function<void()> body;
};

inline Block*& current_block() {
  static thread_local Block* block = nullptr;
  return block;
}

inline void fiber_entry() {
  Block& block = *current_block();
  block.body();
  block.fibers[block.current].state = FiberState::kDone;
  // Returning resumes uc_link (the scheduler).
}

inline void yield_to_scheduler() {
  Block& block = *current_block();
  swapcontext(&block.fibers[block.current].context, &block.scheduler);
}

// Runs ``body`` once per thread of a block of ``threads`` threads with ``shared_bytes`` of shared memory.
inline void run_block(Dim3 index, int threads, size_t shared_bytes, const std::function<void()>& body) {
  if (threads % 32 != 0) {
    fprintf(stderr, "emulation: block of %d threads is not whole warps\n", threads);
    abort();
  }
  Block block;
  block.index = index;
  block.threads = threads;
  block.shared.assign(shared_bytes + 16, 0);
  block.fibers.resize(threads);
  block.warps.resize(threads / 32);
  block.body = body;
  Block* previous = current_block();
  current_block() = &block;
  constexpr size_t kStackBytes = 256 * 1024;
  for (int i = 0; i < threads; ++i) {
    Fiber& f = block.fibers[i];
    f.stack.resize(kStackBytes);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = &block.scheduler;
    makecontext(&f.context, fiber_entry, 0);
  }
  // Warp by warp, lane by lane; a fiber runs until it waits at a barrier or finishes.
  for (;;) {
    bool progress = false, all_done = true;
    for (int w = 0; w < threads / 32; ++w) {
      bool warp_progress = true;
      while (warp_progress) {
        warp_progress = false;
        for (int lane = 0; lane < 32; ++lane) {
          const int i = w * 32 + lane;
          if (block.fibers[i].state == FiberState::kRunnable) {
            block.current = i;
            swapcontext(&block.scheduler, &block.fibers[i].context);
            warp_progress = progress = true;
          }
        }
      }
    }
    for (const Fiber& f : block.fibers) all_done = all_done && f.state == FiberState::kDone;
    if (all_done) break;
    if (!progress) {
      fprintf(stderr, "emulation: deadlock in block (%d, %d, %d): a barrier is not reached by every thread\n",
              index.x, index.y, index.z);
      abort();
    }
  }
  current_block() = previous;
}

// Launches ``kernel(args...)`` over ``grid``, one block after another.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, Dim3 grid, int threads, size_t shared_bytes, const Args&... args) {
  for (int z = 0; z < grid.z; ++z)
    for (int y = 0; y < grid.y; ++y)
      for (int x = 0; x < grid.x; ++x) run_block(Dim3{x, y, z}, threads, shared_bytes, [&] { kernel(args...); });
}

inline int lane() { return current_block()->current & 31; }
inline Warp& warp() { return current_block()->warps[current_block()->current >> 5]; }

// Waits until all 32 lanes of the warp arrived; returns the exchange slot of this operation.
inline WarpExchange& warp_slot() {
  Warp& w = warp();
  return w.slots[w.parity];
}

inline void warp_barrier() {
  Block& block = *current_block();
  Warp& w = warp();
  if (++w.arrived == 32) {
    w.arrived = 0;
    w.parity ^= 1;
    const int base = block.current & ~31;
    for (int i = base; i < base + 32; ++i) {
      if (block.fibers[i].state == FiberState::kWaitWarp) block.fibers[i].state = FiberState::kRunnable;
    }
    return;
  }
  block.fibers[block.current].state = FiberState::kWaitWarp;
  yield_to_scheduler();
}

template <typename T>
float unpack(uint32_t pair, int half) {
  const uint16_t bits = static_cast<uint16_t>(half ? pair >> 16 : pair & 0xffffu);
  T value;
  static_assert(sizeof(T) == 2, "16-bit element");
  *reinterpret_cast<uint16_t*>(&value) = bits;
  if constexpr (std::is_same<T, __half>::value) {
    return __half2float(value);
  } else {
    return __bfloat162float(value);
  }
}

}  // namespace emulation

using std::min;  // the kernels call CUDA's integer min()

inline int thread_index() { return emulation::current_block()->current; }
inline int block_index_x() { return emulation::current_block()->index.x; }
inline int block_index_y() { return emulation::current_block()->index.y; }
inline int block_index_z() { return emulation::current_block()->index.z; }
inline char* dynamic_shared_memory() {
  char* base = emulation::current_block()->shared.data();
  return base + (16 - reinterpret_cast<uintptr_t>(base) % 16) % 16;
}

inline void block_sync() {
  using namespace emulation;
  Block& block = *current_block();
  if (++block.block_arrived == block.threads) {
    block.block_arrived = 0;
    for (Fiber& f : block.fibers) {
      if (f.state == FiberState::kWaitBlock) f.state = FiberState::kRunnable;
    }
    return;
  }
  block.fibers[block.current].state = FiberState::kWaitBlock;
  yield_to_scheduler();
}

inline float warp_shfl_xor(float value, int mask) {
  using namespace emulation;
  WarpExchange& slot = warp_slot();
  slot.value[lane()] = value;
  warp_barrier();
  return slot.value[lane() ^ mask];
}

// D = A B + C for a 16x16 A and 16x8 B spread over the warp in the mma.m16n8k16 fragment layout; fp32 products
// and sums (the hardware's accumulation order differs by rounding only).
template <typename T>
void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  using namespace emulation;
  WarpExchange& slot = warp_slot();
  const int me = lane();
  std::copy(a, a + 4, slot.a[me]);
  std::copy(b, b + 2, slot.b[me]);
  warp_barrier();
  const int g = me >> 2, t = me & 3;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float sum = 0.0f;
    for (int kk = 0; kk < 16; ++kk) {
      const int pair_lane = (kk % 8) / 2;
      const float x = unpack<T>(slot.a[(row % 8) * 4 + pair_lane][(row >= 8) + 2 * (kk >= 8)], kk & 1);
      const float y = unpack<T>(slot.b[col * 4 + pair_lane][kk >= 8], kk & 1);
      sum += x * y;
    }
    c[e] += sum;
  }
}

}  // namespace attention
}  // namespace metagpt_fast
