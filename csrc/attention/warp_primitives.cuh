// The few warp-level primitives the attention kernels use, in one place.
//
// The kernels touch hardware only through these functions (thread/block indices, __syncthreads, __syncwarp, a shuffle
// inside a quad of lanes, the m16n8k16 tensor-core mma, ldmatrix, cp.async, ex2.approx and fp16/bf16 packing). Shared
// memory is read and written with plain loads and stores, or through ldmatrix and cp.async below — so the kernels are
// also plain C++: compiled with MGF_ATTENTION_EMULATION defined (by a host compiler), attention_emulation.h supplies
// these primitives by running every CUDA thread of a block as a fiber on the CPU, and the test suite executes the real
// kernel code without a GPU (adversarially: seeded warp schedules, cp.async landing only at its wait, a race detector).
//
// Fragment layout of mma.sync.aligned.m16n8k16.row.col (PTX ISA, "Matrix fragments for mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4; each 32-bit register holds two consecutive elements, lower index in the low half:
//   A (16x16, row major): a[0] = (g, 2t..2t+1)  a[1] = (g+8, 2t..2t+1)  a[2] = (g, 2t+8..)  a[3] = (g+8, 2t+8..)
//   B (16x8, k x n):      b[0] = (k 2t..2t+1, n g)   b[1] = (k 2t+8..2t+9, n g)
//   C (16x8, fp32):       c[0], c[1] = (g, 2t), (g, 2t+1)    c[2], c[3] = (g+8, 2t), (g+8, 2t+1)
// So the C fragments of two neighbouring 16x8 tiles are exactly an A fragment of a 16x16 tile (used for P @ V).
#pragma once

#include <stdint.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(MGF_ATTENTION_EMULATION)
#include "attention_emulation.h"
#else

#define MGF_KERNEL __global__
#define MGF_DEV __device__ __forceinline__
#define MGF_LAUNCH_BOUNDS(threads, min_blocks) __launch_bounds__(threads, min_blocks)

namespace metagpt_fast {
namespace attention {

MGF_DEV int thread_index() { return threadIdx.x; }
MGF_DEV int block_index_x() { return blockIdx.x; }
MGF_DEV int block_index_y() { return blockIdx.y; }
MGF_DEV int block_index_z() { return blockIdx.z; }
MGF_DEV void block_sync() { __syncthreads(); }
// __syncwarp(): the lanes of this warp see each other's shared-memory writes made before it (every lane must call it).
MGF_DEV void warp_sync() { __syncwarp(0xffffffffu); }

// Exchange with the lane whose index is lane ^ mask (mask 1, 2: inside the quad of lanes sharing a C row).
MGF_DEV float warp_shfl_xor(float value, int mask) { return __shfl_xor_sync(0xffffffffu, value, mask); }

MGF_DEV char* dynamic_shared_memory() {
  extern __shared__ __align__(16) char shared_storage[];
  return shared_storage;
}

template <typename T>
MGF_DEV void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
MGF_DEV void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
MGF_DEV void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ---- asynchronous global -> shared copies (sm_80+), PTX ISA "cp.async" / "cp.async.commit_group" /
// "cp.async.wait_group". A copy is visible to the issuing thread only after the wait that retires its group, and to
// other threads only after that wait AND a block_sync(); the emulation enforces exactly that.

// cp.async.cg.shared.global, 16 bytes (both addresses 16-byte aligned). valid == false: src-size 0, so the 16 shared
// bytes are zero-filled and global_src is not read (it may point anywhere, e.g. past the end of a tensor).
MGF_DEV void cp_async_16(void* shared_dst, const void* global_src, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(shared_dst));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global_src), "r"(src_bytes)
               : "memory");
}

// Closes this thread's current group of copies (cp.async.commit_group); an empty group is allowed.
MGF_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's most recent committed groups are pending (cp.async.wait_group N).
// Copies issued after the last commit are not waited for.
template <int N>
MGF_DEV void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Waits for every copy of this thread, committed or not (cp.async.wait_all).
MGF_DEV void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// ---- ldmatrix (sm_75+), PTX ISA "ldmatrix": warp-collective loads of 8x8 b16 matrices from shared memory.
// ``row`` is THIS lane's row address: lanes 8i..8i+7 give the 8 row addresses of matrix i (x1 uses lanes 0-7, x2
// lanes 0-15; the other lanes' addresses are ignored). Each row is 16 contiguous bytes, 16-byte aligned. Lane l
// receives in r[i] the elements (l/4, 2*(l%4)) and (l/4, 2*(l%4)+1) of matrix i, lower column in the low half;
// .trans: the elements (2*(l%4), l/4) and (2*(l%4)+1, l/4). Every lane of the warp must execute it (.sync.aligned).
// So an x4 over the four 8x8 quadrants of a row-major 16x16 tile (lanes 0-15: rows 0-15 at column 0, lanes 16-31:
// rows 0-15 at column 8) gives exactly the mma A fragment a[0..3]; an x2 over a B tile stored n-major (row n holds
// k contiguous, as K for Q K^T; lanes 0-7: n 0-7 at k 0, lanes 8-15: n 0-7 at k 8) gives b[0..1]; and an x2 .trans
// over a B tile stored k-major (row k holds n contiguous, as V for P V; lanes 0-15: rows k 0-15) gives b[0..1].

MGF_DEV uint32_t shared_address(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

MGF_DEV void ldmatrix_x1(uint32_t (&r)[1], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(shared_address(row)));
}

MGF_DEV void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(shared_address(row)));
}

MGF_DEV void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}

MGF_DEV void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(shared_address(row)));
}

MGF_DEV void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}

// 2^x, ex2.approx.ftz.f32 (max relative error 2^-22; denormal inputs and results flushed to zero).
MGF_DEV float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace attention
}  // namespace metagpt_fast

#endif  // MGF_ATTENTION_EMULATION

namespace metagpt_fast {
namespace attention {

// Element conversions, identical on the device and in the emulation (cuda_fp16.h / cuda_bf16.h are host-usable).
template <typename T>
struct Element;

template <>
struct Element<__half> {
  static MGF_DEV float to_float(__half x) { return __half2float(x); }
  static MGF_DEV __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct Element<__nv_bfloat16> {
  static MGF_DEV float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static MGF_DEV __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// Two elements in one 32-bit register, ``lo`` in the low half (the mma operand layout).
template <typename T>
MGF_DEV uint32_t pack2(T lo, T hi) {
  const uint32_t l = *reinterpret_cast<const uint16_t*>(&lo);
  const uint32_t h = *reinterpret_cast<const uint16_t*>(&hi);
  return l | (h << 16);
}

template <typename T>
MGF_DEV uint32_t pack2_float(float lo, float hi) {
  return pack2<T>(Element<T>::from_float(lo), Element<T>::from_float(hi));
}

// Loads the element pair (p[0], p[STRIDE]) of a shared-memory tile as one mma register: one 32-bit load when the
// pair is contiguous, two 16-bit loads otherwise (pairs that run down a column).
template <int STRIDE, typename T>
MGF_DEV uint32_t load_pair(const T* p) {
  if constexpr (STRIDE == 1) {
    return *reinterpret_cast<const uint32_t*>(p);
  } else {
    return pack2<T>(p[0], p[STRIDE]);
  }
}

// A fragment of the 16x16 block at ``tile`` of a shared tile whose row r, column c is tile[r * ROW + c * COL].
template <int ROW, int COL, typename T>
MGF_DEV void load_a(uint32_t (&a)[4], const T* tile, int lane) {
  const int g = lane >> 2, t = lane & 3;
  a[0] = load_pair<COL>(tile + g * ROW + (2 * t) * COL);
  a[1] = load_pair<COL>(tile + (g + 8) * ROW + (2 * t) * COL);
  a[2] = load_pair<COL>(tile + g * ROW + (2 * t + 8) * COL);
  a[3] = load_pair<COL>(tile + (g + 8) * ROW + (2 * t + 8) * COL);
}

// B fragment of the 16x8 (k x n) block at ``tile`` of a shared tile whose element (k, n) is tile[k * K + n * N].
template <int K, int N, typename T>
MGF_DEV void load_b(uint32_t (&b)[2], const T* tile, int lane) {
  const int g = lane >> 2, t = lane & 3;
  b[0] = load_pair<K>(tile + (2 * t) * K + g * N);
  b[1] = load_pair<K>(tile + (2 * t + 8) * K + g * N);
}

// A fragment of a 16x16 tile from the fp32 C fragments of its two 16x8 halves (columns 0-7 and 8-15).
template <typename T>
MGF_DEV void c_to_a(uint32_t (&a)[4], const float (&left)[4], const float (&right)[4]) {
  a[0] = pack2_float<T>(left[0], left[1]);
  a[1] = pack2_float<T>(left[2], left[3]);
  a[2] = pack2_float<T>(right[0], right[1]);
  a[3] = pack2_float<T>(right[2], right[3]);
}

}  // namespace attention
}  // namespace metagpt_fast
