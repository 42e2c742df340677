// Test-only kernels that check the CPU emulation of the warp primitives (attention_emulation.h) against the PTX
// semantics, and show that it catches the synchronisation mistakes a GPU punishes.
//
// Not part of the extension: tests/test_cuda_emulator.py compiles this file with a host compiler and
// -DMGF_ATTENTION_EMULATION -std=c++20 into a shared library and calls the entry points below through ctypes. The
// kernels are written against warp_primitives.cuh exactly as the attention kernels are. Entry points return 0, or
// abort with an "emulation: ..." message when the emulation detects an error (tests run those in a subprocess).
#include <stdint.h>
#include <string.h>

#include "warp_primitives.cuh"

namespace {

namespace em = metagpt_fast::attention::emulation;
using namespace metagpt_fast::attention;

// ---- ldmatrix: fragment layouts ----------------------------------------------------------------------------------
// A 16x16 tile of raw 16-bit values (r << 8) | c at pitch 24 (48-byte rows, 16-byte aligned) in shared memory.
constexpr int kPitch = 24;

// Row address of lane ``lane`` for an ldmatrix over the four 8x8 quadrants of the tile in mma A order: lanes 8i..8i+7
// address matrix i = rows 8 (i % 2) .. +7 at column 8 (i / 2). Lanes past 8 * num get an address the instruction must
// ignore (misaligned, outside shared memory).
const void* quadrant_row(const uint16_t* tile, int lane, int num) {
  if (lane >= 8 * num) return reinterpret_cast<const void*>(uintptr_t{1});
  return tile + (lane % 16) * kPitch + 8 * (lane / 16);
}

struct LdmatrixArgs {
  uint32_t* out;    // [5 variants][32 lanes][4]: x1, x2, x4, x2.trans, x4.trans
  int* mismatches;  // [3]: ldmatrix_x4 vs load_a, x2 vs load_b (n-major), x2_trans vs load_b (k-major)
};

MGF_KERNEL void ldmatrix_kernel(const LdmatrixArgs args) {
  uint16_t* tile = reinterpret_cast<uint16_t*>(dynamic_shared_memory());
  const int lane = thread_index();
  if (lane < 16) {
    for (int c = 0; c < 16; ++c) tile[lane * kPitch + c] = static_cast<uint16_t>((lane << 8) | c);
  }
  block_sync();
  uint32_t* out = args.out + lane * 4;
  uint32_t r1[1], r2[2], r4[4], t2[2], t4[4];
  ldmatrix_x1(r1, quadrant_row(tile, lane, 1));
  ldmatrix_x2(r2, quadrant_row(tile, lane, 2));
  ldmatrix_x4(r4, quadrant_row(tile, lane, 4));
  ldmatrix_x2_trans(t2, quadrant_row(tile, lane, 2));
  ldmatrix_x4_trans(t4, quadrant_row(tile, lane, 4));
  out[0] = r1[0];
  for (int i = 0; i < 2; ++i) out[128 + i] = r2[i];
  for (int i = 0; i < 4; ++i) out[256 + i] = r4[i];
  for (int i = 0; i < 2; ++i) out[384 + i] = t2[i];
  for (int i = 0; i < 4; ++i) out[512 + i] = t4[i];

  // The mma fragments: A of the row-major tile; B (k x n, 16 x 8) stored n-major (element (k, n) at tile[n][k], rows
  // n 0-7: lanes 0-7 at k 0, lanes 8-15 at k 8) and stored k-major (element (k, n) at tile[k][n], lanes 0-15: rows k).
  const __half* h = reinterpret_cast<const __half*>(tile);
  uint32_t a[4], b_n[2], b_k[2], ld_b_n[2], ld_b_k[2];
  load_a<kPitch, 1>(a, h, lane);
  load_b<1, kPitch>(b_n, h, lane);
  load_b<kPitch, 1>(b_k, h, lane);
  ldmatrix_x2(ld_b_n, tile + (lane % 8) * kPitch + 8 * ((lane / 8) % 2));
  ldmatrix_x2_trans(ld_b_k, tile + (lane % 16) * kPitch);
  int bad[3] = {0, 0, 0};
  for (int i = 0; i < 4; ++i) bad[0] += a[i] != r4[i];
  for (int i = 0; i < 2; ++i) bad[1] += b_n[i] != ld_b_n[i];
  for (int i = 0; i < 2; ++i) bad[2] += b_k[i] != ld_b_k[i];
  for (int i = 0; i < 3; ++i) args.mismatches[i] += bad[i];  // fibers of one block never run concurrently
}

// ---- cp.async: landing only at the wait --------------------------------------------------------------------------
struct CopyArgs {
  const unsigned char* src;  // [2][64 threads][16]
  unsigned char* out;        // [64 threads][5 points][3 rows][16]: what the thread sees of its three rows
};

MGF_KERNEL void cp_async_kernel(const CopyArgs args) {
  unsigned char* shared = reinterpret_cast<unsigned char*>(dynamic_shared_memory());
  const int tid = thread_index();
  unsigned char* rows[3] = {shared + 16 * tid, shared + 16 * (64 + tid), shared + 16 * (128 + tid)};
  unsigned char* out = args.out + tid * 5 * 3 * 16;
  auto observe = [&](int point) {
    for (int r = 0; r < 3; ++r) memcpy(out + (point * 3 + r) * 16, rows[r], 16);
  };
  cp_async_16(rows[0], args.src + 16 * tid, true);
  cp_async_commit();  // group 0: row 0
  cp_async_16(rows[1], args.src + 16 * (64 + tid), true);
  cp_async_commit();                       // group 1: row 1
  cp_async_16(rows[2], nullptr, false);    // zero-fill, never committed: the source is not read
  observe(0);                              // nothing landed: the 0xff fill
  cp_async_wait<1>();
  observe(1);  // group 0 landed, group 1 pending
  cp_async_wait<0>();
  observe(2);  // groups 0 and 1 landed; the uncommitted zero-fill is not waited for
  cp_async_wait_all();
  observe(3);  // everything landed
  block_sync();
  // Another warp's rows, after its wait and a barrier.
  const int other = tid ^ 32;
  for (int r = 0; r < 3; ++r) rows[r] = shared + 16 * (64 * r + other);
  observe(4);
}

// ---- a missing barrier: plain shared-memory stores read by the other warp (of two) --------------------------------
struct BarrierArgs {
  int with_barrier;
  float* out;  // [64]
};

MGF_KERNEL void barrier_kernel(const BarrierArgs args) {
  float* shared = reinterpret_cast<float*>(dynamic_shared_memory());
  const int tid = thread_index();
  shared[tid] = static_cast<float>(tid + 1);
  float x = warp_shfl_xor(static_cast<float>(tid), 1);  // collectives: points where another warp may run
  x = warp_shfl_xor(x, 2);
  if (args.with_barrier) block_sync();
  args.out[tid] = shared[tid ^ 32] + 0.0f * x;  // the partner warp's value
}

// ---- intra-warp: each lane reads its neighbour's plain store, after warp_sync() or not ----------------------------
MGF_KERNEL void warp_sync_kernel(const BarrierArgs args) {
  float* shared = reinterpret_cast<float*>(dynamic_shared_memory());
  const int lane = thread_index();
  shared[lane] = static_cast<float>(lane + 1);
  if (args.with_barrier) warp_sync();
  args.out[lane] = shared[(lane + 1) % 32];
}

// ---- plain stores read by another warp's ldmatrix, after a block_sync() or not ----------------------------------
MGF_KERNEL void plain_store_kernel(const BarrierArgs args) {
  uint16_t* tiles = reinterpret_cast<uint16_t*>(dynamic_shared_memory());  // two 16x16 tiles, one per warp
  const int tid = thread_index(), lane = tid & 31, warp = tid >> 5;
  for (int e = lane; e < 256; e += 32) tiles[warp * 256 + e] = static_cast<uint16_t>(e + 1);
  if (args.with_barrier) block_sync();
  uint32_t r[4];
  ldmatrix_x4(r, tiles + (1 - warp) * 256 + (lane % 16) * 16 + 8 * (lane / 16));  // the other warp's tile
  args.out[tid] = static_cast<float>(r[0] & 0xffffu);
}

// ---- a cp.async pipeline: C = A B with double-buffered tiles, ldmatrix and mma ----------------------------------
// A (64 x K) and B (K x 32) row major, fp16, K a multiple of 8; 128 threads, warp w computes C rows 16w..16w+15.
// K tiles of 32; the last tile is partly past K and zero-filled (valid == false).
constexpr int kTileK = 32, kRowsA = 64, kColsB = 32, kPitchTile = kTileK + 8;  // 80-byte rows

struct PipelineArgs {
  const __half* a;
  const __half* b;
  float* c;  // [64][32]
  int k;
};

void load_tiles(const PipelineArgs& p, __half* sa, __half* sb, int tile, int tid) {
  const int k0 = tile * kTileK;
  for (int chunk = tid; chunk < kRowsA * kTileK / 8; chunk += 128) {  // A: 64 rows x 4 chunks of 8
    const int row = chunk / 4, col = (chunk % 4) * 8;
    const bool valid = k0 + col < p.k;
    cp_async_16(sa + row * kPitchTile + col, valid ? p.a + row * p.k + k0 + col : p.a, valid);
  }
  for (int chunk = tid; chunk < kTileK * kColsB / 8; chunk += 128) {  // B: 32 k-rows x 4 chunks of 8
    const int row = chunk / 4, col = (chunk % 4) * 8;
    const bool valid = k0 + row < p.k;
    cp_async_16(sb + row * kPitchTile + col, valid ? p.b + (k0 + row) * kColsB + col : p.b, valid);
  }
}

MGF_KERNEL void pipeline_kernel(const PipelineArgs p) {
  __half* sa[2];
  __half* sb[2];
  sa[0] = reinterpret_cast<__half*>(dynamic_shared_memory());
  sa[1] = sa[0] + kRowsA * kPitchTile;
  sb[0] = sa[1] + kRowsA * kPitchTile;
  sb[1] = sb[0] + kTileK * kPitchTile;
  const int tid = thread_index(), lane = tid & 31, warp = tid >> 5;
  const int tiles = (p.k + kTileK - 1) / kTileK;
  float acc[kColsB / 8][4] = {};
  load_tiles(p, sa[0], sb[0], 0, tid);
  cp_async_commit();
  for (int t = 0; t < tiles; ++t) {
    if (t + 1 < tiles) load_tiles(p, sa[(t + 1) % 2], sb[(t + 1) % 2], t + 1, tid);
    cp_async_commit();  // possibly empty
    cp_async_wait<1>();  // PIPELINE_WAIT: tile t landed (this thread's copies)
    block_sync();        // PIPELINE_SYNC_AFTER_WAIT: every thread's copies of tile t visible
    const __half* a = sa[t % 2] + warp * 16 * kPitchTile;
    const __half* b = sb[t % 2];
    for (int kk = 0; kk < kTileK; kk += 16) {
      uint32_t af[4];
      ldmatrix_x4(af, a + (lane % 16) * kPitchTile + kk + 8 * (lane / 16));
      for (int nt = 0; nt < kColsB / 8; nt += 2) {  // two 8-column B fragments per x4.trans
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, b + (kk + lane % 16) * kPitchTile + nt * 8 + 8 * (lane / 16));
        const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
        mma_16816<__half>(acc[nt], af, b0);
        mma_16816<__half>(acc[nt + 1], af, b1);
      }
    }
    block_sync();  // PIPELINE_SYNC_BEFORE_REFILL: every warp is done with buffer t % 2 before tile t + 2 refills it
  }
  cp_async_wait_all();  // nothing left (a dropped wait above lands its copies here, too late)
  const int g = lane >> 2, q = lane & 3;
  for (int nt = 0; nt < kColsB / 8; ++nt) {
    for (int e = 0; e < 4; ++e) {
      const int row = warp * 16 + g + 8 * (e >> 1), col = nt * 8 + 2 * q + (e & 1);
      p.c[row * kColsB + col] = acc[nt][e];
    }
  }
}

// ---- errors the emulation must refuse --------------------------------------------------------------------------
struct ErrorArgs {
  int which;
  const __half* src;
};

MGF_KERNEL void error_kernel(const ErrorArgs args) {
  char* shared = dynamic_shared_memory();
  const int lane = thread_index();
  uint32_t r[4];
  switch (args.which) {
    case 0:  // ldmatrix row not 16-byte aligned
      ldmatrix_x4(r, shared + lane * 16 + 8);
      break;
    case 1:  // a copy never waited for
      cp_async_16(shared + lane * 16, args.src + lane * 8, true);
      cp_async_commit();
      break;
    case 2:  // lanes of one warp at different collectives
      if (lane == 0) {
        warp_shfl_xor(1.0f, 1);
      } else {
        ldmatrix_x4(r, shared + lane * 16);
      }
      break;
    case 3:  // cp.async destination outside shared memory
      cp_async_16(const_cast<__half*>(args.src) + 64 * 8, args.src + lane * 8, true);
      cp_async_wait_all();
      break;
    default:
      break;
  }
}

}  // namespace

extern "C" {

void mgf_selftest_set_seed(uint64_t seed) { em::set_schedule_seed(seed); }

int mgf_selftest_ldmatrix(uint32_t* out, int* mismatches) {
  em::launch(&ldmatrix_kernel, em::Dim3{}, 32, 16 * kPitch * 2, LdmatrixArgs{out, mismatches});
  return 0;
}

int mgf_selftest_cp_async(const unsigned char* src, unsigned char* out) {
  em::launch(&cp_async_kernel, em::Dim3{}, 64, 3 * 64 * 16, CopyArgs{src, out});
  return 0;
}

int mgf_selftest_barrier(int with_barrier, float* out) {
  em::launch(&barrier_kernel, em::Dim3{}, 64, 64 * sizeof(float), BarrierArgs{with_barrier, out});
  return 0;
}

int mgf_selftest_warp_sync(int with_sync, float* out) {
  em::launch(&warp_sync_kernel, em::Dim3{}, 32, 32 * sizeof(float), BarrierArgs{with_sync, out});
  return 0;
}

int mgf_selftest_plain_store(int with_barrier, float* out) {
  em::launch(&plain_store_kernel, em::Dim3{}, 64, 2 * 256 * sizeof(uint16_t), BarrierArgs{with_barrier, out});
  return 0;
}

int mgf_selftest_pipeline(const void* a, const void* b, float* c, int k) {
  if (k % 8 != 0 || k <= 0) return -1;
  const size_t shared = 2 * (kRowsA + kTileK) * kPitchTile * sizeof(__half);
  em::launch(&pipeline_kernel, em::Dim3{}, 128, shared,
             PipelineArgs{static_cast<const __half*>(a), static_cast<const __half*>(b), c, k});
  return 0;
}

int mgf_selftest_error(int which, const void* src) {
  em::launch(&error_kernel, em::Dim3{}, 32, 32 * 16, ErrorArgs{which, static_cast<const __half*>(src)});
  return 0;
}

float mgf_selftest_fast_exp2(float x) { return metagpt_fast::attention::fast_exp2(x); }

}  // extern "C"
