"""CPU AdamW throughput: fuyou's fused kernel per codec vs torch fused AdamW, DeepSpeedCPUAdam and
the DRAM bound, side by side in one run.

    python benchmarks/bench_adam.py [--params 50e6] [--reps 5] [--threads 1 2] [--out benchmarks/results/bench_adam.md]
    python benchmarks/bench_adam.py --quick   # a smoke run: prints, keeps the saved table

Each method updates one flat parameter of --params elements. For every (method, threads) the
table gives the median over --reps interleaved runs (method order rotates each round, so machine
noise hits all) of params/s, the bytes the step moves through DRAM per parameter, the effective
GB/s, and that against the DRAM bound: an in-place read+write pass over a buffer of the same
number of bytes (torch `add_`), timed in the same rounds.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import statistics
import sys
import time

import psutil
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks._common import cpu_model, report_path, write_report  # noqa: E402

from fuyou.config import StateConfig  # noqa: E402
from fuyou.optim import KINDS, fused, init_state_, param_codecs, state_layout  # noqa: E402
from fuyou.optim.state import StateCodecs  # noqa: E402
from fuyou.step.slot_sizes import weights_are_master  # noqa: E402
from fuyou.store.layout import BlockLayout  # noqa: E402

CODECS = [  # (label, StateConfig)
    ("fuyou fp32 (correctly rounded sqrt)", StateConfig(weights="fp32", master="fp32", states="fp32")),
    ("fuyou bf16 m/v, bf16+rem", StateConfig(weights="bf16", master="bf16+rem", states="bf16")),
    ("fuyou fp8 m/v, bf16+rem", StateConfig(weights="bf16", master="bf16+rem", states="fp8")),
    ("fuyou de8 m/v, bf16+rem", StateConfig(weights="bf16", master="bf16+rem", states="de8")),
    ("fuyou log8 m/v, bf16+rem", StateConfig(weights="bf16", master="bf16+rem", states="log8")),
]
HYPER = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


def machine() -> str:
    model = cpu_model()
    ram = psutil.virtual_memory().total / 2**30
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores, {ram:.1f} GiB RAM, {platform.system()}, torch {torch.__version__}, {now}, load average {load}"


def kernel_line() -> str:
    """Which build of the fused kernel ran, and how fp32 mode took torch's sqrt."""
    if not fused.available():
        return "fuyou._adam not built"
    kind = {fused.SQRT_VML_EX: "vmsSqrt's generic path recomputed in registers", fused.SQRT_VML_CALL: "vmsSqrt called per chunk",
            None: "two phases around torch.sqrt"}[fused.torch_sqrt_kind()[0]]
    bf16 = ", AVX512-BF16 conversions" if fused.isas()[-1] == 2 and fused._ext.has_avx512bf16() else ""
    return f"fuyou kernel build: {fused.ISA_NAMES[fused.isas()[-1]]}{bf16}; fp32 mode's sqrt: {kind}"


def _set_omp_threads(n: int) -> None:
    """torch bundles its own OpenMP; extensions (DeepSpeed) use the system libgomp: set both."""
    torch.set_num_threads(n)
    try:
        ctypes.CDLL("libgomp.so.1").omp_set_num_threads(n)
    except OSError:
        pass


def shares_master(cfg: StateConfig, numel: int) -> bool:
    """Whether the runtime gives the weights the master's region of its optimizer slot
    (fuyou.step.slot_sizes.weights_are_master: fp32 weights of an fp32 master), so that the update
    writes them once; so does this benchmark then."""
    return weights_are_master(BlockLayout("bench", [("w", numel, (numel,))], StateCodecs(cfg)))


def optimizer_bytes_per_param(cfg: StateConfig, numel: int) -> float:
    """DRAM bytes of one fused step: read grad, read+write master and moments, write weights (when
    they are not the master)."""
    size = lambda kind: sum(p.nbytes for p in state_layout(cfg, kind, numel)) / numel  # noqa: E731
    return 4 + 2 * (size("master") + size("exp_avg") + size("exp_avg_sq")) + (0 if shares_master(cfg, numel) else size("weights"))


class FuyouMethod:
    def __init__(self, label, cfg, n):
        self.label, self.cfg, self.n = label, cfg, n
        self.codecs = param_codecs(cfg, n)
        self.parts = {k: {p.name: torch.empty(p.numel, dtype=p.dtype) for p in state_layout(cfg, k, n)} for k in KINDS}
        init_state_(cfg, torch.randn(n) * 0.02, self.parts)
        if shares_master(cfg, n):
            self.parts["weights"] = self.parts["master"]
        self.grad = torch.randn(n) * 1e-3
        self.bytes_per_param = optimizer_bytes_per_param(cfg, n)
        self.step_no = 0

    def step(self, threads):
        self.step_no += 1
        fused.adamw_fused_(self.codecs, self.grad, self.parts, step=self.step_no, threads=threads, **HYPER)


class FuyouFp32Mode(FuyouMethod):
    """fuyou's fp32 mode: the kernel with torch's own sqrt (bit-exact with torch.optim.AdamW), what
    the runtime runs for fp32 master and moments."""

    def __init__(self, n):
        super().__init__("fuyou fp32 mode (torch's sqrt)", StateConfig(weights="fp32", master="fp32", states="fp32"), n)

    def step(self, threads):
        self.step_no += 1
        fused.adamw_torch_sqrt_(self.codecs, self.grad, self.parts, step=self.step_no, threads=threads, **HYPER)


class TorchFused:
    label = "torch AdamW(fused=True) fp32"
    bytes_per_param = 28.0  # read p, g, m, v; write p, m, v

    def __init__(self, n):
        self.p = torch.nn.Parameter(torch.randn(n) * 0.02)
        self.p.grad = torch.randn(n) * 1e-3
        self.opt = torch.optim.AdamW([self.p], lr=HYPER["lr"], weight_decay=HYPER["weight_decay"], fused=True)

    def step(self, threads):
        self.opt.step()


class TorchDefault(TorchFused):
    """torch.optim.AdamW as plain PyTorch training runs it on the CPU (single tensor, torch's own
    ops): what fuyou's fp32 mode reproduces bit for bit."""

    label = "torch AdamW (default: single tensor) fp32"

    def __init__(self, n):
        self.p = torch.nn.Parameter(torch.randn(n) * 0.02)
        self.p.grad = torch.randn(n) * 1e-3
        self.opt = torch.optim.AdamW([self.p], lr=HYPER["lr"], weight_decay=HYPER["weight_decay"], foreach=False)


class DeepSpeedAdam:
    label = "DeepSpeedCPUAdam fp32"
    bytes_per_param = 28.0

    def __init__(self, n):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # JIT-builds cpu_adam once (cached)

        self.p = torch.nn.Parameter(torch.randn(n) * 0.02)
        self.p.grad = torch.randn(n) * 1e-3
        self.opt = DeepSpeedCPUAdam([self.p], lr=HYPER["lr"], weight_decay=HYPER["weight_decay"], adamw_mode=True)

    def step(self, threads):
        self.opt.step()


CACHE_PARAMS = 1 << 19  # 0.5 M parameters: every method's whole state fits this box's 32 MiB L3


class InCache:
    """A method's twin on CACHE_PARAMS parameters, stepped n / CACHE_PARAMS times per timing: the
    same work per timing with the state in cache, i.e. the method's compute bound without DRAM."""

    def __init__(self, make, n):
        self.inner = make(CACHE_PARAMS)
        self.label = in_cache_label(self.inner.label)
        self.repeat = max(1, round(n / CACHE_PARAMS))

    def step(self, threads):
        for _ in range(self.repeat):
            self.inner.step(threads)


def in_cache_label(label: str) -> str:
    return f"{label} [in cache]"


class DramPass:
    """In-place read+write of bytes_per_param/2 bytes per parameter: the DRAM bound of a method."""

    def __init__(self, label, bytes_per_param, n):
        self.label, self.bytes_per_param = label, bytes_per_param
        self.buf = torch.ones(int(n * bytes_per_param / 8))  # fp32: 4 B read + 4 B written each

    def step(self, threads):
        self.buf.add_(1.0)


def bench(args):
    n = int(args.params)
    torch.manual_seed(0)
    makers = [TorchFused, TorchDefault]
    notes = []
    try:
        DeepSpeedAdam(CACHE_PARAMS)
        makers.append(DeepSpeedAdam)
    except Exception as exc:  # noqa: BLE001 - a failed JIT build or a missing package
        notes.append(f"DeepSpeedCPUAdam skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    if fused.available():
        makers += [FuyouFp32Mode] + [lambda size, label=label, cfg=cfg: FuyouMethod(label, cfg, size) for label, cfg in CODECS]
    else:
        notes.append(f"fuyou._adam not built ({fused.import_error()}): run python setup.py build_ext --inplace")
    methods = [make(n) for make in makers]
    cached = [InCache(make, n) for make in makers]
    drams = {}
    for m in methods:
        key = round(m.bytes_per_param, 2)
        if key not in drams:
            drams[key] = DramPass(f"DRAM pass {key:.2f} B/param", m.bytes_per_param, n)
    everything = methods + cached + list(drams.values())
    times = {(m.label, t): [] for m in everything for t in args.threads}
    for m in everything:  # warm-up: page faults, JIT, first-step paths
        _set_omp_threads(args.threads[0])
        m.step(args.threads[0])
    for rnd in range(args.reps):
        order = everything[rnd % len(everything):] + everything[: rnd % len(everything)]
        for t in args.threads:
            _set_omp_threads(t)
            for m in order:
                t0 = time.perf_counter()
                m.step(t)
                times[(m.label, t)].append(time.perf_counter() - t0)
    return n, methods, drams, times, notes


def report(args, n, methods, drams, times, notes) -> str:
    lines = [
        "# CPU AdamW throughput",
        "",
        f"Machine: {machine()}",
        kernel_line() + ".",
        f"One flat parameter of {n / 1e6:.0f} M elements; medians of {args.reps} interleaved runs.",
        "B/param: DRAM bytes one step moves (fuyou: grad 4 + read+write master, m, v + write weights, unless fp32 weights share the fp32 master's bytes, as in the runtime).",
        "DRAM bound: in-place read+write pass over the same bytes, timed in the same rounds.",
        f"In cache: the same method on {CACHE_PARAMS / 1e6:.1f} M parameters (state in L3), stepped repeatedly in",
        "the same rounds: its compute bound. A method whose rate is near its in-cache rate is bound by",
        "arithmetic, not by DRAM; fewer bytes per parameter only help a method that is not.",
        "",
        "| method | threads | M params/s | in cache | B/param | GB/s | % of DRAM bound | vs torch fused | vs DeepSpeed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in args.threads:
        med = {m.label: statistics.median(times[(m.label, t)]) for m in methods}
        torch_rate = n / med[TorchFused.label]
        ds_rate = n / med[DeepSpeedAdam.label] if DeepSpeedAdam.label in med else None
        for m in methods:
            rate = n / med[m.label]
            cache_rate = n / statistics.median(times[(in_cache_label(m.label), t)])
            dram = drams[round(m.bytes_per_param, 2)]
            dram_gbs = n * dram.bytes_per_param / statistics.median(times[(dram.label, t)]) / 1e9
            gbs = rate * m.bytes_per_param / 1e9
            vs_ds = f"{rate / ds_rate:.2f}x" if ds_rate else "n/a"
            lines.append(
                f"| {m.label} | {t} | {rate / 1e6:.0f} | {cache_rate / 1e6:.0f} | {m.bytes_per_param:.2f} | {gbs:.1f} | "
                f"{100 * gbs / dram_gbs:.0f}% (bound {dram_gbs:.1f} GB/s) | {rate / torch_rate:.2f}x | {vs_ds} |"
            )
    lines += [""] + [f"Note: {x}" for x in notes]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=50e6, help="parameter count (50e6 .. 200e6)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=None, help="report file (default: benchmarks/results/bench_adam.md; a --quick run only prints)")
    ap.add_argument("--quick", action="store_true", help="4 M params, 3 rounds: a smoke run (below the 50 M the numbers need)")
    args = ap.parse_args()
    if args.quick:
        args.params, args.reps = 4e6, 3
    args.out = report_path(args.out, args.quick, "bench_adam.md")
    if args.reps < 3:
        raise SystemExit("--reps must be at least 3 (medians of a few runs, never one)")
    text = report(args, *bench(args))
    write_report(text, args.out)


if __name__ == "__main__":
    main()
