"""Work formulas behind every throughput the benchmarks report, and the peak-FLOP/s table for MFU.

Attention (compute-bound) counts matmul FLOPs, the convention of flash-attention's benchmarks:

    forward  = 2 * B * H * Nq * Nk * (D + Dv)      (Q @ K^T and P @ V; = 4 * B * H * Nq * Nk * D when Dv = D)
    causal   = forward / 2                          (half of the score matrix is skipped)
    backward = 2.5 * forward                        (dV, dP, dQ, dK matmuls; the recomputed S counts as 0.5)

The positional ops and rotary are memory-bound: their figure is the minimum number of bytes an ideal kernel moves
(each input read once, each output written once; sinusoid/rotation tables are computed in the kernel, not read).

The MetaGPT training step counts model FLOPs per token as in PaLM (Chowdhery et al. 2022, appendix B):
``6 * N + 12 * L * T * d`` for N parameters, L layers, sequence length T and width d (the second term is attention,
not halved for causal masking, as in the paper). MFU = achieved model FLOP/s / the device's dense peak.
"""

from __future__ import annotations

import dataclasses

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
# FLOPs of a mode as a multiple of the forward pass.
_MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def attention_flops(
    batch: int,
    heads: int,
    seq_q: int,
    seq_k: int,
    head_dim: int,
    head_dim_v: int | None = None,
    *,
    causal: bool = False,
    mode: str = "fwd",
) -> float:
    """Matmul FLOPs of one attention call (see the module docstring)."""
    if mode not in _MODE_FACTOR:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    forward = 2.0 * batch * heads * seq_q * seq_k * (head_dim + head_dim_v)
    if causal:
        forward /= 2
    return forward * _MODE_FACTOR[mode]


def add_positional_encoding_bytes(batch: int, seq: int, dim: int, itemsize: int, *, mode: str = "fwd") -> float:
    """Forward reads x and writes the output; backward reads the output gradient and writes x's gradient."""
    one_pass = 2.0 * batch * seq * dim * itemsize
    return {"fwd": one_pass, "bwd": one_pass, "fwd+bwd": 2 * one_pass}[_check_mode(mode)]


def embed_positions_bytes(
    batch: int, seq: int, dim: int, vocab: int, itemsize: int, index_itemsize: int = 8, *, mode: str = "fwd"
) -> float:
    """Forward reads the token ids and B*T embedding rows and writes the output; backward reads the ids and the output
    gradient and writes the dense (vocab, d) weight gradient once."""
    tokens = batch * seq
    forward = tokens * index_itemsize + 2.0 * tokens * dim * itemsize
    backward = tokens * index_itemsize + tokens * dim * itemsize + vocab * dim * itemsize
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[_check_mode(mode)]


def rotary_bytes(batch: int, heads_q: int, heads_k: int, seq: int, head_dim: int, itemsize: int, *, mode: str = "fwd"):
    """Each pass reads q and k and writes two tensors of the same size (outputs, or input gradients)."""
    one_pass = 2.0 * batch * (heads_q + heads_k) * seq * head_dim * itemsize
    return {"fwd": one_pass, "bwd": one_pass, "fwd+bwd": 2 * one_pass}[_check_mode(mode)]


def train_step_flops(num_params: int, num_layers: int, seq_len: int, embed_size: int, tokens: int) -> float:
    """Model FLOPs of one optimizer step over ``tokens`` tokens (forward + backward; PaLM appendix B)."""
    return (6.0 * num_params + 12.0 * num_layers * seq_len * embed_size) * tokens


def _check_mode(mode: str) -> str:
    if mode not in _MODE_FACTOR:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


# ------------------------------------------------------------------------------------------------ peak FLOP/s


@dataclasses.dataclass(frozen=True)
class Peak:
    """Dense (no structured sparsity) peak throughput in TFLOP/s; float32 is the non-tensor-core FP32 rate."""

    bfloat16: float | None
    float16: float
    float32: float
    source: str


# Matched in order against torch.cuda.get_device_name(): more specific names first ("H100 PCIe" before "H100",
# "L40S" before "L4", "A100" before "A10"). NVIDIA datasheets quote tensor-core rates "with sparsity"; the dense
# rate used here is half of that figure.
PEAK_TFLOPS: tuple[tuple[str, Peak], ...] = (
    ("H200", Peak(989.5, 989.5, 67.0, "NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16/FP16 1,979 TFLOPS sparse")),
    ("H100 PCIe", Peak(756.5, 756.5, 51.0, "NVIDIA H100 Tensor Core GPU datasheet (PCIe): BF16/FP16 1,513 sparse")),
    ("H100 NVL", Peak(835.5, 835.5, 60.0, "NVIDIA H100 Tensor Core GPU datasheet (NVL): BF16/FP16 1,671 sparse")),
    ("H100", Peak(989.5, 989.5, 67.0, "NVIDIA H100 Tensor Core GPU datasheet (SXM): BF16/FP16 1,979 TFLOPS sparse")),
    ("A100", Peak(312.0, 312.0, 19.5, "NVIDIA A100 Tensor Core GPU datasheet: BF16/FP16 312 dense, FP32 19.5")),
    ("L40S", Peak(362.05, 362.05, 91.6, "NVIDIA L40S datasheet: BF16/FP16 362.05 dense (733 sparse), FP32 91.6")),
    ("L4", Peak(121.0, 121.0, 30.3, "NVIDIA L4 datasheet: BF16/FP16 242 TFLOPS sparse, FP32 30.3")),
    ("A10", Peak(125.0, 125.0, 31.2, "NVIDIA A10 datasheet: BF16/FP16 125 dense (250 sparse), FP32 31.2")),
    ("RTX 4090", Peak(165.2, 165.2, 82.6, "NVIDIA Ada GPU architecture whitepaper: FP16 w/ FP32 accumulate 165.2")),
    ("V100", Peak(None, 125.0, 15.7, "NVIDIA V100 datasheet (SXM2): FP16 tensor 125, FP32 15.7; no BF16")),
    ("T4", Peak(None, 65.0, 8.1, "NVIDIA T4 datasheet: FP16 tensor 65, FP32 8.1; no BF16")),
)


def peak_tflops(device_name: str, dtype: torch.dtype) -> tuple[float, str] | None:
    """``(dense peak TFLOP/s, source)`` for a GPU model and compute dtype, or None when the model is not in the table
    (CPUs included: their peak depends on cores, clocks and vector units, so no MFU is reported)."""
    for pattern, peak in PEAK_TFLOPS:
        if pattern.lower() in device_name.lower():
            value = {torch.bfloat16: peak.bfloat16, torch.float16: peak.float16, torch.float32: peak.float32}.get(dtype)
            return None if value is None else (value, peak.source)
    return None


def mfu(flops_per_second: float, device_name: str, dtype: torch.dtype) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None when the device's peak is unknown."""
    peak = peak_tflops(device_name, dtype)
    return None if peak is None else flops_per_second / (peak[0] * 1e12)
