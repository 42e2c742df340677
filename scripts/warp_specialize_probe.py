"""Which forms of a causal attention forward triton warp-specialises on sm_90 (ahead of time, no GPU needed).

A minimal FlashAttention forward (Q, K, V and the output through tensor descriptors, 128x128 tiles, bfloat16,
D=128) whose key loops are ``tl.range(..., warp_specialize=True)``, compiled for sm_90 in five forms. For each it
prints whether the compile succeeded, whether the TTGIR holds a ``ttg.warp_specialize`` region (a producer
warpgroup and consumer warpgroups), and the warps the kernel launches with. With triton 3.8:

    two-loop         the unmasked loop then the diagonal loop, both marked: compiles, NOT specialised
    branch           one loop, the causal mask under ``if start_n >= full_end``: compiles, NOT specialised
    one-loop         one loop that masks every step: specialised (4 warps asked, 12 launched)
    one-loop-8warps  the same with 8 warps: compiles, NOT specialised
    q-pointer        one-loop with Q loaded by pointers: the compile fails in NVGPUWarpSpecialization,
                     "LLVM ERROR: unsupported load type for producer commit"

No form aborts the process with triton 3.8; the failures are silent (no specialisation) but for the last. This is why
the Triton attention forward's warp-specialised schedule (metagpt_fast/kernels/triton/attention.py, WARP_SPECIALIZE)
is one loop masking every step on 4-warp tiles, with Q read through a descriptor.

    python scripts/warp_specialize_probe.py          # TRITON_INTERPRET unset
"""

from __future__ import annotations

import os
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget


@triton.jit
def _inner(acc, l_i, m_i, q, k_desc, v_desc, rows, lo, hi, full_end, qk_scale, Nk,
           BLOCK_N: tl.constexpr, MASKED: tl.constexpr, FORM: tl.constexpr):  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        s = tl.dot(q, tl.trans(k_desc.load([start_n, 0]))) * qk_scale
        cols = start_n + offs_n
        visible = (rows[:, None] >= cols[None, :]) & (cols[None, :] < Nk)
        if FORM == 1:  # branch: the mask only on the diagonal steps
            if start_n >= full_end:
                s = tl.where(visible, s, float("-inf"))
        elif MASKED:
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v_desc.load([start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _forward(Q, K, V, Out, stride_n, Nq, Nk, qk_scale,
             D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FORM: tl.constexpr):  # fmt: skip
    """FORM 0: two loops; 1: one loop, mask under a branch; 2: one loop masking every step; 3: as 2, Q by pointers."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    q_off, kv_off = bh * Nq * stride_n, bh * Nk * stride_n
    k_desc = tl.make_tensor_descriptor(K + kv_off, [Nk, D], [stride_n, 1], [BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(V + kv_off, [Nk, D], [stride_n, 1], [BLOCK_N, D])
    o_desc = tl.make_tensor_descriptor(Out + q_off, [Nq, D], [stride_n, 1], [BLOCK_M, D])
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if FORM == 3:
        q = tl.load(Q + q_off + rows[:, None] * stride_n + tl.arange(0, D)[None, :], mask=rows[:, None] < Nq)
    else:
        q = tl.make_tensor_descriptor(Q + q_off, [Nq, D], [stride_n, 1], [BLOCK_M, D]).load([start_m * BLOCK_M, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    hi = tl.minimum(Nk, (start_m + 1) * BLOCK_M)
    full_end = tl.minimum((start_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N, Nk // BLOCK_N * BLOCK_N)
    if FORM == 0:
        acc, l_i, m_i = _inner(acc, l_i, m_i, q, k_desc, v_desc, rows, 0, full_end, full_end, qk_scale, Nk,
                               BLOCK_N, False, FORM)  # fmt: skip
        if full_end < hi:
            acc, l_i, m_i = _inner(acc, l_i, m_i, q, k_desc, v_desc, rows, full_end, hi, full_end, qk_scale, Nk,
                                   BLOCK_N, True, FORM)  # fmt: skip
    else:
        acc, l_i, m_i = _inner(acc, l_i, m_i, q, k_desc, v_desc, rows, 0, hi, full_end, qk_scale, Nk,
                               BLOCK_N, True, FORM)  # fmt: skip
    o_desc.store([start_m * BLOCK_M, 0], (acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]).to(Out.dtype.element_ty))


FORMS = {"two-loop": (0, 4), "branch": (1, 4), "one-loop": (2, 4), "one-loop-8warps": (2, 8), "q-pointer": (3, 4)}


def probe(form: int, num_warps: int) -> str:
    signature = {
        "Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "stride_n": "i32", "Nq": "i32", "Nk": "i32",
        "qk_scale": "fp32", "D": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "FORM": "constexpr",
    }  # fmt: skip
    constexprs = {"D": 128, "BLOCK_M": 128, "BLOCK_N": 128, "FORM": form}
    attrs = {(_forward.arg_names.index(n),): [["tt.divisibility", 16]] for n in ("Q", "K", "V", "Out", "stride_n")}
    source = triton.compiler.ASTSource(fn=_forward, signature=signature, constexprs=constexprs, attrs=attrs)
    try:
        compiled = triton.compile(
            source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 2}
        )
    except Exception as exc:  # noqa: BLE001  (the failure is the finding)
        return f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    specialised = "ttg.warp_specialize" in compiled.asm["ttgir"]
    return f"compiled, {'warp-specialised' if specialised else 'NOT specialised'}, {compiled.metadata.num_warps} warps"


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: this compiles for sm_90")
    print(f"triton {triton.__version__}")
    for name, (form, warps) in FORMS.items():
        print(f"{name:16s} {probe(form, warps)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
