#!/usr/bin/env bash
# The one command to run on a GPU machine (one H100/H200): the checks that need a GPU, in under
# 8 minutes, results and logs under bench/results/ (or the folder given as the first argument).
#
#     bash bench/gpu_check.sh [RESULTS_DIR]
#
# Without a CUDA device it is a dry run: each GPU step runs its --smoke variant (the same code
# path, tiny, on the CPU; nothing is measured) and says so, so the script is known to work before
# a GPU arrives (tests/test_bench_gpu_check.py runs it that way in CI).
#
# Every step runs under its own `timeout`, logs to RESULTS_DIR/logs/<step>.log, and a failed step
# does not stop the next; the script exits 1 at the end if any step failed. To add a check (the
# planner's memory, ...), add one `step NAME SECONDS COMMAND...` line below. The whole run ends within
# DEADLINE_S (8 minutes): the last step, the training one, gets what the steps before it left (at most its
# own 190 s), so the set-up a bare machine needs first is taken from it rather than added.
#
# Python: .venv/bin/python when it exists; scripts/setup.sh runs only when .venv is missing (on a
# PyTorch image it creates .venv with --system-site-packages, so the machine's CUDA torch is
# reused and nothing replaces it). If that fails (no network) or .venv's torch cannot see the GPU,
# the system python3 is used: the benchmarks put the repository on sys.path themselves.
#
# Kernel correctness: tests/test_attention_kernels.py pins TRITON_INTERPRET=1 (CPU interpreter,
# fp32/fp16), so it cannot compile the kernels for the GPU; the bf16 GPU check is
# bench/attention_backends.py (every backend the model can train with against an fp32 reference).
# The run's record is RESULTS/gpu_check.json and gpu_check.md (bench/gpu_summary.py); with the
# default RESULTS, model.attention = "auto" reads the backend choices it holds.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${1:-bench/results}"
mkdir -p "$RESULTS/logs"
RESULTS="$(cd "$RESULTS" && pwd)"
LOGS="$RESULTS/logs"
: > "$RESULTS/steps.tsv"
START=$SECONDS
DEADLINE_S=480
NAMES=()
STATUSES=()
TIMES=()

# step NAME TIMEOUT_SECONDS COMMAND... : run, log, record; never exits the script.
step() {
    local name="$1" limit="$2"
    shift 2
    local t0=$SECONDS rc
    echo "=== [$name] (timeout ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > >(tee "$LOGS/$name.log") 2>&1
    rc=$?
    wait  # the tee
    local status="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="TIMEOUT (${limit}s)"
    elif [ "$rc" -ne 0 ]; then
        status="FAILED (exit $rc)"
    fi
    NAMES+=("$name")
    STATUSES+=("$status")
    TIMES+=("$((SECONDS - t0))")
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >> "$RESULTS/steps.tsv"
    echo "=== [$name] $status in $((SECONDS - t0))s"
}

cuda_ok() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

# --- Python environment -------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
    step setup 90 bash scripts/setup.sh
fi
PY=""
for candidate in .venv/bin/python python3; do
    if command -v "$candidate" >/dev/null 2>&1 && cuda_ok "$candidate"; then
        PY="$(command -v "$candidate")"
        break
    fi
done
DRY=0
if [ -z "$PY" ]; then
    DRY=1
    PY="$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )"
    echo "no CUDA device (no python here whose torch sees one): DRY RUN. The GPU steps run their --smoke"
    echo "variants on the CPU to check the code paths; nothing below is a GPU measurement."
fi
echo "python: $PY"

# --- Steps ----------------------------------------------------------------------------------
# In order of importance: bf16 correctness of every attention backend, then their speed (which writes
# the choice model.attention = "auto" makes on this GPU), our kernels against SDPA/cuDNN/Flex, then
# the compiled training step.
if [ "$DRY" = 1 ]; then
    step attention_backends_smoke 120 "$PY" bench/attention_backends.py --smoke --out "$RESULTS/attention_backends_smoke.json"
    step attention_smoke 120 "$PY" bench/attention.py --smoke --out "$RESULTS/attention_smoke.json"
    step train_smoke 120 "$PY" bench/gpu_train.py --smoke --out "$RESULTS/gpu_train_smoke.json"
else
    step environment 30 bash -c "nvidia-smi; '$PY' -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version(), \"triton\", triton.__version__, \"gpu\", torch.cuda.get_device_name(0))'"
    # Correctness (sdpa, flex, triton; causal, documents, window; GQA) first, then forward+backward speed.
    step attention_backends 150 "$PY" bench/attention_backends.py --budget-s 100 --out "$RESULTS/attention_backends.json"
    step attention_bench 100 "$PY" bench/attention.py --budget-s 75 --out "$RESULTS/attention.json"
    # Single-GPU training MFU and peak memory (1B and 8B shapes, 2k/8k/32k, bf16 and float8) beside
    # the planner's predicted peak; runs that do not start within the budget are recorded as skipped.
    train_s=$(( DEADLINE_S - (SECONDS - START) - 15 ))  # 15 s for the summary
    train_s=$(( train_s > 190 ? 190 : train_s < 1 ? 1 : train_s ))
    # No run starts after its budget (50 s before the step's end: a run's compile and steps); none at all
    # when the steps before used the time.
    step train_mfu "$train_s" "$PY" bench/gpu_train.py --budget-s "$(( train_s > 50 ? train_s - 50 : 0 ))" \
        --run-timeout-s 100 --out "$RESULTS/gpu_train.json"
fi
"$PY" bench/gpu_summary.py "$RESULTS" $( [ "$DRY" = 1 ] && echo --dry-run )

# --- Summary --------------------------------------------------------------------------------
echo
echo "gpu_check summary ($((SECONDS - START))s, results in $RESULTS):"
failed=0
for i in "${!NAMES[@]}"; do
    printf '  %-24s %-20s %4ss\n' "${NAMES[$i]}" "${STATUSES[$i]}" "${TIMES[$i]}"
    [ "${STATUSES[$i]}" = "ok" ] || failed=1
done
[ "$DRY" = 1 ] && echo "  (dry run: no GPU, code paths only)"
echo "  summary: $RESULTS/gpu_check.md"
exit "$failed"
