"""Static figures of the CUDA attention kernels (csrc/attention/*.cu) for sm_80 and sm_90, and their gates.

Compiles every ``.cu`` file with nvcc (``-Xptxas -v``) and reads its SASS with cuobjdump
(``metagpt_fast.devtools.cuda_attention``): one JSON line per kernel and arch on stdout (registers, spills, threads,
shared memory per CTA, CTAs per SM and what limits them, HMMA / LDS / LDSM / LDGSTS / LDG / STS counts of the kernel
and of its main loop, LDS-per-HMMA of both), then a table and the gates of ``cuda_attention.GATES`` (how many rows
fail each, and which) on stderr; exit status 1 when a gate fails. ``--root`` reads another checkout's sources (e.g.
an older commit unpacked with ``git archive``), for before / after figures.

    python scripts/cuda_sass_stats.py [--root DIR] [--jobs N] > cuda_sass.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the source tree's package, installed or not


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose csrc/ to compile (default: this one)")
    parser.add_argument("--jobs", type=int, default=2, help="nvcc processes at once")
    args = parser.parse_args()
    from metagpt_fast.devtools import cuda_attention

    rows, lines = cuda_attention.stats_rows(args.root.resolve(), jobs=args.jobs)
    return report(rows, lines)


def report(rows: list[dict], lines: list[str], out=sys.stdout, err=sys.stderr) -> int:
    """Prints the rows (JSON lines on ``out``), the table and the gates (on ``err``); 1 when a gate fails."""
    from metagpt_fast.devtools import cuda_attention

    for row in rows:
        print(json.dumps(row), file=out, flush=True)
    for line in lines:
        print(line, file=err)
    for row in rows:
        print("  " + cuda_attention.format_row(row), file=err)
    for kernel in cuda_attention.unlaunched(rows):
        print(f"  never launched by the launch templates (no occupancy): {kernel}", file=err)
    failures = {gate: cuda_attention.gate_failures(rows, gate) for gate in cuda_attention.GATES}
    counts = ", ".join(f"{gate} {len(failed)}" for gate, failed in failures.items())
    print(f"CUDA attention: {len(rows)} kernels x archs; failing each gate: {counts}", file=err)
    for gate, failed in failures.items():
        for line in failed:
            print(f"  [{gate}] {line}", file=err)
    return 1 if any(failures.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
