// Rotary pair rotation (Su et al. 2021, RoFormer): (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
//
// The backward pass is the rotation by -angle (the transpose of an orthogonal map): pass ``sin`` negated. Which
// features form a pair is the caller's business: (i, i + r/2) in the GPT-NeoX / Llama half-split layout, (2i, 2i+1)
// in the interleaved GPT-J layout.
#pragma once

#include "metagpt_fast/macros.h"

namespace metagpt_fast {

MGF_HOST_DEVICE MGF_INLINE void rotate_pair(float x1, float x2, float c, float s, float* y1, float* y2) {
  *y1 = x1 * c - x2 * s;
  *y2 = x2 * c + x1 * s;
}

// Index of the partner feature pair ``i`` (0 <= i < rotary_dim / 2): first and second element.
MGF_HOST_DEVICE MGF_INLINE int rotary_first(int i, int rotary_dim, bool interleaved) {
  return interleaved ? 2 * i : i;
}
MGF_HOST_DEVICE MGF_INLINE int rotary_second(int i, int rotary_dim, bool interleaved) {
  return interleaved ? 2 * i + 1 : i + rotary_dim / 2;
}

}  // namespace metagpt_fast
