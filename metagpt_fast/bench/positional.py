"""Positional-op benchmarks: the fused token embedding + sinusoidal encoding, and the positional-encoding add.

Both are memory-bound, so throughput is reported in GB/s of the minimum traffic (see ``formulas``); the reference
backend (eager PyTorch: gather, scale, table, add, cast as separate kernels) is the baseline.
"""

from __future__ import annotations

import math

import torch

import metagpt_fast
from metagpt_fast.bench import formulas
from metagpt_fast.bench.core import (
    Case,
    Prepared,
    Provider,
    check_backend,
    functional,
    oracle_dtype,
    registry_providers,
    upcast,
)
from metagpt_fast.bench.suite import OpBench
from metagpt_fast.ops import reference
from metagpt_fast.testing import float32_angle_error


def _sizes(device: str, quick: bool) -> tuple[int, tuple[int, ...], int, int]:
    """(batch, sequence lengths, width, vocabulary) of the suite on ``device``."""
    if torch.device(device).type == "cuda":
        return 8, (1024, 4096, 16384), 1024, 32768
    if quick:
        return 2, (64, 256), 64, 256
    return 4, (256, 1024, 4096), 256, 1024


def _cases(op: str, device: str, dtypes: list[torch.dtype], quick: bool, with_vocab: bool) -> list[Case]:
    batch, seqs, width, vocab = _sizes(device, quick)
    cases = []
    for dtype in dtypes:
        for mode in ("fwd", "fwd+bwd"):
            for t in seqs:
                dims = (("B", batch), ("T", t), ("d", width)) + ((("V", vocab),) if with_vocab else ())
                cases.append(Case(op, mode, dims, dtype, device, interpret_ok=t == seqs[0]))
    return cases


class EmbedPositionsBench(OpBench):
    op = "embed_positions"
    unit = "bytes"

    def cases(self, device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
        return _cases(self.op, device, dtypes, quick, with_vocab=True)

    def inputs(self, case: Case) -> dict:
        s = case.shape
        g = torch.Generator(case.device).manual_seed(0)
        return {
            "tokens": torch.randint(0, s["V"], (s["B"], s["T"]), generator=g, device=case.device),
            "weight": (0.02 * torch.randn(s["V"], s["d"], generator=g, device=case.device)).to(case.dtype),
            # sqrt(d), as MetaGPT scales its embeddings.
            "scale": math.sqrt(s["d"]),
        }

    def parity_slack(self, case: Case, inputs: dict) -> float:
        return float32_angle_error(case.shape["T"] - 1)  # positions 0 .. T-1, float32 angles in the kernels

    def providers(self, device: str) -> list[Provider]:
        return registry_providers(self.op, device, setup_embed_positions)

    def oracle(self, case: Case, inputs: dict) -> list[torch.Tensor]:
        def forward(x):
            return (reference.embed_positions(x["tokens"], x["weight"], x["scale"]),)

        x = upcast(inputs, oracle_dtype(case.dtype))
        return functional(case, x, forward, ("weight",), grad_round_to=case.dtype).parity()

    def work(self, case: Case) -> float:
        s = case.shape
        itemsize = torch.empty(0, dtype=case.dtype).element_size()
        return formulas.embed_positions_bytes(s["B"], s["T"], s["d"], s["V"], itemsize, mode=case.mode)


def setup_embed_positions(backend: str, case: Case, inputs: dict) -> Prepared:
    check_backend(
        "embed_positions",
        backend,
        tokens=inputs["tokens"],
        weight=inputs["weight"],
        scale=inputs["scale"],
        offset=0,
        dropout_p=0.0,
        sinusoidal=True,
    )

    def forward(x):
        return (metagpt_fast.embed_positions(x["tokens"], x["weight"], x["scale"], backend=backend),)

    return functional(case, inputs, forward, ("weight",))


class AddPositionalEncodingBench(OpBench):
    op = "add_positional_encoding"
    unit = "bytes"

    def cases(self, device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
        return _cases(self.op, device, dtypes, quick, with_vocab=False)

    def inputs(self, case: Case) -> dict:
        s = case.shape
        g = torch.Generator(case.device).manual_seed(0)
        return {"x": torch.randn(s["B"], s["T"], s["d"], generator=g, device=case.device).to(case.dtype)}

    def parity_slack(self, case: Case, inputs: dict) -> float:
        return float32_angle_error(case.shape["T"] - 1)  # positions 0 .. T-1, float32 angles in the kernels

    def providers(self, device: str) -> list[Provider]:
        return registry_providers(self.op, device, setup_add_positional_encoding)

    def oracle(self, case: Case, inputs: dict) -> list[torch.Tensor]:
        def forward(x):
            return (reference.add_positional_encoding(x["x"]),)

        x = upcast(inputs, oracle_dtype(case.dtype))
        return functional(case, x, forward, ("x",), grad_round_to=case.dtype).parity()

    def work(self, case: Case) -> float:
        s = case.shape
        itemsize = torch.empty(0, dtype=case.dtype).element_size()
        return formulas.add_positional_encoding_bytes(s["B"], s["T"], s["d"], itemsize, mode=case.mode)


def setup_add_positional_encoding(backend: str, case: Case, inputs: dict) -> Prepared:
    check_backend("add_positional_encoding", backend, x=inputs["x"], offset=0, dropout_p=0.0)

    def forward(x):
        return (metagpt_fast.add_positional_encoding(x["x"], backend=backend),)

    return functional(case, inputs, forward, ("x",))
