"""The compute part of `fuyou probe`: one decoder layer run as the runtime runs it (forward, then
recompute + backward), timed at two token counts (the rate and the fixed cost per call), and a
plain GEMM for reference. probe.py runs it with the other lanes busy."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ..model.skeleton import Skeleton
from .probe_timing import Busy, median_time, time_runs


def layer_shape_of(config) -> dict:
    """The decoder-layer shape a model's config gives (the probe runs a Llama layer of that shape:
    the same GEMMs and attention heads; other mixers cost what their FLOPs say)."""
    hidden = config.hidden_size
    heads = getattr(config, "num_attention_heads", None) or max(hidden // 128, 1)
    return {"hidden": hidden, "intermediate": getattr(config, "intermediate_size", None) or 4 * hidden, "heads": heads,
            "kv_heads": getattr(config, "num_key_value_heads", None) or heads}


def _layer_config(hidden: int, intermediate: int, heads: int, kv_heads: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=256, max_position_embeddings=8192, tie_word_embeddings=False,
    )


class LayerRunner:
    """One decoder layer run as the runtime runs it: forward, then recompute + backward."""

    def __init__(self, device: torch.device, hidden: int, intermediate: int, heads: int, kv_heads: int):
        self.device, self.hidden = device, hidden
        self.dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        self.sk = Skeleton(_layer_config(hidden, intermediate, heads, kv_heads))
        self.sk.move_buffers(device)
        self.g = torch.Generator().manual_seed(0)
        self.names = [n for b in self.sk.blocks if b.name != self.sk.blocks[-1].name for n in b.params]
        weights = {n: (torch.randn(self.sk.params[n].numel, generator=self.g) * 0.02).to(device=device, dtype=self.dtype) for n in self.names}
        self.layer_numel = sum(self.sk.params[n].numel for n in self.sk.blocks[1].params)
        self.sk.attach(weights, requires_grad=True)

    def runner(self, rows: int, seq_len: int) -> Tuple[Callable[[], None], int]:
        """(run, model FLOPs of one run): both calls of a layer for `rows` sequences."""
        sk, device = self.sk, self.device
        ids = torch.randint(0, 256, (rows, seq_len), generator=self.g).to(device)
        with torch.no_grad():
            h, kwargs = sk.embed_forward(ids, None)
        h = h.to(self.dtype)
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

        def run():
            with torch.no_grad():
                sk.layer_forward(0, h, kwargs)
            x = h.detach().requires_grad_(True)
            y = sk.layer_forward(0, x, kwargs)
            y.backward(torch.ones_like(y))
            sync()

        tokens = rows * seq_len
        return run, 4 * (2 * self.layer_numel * tokens + 2 * seq_len * self.hidden * tokens)  # fwd + 3 x fwd

    def close(self) -> None:
        self.sk.detach(self.names)


def probe_compute(
    device: torch.device,
    *,
    hidden: int = 1024,
    intermediate: int = 2816,
    heads: int = 16,
    kv_heads: int = 16,
    batch: int = 8,
    seq_len: int = 128,
    repeats: int = 5,
    min_s: float = 1.0,
    background: Optional[Callable[[], None]] = None,
) -> dict:
    """Model FLOP/s of a decoder layer's forward + (recompute + backward), counted as the step graph
    counts them (spec.consumer_flops), at the given micro-batch and at a near-empty call: the
    line through both gives the fixed cost of one call and the rate. `background` runs meanwhile
    (see probe_timing.Busy)."""
    layer = LayerRunner(device, hidden, intermediate, heads, kv_heads)
    # The second point is a near-empty call (one sequence of 8 tokens): its time is almost all
    # fixed cost, which pins the intercept far better than two large calls do under noise.
    points = {"big": (batch, seq_len), "small": (1, min(8, seq_len))}
    out = {}
    try:
        for key, (rows, seq) in points.items():
            run, flops = layer.runner(rows, seq)
            run()  # warm-up
            run()
            with Busy(background):
                # Two calls per run (forward, then recompute + backward).
                out[key] = (flops, time_runs(run, repeats, min_s))
    finally:
        layer.close()
    (f_big, timing), (f_small, small) = out["big"], out["small"]
    t_big, t_small = timing.median / 2, small.median / 2
    # Per call: t = call_s + flops / rate. Noise on a shared machine can still push the intercept
    # anywhere, so it is clipped to [0, half the probed call] and the rate is then set so that the
    # probed shape itself is reproduced exactly.
    call_s = 0.0
    if f_big > f_small and t_big > t_small:
        call_s = t_big - (t_big - t_small) * f_big / (f_big - f_small)
    call_s = min(max(call_s, 0.0), 0.5 * t_big)
    rate = (f_big / 2) / (t_big - call_s)
    spread = [(f_big / 2) / max(t / 2 - call_s, 1e-9) for t in (timing.slow, timing.fast)]
    return {"compute_flops": rate, "compute_call_s": call_s, "layer_flops_per_s_at_shape": f_big / (2 * t_big), "spread": {"compute_flops": spread},
            "shape": {"hidden": hidden, "intermediate": intermediate, "heads": heads, "kv_heads": kv_heads, "batch": batch, "seq_len": seq_len}}


def probe_matmul(device: torch.device, m: int = 1024, k: int = 1024, n: int = 2816, repeats: int = 5) -> float:
    """Plain GEMM FLOP/s (fp32 on CPU, bf16 on CUDA), for reference beside the layer rate."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def run():
        a @ b
        sync()

    run()
    return 2 * m * k * n / median_time(run, repeats)
