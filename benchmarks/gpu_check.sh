#!/usr/bin/env bash
# The GPU check: everything fuyou does only on a CUDA machine, in one script with a time limit per
# stage, for a machine without network (an H100/H200 with PyTorch, Triton and a compiler):
#   env      GPU, driver, CPU, memory, disk, Python packages
#   deps     wheels carried in .gpu/whl/ (kvikio) into a private site dir; a static liburing
#            carried in .gpu/uring/ into /usr/local (then csrc/io gets its io_uring engine)
#   build    python setup.py build_ext --inplace (csrc/io, csrc/adam)
#   tests    the CUDA tests: runtime on a GPU vs plain PyTorch, compiled Triton kernels, kvikio
#   suite    the whole test suite with the GPU visible (only when GPU_CHECK_STAGES names it)
#   finetune the README's main job (`fuyou finetune`, llama-tiny on the bundled corpus) on the GPU,
#            with a trace of its steps
#   profile  fuyou probe, then an offloaded fine-tune of llama-1b (bf16 weights, fp8 states, bf16+rem
#            master, lean disk mode) with a trace, then `fuyou profile`: busy/overlap/stalls per
#            lane, achieved vs predicted step time
#   gemm     benchmarks/bench_gemm.py --quick: TFLOPS vs bf16 matmul and _scaled_mm
#   io       benchmarks/bench_io.py with the kvikio backend beside uring/threads
#   e2e      benchmarks/bench_scale.py --device cuda --gpu-mem 3GiB --plain: an offloaded fine-tune,
#            tokens/s, TFLOPS (6 x params x tokens), overlap %, plain PyTorch on the same GPU
#   ranks    the data-parallel path on the GPU: torchrun with 1 rank, then 2 ranks sharing the GPU
#            (collectives through gloo on host memory), clipping on, then the 2-rank stores exported
#   predict  benchmarks/bench_predict.py --device cuda: the planner's predicted vs measured step time
#            over its matrix on the GPU (only when GPU_CHECK_STAGES names it: ~4 minutes)
#   adam     benchmarks/bench_adam.py --threads 1 <cores>: the CPU AdamW table (every codec against
#            torch fused) on this machine's many cores, last so a cut-short call loses only it
#
#   bash benchmarks/gpu_check.sh                 # all stages (dry run by itself without nvidia-smi)
#   bash benchmarks/gpu_check.sh --dry-run       # prints the stages and exits 0
#   GPU_CHECK_STAGES="build tests" bash benchmarks/gpu_check.sh    # some stages only
#
# Logs and result tables go to $GPU_CHECK_OUT (default benchmarks/results/gpu/). A failed or timed
# out stage is reported in the summary and the next stage still runs.
set -u
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUTDIR=${GPU_CHECK_OUT:-benchmarks/results/gpu}
E2E_MODEL=${E2E_MODEL:-llama-1b}
E2E_GPU_MEM=${E2E_GPU_MEM:-3GiB}
E2E_STEPS=${E2E_STEPS:-3}
E2E_WEIGHTS=${E2E_WEIGHTS:-bf16}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 4)}
# Per-stage caps in seconds. The default stages took ~7.5 minutes in all on an H200 (2026-11-26).
T_ENV=${T_ENV:-15} T_DEPS=${T_DEPS:-30} T_BUILD=${T_BUILD:-60} T_TESTS=${T_TESTS:-120} T_SUITE=${T_SUITE:-240}
T_FT=${T_FT:-60} T_PROF=${T_PROF:-100} T_GEMM=${T_GEMM:-80} T_IO=${T_IO:-40} T_E2E=${T_E2E:-120} T_RANKS=${T_RANKS:-60}
T_PRED=${T_PRED:-300} T_ADAM=${T_ADAM:-150}
ALL_STAGES="env deps build tests finetune suite profile gemm io e2e ranks predict adam"
# The default leaves out `suite` (the whole suite, ~3 min on 16 cores): `tests` already runs every
# test whose behaviour changes with a GPU visible.
DEFAULT_STAGES="env deps build tests finetune ranks profile gemm io e2e adam"
STAGES=${GPU_CHECK_STAGES:-$DEFAULT_STAGES}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: nvidia-smi not found: no GPU here, dry run only"
    DRY=1
fi

# The CUDA tests, and the CLI tests (their runs default to --device cuda where a GPU is visible).
CUDA_TESTS="tests/runtime/test_cuda.py tests/kernels tests/store/test_gds.py tests/test_cli.py"
declare -A LIMIT=([env]=$T_ENV [deps]=$T_DEPS [build]=$T_BUILD [tests]=$T_TESTS [suite]=$T_SUITE [finetune]=$T_FT [profile]=$T_PROF [gemm]=$T_GEMM [io]=$T_IO [e2e]=$T_E2E
                  [ranks]=$T_RANKS [predict]=$T_PRED [adam]=$T_ADAM)
declare -A DESC=(
    [env]="env: nvidia-smi, CPU, memory, disk, torch/triton versions"
    [deps]="deps: pip install --no-index --no-deps --target /tmp/fuyou-site .gpu/whl/*.whl; .gpu/uring -> /usr/local"
    [build]="build: python setup.py build_ext --inplace -j ${JOBS}"
    [tests]="tests: pytest ${CUDA_TESTS} (runtime on the GPU vs plain PyTorch, compiled Triton kernels, kvikio)"
    [suite]="suite: pytest -n ${JOBS} tests (the whole suite, GPU visible; not in the default stages)"
    [finetune]="finetune: python -m fuyou.cli finetune --trace (the default job, device cuda by default)"
    [profile]="profile: fuyou probe; fuyou finetune --model ${PROF_MODEL:-llama-1b} --weights bf16 --optim-states fp8 --master bf16+rem --disk-mode lean --trace; fuyou profile"
    [gemm]="gemm: benchmarks/bench_gemm.py --quick"
    [io]="io: benchmarks/bench_io.py --backends kvikio,uring,threads --size-gib 2 --no-fio --no-deepspeed"
    [ranks]="ranks: torchrun --nproc-per-node 1, then 2, -m fuyou finetune --device cuda --max-grad-norm 1; fuyou export of the 2-rank stores"
    [predict]="predict: benchmarks/bench_predict.py --device cuda (not in the default stages)"
    [adam]="adam: benchmarks/bench_adam.py --threads 1 ${JOBS} (CPU AdamW per codec vs torch fused, all cores)"
    [e2e]="e2e: benchmarks/bench_scale.py --model ${E2E_MODEL} --weights ${E2E_WEIGHTS} --device cuda --gpu-mem ${E2E_GPU_MEM} --plain: offloaded fine-tune, tokens/s, TFLOPS (6*N*tokens), overlap %, plain PyTorch side by side"
)

if [ "$DRY" = 1 ]; then
    total=0
    for s in $STAGES; do total=$((total + ${LIMIT[$s]})); done
    echo "gpu_check dry run: would run these stages (total limit ${total} s), logs in ${OUTDIR}:"
    for s in $STAGES; do echo "  ${DESC[$s]}, limit ${LIMIT[$s]}s"; done
    exit 0
fi

mkdir -p "$OUTDIR"
declare -A STATUS
run_stage() {  # name, command... (output teed into $OUTDIR/<name>.log)
    local name=$1
    shift
    local limit=${LIMIT[$name]}
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"
    local rc=${PIPESTATUS[0]}
    STATUS[$name]="rc=$rc in $((SECONDS - t0))s"
    [ "$rc" = 124 ] && STATUS[$name]="TIMED OUT after ${limit}s"
    echo "=== $name: ${STATUS[$name]}"
}
want() { [[ " $STAGES " == *" $1 "* ]]; }

stage_env() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
    echo "cpus $(nproc); $(grep -m1 'model name' /proc/cpuinfo)"
    free -g | head -2
    df -h . /tmp | tail -2
    uname -r
    $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
    $PY -c "import transformers, setuptools; print('transformers', transformers.__version__, 'setuptools', setuptools.__version__)"
}

stage_deps() {
    if ls .gpu/whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fuyou-site .gpu/whl/*.whl || return 1
    fi
    if [ -f .gpu/uring/lib/liburing.a ]; then
        cp -r .gpu/uring/include/. /usr/local/include/ && cp .gpu/uring/lib/liburing.a /usr/local/lib/ || return 1
    fi
    PYTHONPATH=/tmp/fuyou-site $PY -c "import kvikio; print('kvikio', kvikio.__version__)" || true
}

stage_build() {
    $PY setup.py -q build_ext --inplace -j "$JOBS" || return 1
    $PY -c "import fuyou._io as io, fuyou._adam as a; print('built: io', io.__file__, 'adam', a.__file__)"
    $PY -c "from fuyou.store import backends; backends.get_backend(); print('I/O backends:', backends.available_backends(), 'default', backends.default_backend_name())" 
}

stage_ranks() {
    local stores="$PWD/.gpu-check-dp" rc=0
    rm -rf "$stores"
    for n in 1 2; do
        $PY -m torch.distributed.run --standalone --nproc-per-node $n -m fuyou finetune --device cuda --store "$stores/n$n-{rank}" \
            --steps 4 --max-grad-norm 1 --batch-size 8 --micro-batches 4 --trace "$OUTDIR/ranks-n$n" || rc=1
    done
    [ $rc = 0 ] && $PY -m fuyou.cli export --store "$stores/n2-{rank}" --to "$stores/export" || rc=1
    [ $rc = 0 ] && $PY -m fuyou.cli profile --trace "$OUTDIR/ranks-n2/rank0/trace.json" --png "$OUTDIR/ranks-n2/timeline.png" || rc=1
    rm -rf "$stores"
    return $rc
}

stage_profile() {
    local store="$PWD/.gpu-check-prof" model=${PROF_MODEL:-llama-1b}
    $PY -m fuyou.cli probe --store-dir "$PWD" --hidden 2048 --intermediate 5632 --heads 32 --out "$OUTDIR/probe.json" || return 1
    $PY -m fuyou.cli finetune --model "$model" --weights bf16 --optim-states fp8 --master bf16+rem --disk-mode lean \
        --batch-size 8 --seq-len 512 --micro-batches 2 --steps "${PROF_STEPS:-2}" --store "$store" --overwrite --trace "$OUTDIR/profile"
    local rc=$?
    rm -rf "$store"
    [ $rc = 0 ] || return $rc
    $PY -m fuyou.cli profile --trace "$OUTDIR/profile/trace.json" --rates "$OUTDIR/probe.json"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ -d /tmp/fuyou-site ] || mkdir -p /tmp/fuyou-site
export PYTHONPATH="$PWD:/tmp/fuyou-site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

export PY JOBS
export OUTDIR
export -f stage_env stage_deps stage_build stage_profile stage_ranks  # run under timeout in a child bash
want env && run_stage env bash -c stage_env
want deps && run_stage deps bash -c stage_deps
want build && run_stage build bash -c stage_build
want tests && run_stage tests $PY -m pytest -q --no-header -p no:cacheprovider -n 8 --timeout 90 -rs $CUDA_TESTS
if want finetune; then
    run_stage finetune $PY -m fuyou.cli finetune --store "$PWD/.gpu-check-ft" --overwrite --trace "$OUTDIR/finetune-trace"
    rm -rf "$PWD/.gpu-check-ft"
fi
want suite && run_stage suite $PY -m pytest -q --no-header -p no:cacheprovider -n "$JOBS" --timeout 200 tests
want ranks && run_stage ranks bash -c stage_ranks
want profile && run_stage profile bash -c stage_profile
want gemm && run_stage gemm $PY benchmarks/bench_gemm.py --quick
if want io; then
    run_stage io $PY benchmarks/bench_io.py --backends kvikio,uring,threads --size-gib 2 --points 4x16,16x8 --runs 3 \
        --no-fio --no-deepspeed --out "$OUTDIR/bench_io.md"
fi
if want e2e; then
    E2E_STORE=${E2E_STORE:-$PWD/.gpu-check-store}
    run_stage e2e $PY benchmarks/bench_scale.py --model "$E2E_MODEL" --weights "$E2E_WEIGHTS" --device cuda --gpu-mem "$E2E_GPU_MEM" \
        --cpu-mem 8GiB --steps "$E2E_STEPS" --batch-size 8 --seq-len 512 --plain --disk-mode safe --store "$E2E_STORE" \
        --out "$OUTDIR/bench_scale_gpu.md"
    rm -rf "$E2E_STORE"
fi

want predict && run_stage predict $PY benchmarks/bench_predict.py --device cuda --dir "$PWD/.gpu-check-predict" --out "$OUTDIR/bench_predict_gpu.md"
want adam && run_stage adam $PY benchmarks/bench_adam.py --threads 1 "$JOBS" --out "$OUTDIR/bench_adam_gpu_machine.md"
rm -rf "$PWD/.gpu-check-predict"

echo "=== summary"
for s in $ALL_STAGES; do
    [ -n "${STATUS[$s]:-}" ] && echo "  $s: ${STATUS[$s]}"
done
exit 0
