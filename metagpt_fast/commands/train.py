"""``metagpt-fast train``: train MetaGPT on the standard library's sources (or ``--data``), byte-level."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from metagpt_fast._extras import has_module
from metagpt_fast.data import VOCAB_SIZE, Splits, read_corpus, read_documents
from metagpt_fast.model import MetaGPTConfig
from metagpt_fast.training import TrainConfig, train

HELP = "train MetaGPT (default corpus: the Python standard library's sources, byte-level)"


# Model shapes for --preset: (vocab_size, embed_size, layers, heads); explicit --embed-size/--layers/--heads win.
# gpt2-small is GPT-2 small's shape with its vocabulary (the byte corpus uses ids < 256 of it), so the LM head and
# its loss are as large as GPT-2's: on a CPU, train it at small B*T (e.g. --batch-size 2 --seq-len 64).
PRESETS = {"default": (VOCAB_SIZE, 128, 4, 4), "gpt2-small": (50257, 768, 12, 12)}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model-size options shared with ``profile``."""
    model = parser.add_argument_group("model")
    model.add_argument("--preset", choices=tuple(PRESETS), default="default", help="model shape (see --embed-size)")
    model.add_argument("--embed-size", type=int, help="default: the preset's (128)")
    model.add_argument("--layers", type=int, help="default: the preset's (4)")
    model.add_argument("--heads", type=int, help="default: the preset's (4)")
    model.add_argument("--seq-len", type=int, default=128, help="max_seq_length and training window")
    model.add_argument("--dropout", type=float, default=0.0)
    model.add_argument("--positional", choices=("sinusoidal", "rotary"), default="sinusoidal")
    model.add_argument("--backend", default="auto", help="auto, reference, triton, cuda or cpu")
    model.add_argument(
        "--unfused",
        action="store_true",
        help="torch's LayerNorm/GELU and a loss over full logits (MetaGPTConfig.fused)",
    )


def model_config(args: argparse.Namespace) -> MetaGPTConfig:
    vocab, embed, layers, heads = PRESETS[getattr(args, "preset", "default")]
    return MetaGPTConfig(
        vocab_size=vocab,
        embed_size=args.embed_size if args.embed_size is not None else embed,
        num_layers=args.layers if args.layers is not None else layers,
        num_heads=args.heads if args.heads is not None else heads,
        dropout=args.dropout,
        max_seq_length=args.seq_len,
        positional=args.positional,
        backend=args.backend,
        fused=not getattr(args, "unfused", False),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    run = parser.add_argument_group("training")
    defaults = TrainConfig()
    run.add_argument("--data", type=Path, help="text file or folder (default: the Python standard library)")
    run.add_argument("--steps", type=int, default=defaults.steps)
    run.add_argument("--batch-size", type=int, default=defaults.batch_size)
    run.add_argument("--lr", type=float, default=defaults.lr)
    run.add_argument("--eval-every", type=int, default=defaults.eval_every)
    run.add_argument("--save-every", type=int, default=defaults.save_every)
    run.add_argument("--seed", type=int, default=defaults.seed)
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--out", type=Path, default=Path("runs/metagpt"), help="checkpoint folder")
    run.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    run.add_argument("--no-progress", action="store_true", help="print lines instead of a progress bar")
    run.add_argument(
        "--pack",
        action="store_true",
        help="keep the files inside each training and evaluation window apart: positions restart and attention "
        "never crosses a file boundary (varlen flash attention)",
    )


def run(args: argparse.Namespace) -> int:
    # The progress bar needs rich (the bench extra); without it training prints lines, as with --no-progress.
    console = None
    if has_module("rich"):
        from rich.console import Console

        console = Console()
    say = console.print if console is not None else print
    for name in ("steps", "batch_size", "eval_every", "save_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_every=args.eval_every,
        save_every=args.save_every,
        seed=args.seed,
        device=args.device,
        pack=args.pack,
    )
    model_cfg = model_config(args)
    if args.pack:
        documents = read_documents(args.data)
        corpus, splits = b"".join(documents), Splits.from_documents(documents)
    else:
        corpus = read_corpus(args.data)
        splits = Splits.from_bytes(corpus)
    resume = args.out / "ckpt.pt" if args.resume else None
    say(
        f"corpus: {args.data or 'Python standard library'} ({len(corpus) / 2**20:.1f} MiB, "
        f"{len(splits.train):,} train / {len(splits.val):,} val bytes); "
        f"device {cfg.device}; backend {model_cfg.backend}"
    )
    progress = _progress_bar(console) if console is not None and not args.no_progress else None
    task = progress.add_task("train", total=cfg.steps, loss=float("nan"), tps=0.0) if progress else None

    def on_step(step: int, loss: float, tps: float) -> None:
        if progress is not None:
            progress.update(task, completed=step, loss=loss, tps=tps)
        elif step % 10 == 0 or step == cfg.steps:
            say(f"step {step}/{cfg.steps}  loss {loss:.4f}  {tps:,.0f} tok/s")

    def on_eval(step: int, val_loss: float) -> None:
        say(f"step {step}: held-out loss {val_loss:.4f}")

    with progress if progress is not None else contextlib.nullcontext():
        result = train(model_cfg, cfg, splits, out=args.out, resume=resume, on_step=on_step, on_eval=on_eval)
    say(
        f"done: step {result.step}, train loss {result.train_loss:.4f}, held-out loss {result.val_loss:.4f}, "
        f"{result.tokens_per_second:,.0f} tok/s; checkpoint {result.checkpoint}"
    )
    return 0


def _progress_bar(console):
    """A rich progress bar (step count, loss, tokens/s, time left) drawn on ``console``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  {task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(),
        console=console,
    )
