#!/usr/bin/env bash
# One-command GPU check for a machine with no internet (Python 3.12, torch 2.11, triton 3.6, nvcc 13.0):
#
#   scripts/gpu_suite.sh OUTDIR
#
# Stages, each time-boxed with `timeout` so a hang cannot eat the budget (the boxes add up to 465 s; a stage never
# gets more than what is left of them):
#   env      nvidia-smi, versions                                        -> OUTDIR/summary.txt
#   build    the CUDA extension (JIT, metagpt_fast/_extension.py)         -> OUTDIR/build.log
#   info     backends and why any is unavailable                         -> OUTDIR/summary.txt
#   tests    the cuda flash_attention tests, then the tests marked gpu in fp16, in bf16, then the rest
#                                                                        -> OUTDIR/tests.log
#   bench    metagpt-fast bench --quick against torch SDPA               -> OUTDIR/bench.log, OUTDIR/bench/
#   aot      Triton AOT register/spill/shared-memory stats (sm_80, sm_90) -> OUTDIR/aot.jsonl (+ summary)
#   profile  a few profiled training steps (top kernels, peak memory)    -> OUTDIR/profile.txt
# At most 8 files, none deeper than OUTDIR/bench/FILE (the GPU machine's transfer limit). Without a GPU the GPU
# stages are skipped with the reason and the others run on the CPU. Exit status 1 if any stage failed or timed out.
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$ROOT" || exit 2

PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda  # torch's guess (/usr/local) lacks lib64/libcudart.so on these machines
fi
unset TRITON_INTERPRET  # real Triton compiler on the GPU; the AOT stage needs it too
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT

SUMMARY=$OUT/summary.txt
BUDGET_TOTAL=465  # seconds for all stages: the whole run must stay under 8 minutes
START=$(date +%s)
STAGES=()
FAILED=0

log_header() {  # file title
    printf '\n===== %s (%s) =====\n' "$2" "$(date -u +%H:%M:%S)" >> "$1"
}

record() {  # stage status seconds
    STAGES+=("$(printf '%-10s %-34s %5ss' "$1" "$2" "$3")")
    printf '[gpu_suite] %-10s %s (%ss)\n' "$1" "$2" "$3"
    case $2 in FAILED* | TIMEOUT*) FAILED=1 ;; esac
}

# stage NAME BUDGET LOG CMD...: runs CMD under `timeout`, output appended to LOG; never longer than what is left.
stage() {
    local name=$1 budget=$2 log=$3
    shift 3
    local left=$((BUDGET_TOTAL - ($(date +%s) - START)))
    if [ "$left" -lt 10 ]; then
        record "$name" "SKIPPED: suite time budget spent" 0
        return 1
    fi
    [ "$budget" -gt "$left" ] && budget=$left
    log_header "$log" "$name: $* (time box ${budget}s)"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=5 "$budget" "$@" >> "$log" 2>&1
    rc=$?
    local took=$(($(date +%s) - t0))
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        record "$name" "TIMEOUT after ${budget}s" "$took"
    elif [ $rc -eq 0 ]; then
        record "$name" "ok" "$took"
    elif [ $rc -eq 5 ] && [[ $name == tests* ]]; then  # pytest: nothing selected (e.g. no test has this dtype)
        record "$name" "ok (no tests selected)" "$took"
    else
        record "$name" "FAILED (exit $rc)" "$took"
    fi
    return $rc
}

skip() {  # name reason [log]
    record "$1" "SKIPPED" 0
    if [ $# -ge 3 ]; then
        log_header "$3" "$1 skipped"
        echo "$1 skipped: $2" >> "$3"
    fi
    echo "[gpu_suite] $1 skipped: $2"
}

# ---------------------------------------------------------------------------------------------------------- env
: > "$SUMMARY"
log_header "$SUMMARY" "environment"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git describe --always --dirty 2>/dev/null || echo unknown)"
    echo "python: $PY ($($PY --version 2>&1))"
    echo "nproc: $(nproc)"
} >> "$SUMMARY"
HAVE_GPU=0
if timeout 60 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    HAVE_GPU=1
fi
if command -v nvidia-smi > /dev/null; then
    stage env 15 "$SUMMARY" nvidia-smi
    timeout 10 nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm,power.limit \
        --format=csv >> "$SUMMARY" 2>&1
else
    echo "nvidia-smi: not found" >> "$SUMMARY"
fi
timeout 60 "$PY" -c "
import torch, platform
print('torch', torch.__version__, '| cuda', torch.version.cuda, '| cuda available', torch.cuda.is_available())
try:
    import triton; print('triton', triton.__version__)
except Exception as exc:
    print('triton: not importable:', exc)
if torch.cuda.is_available():
    print('device', torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability())
" >> "$SUMMARY" 2>&1
if [ $HAVE_GPU -eq 0 ]; then
    echo "[gpu_suite] no CUDA GPU visible to torch: GPU stages will be skipped, CPU stages still run"
fi

# -------------------------------------------------------------------------------------------------------- build
BUILD_LOG=$OUT/build.log
if [ $HAVE_GPU -eq 0 ]; then
    # The JIT build of the CUDA part takes minutes on a CPU machine and nothing could run it: later stages use a
    # prebuilt metagpt_fast._C if there is one, and never start a build.
    export METAGPT_FAST_NO_JIT=1
    skip build "no CUDA GPU (the extension's CPU build is covered by the test suite)"
else
    : > "$BUILD_LOG"
    if ! stage build 150 "$BUILD_LOG" "$PY" -c "
import sys, time
began = time.time()
from metagpt_fast import _extension
module = _extension.load(verbose=True)
print(f'extension loaded: {module is not None} in {time.time() - began:.0f} s')
print('unavailable reason:', _extension.unavailable_reason())
print('CUDA kernels registered:', _extension.has_cuda_kernels())
sys.exit(0 if module is not None else 1)
"; then
        export METAGPT_FAST_NO_JIT=1  # a failed or cut build must not restart inside every later stage
    fi
fi

# --------------------------------------------------------------------------------------------------------- info
stage info 20 "$SUMMARY" "$PY" -m metagpt_fast.cli info

# -------------------------------------------------------------------------------------------------------- tests
TESTS_LOG=$OUT/tests.log
: > "$TESTS_LOG"
# Every test that needs a CUDA GPU carries the `gpu` marker (docs/testing.md). Collecting imports every test module,
# so it runs once; the dtype stages then load only the files that hold GPU tests.
PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider -m gpu)
GPU_IDS=$SCRATCH/gpu_tests.txt
stage tests-collect 20 "$TESTS_LOG" bash -o pipefail -c '"${@:2}" --collect-only -q tests | tee "$1"' _ "$GPU_IDS" \
    "${PYTEST[@]}"
# The CUDA kernels' flash_attention (dense calls, windows, softcap, GQA, deterministic backward) runs first in a box
# of its own, so a slow parity sweep elsewhere cannot starve it; the dtype stages leave its file out.
FLASH_CUDA=tests/test_flash_cuda.py
mapfile -t FILES < <(grep -o '^tests/[^:]*\.py' "$GPU_IDS" 2> /dev/null | sort -u | grep -vx "$FLASH_CUDA")
if [ $HAVE_GPU -eq 0 ]; then
    # Without a GPU only collection is checked (imports, parametrisation); the CPU suite is CI's job.
    echo "no CUDA GPU: the tests marked gpu were collected, not run" >> "$TESTS_LOG"
elif [ ${#FILES[@]} -eq 0 ]; then
    skip tests "no test marked gpu was collected" "$TESTS_LOG"
else
    stage tests-flash-cuda 20 "$TESTS_LOG" "${PYTEST[@]}" "$FLASH_CUDA"
    # pytest -k matches substrings of test ids: "float16" is also in "bfloat16", hence the exclusions.
    stage tests-fp16 30 "$TESTS_LOG" "${PYTEST[@]}" "${FILES[@]}" -k "(float16 and not bfloat16) or fp16"
    stage tests-bf16 30 "$TESTS_LOG" "${PYTEST[@]}" "${FILES[@]}" -k "bfloat16 or bf16"
    stage tests-rest 20 "$TESTS_LOG" "${PYTEST[@]}" "${FILES[@]}" -k "not (float16 or fp16 or bf16)"
fi

# -------------------------------------------------------------------------------------------------------- bench
BENCH_LOG=$OUT/bench.log
: > "$BENCH_LOG"
if [ $HAVE_GPU -eq 1 ]; then
    # Attention fwd and fwd+bwd at N = 1k..16k, D = 64/128, causal and not; positional ops; the training step.
    stage bench 90 "$BENCH_LOG" "$PY" -m metagpt_fast.cli bench --device cuda --quick --max-seconds 65 \
        --backends reference,triton,cuda,torch-sdpa,flash-attn,liger --out "$OUT/bench"
else
    echo "no CUDA GPU: the CPU quick suite of the kernel ops instead (CI runs the full quick suite)" >> "$BENCH_LOG"
    stage bench 90 "$BENCH_LOG" "$PY" -m metagpt_fast.cli bench --device cpu --quick --max-seconds 50 \
        --ops attention,embed_positions,add_positional_encoding,rotary --out "$OUT/bench"
fi

# ---------------------------------------------------------------------------------------------------------- aot
if timeout 30 "$PY" -c "import triton" 2> /dev/null; then
    # JSON lines only in aot.jsonl; the stage header and the stats summary (stderr) go to the summary.
    stage aot 45 "$SUMMARY" bash -c '"$0" scripts/aot_stats.py > "$1"' "$PY" "$OUT/aot.jsonl"
else
    skip aot "triton is not importable"
fi

# ------------------------------------------------------------------------------------------------------ profile
PROFILE_LOG=$OUT/profile.txt
: > "$PROFILE_LOG"
if [ $HAVE_GPU -eq 1 ]; then
    stage profile 25 "$PROFILE_LOG" "$PY" -m metagpt_fast.cli profile --device cuda --seq-len 256 --steps 3 \
        --out "$SCRATCH/profile"
else
    stage profile 25 "$PROFILE_LOG" "$PY" -m metagpt_fast.cli profile --device cpu --embed-size 64 --layers 2 \
        --heads 2 --seq-len 64 --batch-size 2 --steps 2 --out "$SCRATCH/profile"
fi

# ------------------------------------------------------------------------------------------------------ summary
log_header "$SUMMARY" "stages"
printf '%s\n' "${STAGES[@]}" >> "$SUMMARY"
echo "total: $(($(date +%s) - START)) s" >> "$SUMMARY"
NFILES=$(find "$OUT" -type f | wc -l)
DEEP=$(find "$OUT" -mindepth 3 -type f | wc -l)
if [ "$NFILES" -gt 8 ] || [ "$DEEP" -gt 0 ]; then
    echo "WARNING: $NFILES files ($DEEP too deep) in $OUT: the GPU machine returns at most 8, at most one folder deep" \
        | tee -a "$SUMMARY"
fi
cat "$SUMMARY" | sed -n '/===== stages/,$p'
exit $FAILED
