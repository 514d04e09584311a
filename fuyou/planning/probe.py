"""Measure this machine's rates once (`fuyou probe`) and keep them for the planner.

    storage   read / write bytes/s through fuyou.store.DirectFile (the store's own I/O path: O_DIRECT,
              one file per request, fsync after each write), plus the fixed cost per file
    h2d/d2h   pinned host <-> device copies (CUDA); on the CPU device, the host copy that decodes
              stored weights into the compute dtype (what the h2d lane does there)
    compute   model FLOP/s of one decoder layer run as the runtime runs it (forward, then recompute +
              backward), at a layer-like shape or a model's own (probe_compute.py); two token
              counts give the fixed cost per call
    optim     parameters/s of the runtime's optimizer task body: gradient norm pass + adamw_update_
              on fp32 state
Each rate comes with its spread (the quartiles of its runs: probe_timing.py), from which a plan
states its range. The result is saved with the machine it was measured on (rates.py).
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from typing import Callable, Dict, Optional, Tuple

import torch

from scheduler.costmodel import Rates

from ..config import WEIGHT_CODECS, StateConfig
from ..optim.codecs import weights_codec
from ..optim.state import KINDS, WEIGHT_DTYPES, StateCodecs, adamw_update_, decode_weights, init_weights_
from ..store import backends
from ..store.directio import ALIGN, DirectFile, aligned_bytes, aligned_empty
from ..step.slot_sizes import weights_are_master
from ..store.layout import BlockLayout
from .probe_compute import LayerRunner, probe_compute, probe_matmul
from .probe_timing import Busy, median_time, time_runs

DEFAULT_FILE_BYTES = 512 << 20
# Files per task in the step graph: a weights read is one file (two with a tied embedding), a
# states read three (master, exp_avg, exp_avg_sq), a write four (those plus the new weights).
FILES_PER_READ_TASK = 2
FILES_PER_WRITE_TASK = 4


# -- storage -------------------------------------------------------------------------------------
def _commit_like(directory: str) -> None:
    """What Store.commit does: a small JSON file written and fsynced, renamed, the directory fsynced."""
    tmpf = os.path.join(directory, "manifest.json.tmp")
    with open(tmpf, "w") as f:
        f.write("{}" * 1024)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmpf, os.path.join(directory, "manifest.json"))
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_time(paths: list) -> float:
    """Seconds per file of deleting `paths` (then fsyncing their directory), as a commit deletes
    the superseded versions."""
    t0 = time.perf_counter()
    for p in paths:
        os.unlink(p)
    fd = os.open(os.path.dirname(paths[0]), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return (time.perf_counter() - t0) / len(paths)


def _step_commit(directory: str, old: list, small, write_files, repeats: int) -> float:
    """Median seconds of a commit after a step that wrote a new version of each of the `old` files:
    the manifest written and fsynced, renamed, the directory fsynced, the old versions deleted."""
    times = []
    for r in range(repeats):
        new = [f"{p}.{r}" for p in old]
        write_files(new, small)  # the step's writes (not timed)
        t0 = time.perf_counter()
        _commit_like(directory)
        for p in old:
            os.unlink(p)
        times.append(time.perf_counter() - t0)
        old[:] = new
    return statistics.median(times)


def probe_storage(store_dir: str, total_bytes: int = DEFAULT_FILE_BYTES, files: int = 8, repeats: int = 3, background: Optional[Callable[[], None]] = None,
                  backend: Optional[str] = None) -> dict:
    """Write then read `files` files totalling `total_bytes` in `store_dir`, as the store does,
    through the I/O `backend` (None: the default one); `background` runs meanwhile (see probe_timing.Busy)."""
    if total_bytes < files * ALIGN:
        raise ValueError(f"--size {total_bytes} is too small; give at least {files * ALIGN} bytes (e.g. 512MiB)")
    os.makedirs(store_dir, exist_ok=True)
    per = aligned_bytes(total_bytes // files)
    buf = aligned_empty(per)
    buf.random_(0, 255)
    small = aligned_empty(ALIGN)
    small.zero_()
    tmp = tempfile.mkdtemp(prefix="fuyou-probe-", dir=store_dir)
    paths = [os.path.join(tmp, f"f{i}.bin") for i in range(files)]
    small_paths = [p + ".s" for p in paths]

    def write_files(names, data):  # as the store writes: one file per request, fsync after each
        for p in names:
            with DirectFile(p, "w", backend) as f:
                f.pwrite(data).get()
                f.fsync()

    def read_files(names, data):
        for p in names:
            with DirectFile(p, "r", backend) as f:
                f.pread(data).get()

    try:
        with Busy(background):
            t_write = time_runs(lambda: write_files(paths, buf), repeats)
            t_read = time_runs(lambda: read_files(paths, buf), repeats)
            t_wsmall = median_time(lambda: write_files(small_paths, small), repeats) / files
            t_rsmall = median_time(lambda: read_files(small_paths, small), repeats) / files
            t_commit = median_time(lambda: _commit_like(tmp), repeats)
            t_step_commit = _step_commit(tmp, small_paths, small, write_files, repeats)
            # Deleting a large file costs with its size (its extents freed): 8 of `per` bytes against small ones.
            t_unlink_big = _unlink_time(paths)
        # What a commit costs per file a step wrote (the directory's fsync carries their entries)
        # and deleted (the superseded versions), beyond the manifest's own write and fsyncs.
        t_commit_file = max(t_step_commit - t_commit, 0.0) / files
        commit_byte_s = max(t_unlink_big - t_commit_file, 0.0) / max(per - ALIGN, 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = per * files
    read, write = t_read.rates(n), t_write.rates(n)
    return {
        "read_Bps": read[0],
        "write_Bps": write[0],
        "spread": {"read_Bps": list(read[1:]), "write_Bps": list(write[1:])},
        "read_file_s": t_rsmall,
        "write_file_s": t_wsmall,
        "commit_s": t_commit,
        "commit_file_s": t_commit_file,
        "commit_byte_s": commit_byte_s,
        "file_bytes": per,
        "files": files,
    }


# -- copies --------------------------------------------------------------------------------------
def probe_backends(store_dir: str, total_bytes: int, log: Callable[[str], None] = lambda _s: None) -> Dict[str, dict]:
    """Read and write GB/s of every I/O backend that can run here, one after another with nothing
    else running (the plan's storage rates are the default backend's, probed under load)."""
    backends.get_backend()  # registers the optional backends
    out = {}
    for name in backends.available_backends():
        log(f"storage through the {name} backend ...")
        try:
            r = probe_storage(store_dir, total_bytes, repeats=2, backend=name)
        except (OSError, RuntimeError) as exc:  # a backend that cannot do I/O on this disk
            out[name] = {"error": str(exc)[:200]}
            continue
        out[name] = {"read_Bps": r["read_Bps"], "write_Bps": r["write_Bps"]}
    return out


def probe_copies(device: torch.device, nbytes: int = 256 << 20, repeats: int = 5, background: Optional[Callable[[], None]] = None) -> dict:
    """h2d/d2h bandwidth, the host memory copy rate (reads served by the block cache), and the h2d
    lane's rate for each compute-weights codec (it decodes what it copies, on the host's cores:
    measured while `background` computes, as in a step)."""
    return {"copy_Bps": _host_copy_Bps(nbytes, repeats), **_device_copies(device, nbytes, repeats),
            "h2d_by_codec": _h2d_by_codec(device, max(nbytes // 16, 1 << 16), repeats, background)}


def _h2d_by_codec(device: torch.device, numel: int, repeats: int, background: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Bytes/s of the h2d task body per weights codec: the staged weights decoded (fp8 tiles
    dequantized, bf16 viewed) and copied into a compute-dtype slot; bytes as the step graph counts
    them (the decoded values)."""
    shape = (256, max(numel // 256, 1))
    numel = shape[0] * shape[1]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    out = {}
    for codec in WEIGHT_CODECS:
        cfg = StateConfig(weights=codec)
        lay = BlockLayout("probe", [("w", numel, shape)], StateCodecs(cfg, weights_only=True)).kinds["weights"]
        parts = lay.views(aligned_empty(lay.file_bytes).zero_())["w"]
        init_weights_(cfg, torch.randn(shape) * 0.02, parts)
        dst = torch.empty(numel, dtype=torch.float32 if device.type == "cpu" else WEIGHT_DTYPES[codec], device=device)

        def run():
            dst.copy_(decode_weights(cfg, parts, shape))
            sync()

        run()
        with Busy(background):
            out[codec] = weights_codec(codec, numel, shape).values_bytes(numel) / median_time(run, repeats)
    return out


def _host_copy_Bps(nbytes: int, repeats: int) -> float:
    src, dst = torch.empty(nbytes, dtype=torch.uint8).fill_(1), torch.empty(nbytes, dtype=torch.uint8)
    return nbytes / median_time(lambda: dst.copy_(src), repeats)


def _device_copies(device: torch.device, nbytes: int, repeats: int) -> dict:
    if device.type == "cuda":
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)

        def h2d():
            dev.copy_(host, non_blocking=True)
            torch.cuda.synchronize(device)

        def d2h():
            host.copy_(dev, non_blocking=True)
            torch.cuda.synchronize(device)

        h2d()
        return {"h2d_Bps": nbytes / median_time(h2d, repeats), "d2h_Bps": nbytes / median_time(d2h, repeats)}
    # CPU device: the h2d lane decodes stored bf16 weights into fp32 slots; bytes counted are the
    # stored bytes, as the step graph counts them.
    src = torch.randn(nbytes // 2 // 2, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty(src.numel(), dtype=torch.float32)
    rate = src.numel() * 2 / median_time(lambda: dst.copy_(src), repeats)
    return {"h2d_Bps": rate, "d2h_Bps": rate}


def io_loop(store_dir: str, nbytes: int = 16 << 20) -> Tuple[Callable[[], None], Callable[[], None]]:
    """(step, cleanup): one write + fsync and one read of an `nbytes` file per step, as the
    store's write and read lanes do during a training step."""
    buf = aligned_empty(aligned_bytes(nbytes))
    buf.zero_()
    fd, path = tempfile.mkstemp(prefix="fuyou-probe-bg-", dir=store_dir)
    os.close(fd)

    def step():
        with DirectFile(path, "w") as f:
            f.pwrite(buf).get()
            f.fsync()
        with DirectFile(path, "r") as f:
            f.pread(buf).get()

    return step, lambda: os.path.exists(path) and os.unlink(path)


# -- optimizer -----------------------------------------------------------------------------------
# Optimizer settings whose rate `fuyou probe` measures besides fp32 (Rates.codec_key): the compressed
# moments with bf16+rem master and bf16 weights, and fp32 mode with fp8 weights (what encoding the
# weights' tiles adds to any codec: Rates.for_codec).
PROBED_CODECS = (("bf16", "bf16+rem", "bf16"), ("fp8", "bf16+rem", "bf16"), ("de8", "bf16+rem", "bf16"), ("log8", "bf16+rem", "bf16"),
                 ("fp32", "fp32", "fp8"))


def probe_optim(numel: int = 8 << 20, repeats: int = 3, min_s: float = 0.5, background: Optional[Callable[[], None]] = None,
                moments: str = "fp32", master: str = "fp32", weights: Optional[str] = None) -> Tuple[float, float, float]:
    """Parameters/s of the optimizer task body: the gradient-norm pass, then adamw_update_, with the
    given codecs (compute weights: fp32 in fp32 mode, else bf16, unless `weights` says); (median
    rate, slow rate, fast rate)."""
    compressed = (moments, master) != ("fp32", "fp32")
    weights = weights or ("bf16" if compressed else "fp32")
    cfg = StateConfig(weights=weights, master=master, states=moments)
    g = torch.Generator().manual_seed(0)
    shape = (max(numel // 1024, 1), 1024) if weights == "fp8" else (numel,)  # fp8 weights are tiles of a matrix
    numel = shape[0] * shape[1] if weights == "fp8" else numel
    grad = torch.randn(numel, generator=g)
    lay = BlockLayout("probe", [("w", numel, shape)], StateCodecs(cfg))
    bufs = {k: aligned_empty(lay.kinds[k].file_bytes).zero_() for k in KINDS}
    if weights_are_master(lay):  # one region for both, as the runtime's optimizer slot has
        bufs["weights"] = bufs["master"]
    parts = {k: lay.kinds[k].views(bufs[k])["w"] for k in KINDS}
    for k in ("master", "exp_avg_sq"):  # a plausible state: positive second moments
        for t in parts[k].values():
            if t.is_floating_point() and t.dtype == torch.float32:
                t.copy_(torch.rand(t.numel(), generator=g))

    def run():
        torch.linalg.vector_norm(grad)  # the optimizer task's gradient norm, as the runtime takes it (step/bodies.py)
        adamw_update_(cfg, grad, parts, step=2, lr=1e-4, shape=shape)

    run()
    with Busy(background):
        return time_runs(run, repeats, min_s).rates(numel)


# -- whole probe ---------------------------------------------------------------------------------
def probe_rates(device: torch.device, store_dir: str, *, file_bytes: int = DEFAULT_FILE_BYTES, layer: Optional[dict] = None,
                optim_numel: Optional[int] = None, loaded: bool = True, log: Callable[[str], None] = lambda _s: None) -> Tuple[Rates, dict]:
    """Measure every rate; return (Rates, details). With `loaded`, storage and the optimizer are
    measured while a decoder layer computes, and compute while storage reads and writes (the
    state of a step; see probe_timing.Busy). A small `file_bytes` also shrinks the copy and optimizer probes."""
    layer = dict(layer or {})
    shape = {k: layer.get(k, d) for k, d in (("hidden", 1024), ("intermediate", 2816), ("heads", 16), ("kv_heads", 16))}
    rows, seq = layer.get("batch", 8), layer.get("seq_len", 128)
    bg_layer = LayerRunner(device, **shape) if loaded else None
    bg_compute = bg_layer.runner(rows, seq)[0] if bg_layer else None
    bg_io, io_cleanup = io_loop(store_dir, min(16 << 20, max(file_bytes // 8, 1 << 20))) if loaded else (None, lambda: None)
    what = " with a decoder layer computing meanwhile" if loaded else ""
    try:
        log(f"storage (DirectFile, O_DIRECT, fsync per file){what} ...")
        disk = probe_storage(store_dir, file_bytes, background=bg_compute)
        by_backend = probe_backends(store_dir, file_bytes, log)
        log("host/device copies ...")
        copies = probe_copies(device, min(256 << 20, max(file_bytes, 1 << 20)), background=bg_compute)
        log("compute (one decoder layer, forward + recompute + backward)" + (" with storage busy meanwhile" if loaded else "") + " ...")
        comp = probe_compute(device, **shape, batch=rows, seq_len=seq, background=bg_io)
        mm = probe_matmul(device)
        log(f"optimizer (gradient norm + AdamW, fp32 and {len(PROBED_CODECS)} other codec settings){what} ...")
        n_opt = optim_numel or min(8 << 20, max(file_bytes // 16, 1 << 16))
        opt = probe_optim(n_opt, background=bg_compute)
        codecs = {Rates.codec_key(m, ms, w): probe_optim(n_opt, background=bg_compute, moments=m, master=ms, weights=w) for m, ms, w in PROBED_CODECS}
        by_codec = {k: r[0] for k, r in codecs.items()}
    finally:
        io_cleanup()
        if bg_layer is not None:
            bg_layer.close()
    rates = Rates(
        read_Bps=disk["read_Bps"], write_Bps=disk["write_Bps"], h2d_Bps=copies["h2d_Bps"], d2h_Bps=copies["d2h_Bps"], copy_Bps=copies["copy_Bps"],
        compute_flops=comp["compute_flops"], optim_params_per_s=opt[0], optim_by_codec=by_codec, compute_call_s=comp["compute_call_s"],
        h2d_by_codec=copies["h2d_by_codec"],
        latency_s={"read": FILES_PER_READ_TASK * disk["read_file_s"], "write": FILES_PER_WRITE_TASK * disk["write_file_s"], "commit": disk["commit_s"]},
        commit_file_s=disk["commit_file_s"], commit_byte_s=disk["commit_byte_s"],
    )
    # What each rate was over the probe's runs (slow, fast quartile): the plan's range comes from it.
    spread = {**disk["spread"], **comp["spread"], "optim_params_per_s": list(opt[1:]),
              "optim_by_codec": {k: list(r[1:]) for k, r in codecs.items()}}
    details = {"loaded": loaded, "storage": disk, "storage_by_backend": by_backend, "copies": copies, "compute": comp, "matmul_flops": mm,
               "optim_params_per_s": opt[0], "spread": spread}
    return rates, details


