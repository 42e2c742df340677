"""Training loop for MetaGPT: AdamW, byte-level batches, held-out evaluation, atomic checkpoints, exact resume.

Resume is bit-exact on CPU: a checkpoint holds the model, optimizer, the step, and every random state the loop
consumes (torch's global generator — dropout seeds — and the batch sampler's generator).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from metagpt_fast import checkpoint
from metagpt_fast.data import Splits, batch, packed_batch
from metagpt_fast.model import MetaGPT, MetaGPTConfig


@dataclasses.dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps in total (a resumed run continues up to this number)
    batch_size: int = 16  # sequences per step
    lr: float = 3e-3  # peak learning rate (linear warm-up, cosine decay to 10%)
    warmup: int = 20  # warm-up steps
    weight_decay: float = 0.1  # AdamW decay on matrices (not on biases, norms)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    eval_every: int = 100  # steps between held-out evaluations
    eval_batches: int = 4  # batches per evaluation
    save_every: int = 100  # steps between checkpoints; the last step always saves
    seed: int = 1337  # seeds model init, dropout and batch sampling
    device: str = "cpu"
    pack: bool = False  # training and evaluation windows keep their documents apart (needs the Splits' starts)


@dataclasses.dataclass
class TrainResult:
    step: int
    train_loss: float
    val_loss: float
    tokens_per_second: float
    checkpoint: Path | None


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: MetaGPT, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


@torch.no_grad()
def evaluate(
    model: MetaGPT, tokens: torch.Tensor, cfg: TrainConfig, seq_len: int, starts: torch.Tensor | None = None
) -> float:
    """Mean loss over ``eval_batches`` fixed held-out batches (same batches every time). With ``starts`` (the
    documents' first tokens), the batches are packed as in training with ``pack=True``: attention never crosses a
    document boundary and no document predicts the next one's first token."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in range(cfg.eval_batches):
        if starts is None:
            x, y = batch(tokens, cfg.batch_size, seq_len, generator)
            packed = None
        else:
            x, y, packed = packed_batch(tokens, starts, cfg.batch_size, seq_len, generator)
            packed = dataclasses.replace(
                packed, cu_seqlens=packed.cu_seqlens.to(cfg.device), position_ids=packed.position_ids.to(cfg.device)
            )
        loss = model(x.to(cfg.device), y.to(cfg.device), return_logits=False, packed=packed)[1]
        losses.append(loss.item())
    model.train(was_training)
    return sum(losses) / len(losses)


def train(
    model_cfg: MetaGPTConfig,
    cfg: TrainConfig,
    splits: Splits,
    out: Path | None = None,
    resume: Path | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
    on_eval: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Trains (or resumes) a model; ``on_step(step, loss, tokens_per_second)`` and ``on_eval(step, val_loss)``
    report progress."""
    torch.manual_seed(cfg.seed)
    sampler = torch.Generator().manual_seed(cfg.seed)
    start = 0
    if resume is not None:
        state = checkpoint.load(resume)
        model_cfg = MetaGPTConfig(**state["model_config"])
    model = MetaGPT.from_config(model_cfg).to(cfg.device)
    optimizer = make_optimizer(model, cfg)
    if resume is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        sampler.set_state(state["sampler_rng"])
        start = state["step"]
    model.train()
    if cfg.pack and (splits.train_starts is None or splits.val_starts is None):
        raise ValueError("pack=True needs the documents' starts: build the splits with Splits.from_documents")

    seq_len = model_cfg.max_seq_length
    val_starts = splits.val_starts if cfg.pack else None  # packed training: packed evaluation, same boundaries rule
    saved, loss_value, tps = None, float("nan"), 0.0
    for step in range(start, cfg.steps):
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        if cfg.pack:  # documents kept apart inside each window: attention never crosses a boundary
            x, y, packed = packed_batch(splits.train, splits.train_starts, cfg.batch_size, seq_len, sampler)
            packed = dataclasses.replace(
                packed, cu_seqlens=packed.cu_seqlens.to(cfg.device), position_ids=packed.position_ids.to(cfg.device)
            )
            _, loss = model(x.to(cfg.device), y.to(cfg.device), return_logits=False, packed=packed)
        else:
            x, y = batch(splits.train, cfg.batch_size, seq_len, sampler)
            _, loss = model(x.to(cfg.device), y.to(cfg.device), return_logits=False)  # fused loss: no logits held
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        loss_value = loss.item()
        tps = x.numel() / (time.perf_counter() - began)
        if on_step is not None:
            on_step(step + 1, loss_value, tps)
        done = step + 1
        if on_eval is not None and done % cfg.eval_every == 0 and done != cfg.steps:
            on_eval(done, evaluate(model, splits.val, cfg, seq_len, val_starts))
        if out is not None and (done % cfg.save_every == 0 or done == cfg.steps):
            saved = checkpoint.save(
                {
                    "model_config": dataclasses.asdict(model_cfg),
                    "train_config": dataclasses.asdict(cfg),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "sampler_rng": sampler.get_state(),
                    "step": done,
                },
                out / "ckpt.pt",
            )
    val_loss = evaluate(model, splits.val, cfg, seq_len, val_starts)
    if on_eval is not None:
        on_eval(cfg.steps, val_loss)
    return TrainResult(cfg.steps, loss_value, val_loss, tps, saved)


def load_model(path: Path, device: str = "cpu", backend: str = "auto") -> MetaGPT:
    """The model stored in a checkpoint, in eval mode."""
    state = checkpoint.load(path)
    model_cfg = MetaGPTConfig(**{**state["model_config"], "backend": backend})
    model = MetaGPT.from_config(model_cfg)
    model.load_state_dict(state["model"])
    return model.to(device).eval()
