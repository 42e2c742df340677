// CPU emulation of the primitives in warp_primitives.cuh, so the attention kernels run without a GPU in tests.
//
// Compiled only with MGF_ATTENTION_EMULATION defined, by a host C++ compiler (never part of the extension; -std=c++20
// for the test hooks below, C++17 works without them). Every CUDA thread of a block becomes a fiber (ucontext) on one
// OS thread. The emulation is adversarial: it runs the real kernel code in schedules a GPU may produce and makes the
// usual synchronisation mistakes visible as wrong results or as an abort with a message, instead of hiding them behind
// a convenient order. What it guarantees:
//
// * Collectives. block_sync() and the warp-collective operations (warp_sync, warp_shfl_xor, mma_16816, ldmatrix_*)
//   gather all 32 lanes' operands before any lane gets a result, and compute the result at one instant (so an ldmatrix
//   reads shared memory atomically for the warp), with the PTX fragment layouts. Lanes of one warp that reach different
//   collectives (a divergent .sync.aligned instruction) abort; so does a barrier that can never complete (a divergent
//   block_sync(), or one some threads skip by returning): "deadlock".
// * Schedule. Fibers switch only at collectives and barriers. Between two barriers the warps run in an order drawn from
//   a seeded PRNG: each step advances one warp (every runnable lane, in a random rotation of lane order, up to its next
//   collective), and the next warp is picked at random among the runnable ones; per block the PRNG also picks how
//   "sticky" the schedule is (a new warp every step, mostly the same warp, or each warp up to its next block barrier,
//   in a random warp order). So a missing block_sync() — a warp reading shared data another warp has not written yet,
//   or has already overwritten — gives wrong results for some seed. The seed is emulation::set_schedule_seed(uint64_t)
//   (initially $MGF_EMULATION_SEED if set, else kDefaultScheduleSeed); the schedule of a block depends only on the
//   seed, the launch count since the seed was set and the block index, so a failing seed reproduces.
// * Shared memory starts filled with 0xff bytes (NaN in fp16, bf16 and fp32), so a read of bytes nobody wrote shows.
// * cp.async. cp_async_16 reads its source at issue (a zero-filled row when !valid) and queues the copy in the issuing
//   thread's current group; cp_async_commit() closes the group; cp_async_wait<N>() lands (writes into shared memory)
//   the thread's copies of every committed group except the newest N, cp_async_wait_all() every copy. A copy lands ONLY
//   there, so a missing or too-weak wait reads stale bytes (the previous tile, or the 0xff fill). A copy still pending
//   when its thread finishes the kernel aborts with a message: every copy a kernel issues must be retired by a wait (a
//   prefetch beyond the last tile is a bug or wasted bandwidth; empty groups are fine). Addresses: the destination must
//   be 16-byte aligned inside the block's dynamic shared memory, a valid source 16-byte aligned and outside it;
//   otherwise abort.
// * ldmatrix. Row addresses (lanes 0-7 for x1, 0-15 for x2, all 32 for x4) must be 16-byte aligned rows inside the
//   block's shared memory; otherwise abort.
// * Race detector (shared memory written by cp.async or plain stores, read by ldmatrix), deterministic whatever the
//   schedule. Each byte remembers the thread with a copy onto it still pending, the thread whose copy last landed on it
//   (or the warp whose plain store last changed it: shared memory is compared with a snapshot after every scheduling
//   step, before a barrier completes and before copies land; $MGF_EMULATION_PLAIN_RACES=0 turns that off), and the
//   warps that read it with ldmatrix, per barrier epoch (the count of completed block_sync()s). These abort with a
//   message naming both sides: an ldmatrix of a byte with a pending copy (a missing wait, whoever issued it); an
//   ldmatrix of a byte another warp wrote in the same epoch (a missing block_sync() after the wait or the stores); a
//   copy issued or landing, or a plain store, onto a byte another warp read or wrote in the same epoch, or with another
//   thread's copy onto it pending (a missing block_sync() before a buffer is refilled: on the GPU the copy may land at
//   any time after its issue). Plain loads are not seen by the detector, only by the schedule; nor are stores that
//   leave a byte's value unchanged.
// * fast_exp2 is exp2f with denormal results flushed to zero (ex2.approx.ftz; the approximation error is not emulated).
//
// Test hooks (C++20, std::source_location): compiled with -DMGF_EMULATION_DROP_SYNC_LINE=n, the block_sync() call
// written on source line n (of any file, or only of the file whose path ends with -DMGF_EMULATION_DROP_FILE= '"name"')
// does nothing; -DMGF_EMULATION_DROP_WAIT_LINE=n does the same for a cp_async_wait<N>() / cp_async_wait_all() call. The
// environment variables of the same names do the same at run time (read at the first barrier or wait, so one build
// serves every removed line). tests/test_cuda_emulator.py uses them to show that removing one barrier or wait from a
// kernel makes its results wrong.
//
// Not emulated: timing, the hardware's mma rounding and accumulation order, memory ordering of plain global accesses
// between blocks (blocks run one after another). Intra-warp races of plain loads/stores (a lane reading another lane's
// write with no warp_sync(), block_sync() or collective in between) show only through the lane order, which is a random
// rotation per step (a lane reading a lane that runs after it reads stale bytes); lanes of one warp are never
// interleaved between two collectives.
#pragma once

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

#if __cplusplus >= 202002L && __has_include(<source_location>)
#include <source_location>
#define MGF_EMULATION_HAS_SOURCE_LOCATION 1
#else
#define MGF_EMULATION_HAS_SOURCE_LOCATION 0
#if defined(MGF_EMULATION_DROP_SYNC_LINE) || defined(MGF_EMULATION_DROP_WAIT_LINE)
#error "MGF_EMULATION_DROP_SYNC_LINE / MGF_EMULATION_DROP_WAIT_LINE need -std=c++20 (std::source_location)"
#endif
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#define MGF_KERNEL
#define MGF_DEV inline
#define MGF_LAUNCH_BOUNDS(threads, min_blocks)

namespace metagpt_fast {
namespace attention {
namespace emulation {

constexpr uint64_t kDefaultScheduleSeed = 0x9e3779b97f4a7c15ull;

struct Dim3 {
  int x = 1, y = 1, z = 1;
};

[[noreturn]] inline void fail(const char* message) {
  fprintf(stderr, "emulation: %s\n", message);
  fflush(stderr);
  abort();
}

inline uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

struct ScheduleSeed {
  uint64_t seed = kDefaultScheduleSeed;
  uint64_t launches = 0;  // kernel launches since the seed was set
};

// The seed starts as $MGF_EMULATION_SEED when set (so a whole test run can be repeated under other schedules),
// kDefaultScheduleSeed otherwise.
inline ScheduleSeed& schedule_seed() {
  static ScheduleSeed s = [] {
    ScheduleSeed first;
    if (const char* env = getenv("MGF_EMULATION_SEED")) first.seed = strtoull(env, nullptr, 0);
    return first;
  }();
  return s;
}

// Sets the seed of the warp schedule (and restarts the launch count it is mixed with).
inline void set_schedule_seed(uint64_t seed) {
  schedule_seed().seed = seed;
  schedule_seed().launches = 0;
}

// Whether the race detector also tracks plain stores to shared memory (it compares shared memory with a snapshot
// after every scheduling step, barrier and landing; cheap next to the fiber switches). On unless
// $MGF_EMULATION_PLAIN_RACES is 0.
inline bool& plain_store_tracking() {
  static bool on = [] {
    const char* env = getenv("MGF_EMULATION_PLAIN_RACES");
    return env == nullptr || strcmp(env, "0") != 0;
  }();
  return on;
}

inline void set_plain_store_tracking(bool on) { plain_store_tracking() = on; }

enum class FiberState { kRunnable, kWaitWarp, kWaitBlock, kDone };

struct PendingCopy {
  char* dst;
  uint64_t group;
  unsigned char bytes[16];
};

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;
  FiberState state = FiberState::kRunnable;
  std::vector<PendingCopy> pending;  // cp.async copies not landed yet, in issue order
  uint64_t committed = 0;            // groups committed; the open group's number
};

// What a lane is doing at a warp collective (all 32 lanes must agree): 1 shuffle, 2 mma, 10 + 2 * NUM + TRANS
// ldmatrix .xNUM[.trans].
constexpr int kShuffle = 1, kMma = 2, kWarpSync = 3;
constexpr int ldmatrix_kind(int num, bool trans) { return 10 + 2 * num + (trans ? 1 : 0); }

// Operands of one warp-collective operation, one slot per lane. Two slots alternate: a lane can only write slot s
// again after the next operation's barrier, which every lane reaches only after reading slot s.
struct WarpExchange {
  int kind[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
  float value[32];
  const void* ptr[32];
  uint32_t result[32][4];
};

struct Warp {
  int arrived = 0;
  int parity = 0;
  WarpExchange slots[2];
};

// Per-byte access record of the race detector (see the header comment).
struct ByteRecord {
  int32_t writer = -1;   // thread whose cp.async copy last landed here (a plain store: the first thread of its warp)
  int32_t pending = -1;  // thread with a cp.async copy onto this byte issued and not landed yet
  bool plain = false;    // the last write was a plain store (seen by the optional plain-store tracking)
  uint32_t pending_step = 0;  // the scheduling step that issued the pending copy
  uint32_t write_epoch = 0;
  uint32_t read_epoch = 0;
  uint32_t readers = 0;  // bit w: warp w read it with ldmatrix in read_epoch
};

struct Block {
  Dim3 index;
  int threads = 0;
  size_t shared_bytes = 0;
  std::vector<char> shared;
  char* shared_base = nullptr;  // 16-byte aligned start of the dynamic shared memory
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<ByteRecord> records;  // allocated at the first tracked access
  bool track_plain = false;         // plain stores are tracked (snapshot holds shared memory as last seen)
  std::vector<char> snapshot;
  uint32_t epoch = 1;               // completed block barriers + 1
  uint32_t step = 0;                // scheduling steps so far
  int block_arrived = 0;
  int current = 0;
  ucontext_t scheduler;
  std::function<void()> body;
};

inline Block*& current_block() {
  static thread_local Block* block = nullptr;
  return block;
}

inline Fiber& current_fiber() { return current_block()->fibers[current_block()->current]; }

// Fiber stacks, reused from block to block (allocating and zeroing 256 stacks per block is most of a small launch).
constexpr size_t kFiberStackBytes = 256 * 1024;
inline char* fiber_stack(int i) {
  static thread_local std::vector<std::unique_ptr<char[]>> stacks;
  while (static_cast<int>(stacks.size()) <= i) stacks.emplace_back(new char[kFiberStackBytes]);
  return stacks[i].get();
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

inline bool in_shared(const Block& block, const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  return c >= block.shared_base && c + bytes <= block.shared_base + block.shared_bytes;
}

inline ByteRecord* records_at(Block& block, const char* p) {
  if (block.records.empty()) block.records.resize(block.shared_bytes);
  return block.records.data() + (p - block.shared_base);
}

[[noreturn]] inline void race(const Block& block, const char* p, const char* what) {
  char message[400];
  snprintf(message, sizeof message, "shared-memory race in block (%d, %d, %d) at shared byte %zu: %s", block.index.x,
           block.index.y, block.index.z, static_cast<size_t>(p - block.shared_base), what);
  fail(message);
}

// Race detector: warp ``warp`` reads [p, p + bytes) with ldmatrix.
inline void track_read(Block& block, int warp, const char* p, size_t bytes) {
  ByteRecord* r = records_at(block, p);
  char what[300];
  for (size_t i = 0; i < bytes; ++i) {
    if (r[i].pending >= 0) {
      snprintf(what, sizeof what,
               "warp %d reads it (ldmatrix) while thread %d's cp.async onto it is pending (no cp_async_wait retired "
               "it)",
               warp, r[i].pending);
      race(block, p + i, what);
    }
    if (r[i].writer >= 0 && r[i].write_epoch == block.epoch && (r[i].writer >> 5) != warp) {
      if (r[i].plain) {
        snprintf(what, sizeof what,
                 "warp %d reads it (ldmatrix) after warp %d stored to it with no block_sync() in between", warp,
                 r[i].writer >> 5);
      } else {
        snprintf(what, sizeof what,
                 "warp %d reads it (ldmatrix) after thread %d's cp.async landed on it with no block_sync() in between",
                 warp, r[i].writer);
      }
      race(block, p + i, what);
    }
    if (r[i].read_epoch != block.epoch) {
      r[i].read_epoch = block.epoch;
      r[i].readers = 0;
    }
    r[i].readers |= 1u << warp;
  }
}

// Race detector: thread ``thread`` issues (landing == false) or lands a cp.async copy onto [p, p + 16). A copy may
// land any time between its issue and its wait, so both must not meet another warp's access of the same epoch.
inline void track_write(Block& block, int thread, const char* p, bool landing) {
  ByteRecord* r = records_at(block, p);
  const int warp = thread >> 5;
  char what[300];
  for (size_t i = 0; i < 16; ++i) {
    if (r[i].read_epoch == block.epoch && (r[i].readers & ~(1u << warp)) != 0) {
      snprintf(what, sizeof what,
               "thread %d's cp.async %s onto it after warp %d read it (ldmatrix) with no block_sync() in between",
               thread, landing ? "lands" : "is issued", __builtin_ctz(r[i].readers & ~(1u << warp)));
      race(block, p + i, what);
    }
    if (r[i].pending >= 0 && r[i].pending != thread) {
      snprintf(what, sizeof what, "thread %d's cp.async %s onto it while thread %d's copy onto it is pending", thread,
               landing ? "lands" : "is issued", r[i].pending);
      race(block, p + i, what);
    }
    if (r[i].writer >= 0 && r[i].write_epoch == block.epoch && (r[i].writer >> 5) != warp) {
      snprintf(what, sizeof what,
               "thread %d's cp.async %s onto it after %s %d wrote it with no block_sync() in between", thread,
               landing ? "lands" : "is issued", r[i].plain ? "a plain store of warp" : "a cp.async of thread",
               r[i].plain ? r[i].writer >> 5 : r[i].writer);
      race(block, p + i, what);
    }
    if (landing) {
      r[i].plain = false;
      r[i].pending = -1;
      r[i].writer = thread;
      r[i].write_epoch = block.epoch;
    } else {
      r[i].pending = thread;
      r[i].pending_step = block.step;
    }
  }
}

// Plain-store tracking: the bytes of shared memory that changed since the snapshot were stored by warp ``warp``
// (the warp whose step is running) in this epoch; check them like a cp.async landing, and record them.
inline void flush_plain_stores(Block& block, int warp) {
  if (!block.track_plain) return;
  const char* now = block.shared_base;
  char* seen = block.snapshot.data();
  const size_t n = block.shared_bytes;
  if (memcmp(now, seen, n) == 0) return;
  char what[300];
  for (size_t chunk = 0; chunk < n; chunk += 256) {
    const size_t end = std::min(n, chunk + 256);
    if (memcmp(now + chunk, seen + chunk, end - chunk) == 0) continue;
    ByteRecord* r = records_at(block, now);
    for (size_t i = chunk; i < end; ++i) {
      if (now[i] == seen[i]) continue;
      // (A copy this warp issued in this step may have come after the store: the order within a step is unknown.)
      if (r[i].pending >= 0 && !((r[i].pending >> 5) == warp && r[i].pending_step == block.step)) {
        snprintf(what, sizeof what, "warp %d stores to it while thread %d's cp.async onto it is pending", warp,
                 r[i].pending);
        race(block, now + i, what);
      }
      if (r[i].read_epoch == block.epoch && (r[i].readers & ~(1u << warp)) != 0) {
        snprintf(what, sizeof what, "warp %d stores to it after warp %d read it (ldmatrix) with no block_sync() in "
                 "between", warp, __builtin_ctz(r[i].readers & ~(1u << warp)));
        race(block, now + i, what);
      }
      if (r[i].writer >= 0 && r[i].write_epoch == block.epoch && (r[i].writer >> 5) != warp) {
        snprintf(what, sizeof what, "warp %d stores to it after %s %d wrote it with no block_sync() in between", warp,
                 r[i].plain ? "a plain store of warp" : "a cp.async of thread",
                 r[i].plain ? r[i].writer >> 5 : r[i].writer);
        race(block, now + i, what);
      }
      r[i].writer = warp * 32;
      r[i].plain = true;
      r[i].write_epoch = block.epoch;
    }
    memcpy(seen + chunk, now + chunk, end - chunk);
  }
}

// Runs ``body`` once per thread of a block of ``threads`` threads with ``shared_bytes`` of shared memory.
inline void run_block(Dim3 index, int threads, size_t shared_bytes, const std::function<void()>& body) {
  if (threads % 32 != 0 || threads <= 0 || threads > 1024) {
    fprintf(stderr, "emulation: block of %d threads is not 1 to 32 whole warps\n", threads);
    abort();
  }
  Block block;
  block.index = index;
  block.threads = threads;
  block.shared_bytes = shared_bytes;
  block.shared.assign(shared_bytes + 16, static_cast<char>(0xff));
  const uintptr_t raw = reinterpret_cast<uintptr_t>(block.shared.data());
  block.shared_base = block.shared.data() + (16 - raw % 16) % 16;
  block.fibers.resize(threads);
  block.warps.resize(threads / 32);
  block.body = body;
  block.track_plain = plain_store_tracking() && shared_bytes > 0;
  if (block.track_plain) block.snapshot.assign(block.shared_base, block.shared_base + shared_bytes);
  Block* previous = current_block();
  current_block() = &block;
  for (int i = 0; i < threads; ++i) {
    Fiber& f = block.fibers[i];
    f.stack = fiber_stack(i);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kFiberStackBytes;
    f.context.uc_link = &block.scheduler;
    makecontext(&f.context, fiber_entry, 0);
  }
  // The schedule: this block's PRNG, from the seed, the launch count and the block index.
  uint64_t rng = schedule_seed().seed ^ (schedule_seed().launches * 0xd1b54a32d192ed03ull);
  rng ^= splitmix64(rng) + ((static_cast<uint64_t>(index.z) << 42) ^ (static_cast<uint64_t>(index.y) << 21) ^
                            static_cast<uint64_t>(index.x));
  splitmix64(rng);
  // Stickiness (out of 8): the chance that the warp that just ran runs again. 8: up to its next block barrier.
  static constexpr int kStickiness[4] = {0, 4, 7, 8};
  const int sticky = kStickiness[splitmix64(rng) % 4];
  const int n_warps = threads / 32;
  int last = -1;
  std::vector<int> runnable;
  runnable.reserve(n_warps);
  for (;;) {
    runnable.clear();
    for (int w = 0; w < n_warps; ++w) {
      for (int lane = 0; lane < 32; ++lane) {
        if (block.fibers[w * 32 + lane].state == FiberState::kRunnable) {
          runnable.push_back(w);
          break;
        }
      }
    }
    if (runnable.empty()) {
      int done = 0, at_block = 0, at_warp = 0;
      for (const Fiber& f : block.fibers) {
        done += f.state == FiberState::kDone;
        at_block += f.state == FiberState::kWaitBlock;
        at_warp += f.state == FiberState::kWaitWarp;
      }
      if (done == threads) break;
      fprintf(stderr,
              "emulation: deadlock in block (%d, %d, %d): a barrier is not reached by every thread (%d threads at "
              "block_sync, %d at a warp collective, %d finished)\n",
              index.x, index.y, index.z, at_block, at_warp, done);
      abort();
    }
    const bool last_runnable = last >= 0 && std::find(runnable.begin(), runnable.end(), last) != runnable.end();
    int w;
    if (last_runnable && (sticky == 8 || static_cast<int>(splitmix64(rng) % 8) < sticky)) {
      w = last;
    } else {
      w = runnable[splitmix64(rng) % runnable.size()];
    }
    last = w;
    // One step: every runnable lane of warp w, in a random rotation of lane order (either direction), up to its
    // next collective (or barrier, or the end).
    ++block.step;
    const uint64_t order = splitmix64(rng);
    const int first = static_cast<int>(order % 32), direction = (order >> 5) & 1 ? 1 : 31;
    for (int k = 0; k < 32; ++k) {
      const int i = w * 32 + (first + k * direction) % 32;
      if (block.fibers[i].state == FiberState::kRunnable) {
        block.current = i;
        swapcontext(&block.scheduler, &block.fibers[i].context);
      }
    }
    flush_plain_stores(block, w);
  }
  for (int i = 0; i < threads; ++i) {
    const Fiber& f = block.fibers[i];
    if (!f.pending.empty()) {
      fprintf(stderr,
              "emulation: thread %d of block (%d, %d, %d) finished with %zu cp.async copies never retired by a "
              "cp_async_wait (the first to shared byte %zu)\n",
              i, index.x, index.y, index.z, f.pending.size(),
              static_cast<size_t>(f.pending.front().dst - block.shared_base));
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
  ++schedule_seed().launches;
}

inline int lane() { return current_block()->current & 31; }
inline Warp& warp() { return current_block()->warps[current_block()->current >> 5]; }

// This lane's exchange slot for the next warp-collective operation.
inline WarpExchange& warp_slot() {
  Warp& w = warp();
  return w.slots[w.parity];
}

// Waits until all 32 lanes of the warp arrived with the same ``kind``; the last lane to arrive runs
// ``complete(slot)`` (every lane's operands are in the slot) before any lane continues.
template <typename Complete>
inline void warp_collective(int kind, Complete&& complete) {
  Block& block = *current_block();
  Warp& w = warp();
  WarpExchange& slot = w.slots[w.parity];
  slot.kind[lane()] = kind;
  if (++w.arrived == 32) {
    for (int l = 0; l < 32; ++l) {
      if (slot.kind[l] != slot.kind[0]) {
        char message[200];
        snprintf(message, sizeof message,
                 "warp %d of block (%d, %d, %d): lanes 0 and %d reached different warp-collective operations "
                 "(%d, %d: 1 shuffle, 2 mma, 3 warp_sync, 10 + 2 x + trans ldmatrix .x[.trans])",
                 block.current >> 5, block.index.x, block.index.y, block.index.z, l, slot.kind[0], slot.kind[l]);
        fail(message);
      }
    }
    complete(slot);
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
  memcpy(static_cast<void*>(&value), &bits, 2);
  if constexpr (std::is_same<T, __half>::value) {
    return __half2float(value);
  } else {
    return __bfloat162float(value);
  }
}

// ldmatrix .x<NUM>[.trans] for the whole warp, from the row addresses in ``slot`` (see warp_primitives.cuh).
template <int NUM, bool TRANS>
inline void ldmatrix_gather(Block& block, WarpExchange& slot) {
  const int warp = block.current >> 5;
  for (int row = 0; row < 8 * NUM; ++row) {
    const char* p = static_cast<const char*>(slot.ptr[row]);
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0 || !in_shared(block, p, 16)) {
      char message[200];
      snprintf(message, sizeof message,
               "ldmatrix in warp %d of block (%d, %d, %d): lane %d's row address %p is not a 16-byte aligned row of "
               "the block's shared memory",
               warp, block.index.x, block.index.y, block.index.z, row, static_cast<const void*>(p));
      fail(message);
    }
    track_read(block, warp, p, 16);
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < NUM; ++i) {
      uint16_t lo, hi;
      if (!TRANS) {  // row g, columns 2t and 2t + 1 of matrix i
        const char* p = static_cast<const char*>(slot.ptr[8 * i + g]) + 4 * t;
        memcpy(&lo, p, 2);
        memcpy(&hi, p + 2, 2);
      } else {  // rows 2t and 2t + 1, column g
        memcpy(&lo, static_cast<const char*>(slot.ptr[8 * i + 2 * t]) + 2 * g, 2);
        memcpy(&hi, static_cast<const char*>(slot.ptr[8 * i + 2 * t + 1]) + 2 * g, 2);
      }
      slot.result[l][i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

template <int NUM, bool TRANS>
inline void ldmatrix(uint32_t (&r)[NUM], const void* row) {
  WarpExchange& slot = warp_slot();
  const int me = lane();
  slot.ptr[me] = row;
  warp_collective(ldmatrix_kind(NUM, TRANS), [](WarpExchange& s) { ldmatrix_gather<NUM, TRANS>(*current_block(), s); });
  for (int i = 0; i < NUM; ++i) r[i] = slot.result[me][i];
}

// Lands every pending copy of ``fiber`` whose group is below ``group_end``.
inline void land_copies(Block& block, Fiber& fiber, uint64_t group_end) {
  if (fiber.pending.empty() || fiber.pending.front().group >= group_end) return;
  flush_plain_stores(block, block.current >> 5);  // this step's stores so far are not the copies'
  size_t kept = 0;
  for (size_t i = 0; i < fiber.pending.size(); ++i) {
    PendingCopy& c = fiber.pending[i];
    if (c.group < group_end) {
      track_write(block, block.current, c.dst, true);
      memcpy(c.dst, c.bytes, 16);
      if (block.track_plain) memcpy(block.snapshot.data() + (c.dst - block.shared_base), c.bytes, 16);
    } else {
      fiber.pending[kept++] = c;
    }
  }
  fiber.pending.resize(kept);
}

#if MGF_EMULATION_HAS_SOURCE_LOCATION
using SourceLocation = std::source_location;
#define MGF_EMULATION_HERE = std::source_location::current()
#else
struct SourceLocation {
  static constexpr uint32_t line() { return 0; }
};
#define MGF_EMULATION_HERE = ::metagpt_fast::attention::emulation::SourceLocation()
#endif

// The test hooks set at run time: $MGF_EMULATION_DROP_SYNC_LINE, $MGF_EMULATION_DROP_WAIT_LINE and
// $MGF_EMULATION_DROP_FILE, read once (so one build serves every removed line; set them before the first launch).
struct DropHooks {
  uint32_t sync_line = 0, wait_line = 0;  // 0: none
  const char* file = "";                  // a path suffix; "" matches any file
};

inline const DropHooks& drop_hooks() {
  static const DropHooks hooks = [] {
    DropHooks h;
    if (const char* v = getenv("MGF_EMULATION_DROP_SYNC_LINE")) h.sync_line = static_cast<uint32_t>(atoi(v));
    if (const char* v = getenv("MGF_EMULATION_DROP_WAIT_LINE")) h.wait_line = static_cast<uint32_t>(atoi(v));
    if (const char* v = getenv("MGF_EMULATION_DROP_FILE")) h.file = v;
    return h;
  }();
  return hooks;
}

inline bool path_ends_with(const char* path, const char* suffix) {
  const size_t n = strlen(path), m = strlen(suffix);
  return n >= m && strcmp(path + n - m, suffix) == 0;
}

// Whether ``where`` is on ``line`` of the file the hooks name (MGF_EMULATION_DROP_FILE: a string literal at compile
// time, or the environment variable; any file when neither names one).
inline bool hook_matches(const SourceLocation& where, uint32_t line) {
#if MGF_EMULATION_HAS_SOURCE_LOCATION
  if (line == 0 || where.line() != line) return false;
#if defined(MGF_EMULATION_DROP_FILE)
  if (!path_ends_with(where.file_name(), MGF_EMULATION_DROP_FILE)) return false;
#endif
  return path_ends_with(where.file_name(), drop_hooks().file);
#else
  (void)where;
  (void)line;
  return false;
#endif
}

inline bool dropped_sync(const SourceLocation& where) {
#if defined(MGF_EMULATION_DROP_SYNC_LINE)
  if (hook_matches(where, MGF_EMULATION_DROP_SYNC_LINE)) return true;
#endif
  return hook_matches(where, drop_hooks().sync_line);
}

inline bool dropped_wait(const SourceLocation& where) {
#if defined(MGF_EMULATION_DROP_WAIT_LINE)
  if (hook_matches(where, MGF_EMULATION_DROP_WAIT_LINE)) return true;
#endif
  return hook_matches(where, drop_hooks().wait_line);
}

}  // namespace emulation

using std::min;  // the kernels call CUDA's integer min()

inline int thread_index() { return emulation::current_block()->current; }
inline int block_index_x() { return emulation::current_block()->index.x; }
inline int block_index_y() { return emulation::current_block()->index.y; }
inline int block_index_z() { return emulation::current_block()->index.z; }
inline char* dynamic_shared_memory() { return emulation::current_block()->shared_base; }

inline void block_sync(emulation::SourceLocation where MGF_EMULATION_HERE) {
  using namespace emulation;
  if (dropped_sync(where)) return;
  Block& block = *current_block();
  if (++block.block_arrived == block.threads) {
    flush_plain_stores(block, block.current >> 5);  // this step's stores belong to the epoch that ends here
    block.block_arrived = 0;
    ++block.epoch;
    for (Fiber& f : block.fibers) {
      if (f.state == FiberState::kWaitBlock) f.state = FiberState::kRunnable;
    }
    return;
  }
  block.fibers[block.current].state = FiberState::kWaitBlock;
  yield_to_scheduler();
}

// __syncwarp: a warp collective with no operands (every lane's earlier writes are done before any lane goes on).
inline void warp_sync() { emulation::warp_collective(emulation::kWarpSync, [](emulation::WarpExchange&) {}); }

inline float warp_shfl_xor(float value, int mask) {
  using namespace emulation;
  WarpExchange& slot = warp_slot();
  slot.value[lane()] = value;
  warp_collective(kShuffle, [](WarpExchange&) {});
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
  warp_collective(kMma, [](WarpExchange&) {});
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

// cp.async.cg.shared.global of 16 bytes, queued in this thread's open group; lands at the wait that retires it.
inline void cp_async_16(void* shared_dst, const void* global_src, bool valid) {
  using namespace emulation;
  Block& block = *current_block();
  char* dst = static_cast<char*>(shared_dst);
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || !in_shared(block, dst, 16)) {
    char message[200];
    snprintf(message, sizeof message,
             "cp_async_16 by thread %d of block (%d, %d, %d): destination %p is not 16 aligned bytes of the block's "
             "shared memory",
             block.current, block.index.x, block.index.y, block.index.z, shared_dst);
    fail(message);
  }
  PendingCopy copy;
  copy.dst = dst;
  copy.group = current_fiber().committed;
  if (valid) {
    if (reinterpret_cast<uintptr_t>(global_src) % 16 != 0 || in_shared(block, global_src, 1)) {
      char message[200];
      snprintf(message, sizeof message,
               "cp_async_16 by thread %d of block (%d, %d, %d): source %p is not a 16-byte aligned global address",
               block.current, block.index.x, block.index.y, block.index.z, global_src);
      fail(message);
    }
    memcpy(copy.bytes, global_src, 16);
  } else {
    memset(copy.bytes, 0, 16);
  }
  track_write(block, block.current, dst, false);
  current_fiber().pending.push_back(copy);
}

inline void cp_async_commit() { ++emulation::current_fiber().committed; }

// Lands this thread's copies of every committed group but the newest N.
template <int N>
inline void cp_async_wait(emulation::SourceLocation where MGF_EMULATION_HERE) {
  using namespace emulation;
  static_assert(N >= 0, "cp.async.wait_group N >= 0");
  if (dropped_wait(where)) return;
  Fiber& f = current_fiber();
  if (f.committed >= static_cast<uint64_t>(N)) land_copies(*current_block(), f, f.committed - N);
}

// Lands every copy of this thread, committed or not (wait_all also closes the open group).
inline void cp_async_wait_all(emulation::SourceLocation where MGF_EMULATION_HERE) {
  using namespace emulation;
  if (dropped_wait(where)) return;
  Fiber& f = current_fiber();
  ++f.committed;
  land_copies(*current_block(), f, f.committed);
}

inline void ldmatrix_x1(uint32_t (&r)[1], const void* row) { emulation::ldmatrix<1, false>(r, row); }
inline void ldmatrix_x2(uint32_t (&r)[2], const void* row) { emulation::ldmatrix<2, false>(r, row); }
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { emulation::ldmatrix<4, false>(r, row); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) { emulation::ldmatrix<2, true>(r, row); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { emulation::ldmatrix<4, true>(r, row); }

// ex2.approx.ftz.f32: exp2f with a denormal result flushed to zero (the input is flushed too).
inline float fast_exp2(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.0f;
  const float y = exp2f(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}

}  // namespace attention
}  // namespace metagpt_fast
