"""Rotary benchmark: the package's fused q+k rotation against Liger-Kernel's and flash-attn's rotary kernels.

GPT-NeoX half-split layout, rotary_dim = head dim, positions 0..T-1 (the layout all three support). The baselines
take precomputed cos/sin tables, built outside the timed region (the package's kernels compute angles in-kernel).
"""

from __future__ import annotations

import torch

import metagpt_fast
from metagpt_fast.bench import formulas
from metagpt_fast.bench.core import (
    Case,
    Prepared,
    Provider,
    Unsupported,
    check_backend,
    functional,
    oracle_dtype,
    registry_providers,
    upcast,
)
from metagpt_fast.bench.suite import OpBench, cuda_package_unavailable
from metagpt_fast.ops import reference
from metagpt_fast.ops.reference.positional import DEFAULT_BASE
from metagpt_fast.ops.reference.rotary import rotary_angles
from metagpt_fast.testing import float32_angle_error


def setup_rotary(backend: str, case: Case, inputs: dict) -> Prepared:
    check_backend(
        "rotary",
        backend,
        q=inputs["q"],
        k=inputs["k"],
        position_ids=None,
        offset=0,
        rotary_dim=case.shape["D"],
        base=DEFAULT_BASE,
        interleaved=False,
        inplace=False,
    )

    def forward(x):
        return metagpt_fast.apply_rotary(x["q"], x["k"], backend=backend)

    return functional(case, inputs, forward, ("q", "k"))


def _tables(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, D/2) in the case's dtype."""
    s = case.shape
    cos, sin = rotary_angles(torch.arange(s["T"], device=case.device), s["D"])
    return cos.to(case.dtype), sin.to(case.dtype)


def setup_liger(case: Case, inputs: dict) -> Prepared:
    from liger_kernel.ops.rope import LigerRopeFunction

    cos, sin = _tables(case)
    # Liger takes Hugging Face's (1, T, D) tables: the D/2 frequencies repeated for both halves.
    cos, sin = torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None]

    def forward(x):
        return LigerRopeFunction.apply(x["q"], x["k"], cos, sin)

    return functional(case, inputs, forward, ("q", "k"))


def setup_flash_attn_rotary(case: Case, inputs: dict) -> Prepared:
    from flash_attn.layers.rotary import apply_rotary_emb

    if case.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise Unsupported(f"flash-attn rotary does not run {case.dtype}")
    cos, sin = _tables(case)

    def forward(x):  # flash-attn's layout is (B, T, H, D)
        q, k = (apply_rotary_emb(x[n].transpose(1, 2), cos, sin).transpose(1, 2) for n in ("q", "k"))
        return q, k

    return functional(case, inputs, forward, ("q", "k"))


class RotaryBench(OpBench):
    op = "rotary"
    unit = "bytes"

    def cases(self, device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
        if torch.device(device).type == "cuda":
            batch, heads, seqs, dim = 4, 32, (1024, 4096, 16384), 128
        elif quick:
            batch, heads, seqs, dim = 1, 2, (64, 256), 32
        else:
            batch, heads, seqs, dim = 2, 8, (256, 1024, 4096), 64
        return [
            Case(self.op, mode, (("B", batch), ("H", heads), ("T", t), ("D", dim)), dtype, device, t == seqs[0])
            for dtype in dtypes
            for mode in ("fwd", "fwd+bwd")
            for t in seqs
        ]

    def inputs(self, case: Case) -> dict:
        s = case.shape
        g = torch.Generator(case.device).manual_seed(0)
        shape = (s["B"], s["H"], s["T"], s["D"])
        return {n: torch.randn(shape, generator=g, device=case.device).to(case.dtype) for n in ("q", "k")}

    def parity_slack(self, case: Case, inputs: dict) -> float:
        # A pair (x1, x2) rotated by an angle off by e moves by at most e * (|x1| + |x2|).
        magnitude = max(float(inputs[n].abs().max()) for n in ("q", "k"))
        return 2 * magnitude * float32_angle_error(case.shape["T"] - 1)

    def providers(self, device: str) -> list[Provider]:
        return registry_providers(self.op, device, setup_rotary) + [
            Provider("liger", "baseline", setup_liger, unavailable=cuda_package_unavailable("liger_kernel", device)),
            Provider(
                "flash-attn",
                "baseline",
                setup_flash_attn_rotary,
                unavailable=cuda_package_unavailable("flash_attn", device),
            ),
        ]

    def oracle(self, case: Case, inputs: dict) -> list[torch.Tensor]:
        def forward(x):
            return reference.apply_rotary(x["q"], x["k"])

        x = upcast(inputs, oracle_dtype(case.dtype))
        return functional(case, x, forward, ("q", "k"), grad_round_to=case.dtype).parity()

    def work(self, case: Case) -> float:
        s = case.shape
        itemsize = torch.empty(0, dtype=case.dtype).element_size()
        return formulas.rotary_bytes(s["B"], s["H"], s["H"], s["T"], s["D"], itemsize, mode=case.mode)
