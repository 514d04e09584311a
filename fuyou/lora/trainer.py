"""One LoRA step: the frozen base streams through the runtime's forward and backward exactly as in a
full fine-tune (layer-wise micro-batches, prefetch, recompute), the adapters' gradients accumulate
on the compute device, torch.optim.AdamW updates them there (no optimizer-lane I/O, nothing of the
base written), and the run directory commits the new adapter state atomically."""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from typing import Optional

import torch

from ..step.runtime import Runtime, StepResult
from . import run as run_dir


class LoraTrainer:
    def __init__(self, rt: Runtime, adapters, *, optim, max_grad_norm: Optional[float], root: str, base: dict, manifest: Optional[dict]):
        self.rt, self.adapters, self.max_grad_norm = rt, adapters, max_grad_norm
        self.root, self.base, self.manifest = root, base, manifest
        self.opt = torch.optim.AdamW(adapters.parameters(), lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                                     weight_decay=optim.weight_decay)
        self.step_count = 0
        if manifest is not None:
            self._load(run_dir.load_state(root, manifest))
            self.step_count = manifest["step"]

    # -- what the loop asks of a trainer -----------------------------------------------------------
    @property
    def train_meta(self) -> dict:
        return self.manifest["train"] if self.manifest else {}

    def numel(self) -> int:
        """The base's parameters: what store traffic per parameter is counted against."""
        return self.rt.store.numel()

    def step(self, batch, train_meta: dict) -> StepResult:
        t0, rt = time.perf_counter(), self.rt
        step = self.step_count + 1
        read0 = rt.store.bytes_read
        st = rt.forward_backward(batch, step)
        params = [p for p in self.adapters.parameters() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))) if params else 0.0
        status = "ok"
        if not math.isfinite(norm):
            status = "skipped"
        else:
            if self.max_grad_norm is not None:
                before = norm
                torch.nn.utils.clip_grad_norm_(self.adapters.parameters(), self.max_grad_norm)
                status = "clipped" if self.max_grad_norm / (before + 1e-6) < 1 else "ok"
            for group in self.opt.param_groups:
                group["lr"] = st.lr
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        committed = step if status != "skipped" else step - 1
        self.manifest = run_dir.commit(self.root, committed, self._state(), self.base, train_meta, self.manifest)
        self.step_count = committed
        return StepResult(step=committed, loss=sum(st.loss_sums) / max(st.targets, 1), tokens=int(batch.input_ids.numel()), grad_norm=norm, lr=st.lr,
                          bytes_read=rt.store.bytes_read - read0, bytes_written=0, seconds=time.perf_counter() - t0, status=status)

    def evaluate(self, batch) -> tuple:
        """(loss summed over the batch's label tokens, their count): the base with its adapters."""
        return self.rt.evaluate(batch)

    def stopping(self, requested: Optional[str]) -> Optional[str]:
        return requested

    def save(self, out: str, dtype: str = "fp32") -> None:
        """The adapters as a PEFT adapter directory, made beside `out` and renamed to it when complete."""
        parent = os.path.dirname(os.path.abspath(out))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".partial-", dir=parent)
        try:
            self.adapters.save_peft(tmp, dtype)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # -- state --------------------------------------------------------------------------------------
    def _state(self) -> dict:
        out = self.adapters.state()
        for name, p in self.adapters.params.items():
            s = self.opt.state.get(p)
            if s:
                out[f"{name}::exp_avg"] = s["exp_avg"].detach().to("cpu").contiguous()
                out[f"{name}::exp_avg_sq"] = s["exp_avg_sq"].detach().to("cpu").contiguous()
                out[f"{name}::step"] = s["step"].detach().to("cpu").reshape(1).contiguous()
        return out

    def _load(self, tensors: dict) -> None:
        self.adapters.load({k: v for k, v in tensors.items() if "::" not in k}, self.root)
        for name, p in self.adapters.params.items():
            if f"{name}::exp_avg" in tensors:
                self.opt.state[p] = {"step": tensors[f"{name}::step"].reshape(()).clone(), "exp_avg": tensors[f"{name}::exp_avg"].to(p.device).clone(),
                                     "exp_avg_sq": tensors[f"{name}::exp_avg_sq"].to(p.device).clone()}
