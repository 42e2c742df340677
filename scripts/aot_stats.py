"""Triton AOT statistics in parallel: every case of ``metagpt_fast.devtools.aot`` compiled for sm_80 and sm_90.

Same JSON lines as ``python -m metagpt_fast.devtools.aot`` (one object per case and arch: registers, stack,
local and shared memory, spill bytes, wgmma use, SASS opcode counts of the kernel and of its main-loop step,
instructions per 128 streamed rows, the TTGIR's matmuls and those that warps repeat, the ptxas advisories on sm_90,
or the compile error), but spread over worker processes (one shard of the cases each) so the GPU suite's time box
covers every case. Each line is printed as soon as its compile ends, so a cut run keeps what finished; a summary of
the gates of ``metagpt_fast.devtools.aot.GATES`` (how many rows fail each, and which) goes to stderr.

    python scripts/aot_stats.py [--jobs N] > aot.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the source tree's package, installed or not


def compile_shard(shard: int, shards: int) -> None:
    """Compiles the cases whose index is ``shard`` modulo ``shards``, printing one JSON line per (case, arch)."""
    from metagpt_fast.devtools.aot import all_cases, stats_rows

    cases = [case for index, case in enumerate(all_cases()) if index % shards == shard]
    for row in stats_rows(cases):
        print(json.dumps(row), flush=True)


def run_shards(jobs: int) -> list[dict]:
    """Starts ``jobs`` worker processes and relays their lines as they arrive."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "--shard", str(i), "--jobs", str(jobs)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(jobs)
    ]
    rows = []
    selector = selectors.DefaultSelector()
    for worker in workers:
        selector.register(worker.stdout, selectors.EVENT_READ)
    open_streams = len(workers)
    while open_streams:
        for key, _ in selector.select():
            line = key.fileobj.readline()
            if not line:
                selector.unregister(key.fileobj)
                open_streams -= 1
                continue
            print(line, end="", flush=True)
            rows.append(json.loads(line))
    for worker in workers:
        worker.wait()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--shard", type=int, help=argparse.SUPPRESS)  # set for the worker processes
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: ahead-of-time compilation needs triton's real compiler")
    if args.shard is not None:
        compile_shard(args.shard, args.jobs)
        return 0
    rows = run_shards(max(1, args.jobs))
    from metagpt_fast.devtools.aot import GATES, gate_failures

    failures = {gate: gate_failures(rows, gate) for gate in GATES}
    counts = ", ".join(f"{gate} {len(failed)}" for gate, failed in failures.items())
    print(f"AOT: {len(rows)} compiles; failing each gate: {counts}", file=sys.stderr)
    hopper = [r for r in rows if r["arch"] >= 90 and "error" not in r]
    if hopper and all(r.get("ptxas_advisories") is None for r in hopper):
        print(f"  ptxas advisories not checked: {hopper[0]['ptxas']}", file=sys.stderr)
    for gate, failed in failures.items():
        for line in failed:
            print(f"  [{gate}] {line}", file=sys.stderr)
    return 1 if any(failures.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
