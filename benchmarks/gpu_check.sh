#!/usr/bin/env bash
# One GPU check for an H100 machine without network, done in <= 8 minutes:
#   install   pip install --no-deps --no-build-isolation -e .  (wheels carried in .whl/ first)
#   tests     pytest -q tests                                  (the CUDA tests run here)
#   gemm      benchmarks/bench_gemm.py --quick                 (skipped with a note if absent)
#   io        benchmarks/bench_io.py, kvikio backend           (skipped with a note if absent)
#   e2e       offloaded fine-tune of llama-1b with --gpu-mem 3GiB (< its 4.4 GB of fp32 weights):
#             tokens/s, TFLOPS (6 x params x tokens), overlap %, next to plain PyTorch in memory
#
#   bash benchmarks/gpu_check.sh            # runs (dry run by itself when nvidia-smi is absent)
#   bash benchmarks/gpu_check.sh --dry-run  # prints the stages and exits 0
#
# Each stage has its own time limit (seconds; the sum stays under 8 minutes) so one slow stage
# cannot eat the others; a failed stage is reported and the next one still runs.
set -u
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
E2E_MODEL=${E2E_MODEL:-llama-1b}
E2E_GPU_MEM=${E2E_GPU_MEM:-3GiB}
E2E_STEPS=${E2E_STEPS:-3}
T_INSTALL=60 T_TESTS=150 T_GEMM=40 T_IO=40 T_E2E=180  # 470 s in all: inside 8 minutes with start-up slack
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: nvidia-smi not found: no GPU here, dry run only"
    DRY=1
fi

STAGES="install tests gemm io e2e"
declare -A DESC=(
    [install]="install: pip install --no-index --target .whl/site .whl/*.whl (if .whl/ exists); pip install --no-deps --no-build-isolation -e ."
    [tests]="tests: pytest -q tests (CUDA tests included), limit ${T_TESTS}s"
    [gemm]="gemm: benchmarks/bench_gemm.py --quick (skipped with a note if absent), limit ${T_GEMM}s"
    [io]="io: benchmarks/bench_io.py with the kvikio backend (skipped with a note if absent), limit ${T_IO}s"
    [e2e]="e2e: benchmarks/bench_scale.py --model ${E2E_MODEL} --device cuda --gpu-mem ${E2E_GPU_MEM} --plain: offloaded fine-tune, tokens/s, TFLOPS (6*N*tokens), overlap %, plain PyTorch side by side, limit ${T_E2E}s"
)

if [ "$DRY" = 1 ]; then
    echo "gpu_check dry run: would run these stages (total limit $((T_INSTALL + T_TESTS + T_GEMM + T_IO + T_E2E)) s):"
    for s in $STAGES; do echo "  ${DESC[$s]}"; done
    exit 0
fi

declare -A STATUS
run_stage() {  # name, limit_s, command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@"
    local rc=$?
    STATUS[$name]="rc=$rc in $((SECONDS - t0))s"
    [ $rc = 124 ] && STATUS[$name]="TIMED OUT after ${limit}s"
    echo "=== $name: ${STATUS[$name]}"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# install
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    run_stage wheels 30 $PY -m pip install --no-index --no-deps --target .whl/site .whl/*.whl
    export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
fi
run_stage install "$T_INSTALL" $PY -m pip install --no-index --no-deps --no-build-isolation -e .

# tests
run_stage tests "$T_TESTS" $PY -m pytest -q --no-header -p no:cacheprovider tests

# gemm
if [ -f benchmarks/bench_gemm.py ]; then
    run_stage gemm "$T_GEMM" $PY benchmarks/bench_gemm.py --quick
else
    STATUS[gemm]="skipped: benchmarks/bench_gemm.py not in this tree"
fi

# io (kvikio)
if [ -f benchmarks/bench_io.py ]; then
    IO_HELP=$($PY benchmarks/bench_io.py --help 2>&1)
    IO_ARGS=()
    grep -q -- "--quick" <<<"$IO_HELP" && IO_ARGS+=(--quick)
    grep -q -- "--no-fio" <<<"$IO_HELP" && IO_ARGS+=(--no-fio --no-deepspeed)
    grep -q -- "--size-gib" <<<"$IO_HELP" && ! grep -q -- "--quick" <<<"$IO_HELP" && IO_ARGS+=(--size-gib 1)
    if $PY -c "import kvikio" 2>/dev/null && grep -q -- "--backends" <<<"$IO_HELP"; then
        run_stage io "$T_IO" $PY benchmarks/bench_io.py "${IO_ARGS[@]}" --backends kvikio,uring
    else
        STATUS[io]="skipped: kvikio not importable (carry its wheels in .whl/) or bench_io.py has no --backends"
    fi
else
    STATUS[io]="skipped: benchmarks/bench_io.py not in this tree"
fi

# e2e: the store on the local disk, removed afterwards
E2E_STORE=${E2E_STORE:-$PWD/.gpu-check-store}
run_stage e2e "$T_E2E" $PY benchmarks/bench_scale.py --model "$E2E_MODEL" --device cuda --gpu-mem "$E2E_GPU_MEM" \
    --cpu-mem 8GiB --steps "$E2E_STEPS" --batch-size 8 --seq-len 512 --plain --store "$E2E_STORE" \
    --out benchmarks/results/gpu_check_e2e.md
rm -rf "$E2E_STORE"

echo "=== summary"
for s in wheels $STAGES; do
    [ -n "${STATUS[$s]:-}" ] && echo "  $s: ${STATUS[$s]}"
done
exit 0
