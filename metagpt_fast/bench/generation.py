"""Generation speed: ``MetaGPT.generate`` with the KV cache against the no-cache loop, interleaved.

``python -m metagpt_fast.bench.generation`` times both on the CLI's default model size (``metagpt-fast train``'s
defaults: embed 128, 4 layers, 4 heads, byte vocabulary) with ``max_seq_length=512``, a 64-token prompt and 448 new
tokens, greedy, single-threaded by default. Each round runs both (alternating which goes first); the ratio
``t_no_cache / t_cache`` is taken per round and its median reported with a 95% bootstrap interval.
"""

from __future__ import annotations

import argparse
import time

import torch

from metagpt_fast.bench.interleave import estimate
from metagpt_fast.data import VOCAB_SIZE
from metagpt_fast.model import MetaGPT, MetaGPTConfig


def build(args: argparse.Namespace) -> MetaGPT:
    torch.manual_seed(0)
    cfg = MetaGPTConfig(
        vocab_size=VOCAB_SIZE,
        embed_size=args.embed_size,
        num_layers=args.layers,
        num_heads=args.heads,
        max_seq_length=args.seq_len,
        positional=args.positional,
        backend=args.backend,
        fused=not args.unfused,
    )
    return MetaGPT.from_config(cfg).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embed-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--positional", choices=("sinusoidal", "rotary"), default="sinusoidal")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--unfused", action="store_true", help="MetaGPTConfig(fused=False): torch's norms and GELU")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new", type=int, default=448, help="new tokens")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument("--compile", action="store_true", help="also time the cache with compile=True")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    idx = torch.randint(0, VOCAB_SIZE, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    runs = {
        "cache": lambda: model.generate(idx, args.new, temperature=0),
        "no_cache": lambda: model.generate(idx, args.new, temperature=0, use_cache=False),
    }
    if args.compile:
        runs["cache_compiled"] = lambda: model.generate(idx, args.new, temperature=0, compile=True)
    outputs = {name: fn() for name, fn in runs.items()}  # warm-up (and compilation)
    for name, out in outputs.items():
        if not torch.equal(out, outputs["no_cache"]):
            print(f"warning: {name} tokens differ from the no-cache loop's")
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    base = times["no_cache"]
    tokens = args.batch * args.new
    print(
        f"model: embed {args.embed_size}, {args.layers} layers, {args.heads} heads, max_seq_length {args.seq_len}, "
        f"{args.positional}{', unfused' if args.unfused else ''}; prompt {args.prompt} + {args.new} new tokens, "
        f"batch {args.batch}, "
        f"threads {torch.get_num_threads()}, {args.rounds} interleaved rounds"
    )
    for name in names:
        t = estimate(times[name])
        line = f"{name:>15}: median {t.median:8.3f} s  ({tokens / t.median:8.1f} tok/s)"
        if name != "no_cache":
            ratio = estimate([b / x for b, x in zip(base, times[name], strict=True)])
            line += f"  speed-up vs no_cache {ratio.median:6.2f}x  [95% CI {ratio.ci_low:.2f}, {ratio.ci_high:.2f}]"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
