// Shared-memory tiles of the attention kernels: a swizzled layout, cp.async loads into it, ldmatrix fragment loads
// out of it, and the quad reductions and fp32 fragment stores the kernels share.
//
// Layout. A ROWS x D tile of 16-bit elements is stored row-major without padding; each row is D / 8 chunks of 16
// bytes, and chunk c of row r sits at chunk position c ^ (r & 7). An ldmatrix reads 8 rows of one 16-byte chunk
// column: the XOR puts those 8 chunks at 8 different positions, i.e. in 8 disjoint groups of 4 banks (the row pitch
// is a multiple of 128 bytes), so every 8x8 matrix load and every 16-byte store is free of bank conflicts.
//
// Fragments (warp_primitives.cuh has the mma.m16n8k16 layouts; g = lane / 4, t = lane % 4). ldmatrix.x4 loads four
// 8x8 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and matrix i lands in register i:
//   A from a row-major tile (tile[m][k]):      matrices (m 0-7, k 0-7) (m 8-15, k 0-7) (m 0-7, k 8-15) (m 8-15, k 8-15)
//   A from a k-major tile (tile[k][m]), .trans: the same four, read from their transposed positions
//   B from an n-major tile (tile[n][k]):       (n 0-7, k 0-7) (n 0-7, k 8-15) (n 8-15, k 0-7) (n 8-15, k 8-15)
//                                               = b of n-block 0, then b of n-block 1
//   B from a k-major tile (tile[k][n]), .trans: (k 0-7, n 0-7) (k 8-15, n 0-7) (k 0-7, n 8-15) (k 8-15, n 8-15)
#pragma once

#include <stdint.h>

#include "warp_primitives.cuh"

namespace metagpt_fast {
namespace attention {

// Element offset of 16-byte chunk ``chunk`` of row ``row`` in a swizzled tile with D columns.
template <int D>
MGF_DEV int swizzled_offset(int row, int chunk) {
  constexpr int CHUNKS = D / 8;
  constexpr int MASK = (CHUNKS < 8 ? CHUNKS : 8) - 1;
  static_assert(D % 8 == 0 && (CHUNKS & (CHUNKS - 1)) == 0, "rows are a power-of-two number of 16-byte chunks");
  return row * D + ((chunk ^ (row & MASK)) << 3);
}

// Element offset of (row, col) in a swizzled tile with D columns.
template <int D>
MGF_DEV int swizzled_index(int row, int col) {
  return swizzled_offset<D>(row, col >> 3) + (col & 7);
}

// Issues (does not commit) the cp.async copies of rows [row0, row0 + ROWS) of a row-major (n_rows, D) matrix with
// row stride ``row_stride`` (elements; rows 16-byte aligned) into a swizzled tile. Rows at or past ``n_rows`` are
// zero-filled without reading global memory. All THREADS threads of the block call it.
template <int ROWS, int D, int THREADS, typename T>
MGF_DEV void load_tile_async(T* tile, const T* matrix, int64_t row_stride, int row0, int n_rows, int tid) {
  constexpr int CHUNKS = D / 8;
  constexpr int TOTAL = ROWS * CHUNKS;
  constexpr int ITERS = (TOTAL + THREADS - 1) / THREADS;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int c = tid + it * THREADS;
    if (TOTAL % THREADS != 0 && c >= TOTAL) break;
    const int r = c / CHUNKS, chunk = c % CHUNKS;
    const bool valid = row0 + r < n_rows;
    const T* src = valid ? matrix + static_cast<int64_t>(row0 + r) * row_stride + chunk * 8 : matrix;
    cp_async_16(tile + swizzled_offset<D>(r, chunk), src, valid);
  }
}

// A fragment of the 16x16 block at (row0, col0) of a row-major swizzled tile (col0 a multiple of 16).
template <int D, typename T>
MGF_DEV void ldsm_a(uint32_t (&a)[4], const T* tile, int row0, int col0, int lane) {
  const int row = row0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int chunk = (col0 >> 3) + (lane >> 4);
  ldmatrix_x4(a, tile + swizzled_offset<D>(row, chunk));
}

// A fragment of the 16x16 block A(m0.., k0..) where A(m, k) = tile[k][m] (a k-major swizzled tile; m0 a multiple of
// 16).
template <int D, typename T>
MGF_DEV void ldsm_a_trans(uint32_t (&a)[4], const T* tile, int m0, int k0, int lane) {
  const int row = k0 + (lane & 7) + (lane >> 4) * 8;
  const int chunk = (m0 >> 3) + ((lane >> 3) & 1);
  ldmatrix_x4_trans(a, tile + swizzled_offset<D>(row, chunk));
}

// B fragments of the n-blocks [n0, n0 + 8) (b0) and [n0 + 8, n0 + 16) (b1) at k-step [k0, k0 + 16) where
// B(k, n) = tile[n][k] (an n-major swizzled tile, e.g. K for S = Q K^T; k0 a multiple of 16).
template <int D, typename T>
MGF_DEV void ldsm_b(uint32_t (&b0)[2], uint32_t (&b1)[2], const T* tile, int n0, int k0, int lane) {
  const int row = n0 + (lane & 7) + (lane >> 4) * 8;
  const int chunk = (k0 >> 3) + ((lane >> 3) & 1);
  uint32_t r[4];
  ldmatrix_x4(r, tile + swizzled_offset<D>(row, chunk));
  b0[0] = r[0];
  b0[1] = r[1];
  b1[0] = r[2];
  b1[1] = r[3];
}

// B fragments of the n-blocks [n0, n0 + 8) (b0) and [n0 + 8, n0 + 16) (b1) at k-step [k0, k0 + 16) where
// B(k, n) = tile[k][n] (a k-major swizzled tile, e.g. V for O = P V; n0 a multiple of 16).
template <int D, typename T>
MGF_DEV void ldsm_b_trans(uint32_t (&b0)[2], uint32_t (&b1)[2], const T* tile, int k0, int n0, int lane) {
  const int row = k0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int chunk = (n0 >> 3) + (lane >> 4);
  uint32_t r[4];
  ldmatrix_x4_trans(r, tile + swizzled_offset<D>(row, chunk));
  b0[0] = r[0];
  b0[1] = r[1];
  b1[0] = r[2];
  b1[1] = r[3];
}

// Sum / max over the four lanes of a quad (the lanes holding one row of a C fragment).
MGF_DEV float quad_max(float x) {
  x = fmaxf(x, warp_shfl_xor(x, 1));
  return fmaxf(x, warp_shfl_xor(x, 2));
}

MGF_DEV float quad_sum(float x) {
  x += warp_shfl_xor(x, 1);
  return x + warp_shfl_xor(x, 2);
}

// Stores 16 rows x D of fp32 C fragments (rows row_lo and row_lo + 8 of this lane), times ``factor[r]``, to a
// row-major global matrix; rows at or past n_rows are skipped.
template <int D, typename T>
MGF_DEV void store_rows(T* matrix, int64_t row_stride, const float (&acc)[D / 8][4], int row_lo, int n_rows,
                        const float (&factor)[2], int lane) {
  const int t = lane & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_lo + 8 * r;
    if (row < n_rows) {
      T* dst = matrix + row * row_stride + 2 * t;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        *reinterpret_cast<uint32_t*>(dst + dn * 8) =
            pack2_float<T>(acc[dn][2 * r] * factor[r], acc[dn][2 * r + 1] * factor[r]);
      }
    }
  }
}

}  // namespace attention
}  // namespace metagpt_fast
