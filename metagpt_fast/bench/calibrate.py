"""Measures which attention implementation is fastest per size class and writes the table ``auto`` reads.

    python -m metagpt_fast.bench.calibrate                 # this machine's devices, default classes
    python -m metagpt_fast.bench.calibrate --quick --n 512,2048 --dtypes float32

Every class (device, dtype, fwd or fwd+bwd, N, head dim, causal) times each implementation that serves it and is not
slow (interpreted Triton is not timed) against the reference, interleaved (``bench/interleave.py``): the speedups are
medians of per-round ratios with 95% bootstrap intervals. The table (``metagpt_fast/backends/measured_speed.json``)
records the date, the machine, the threads, the versions and this command; entries of devices not measured in this run
are kept, so a GPU machine's run adds to a CPU one. ``backends/measured.py`` describes how priorities follow from it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import shlex
import sys
from pathlib import Path

import torch

import metagpt_fast
from metagpt_fast import backends
from metagpt_fast.backends import measured
from metagpt_fast.bench.interleave import clock_for, interleave
from metagpt_fast.bench.results import git_revision, machine
from metagpt_fast.bench.timing import TimingBudget

DEFAULT_N = (128, 512, 2048)
DEFAULT_HEAD_DIMS = (64, 128)
DEFAULT_MODES = ("fwd", "fwd+bwd")


def shape(device: str, n: int, d: int) -> tuple[int, int, int, int]:
    """(B, H, N, D): 8 heads on CPU (the classes rank kernels; B * H only scales the work), 16k tokens per batch and
    model width 2048 on GPUs (bench/attention.py's GPU convention)."""
    if torch.device(device).type == "cuda":
        return max(1, 16384 // n), max(1, 2048 // d), n, d
    return 1, 8, n, d


def providers(device: str, dtype: torch.dtype, n: int, d: int, causal: bool, mode: str):
    """``{backend: call}`` for every implementation (not slow) that serves this class, the reference included."""
    b, h, n, d = shape(device, n, d)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    grad = mode != "fwd"
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        go = torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype)
    inputs = dict(query=q, key=k, value=v, attn_mask=None, dropout_p=0.0, is_causal=causal, scale=None)
    calls = {}
    for impl in backends.implementations("attention"):
        if impl.slow or impl.not_supported_reasons(**inputs, enable_gqa=False):
            continue

        def call(name=impl.backend):
            with contextlib.nullcontext() if grad else torch.no_grad():
                out = metagpt_fast.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=name)
                if grad:
                    torch.autograd.grad(out, (q, k, v), go)

        calls[impl.backend] = call
    return calls


def calibrate(args: argparse.Namespace) -> list[dict]:
    budget = TimingBudget.quick() if args.quick else TimingBudget(case_max_s=args.case_s)
    entries = []
    for device in args.devices:
        for dtype_s in args.dtypes:
            for mode in args.modes:
                for d in args.head_dims:
                    for n in args.n:
                        for causal in (False, True):
                            calls = providers(device, getattr(torch, dtype_s), n, d, causal, mode)
                            if "reference" not in calls or len(calls) < 2:
                                continue
                            pairs = [(p, "reference") for p in calls if p != "reference"]
                            res = interleave(calls, pairs, budget, clock=clock_for(device))
                            speedup = {"reference": [1.0, 1.0, 1.0]}
                            for (p, _), est in res.ratios.items():
                                speedup[p] = [round(est.median, 3), round(est.ci_low, 3), round(est.ci_high, 3)]
                            entry = dict(
                                op="attention", device=measured.device_class(torch.device(device)), dtype=dtype_s,
                                mode=mode, n=n, head_dim=d, causal=causal, speedup=speedup, rounds=res.rounds,
                            )  # fmt: skip
                            entries.append(entry)
                            print(json.dumps(entry), flush=True)
    return entries


def write(entries: list[dict], out: Path, threads: int, command: str) -> dict:
    """The table with ``entries``, plus the old table's entries of devices this run did not measure."""
    kept = []
    measured_devices = {e["device"] for e in entries}
    with contextlib.suppress(OSError, ValueError):
        old = json.loads(out.read_text())
        kept = [e for e in old.get("entries", []) if isinstance(e, dict) and e.get("device") not in measured_devices]
    data = {
        "version": measured.FORMAT_VERSION,
        "measured": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "threads": threads,
        "torch": torch.__version__,
        "git": git_revision(),
        "command": command,
        "entries": kept + entries,
    }
    measured.parse(data)  # never write a table that the loader would refuse
    head = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in data.items() if k != "entries"]
    rows = ",\n".join(f"  {json.dumps(e)}" for e in data["entries"])
    out.write_text("{\n" + ",\n".join(head) + ',\n "entries": [\n' + rows + "\n ]\n}\n")  # one entry a line
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m metagpt_fast.bench.calibrate", description=__doc__.split("\n")[0])
    ints = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    strs = lambda s: tuple(x for x in s.split(",") if x)  # noqa: E731
    default_devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    p.add_argument("--devices", type=strs, default=default_devices)
    p.add_argument("--dtypes", type=strs, default=("float32", "bfloat16"))
    p.add_argument("--modes", type=strs, default=DEFAULT_MODES)
    p.add_argument("--n", type=ints, default=DEFAULT_N)
    p.add_argument("--head-dims", type=ints, default=DEFAULT_HEAD_DIMS)
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    p.add_argument("--case-s", type=float, default=6.0, help="time cap of one class's rounds (seconds)")
    p.add_argument("--quick", action="store_true", help="the quick timing budget (3 s per class)")
    p.add_argument("--out", type=Path, default=measured.DEFAULT_TABLE_PATH)
    args = p.parse_args(argv)
    for m in args.modes:
        if m not in DEFAULT_MODES:
            p.error(f"--modes must be among {DEFAULT_MODES}, got {m!r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for dt in args.dtypes:
        if not isinstance(getattr(torch, dt, None), torch.dtype):
            p.error(f"--dtypes: unknown dtype {dt!r}")
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m metagpt_fast.bench.calibrate", *map(shlex.quote, argv)])
    entries = calibrate(args)
    data = write(entries, args.out, torch.get_num_threads(), command)
    print(f"wrote {len(data['entries'])} entries to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
