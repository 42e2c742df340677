"""``metagpt-fast generate``: load a checkpoint and sample a continuation of a prompt."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from metagpt_fast.data import decode, encode
from metagpt_fast.training import load_model

HELP = "sample text from a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/metagpt/ckpt.pt"))
    parser.add_argument("--prompt", default="def ", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto")


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    model = load_model(args.checkpoint, args.device, args.backend)
    if not args.prompt:
        raise ValueError("--prompt must not be empty")
    prompt = encode(args.prompt)[None, -model.config.max_seq_length :].to(args.device)
    out = model.generate(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None)
    print(decode(out[0].cpu()))
    return 0
