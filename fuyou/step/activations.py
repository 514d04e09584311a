"""Block inputs the forward saves for the backward, and where they wait: on the device, in host
buffers, or in scratch files beside the store's blocks.

Key (i, m): the input of block i (0 = embedding, 1..L = layers, L+1 = head) for micro-batch m. The
memory plan places them (memory_plan._place_block_inputs): the inputs of layers 1..n_offloaded go
out after their layer's forward and come back just before its backward (`offload` / `bring_back`,
the act_out / act_in tasks of the step graph), layers 1..n_on_ssd of those to scratch files
(`<store>/scratch/act.<layer>.<micro>.bin`, O_DIRECT, no fsync: they live one step; staged through
pinned host buffers on a GPU), the others to host memory. Leftovers of a killed run are removed
when a runtime opens the store.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Callable, Dict, Optional, Tuple

import torch

from ..memory import Pool
from ..store.directio import DirectFile, aligned_bytes
from ..store.store import Store
from .memory_plan import MemoryPlan

Key = Tuple[int, int]  # (block index, micro-batch)


class Activations:
    """`count(link, nbytes)`: told what each offload and bring-back moved (context.LinkBytes.add)."""

    def __init__(self, store: Store, plan: MemoryPlan, *, dev_pool: Pool, cpu_pool: Pool, streams: Dict[str, torch.cuda.Stream],
                 device: torch.device, count: Callable[[str, int], None] = lambda _link, _n: None):
        self.backend, self.plan, self.streams, self.count = store.backend, plan, streams, count
        self.dev_pool, self.cpu_pool = dev_pool, cpu_pool
        self.scratch = os.path.join(store.root, "scratch")
        shutil.rmtree(self.scratch, ignore_errors=True)
        if plan.n_on_ssd:
            os.makedirs(self.scratch)
        stage = plan.n_on_ssd and device.type != "cpu"
        self._staging = [cpu_pool.alloc(aligned_bytes(plan.act_bytes)) for _ in range(2)] if stage else []
        self.on_device: Dict[Key, tuple] = {}  # (device pool buffer, tensor)
        self.on_host: Dict[Key, tuple] = {}  # (host pool buffer, tensor)
        self.on_disk: Dict[Key, tuple] = {}  # (path, dtype, shape, bytes)

    # -- on the device -------------------------------------------------------------------------
    def save(self, key: Key, t: torch.Tensor) -> None:
        """Keep a copy of `t` in a device buffer charged to the device pool."""
        buf = self.dev_pool.alloc(t.numel() * t.element_size())
        saved = buf.view(t.dtype).view(t.shape)
        saved.copy_(t)
        self.on_device[key] = (buf, saved)

    def get(self, key: Key) -> torch.Tensor:
        return self.on_device[key][1]

    def take(self, key: Key) -> tuple:
        """Remove a saved input: (pool buffer, tensor); `release` the buffer once done with it."""
        return self.on_device.pop(key)

    def release(self, buf: torch.Tensor) -> None:
        self.dev_pool.free(buf)

    # -- offloaded (the act_out / act_in tasks) ---------------------------------------------------
    def offload(self, i: int, n_micro: int) -> None:
        """Layer i's inputs (every micro-batch) to host buffers or scratch files; their device buffers freed."""
        if i <= self.plan.n_on_ssd:
            self._write_scratch(i, n_micro)
        else:
            self._move(i, n_micro, self.on_device, self.on_host, self.dev_pool, self.cpu_pool, "d2h", "gpu->cpu")

    def bring_back(self, i: int, n_micro: int) -> None:
        """Layer i's inputs back into device buffers, for its backward."""
        if i <= self.plan.n_on_ssd:
            self._read_scratch(i, n_micro)
        else:
            self._move(i, n_micro, self.on_host, self.on_device, self.cpu_pool, self.dev_pool, "h2d", "cpu->gpu")

    def _move(self, i: int, n_micro: int, src: dict, dst: dict, src_pool: Pool, dst_pool: Pool, lane: str, link: str) -> None:
        stream: Optional[torch.cuda.Stream] = self.streams.get(lane)
        for m in range(n_micro):
            buf, t = src.pop((i, m))
            out = dst_pool.alloc(t.numel() * t.element_size())
            moved = out.view(t.dtype).view(t.shape)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                moved.copy_(t, non_blocking=stream is not None)
            if stream is not None:
                stream.synchronize()  # the source buffer is freed right below
            dst[(i, m)] = (out, moved)
            src_pool.free(buf)
            self.count(link, t.numel() * t.element_size())

    def _write_scratch(self, i: int, n_micro: int) -> None:
        staging = self._staging[0] if self._staging else None
        for m in range(n_micro):
            buf, t = self.on_device.pop((i, m))
            nbytes = t.numel() * t.element_size()
            src = buf
            if staging is not None:
                staging[:nbytes].view(t.dtype).view(t.shape).copy_(t)
                src = staging
            path = os.path.join(self.scratch, f"act.{i}.{m}.bin")
            with DirectFile(path, "w", self.backend) as f:
                f.pwrite(src, size=nbytes).get()
            self.count("ssd written", nbytes)
            self.on_disk[(i, m)] = (path, t.dtype, t.shape, nbytes)
            self.dev_pool.free(buf)

    def _read_scratch(self, i: int, n_micro: int) -> None:
        staging = self._staging[1] if self._staging else None
        for m in range(n_micro):
            path, dtype, shape, nbytes = self.on_disk.pop((i, m))
            buf = self.dev_pool.alloc(nbytes)
            with DirectFile(path, "r", self.backend) as f:
                f.pread(staging if staging is not None else buf, size=nbytes).get()
            self.count("ssd read", nbytes)
            t = buf.view(dtype).view(shape)
            if staging is not None:
                t.copy_(staging[:nbytes].view(dtype).view(shape))
            os.unlink(path)
            self.on_device[(i, m)] = (buf, t)

    def clear(self) -> None:
        """Free whatever a step left here (a failed step leaves inputs anywhere)."""
        for buf, _t in self.on_device.values():
            self.dev_pool.free(buf)
        self.on_device.clear()
        for buf, _t in self.on_host.values():
            self.cpu_pool.free(buf)
        self.on_host.clear()
        for path, *_rest in self.on_disk.values():
            if os.path.exists(path):
                os.unlink(path)
        self.on_disk.clear()
