"""End-to-end MetaGPT training step (forward, loss, backward, gradient clipping, AdamW) per backend.

Throughput is tokens/s; model FLOPs follow PaLM's count (``formulas.train_step_flops``) for TFLOP/s and MFU.
Low-precision dtypes run under ``torch.autocast`` with float32 master weights, as mixed-precision training does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch

from metagpt_fast.bench import formulas
from metagpt_fast.bench.core import Case, Prepared, Provider, oracle_dtype, registry_providers
from metagpt_fast.bench.results import device_name
from metagpt_fast.bench.suite import OpBench
from metagpt_fast.bench.timing import Timing
from metagpt_fast.model import MetaGPT, MetaGPTConfig
from metagpt_fast.training import TrainConfig, make_optimizer

VOCAB_SIZE = 256  # byte-level, as the CLI's training corpus
# Model sizes: (embed_size, num_layers, num_heads).
MODEL_SIZES = {
    "tiny": (64, 2, 2),  # CI smoke size
    "small": (128, 4, 4),  # the original article's model
    "medium": (512, 8, 8),
    "gpt2": (768, 12, 12),  # GPT-2 small's shape
}


def model_config(size: str, seq_len: int, backend: str = "auto") -> MetaGPTConfig:
    if size not in MODEL_SIZES:
        raise ValueError(f"model size must be one of {sorted(MODEL_SIZES)}, got {size!r}")
    embed, layers, heads = MODEL_SIZES[size]
    return MetaGPTConfig(VOCAB_SIZE, embed, layers, heads, dropout=0.0, max_seq_length=seq_len, backend=backend)


def autocast(device: str, dtype: torch.dtype):
    """Mixed precision for half dtypes; float32/float64 run as they are."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(torch.device(device).type, dtype=dtype)
    return contextlib.nullcontext()


@dataclasses.dataclass
class TrainStep:
    """A model, its optimizer and one fixed batch; ``step()`` runs one full optimizer step."""

    model: MetaGPT
    optimizer: torch.optim.Optimizer
    tokens: torch.Tensor
    targets: torch.Tensor
    dtype: torch.dtype
    grad_clip: float = TrainConfig.grad_clip

    def loss(self) -> torch.Tensor:
        with autocast(self.tokens.device.type, self.dtype):
            return self.model(self.tokens, self.targets, return_logits=False)[1]

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()


def build_train_step(
    cfg: MetaGPTConfig, batch: int, device: str, dtype: torch.dtype, state: dict | None = None, seed: int = 0
) -> TrainStep:
    """Model (seeded, or loaded from ``state``), the training loop's AdamW, and a seeded batch of ``batch`` rows."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MetaGPT.from_config(cfg)
        tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_length + 1))
    if state is not None:
        model.load_state_dict(state)
    weights_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    model = model.to(device=device, dtype=weights_dtype).train()
    tokens = tokens.to(device)
    return TrainStep(model, make_optimizer(model, TrainConfig()), tokens[:, :-1], tokens[:, 1:], dtype)


@functools.cache
def num_parameters(size: str, seq_len: int) -> int:
    """Parameters of a model size (tied embedding counted once)."""
    return MetaGPT.from_config(model_config(size, seq_len)).num_parameters()


def setup_train_step(backend: str, case: Case, inputs: dict) -> Prepared:
    s = case.shape
    cfg = model_config(s["size"], s["T"], backend)
    train = build_train_step(cfg, s["B"], case.device, case.dtype, inputs["state"])
    check = build_train_step(cfg, s["B"], case.device, case.dtype, inputs["state"])
    return Prepared(run=train.step, parity=lambda: loss_and_grads(check))


def loss_and_grads(train: TrainStep) -> list[torch.Tensor]:
    """The loss and every parameter's gradient after one forward/backward (no optimizer step)."""
    train.optimizer.zero_grad(set_to_none=True)
    loss = train.loss()
    loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in train.model.parameters()]
    return [loss.detach()] + grads


class TrainStepBench(OpBench):
    op = "train_step"
    unit = "tokens"

    def cases(self, device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
        if torch.device(device).type == "cuda":
            size, batch, seqs = "gpt2", 8, (512, 1024) if quick else (512, 1024, 2048)
        elif quick:
            size, batch, seqs = "tiny", 2, (32, 64)
        else:
            size, batch, seqs = "small", 8, (128, 256)
        embed, layers, heads = MODEL_SIZES[size]
        return [
            Case(
                self.op,
                "train",
                (("size", size), ("B", batch), ("T", t), ("d", embed), ("L", layers), ("H", heads)),
                dtype,
                device,
                # Interpreted Triton runs a whole model only at the CI size.
                interpret_ok=size == "tiny" and t == seqs[0],
            )
            for dtype in dtypes
            for t in seqs
        ]

    def inputs(self, case: Case) -> dict:
        s = case.shape
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            state = MetaGPT.from_config(model_config(s["size"], s["T"])).state_dict()
        return {"state": state}

    def providers(self, device: str) -> list[Provider]:
        return registry_providers("attention", device, setup_train_step)

    def oracle(self, case: Case, inputs: dict) -> list[torch.Tensor]:
        s = case.shape
        cfg = model_config(s["size"], s["T"], "reference")
        return loss_and_grads(build_train_step(cfg, s["B"], case.device, oracle_dtype(case.dtype), inputs["state"]))

    def work(self, case: Case) -> float:
        s = case.shape
        return float(s["B"] * s["T"])

    def model_flops(self, case: Case) -> float:
        s = case.shape
        return formulas.train_step_flops(num_parameters(s["size"], s["T"]), s["L"], s["T"], s["d"], s["B"] * s["T"])

    def extra_metrics(self, case: Case, timing: Timing) -> dict[str, float]:
        flops_per_s = self.model_flops(case) / (timing.median_ms * 1e-3)
        metrics = {"tflops": flops_per_s / 1e12}
        mfu = formulas.mfu(flops_per_s, device_name(case.device), case.dtype)
        if mfu is not None:
            metrics["mfu"] = mfu
        return metrics
