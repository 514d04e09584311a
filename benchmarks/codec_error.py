"""Quantisation error of AdamW's update direction m/(sqrt(v)+eps) under each optimizer-state codec.

    python benchmarks/codec_error.py [--steps 300] [--out benchmarks/results/codec_error.md]

A tiny transformer (2 encoder layers, d_model 128, a synthetic sequence-reversal task) trains
with fp32 torch AdamW. At checkpoints the optimizer's m and v are encoded and decoded with each
codec (m with the signed variant, v with the unsigned one) and the bias-corrected update
direction u = m_hat / (sqrt(v_hat) + eps) is compared with its fp32 value over all tensors of at
least SMALL_NUMEL elements (smaller ones stay fp32 in every codec):

    error = 100 * ||u_codec - u_fp32||_2 / ||u_fp32||_2      (relative L2 error, percent)

COAT (Table 1) reports E4M3 20.10, E4M3+DRE 12.31, DE8 10.54 for the same quantity on their
models; their exact normalisation is not stated the same way, so compare the ranking and the
ratios, not the absolute numbers. --lr changes the trajectory (a second one to check a codec on).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks._common import write_report  # noqa: E402

from fuyou.optim.codec_ref import E4M3_MAX, FP8_GROUP  # noqa: E402
from fuyou.optim.codecs import SMALL_NUMEL, moment_codec  # noqa: E402


def roundtrip(name: str, x: torch.Tensor, signed: bool) -> torch.Tensor:
    codec = moment_codec(name, x.numel())
    parts = {p.name: torch.zeros(p.numel, dtype=p.dtype) for p in codec.layout(x.numel())}
    codec.encode_(x, parts, signed=signed)
    return codec.decode(parts, x.numel(), signed=signed)


def e4m3_plain(x: torch.Tensor) -> torch.Tensor:
    """E4M3 with a per-group absmax scale and no range expansion (COAT's "E4M3" row)."""
    n = x.numel()
    g = torch.nn.functional.pad(x, (0, (-n) % FP8_GROUP)).view(-1, FP8_GROUP)
    s = (g.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=1e-38)
    q = (g / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * s
    return q.reshape(-1)[:n]


SCHEMES = {  # name -> (m round trip, v round trip)
    "bf16": (lambda x: roundtrip("bf16", x, True), lambda x: roundtrip("bf16", x, False)),
    "E4M3 (group absmax, no DRE)": (e4m3_plain, e4m3_plain),
    "fp8 = E4M3+DRE": (lambda x: roundtrip("fp8", x, True), lambda x: roundtrip("fp8", x, False)),
    "de8 (dynamic 8-bit)": (lambda x: roundtrip("de8", x, True), lambda x: roundtrip("de8", x, False)),
    "de8 m + E4M3+DRE v": (lambda x: roundtrip("de8", x, True), lambda x: roundtrip("fp8", x, False)),
    "log8 = E4M3+DRE on the bit pattern": (lambda x: roundtrip("log8", x, True), lambda x: roundtrip("log8", x, False)),
}


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=64, d=128, layers=2, seq=32):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.randn(seq, d) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.body = torch.nn.TransformerEncoder(layer, layers)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, tokens):
        return self.head(self.body(self.emb(tokens) + self.pos))


def direction(m, v, step, beta1, beta2, eps):
    return (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + eps)


def measure(args):
    torch.manual_seed(0)
    model = TinyLM()
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(beta1, beta2), eps=eps, weight_decay=0.01)
    checkpoints = sorted(set(args.checkpoints))
    rows = {name: {} for name in SCHEMES}
    losses = {}
    for step in range(1, args.steps + 1):
        tokens = torch.randint(0, 64, (32, 32))
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), tokens.flip(1).reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in checkpoints:
            losses[step] = loss.item()
            states = [opt.state[p] for p in model.parameters() if p.numel() >= SMALL_NUMEL]
            ms = [s["exp_avg"].reshape(-1) for s in states]
            vs = [s["exp_avg_sq"].reshape(-1) for s in states]
            ref = torch.cat([direction(m, v, step, beta1, beta2, eps) for m, v in zip(ms, vs)])
            for name, (fm, fv) in SCHEMES.items():
                got = torch.cat([direction(fm(m), fv(v), step, beta1, beta2, eps) for m, v in zip(ms, vs)])
                rows[name][step] = 100 * ((got - ref).norm() / ref.norm()).item()
    return checkpoints, rows, losses, sum(p.numel() for p in model.parameters())


def report(args, checkpoints, rows, losses, nparams) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = "| codec (m, v) | " + " | ".join(f"step {s}" for s in checkpoints) + " | median |"
    lines = [
        "# Quantisation error of m/(sqrt(v)+eps)",
        "",
        f"{now}; tiny transformer ({nparams / 1e3:.0f} k params, tensors >= {SMALL_NUMEL} elements measured), "
        f"fp32 AdamW lr {args.lr}, batch 32 x 32 tokens, sequence reversal. Loss at the checkpoints: "
        + ", ".join(f"{s}: {losses[s]:.2f}" for s in checkpoints) + ".",
        "Metric: 100 * ||u_codec - u_fp32||_2 / ||u_fp32||_2 with u = m_hat / (sqrt(v_hat) + eps).",
        "",
        head,
        "|---|" + "---|" * (len(checkpoints) + 1),
    ]
    for name, by_step in rows.items():
        vals = [by_step[s] for s in checkpoints]
        lines.append(f"| {name} | " + " | ".join(f"{x:.2f}" for x in vals) + f" | {statistics.median(vals):.2f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[10, 50, 100, 200, 300])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "codec_error.md"))
    args = ap.parse_args()
    if any(s > args.steps or s < 1 for s in args.checkpoints):
        raise SystemExit("--checkpoints must lie in 1..--steps")
    text = report(args, *measure(args))
    write_report(text, args.out)


if __name__ == "__main__":
    main()
