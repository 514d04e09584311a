"""TFLOPS of fuyou's low-precision Triton GEMMs vs torch bf16 matmul and torch._scaled_mm (rowwise).

GPU only (exits 0 with a message elsewhere). Times are triton.testing.do_bench medians (each over
~100 ms of back-to-back runs); every ratio compares numbers from this same run and GPU.

    python benchmarks/bench_gemm.py            # squares {4096, 8192}^3 and LLM layer shapes, ~3 min on H100
    python benchmarks/bench_gemm.py --quick    # 3 shapes

Columns (TFLOPS = 2*M*N*K / time): bf16 = torch.matmul bf16; smm = torch._scaled_mm fp8 rowwise
(pre-quantized, default precise accumulation); fwd/dgrad/wgrad = fuyou.kernels.fp8_gemm in the
three layouts of the blockwise recipe (pre-quantized; fwd with fast accumulation, dgrad/wgrad
without, as the recipe runs them); fwd+q = forward including act_quant(X) and weight_quant(W);
then the quantizers alone (ms) and the FP4 emulation primitives (hadamard + fp4_quant of X, ms).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch

SQUARES = [(m, n, k) for m in (4096, 8192) for n in (4096, 8192) for k in (4096, 8192)]
# (name, tokens M, out N, in K): Llama-3-8B and -70B projections at 8192 tokens per micro-batch.
LAYERS = [
    ("8B qkv", 8192, 6144, 4096), ("8B o", 8192, 4096, 4096), ("8B gate+up", 8192, 28672, 4096),
    ("8B down", 8192, 4096, 14336), ("70B qkv", 8192, 10240, 8192), ("70B down", 8192, 8192, 28672),
]


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import triton

    return (f"{torch.cuda.get_device_name()} | CPU {cpu}, {os.cpu_count()} cores, {ram_gib:.0f} GiB | "
            f"torch {torch.__version__}, triton {triton.__version__} | "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")


def bench_ms(fn) -> float | None:
    from triton.testing import do_bench

    try:
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    except Exception as exc:  # a peer missing on this torch (e.g. rowwise _scaled_mm) -> n/a
        print(f"    ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})", file=sys.stderr)
        return None


def tflops(flop: float, ms: float | None) -> str:
    return f"{flop / ms / 1e9:7.0f}" if ms else "    n/a"


def run_shape(label: str, m: int, n: int, k: int, device: str = "cuda") -> tuple[str, dict]:
    from fuyou.kernels import reference as ref
    from fuyou.kernels.act_quant import act_quant
    from fuyou.kernels.fp4_quant import fp4_quant
    from fuyou.kernels.fp8_gemm import fp8_gemm
    from fuyou.kernels.hadamard import hadamard
    from fuyou.kernels.weight_quant import weight_quant

    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    dy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    flop = 2.0 * m * n * k
    xq, xs = act_quant(x)
    wq, ws = weight_quant(w)
    gq, gs = act_quant(dy)
    gtq, gts = act_quant(dy.t())
    xtq, xts = act_quant(x.t())
    # rowwise scaled_mm peer: one scale per row of X and per row of W
    x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
    sx = torch.ones(m, 1, device=device)
    sw = torch.ones(1, n, device=device)
    ms = {
        "bf16": bench_ms(lambda: x @ w.t()),
        "smm": bench_ms(lambda: torch._scaled_mm(x8, w8.t(), sx, sw, out_dtype=torch.bfloat16)),
        "fwd": bench_ms(lambda: fp8_gemm(xq, xs, wq.t(), ws, 128, torch.bfloat16, fast_accum=True)),
        "dgrad": bench_ms(lambda: fp8_gemm(gq, gs, wq, ws.t(), 128, torch.bfloat16)),
        "wgrad": bench_ms(lambda: fp8_gemm(gtq, gts, xtq.t(), xts, 1, torch.float32)),
        "fwd+q": bench_ms(lambda: fp8_gemm(*act_quant(x), *_wt(weight_quant(w)), 128, torch.bfloat16, True)),
        "aq": bench_ms(lambda: act_quant(x)),
        "aqT": bench_ms(lambda: act_quant(x.t())),
        "wq": bench_ms(lambda: weight_quant(w)),
        "fp4": bench_ms(lambda: fp4_quant(hadamard(x, 32), "mxfp4")),
        "nv4": bench_ms(lambda: fp4_quant(x, "nvfp4", tensor_scale=ref.nvfp4_tensor_scale_ref(x))),
    }
    t = {key: tflops(flop, ms[key]) for key in ("bf16", "smm", "fwd", "dgrad", "wgrad", "fwd+q")}

    def ratio(a, b):
        return f"{ms[b] / ms[a]:5.2f}" if ms[a] and ms[b] else "  n/a"

    def msec(key):
        return f"{ms[key]:6.3f}" if ms[key] else "   n/a"

    row = (f"{label:>18} {m:>5} {n:>5} {k:>5} | {t['bf16']} {t['smm']} | {t['fwd']} {t['dgrad']} {t['wgrad']} "
           f"{t['fwd+q']} | {ratio('fwd', 'bf16')} {ratio('fwd', 'smm')} | {msec('aq')} {msec('aqT')} {msec('wq')} | "
           f"{msec('fp4')} {msec('nv4')}")
    return row, ms


def _wt(qs):
    codes, scales = qs
    return codes.t(), scales


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 shapes only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gemm: needs a CUDA GPU (FP8 tensor cores: sm_89/sm_90+); nothing measured on this machine.")
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench_gemm: unset TRITON_INTERPRET to time the compiled kernels.")
        return 0
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    print(machine())
    shapes = [("square", *s) for s in SQUARES] + list(LAYERS)
    if args.quick:  # 8192^3 (the acceptance shape) and the two largest layer shapes
        shapes = [("square", *SQUARES[-1]), LAYERS[-1], LAYERS[2]]
    print(f"{'shape':>18} {'M':>5} {'N':>5} {'K':>5} | {'bf16':>7} {'smm':>7} | {'fwd':>7} {'dgrad':>7} "
          f"{'wgrad':>7} {'fwd+q':>7} | {'x/bf':>5} {'x/smm':>5} | {'aq ms':>6} {'aqT ms':>6} {'wq ms':>6} | "
          f"{'mx4 ms':>6} {'nv4 ms':>6}")
    print("TFLOPS for GEMM columns; x/bf, x/smm = fuyou fwd speed relative to bf16 and _scaled_mm (>1 = faster)")
    import fuyou.kernels.fp8_gemm as fp8_gemm_mod

    seen = set()
    for label, m, n, k in shapes:
        row, _ = run_shape(label, m, n, k)
        print(row, flush=True)
        for key, cfg in getattr(fp8_gemm_mod._fp8_gemm_kernel, "cache", {}).items():
            if key not in seen:  # the tiles the autotuner chose for this shape's fwd/dgrad/wgrad
                seen.add(key)
                print(f"{'':>18} tuned {key[:5]}: {cfg}", flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
