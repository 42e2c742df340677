"""End-to-end MetaGPT training step (forward, loss, backward, gradient clipping, AdamW): fused against reference.

The ``reference`` provider is the unfused model on the reference backend (torch's LayerNorm and GELU, the loss by
``F.cross_entropy`` over the full ``(B, T, V)`` float32 logits); every other backend runs the fused model
(``MetaGPTConfig.fused``: LayerNorm with the residual add, bias+GELU, the loss by ``linear_cross_entropy``, which never
holds the logits), and ``unfused`` is the unfused model on ``auto`` (what fusion alone changes). The runner reports
each one's tokens/s, its speedup over ``reference`` and its peak memory (``bench/memory.py``). The cases at GPT-2's
vocabulary (V=50257) are where the LM head's logits dominate the step's memory.

Model FLOPs follow PaLM's count (``formulas.train_step_flops``) for TFLOP/s and MFU. Low-precision dtypes run under
``torch.autocast`` with float32 master weights, as mixed-precision training does.
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
GPT2_VOCAB_SIZE = 50257
# Model sizes: (embed_size, num_layers, num_heads).
MODEL_SIZES = {
    "tiny": (64, 2, 2),  # CI smoke size
    "small": (128, 4, 4),  # the original article's model
    "medium": (512, 8, 8),
    "gpt2": (768, 12, 12),  # GPT-2 small's shape
}
UNFUSED = "unfused"  # the unfused model on the auto backend


def model_config(
    size: str, seq_len: int, backend: str = "auto", vocab: int = VOCAB_SIZE, fused: bool = True
) -> MetaGPTConfig:
    if size not in MODEL_SIZES:
        raise ValueError(f"model size must be one of {sorted(MODEL_SIZES)}, got {size!r}")
    embed, layers, heads = MODEL_SIZES[size]
    return MetaGPTConfig(vocab, embed, layers, heads, dropout=0.0, max_seq_length=seq_len, backend=backend, fused=fused)


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
def num_parameters(size: str, seq_len: int, vocab: int = VOCAB_SIZE) -> int:
    """Parameters of a model size (tied embedding counted once)."""
    return MetaGPT.from_config(model_config(size, seq_len, vocab=vocab)).num_parameters()


def setup_train_step(backend: str, case: Case, inputs: dict) -> Prepared:
    """The fused model on ``backend``; the unfused one on the reference backend (``reference``) or on auto."""
    s = case.shape
    if backend == UNFUSED:
        cfg = model_config(s["size"], s["T"], "auto", s["V"], fused=False)
    else:
        cfg = model_config(s["size"], s["T"], backend, s["V"], fused=backend != "reference")
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
        # (size, B, T, V) per device and suite; the last ones of each have GPT-2's vocabulary.
        if torch.device(device).type == "cuda":
            runs = [("gpt2", 8, t, GPT2_VOCAB_SIZE) for t in ((512, 1024) if quick else (512, 1024, 2048))]
        elif quick:
            runs = [("tiny", 2, 32, VOCAB_SIZE), ("tiny", 2, 64, VOCAB_SIZE), ("tiny", 2, 32, GPT2_VOCAB_SIZE)]
        else:
            runs = [("small", 8, 128, VOCAB_SIZE), ("small", 8, 256, VOCAB_SIZE), ("small", 8, 128, GPT2_VOCAB_SIZE)]
        cases = []
        for dtype in dtypes:
            for i, (size, batch, t, vocab) in enumerate(runs):
                embed, layers, heads = MODEL_SIZES[size]
                dims = (("size", size), ("B", batch), ("T", t), ("V", vocab), ("d", embed), ("L", layers), ("H", heads))
                # Interpreted Triton runs a whole model only at the CI size.
                cases.append(Case(self.op, "train", dims, dtype, device, interpret_ok=size == "tiny" and i == 0))
        return cases

    def inputs(self, case: Case) -> dict:
        s = case.shape
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            state = MetaGPT.from_config(model_config(s["size"], s["T"], vocab=s["V"])).state_dict()
        return {"state": state}

    def providers(self, device: str) -> list[Provider]:
        return registry_providers("attention", device, setup_train_step) + [
            Provider(UNFUSED, "baseline", lambda case, inputs: setup_train_step(UNFUSED, case, inputs))
        ]

    def oracle(self, case: Case, inputs: dict) -> list[torch.Tensor]:
        s = case.shape
        cfg = model_config(s["size"], s["T"], "reference", s["V"], fused=False)
        return loss_and_grads(build_train_step(cfg, s["B"], case.device, oracle_dtype(case.dtype), inputs["state"]))

    def work(self, case: Case) -> float:
        s = case.shape
        return float(s["B"] * s["T"])

    def model_flops(self, case: Case) -> float:
        s = case.shape
        params = num_parameters(s["size"], s["T"], s["V"])
        return formulas.train_step_flops(params, s["L"], s["T"], s["d"], s["B"] * s["T"])

    def extra_metrics(self, case: Case, timing: Timing) -> dict[str, float]:
        flops_per_s = self.model_flops(case) / (timing.median_ms * 1e-3)
        metrics = {"tflops": flops_per_s / 1e12}
        mfu = formulas.mfu(flops_per_s, device_name(case.device), case.dtype)
        if mfu is not None:
            metrics["mfu"] = mfu
        return metrics


def main(argv: list[str] | None = None) -> int:
    """``python -m metagpt_fast.bench.train_step``: one case, the fused model against the reference, interleaved;
    prints tokens/s, the speedup per round (median, 95% interval) and each one's peak memory."""
    import argparse

    from metagpt_fast.bench.interleave import clock_for, interleave
    from metagpt_fast.bench.memory import peak_memory
    from metagpt_fast.bench.timing import TimingBudget

    parser = argparse.ArgumentParser(description="MetaGPT train step: fused against reference")
    parser.add_argument("--size", choices=tuple(MODEL_SIZES), default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=GPT2_VOCAB_SIZE)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", help="the fused model's backend")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args(argv)
    runs = {
        "reference": model_config(args.size, args.seq_len, "reference", args.vocab, fused=False),
        "fused": model_config(args.size, args.seq_len, args.backend, args.vocab, fused=True),
        UNFUSED: model_config(args.size, args.seq_len, "auto", args.vocab, fused=False),
    }
    steps = {name: build_train_step(cfg, args.batch, args.device, torch.float32) for name, cfg in runs.items()}
    budget = TimingBudget(min_warmup=1, warmup_s=0.0, min_rounds=args.rounds, max_rounds=args.rounds,
                          case_max_s=args.max_seconds)  # fmt: skip
    pairs = [(name, "reference") for name in runs if name != "reference"]
    result = interleave({n: s.step for n, s in steps.items()}, pairs, budget, clock_for(args.device))
    tokens = args.batch * args.seq_len
    embed, layers, heads = MODEL_SIZES[args.size]
    print(
        f"train step, d={embed} L={layers} H={heads} V={args.vocab} B={args.batch} T={args.seq_len}, {args.device}, "
        f"{torch.get_num_threads()} threads, {result.rounds} interleaved rounds ({result.stopped})"
    )
    for name, step in steps.items():
        samples = sorted(result.samples[name])
        ms = samples[len(samples) // 2]
        peak = peak_memory(step.step, args.device)
        ratio = result.ratios.get((name, "reference"))
        speed = f"{ratio.median:.2f}x [{ratio.ci_low:.2f}-{ratio.ci_high:.2f}]" if ratio else "1.00x"
        print(f"  {name:10s} {ms:9.1f} ms  {tokens / (ms * 1e-3):9.0f} tokens/s  vs reference {speed:20s} "
              f"peak {peak / 2**20 if peak is not None else float('nan'):8.1f} MiB")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
