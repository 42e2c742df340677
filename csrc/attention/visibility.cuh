// Which keys a query sees: the one place that decides it, for the forward and the backward kernels alike.
//
// Key j is visible to query i when both exist (i < n_q, j < n_k: padding rows and columns of a tile never are),
// j - (i + offset) lies in [-left, right] (a side at -1 is unbounded; offset = n_k - n_q for bottom-right aligned
// windows, else 0; causal is right = 0), and the boolean mask, if any, is true at (i, j). The range helpers bound
// the key tiles a query tile can see (and the query tiles a key tile is seen by) by the window alone, so a window of
// w costs O(N w): tiles outside it are skipped by the loop bounds, not masked element by element.
#pragma once

#include <stdint.h>

#include "attention_params.h"
#include "warp_primitives.cuh"

namespace metagpt_fast {
namespace attention {

MGF_DEV int int_min(int a, int b) { return a < b ? a : b; }
MGF_DEV int int_max(int a, int b) { return a > b ? a : b; }
MGF_DEV int clamp_to(int x, int hi) { return int_min(int_max(x, 0), hi); }

struct Visibility {
  int n_q, n_k;
  int left, right;  // window sides, -1: unbounded
  int offset;       // key aligned with query i is i + offset
  const bool* mask;  // already offset to (batch, head), or null
  int64_t mask_stride_q, mask_stride_k;

  // The window test alone (no bounds, no mask): is j - (i + offset) in [-left, right]?
  MGF_DEV bool in_window(int i, int j) const {
    const int rel = j - (i + offset);
    return (right < 0 || rel <= right) && (left < 0 || rel >= -left);
  }

  MGF_DEV bool operator()(int i, int j) const {
    bool visible = i < n_q && j < n_k && in_window(i, j);
    if (visible && mask != nullptr) visible = mask[i * mask_stride_q + j * mask_stride_k];
    return visible;
  }

  // Keys [key_begin(i0), key_end(i1)) hold every key the window lets some query of [i0, i1) see (empty when
  // key_begin >= key_end). Queries [query_begin(j0), query_end(j1)) likewise for the keys [j0, j1).
  MGF_DEV int key_begin(int i0) const { return left < 0 ? 0 : clamp_to(i0 + offset - left, n_k); }
  MGF_DEV int key_end(int i1) const { return right < 0 ? n_k : clamp_to(i1 + offset + right, n_k); }
  MGF_DEV int query_begin(int j0) const { return right < 0 ? 0 : clamp_to(j0 - offset - right, n_q); }
  MGF_DEV int query_end(int j1) const { return left < 0 ? n_q : clamp_to(j1 - offset + left, n_q); }

  // Does every (i, j) of the tile [i0, i1) x [j0, j1) pass the window, bounds and mask tests without a per-element
  // check? (No mask, the tile inside [0, n_q) x [0, n_k), and its corners inside the window band.)
  MGF_DEV bool whole_tile(int i0, int i1, int j0, int j1) const {
    return mask == nullptr && i1 <= n_q && j1 <= n_k && (right < 0 || (j1 - 1) - (i0 + offset) <= right) &&
           (left < 0 || j0 - ((i1 - 1) + offset) >= -left);
  }
};

// The visibility of query head h of batch b; ``causal`` is window_right = 0.
MGF_DEV Visibility make_visibility(const AttentionParams& p, int b, int h) {
  const bool* mask = p.mask == nullptr ? nullptr : p.mask + b * p.mask_stride_batch + h * p.mask_stride_head;
  return Visibility{p.n_q,
                    p.n_k,
                    p.window_left,
                    p.causal ? 0 : p.window_right,
                    p.bottom_right ? p.n_k - p.n_q : 0,
                    mask,
                    p.mask_stride_q,
                    p.mask_stride_k};
}

}  // namespace attention
}  // namespace metagpt_fast
