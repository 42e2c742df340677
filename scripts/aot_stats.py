"""Triton AOT statistics in parallel: every case of ``metagpt_fast.devtools.aot`` compiled for sm_80 and sm_90.

Same JSON lines as ``python -m metagpt_fast.devtools.aot`` (one object per case and arch: registers, stack,
local and shared memory, spill bytes, wgmma use, or the compile error), but spread over worker processes (one shard
of the cases each) so the GPU suite's time box covers every case. Each line is printed as soon as its compile ends,
so a cut run keeps what finished; a summary (spills over the allowance, missing wgmma, errors) goes to stderr.

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
    from metagpt_fast.devtools.aot import ARCHS, all_cases, stats_row

    for index, case in enumerate(all_cases()):
        if index % shards != shard:
            continue
        for arch in ARCHS:
            print(json.dumps(stats_row(case, arch)), flush=True)


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
    errors = [r for r in rows if "error" in r]
    spills = [r for r in rows if r.get("spill_bytes", 0) > r["allowed_spill_bytes"]]
    no_wgmma = [r for r in rows if r["expect_wgmma"] and r["arch"] >= 90 and r.get("uses_wgmma") is False]
    print(
        f"AOT: {len(rows)} compiles, {len(errors)} errors, {len(spills)} over their spill allowance, "
        f"{len(no_wgmma)} without the expected wgmma on sm_90",
        file=sys.stderr,
    )
    for r in errors + spills + no_wgmma:
        detail = r.get("error") or f"registers {r['registers']}, spill {r['spill_bytes']} B, wgmma {r['uses_wgmma']}"
        print(f"  {r['label']} sm_{r['arch']}: {detail}", file=sys.stderr)
    return 1 if errors or spills or no_wgmma else 0


if __name__ == "__main__":
    raise SystemExit(main())
