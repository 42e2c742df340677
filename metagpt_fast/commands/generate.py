"""``metagpt-fast generate``: load a checkpoint and sample a continuation of a prompt, printed as it comes."""

from __future__ import annotations

import argparse
import codecs
import sys
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
    parser.add_argument("--top-k", type=int, default=40, help="0 = no top-k filter")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    parser.add_argument(
        "--stop", action="append", default=[], metavar="CHAR", help="a one-byte text that ends the generation"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--no-cache", action="store_true", help="full forward per token instead of the KV cache")
    parser.add_argument("--compile", action="store_true", help="compile the decode step (torch.compile)")
    parser.add_argument("--no-stream", action="store_true", help="print the text once, at the end")


def _stop_tokens(stops: list[str]) -> list[int]:
    tokens = []
    for text in stops:
        data = encode(text)
        if data.numel() != 1:
            raise ValueError(f"--stop must be one byte (one token of the byte-level tokenizer), got {text!r}")
        tokens.append(int(data[0]))
    return tokens


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    model = load_model(args.checkpoint, args.device, args.backend)
    if not args.prompt:
        raise ValueError("--prompt must not be empty")
    prompt = encode(args.prompt)[None, -model.config.max_seq_length :].to(args.device)
    generator = torch.Generator(prompt.device).manual_seed(args.seed)
    options = dict(
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        stop_tokens=_stop_tokens(args.stop),
        generator=generator,
        use_cache=not args.no_cache,
        compile=args.compile,
    )
    if args.no_stream:
        out = model.generate(prompt, args.max_new_tokens, **options)
        print(decode(out[0].cpu()))
        return 0
    # Bytes arrive one token at a time: a character of several UTF-8 bytes is printed once it is complete.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(decoder.decode(bytes(prompt[0].tolist())))
    sys.stdout.flush()
    for token in model.stream_generate(prompt, args.max_new_tokens, **options):
        sys.stdout.write(decoder.decode(bytes([int(token[0])])))
        sys.stdout.flush()
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    sys.stdout.flush()
    return 0
