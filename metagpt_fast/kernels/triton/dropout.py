"""In-kernel dropout shared by every Triton kernel: the Philox stream of ``ops/reference/random.py``.

``tl.randint(seed, offset)`` with an int64 offset is Philox-4x32-10 with key ``(seed_lo, seed_hi)`` and counter
``(offset_lo, offset_hi, 0, 0)`` — exactly the reference stream (checked by ``tests/test_dropout_stream.py``).
"""

import triton
import triton.language as tl


@triton.jit
def dropout_keep(seed, offsets, THRESHOLD):
    """True where the element at linear index ``offsets`` (int64) is kept: ``(word >> 8) >= THRESHOLD``."""
    word = tl.randint(seed, offsets.to(tl.int64)).to(tl.uint32, bitcast=True)
    return (word >> 8).to(tl.int32) >= THRESHOLD
