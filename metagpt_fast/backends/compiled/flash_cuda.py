"""The ``cuda`` backend of the ``flash_attention`` op: the mma.sync attention kernels of csrc/attention/ through their
windowed binding, ``metagpt_fast::attention_window_fwd`` / ``attention_window_bwd`` (declared by the extension's CUDA
part, attention_cuda.cpp, on (B, H, N, D) tensors).

It serves dense-mapped calls, what ``flash_attn_func`` and its packed forms produce: every sequence of the packed
batch has the same length, so the ``(B * N, H, D)`` tensors are one ``(B, H, N, D)`` problem, read through strides
(no copy of q, k or v). float16 / bfloat16 at head dims 64 and 128 (q, k and v alike): causal masks and windows
aligned to the bottom right, softcap, GQA / MQA,
and a backward without atomics (``deterministic``). True variable lengths, ALiBi and dropout are refused with their
reasons, so ``auto`` takes Triton and ``backend="cuda"`` raises saying why; so is every call when the extension was
built without these kernels.

The kernels write ``out`` (B, Hq, Nq, D) and ``lse`` (B, Hq, Nq): both are copied into the op's layouts,
``(B * Nq, Hq, D)`` and ``(Hq, B * Nq)`` (one pass over the output, small next to the attention itself); the backward
reads the op's lse back through a view.
"""

import torch

from metagpt_fast._spec import MAX_GRID_YZ
from metagpt_fast.backends import autograd, compiled, registry

# Decided once at import (outside any torch.compile trace): the dispatcher lookup is not traceable. The windowed ops
# exist only in an extension built with its CUDA part.
_WINDOW_OPS = hasattr(torch.ops.metagpt_fast, "attention_window_fwd")
_CUDA_KERNELS = _WINDOW_OPS and compiled.has_cuda_kernel("attention_window_fwd")
NO_CUDA_KERNELS = (
    "the compiled extension has no CUDA kernel for flash_attention (its CUDA part, csrc/attention/, was not built: "
    "torch without CUDA or no nvcc, or an extension older than the attention_window ops)"
)


def cuda_reasons(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, *, kernels: bool = True) -> list[str]:
    """What the CUDA kernels cannot serve beyond the capabilities (``kernels``: whether the extension has them).

    They take one (B, H, N, D) problem: every sequence of the batch has ``max_seqlen_q`` queries and
    ``max_seqlen_k`` keys. For a validated call that is exactly ``total == B * max_seqlen`` on both sides (no
    sequence exceeds ``max_seqlen``, so the lengths sum to ``B * max_seqlen`` only when all are equal to it), decided
    from shapes alone, without reading ``cu_seqlens`` back from the GPU."""
    reasons = [] if kernels else [NO_CUDA_KERNELS]
    batch, hq = cu_seqlens_q.shape[0] - 1, q.shape[1]
    if q.shape[0] != batch * max_seqlen_q or k.shape[0] != batch * max_seqlen_k:
        reasons.append(
            f"variable-length sequences (the CUDA kernels take {batch} sequences of equal length: {q.shape[0]} "
            f"queries for max_seqlen_q {max_seqlen_q}, {k.shape[0]} keys for max_seqlen_k {max_seqlen_k})"
        )
    if batch > MAX_GRID_YZ or hq > MAX_GRID_YZ:
        reasons.append(f"batch and heads up to {MAX_GRID_YZ} (CUDA grid limit), got batch {batch}, heads {hq}")
    if max(max_seqlen_q, max_seqlen_k) >= 2**31 - 1:
        reasons.append(f"sequence lengths below 2**31 (32-bit positions), got {max(max_seqlen_q, max_seqlen_k)}")
    return reasons


def extra_reasons(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right,
    softcap, alibi_slopes, dropout_p,
) -> list[str]:  # fmt: skip
    return cuda_reasons(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, kernels=_CUDA_KERNELS)


def cuda_priority(inputs) -> int:
    """30 (above Triton's 20) on sm_80-class GPUs, 15 (below it) on sm_90 and newer, where Triton's flash kernels
    run wgmma with TMA loads and these mma.sync. Static, as for the attention op (backends/compiled/attention.py):
    no GPU measurement of either order exists yet."""
    return 15 if torch.cuda.get_device_capability(inputs["q"].device) >= (9, 0) else 30


def as_bhnd(t: torch.Tensor, batch: int) -> torch.Tensor:
    """A packed ``(B * N, H, D)`` tensor as the ``(B, H, N, D)`` view the kernels read (a copy only if ``t``'s
    strides do not allow the view)."""
    return t.reshape(batch, t.shape[0] // batch, *t.shape[1:]).transpose(1, 2)


def from_bhnd(t: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, D)`` -> the packed ``(B * N, H, D)`` layout, contiguous."""
    return t.transpose(1, 2).reshape(-1, *t.shape[1:2], t.shape[-1]).contiguous()


def _window(causal: bool, window_right: int) -> int:
    return 0 if causal else window_right


class Kernels:
    """The windowed attention ops the custom ops below call (a seam: tests put a CPU stand-in here)."""

    @staticmethod
    def forward(*args):
        return torch.ops.metagpt_fast.attention_window_fwd(*args)

    @staticmethod
    def backward(*args):
        return torch.ops.metagpt_fast.attention_window_bwd(*args)


kernels = Kernels()

if _WINDOW_OPS:

    @torch.library.register_fake("metagpt_fast::attention_window_fwd")
    def _(q, k, v, attn_mask, dropout_p, window_left, window_right, bottom_right, softcap, scale, seed):
        b, h, n, _ = q.shape
        return q.new_empty((b, h, n, v.shape[-1])), q.new_empty((b, h, n), dtype=torch.float32)

    @torch.library.register_fake("metagpt_fast::attention_window_bwd")
    def _(grad_out, q, k, v, out, lse, attn_mask, dropout_p, window_left, window_right, bottom_right, softcap, scale,
          seed):  # fmt: skip
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("metagpt_fast::cuda_flash_attention_forward", mutates_args=())
def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (Tq, Hq, D), lse (Hq, Tq) float32)`` of a dense-mapped call (``alibi_slopes`` None and
    ``dropout_p`` 0: the registry refuses the others for this backend)."""
    batch = cu_seqlens_q.shape[0] - 1
    out, lse = kernels.forward(
        as_bhnd(q, batch), as_bhnd(k, batch), as_bhnd(v, batch), None, dropout_p, window_left,
        _window(causal, window_right), True, softcap, softmax_scale, seed,
    )  # fmt: skip
    return from_bhnd(out), lse.transpose(0, 1).reshape(lse.shape[1], -1).contiguous()


@flash_attention_forward.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
      window_right, softcap, alibi_slopes, dropout_p, seed):  # fmt: skip
    total, heads, _ = q.shape
    return q.new_empty((total, heads, v.shape[-1])), q.new_empty((heads, total), dtype=torch.float32)


@torch.library.custom_op("metagpt_fast::cuda_flash_attention_backward", mutates_args=())
def flash_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` shaped like q, k and v (contiguous)."""
    batch = cu_seqlens_q.shape[0] - 1
    heads = lse.shape[0]
    dq, dk, dv = kernels.backward(
        as_bhnd(grad_out, batch), as_bhnd(q, batch), as_bhnd(k, batch), as_bhnd(v, batch), as_bhnd(out, batch),
        lse.view(heads, batch, -1).transpose(0, 1), None, dropout_p, window_left, _window(causal, window_right),
        True, softcap, softmax_scale, seed,
    )  # fmt: skip
    return from_bhnd(dq), from_bhnd(dk), from_bhnd(dv)


@flash_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      window_left, window_right, softcap, alibi_slopes, dropout_p, seed):  # fmt: skip
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


autograd.flash_attention("metagpt_fast::cuda_flash_attention_forward", flash_attention_backward)


def flash_attention(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
    window_right, softcap, alibi_slopes, dropout_p, seed,
):  # fmt: skip
    """The flash_attention op's contract (see ``ops/flash.py``): returns ``(out, lse)``."""
    return flash_attention_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
        window_right, softcap, alibi_slopes, dropout_p, seed,
    )  # fmt: skip


CUDA = registry.Capabilities(
    devices=("cuda",),
    min_compute_capability=(8, 0),
    head_dims=(64, 128),
    dtypes=(torch.float16, torch.bfloat16),
    features=frozenset({"window", "softcap", "gqa", "deterministic"}),
)
registry.register("flash_attention", "cuda", flash_attention, CUDA, extra_reasons, priority=cuda_priority)
