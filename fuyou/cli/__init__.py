"""The `fuyou` command: parses arguments and calls the API; errors become one line and exit 2."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..config import BatchConfig, FinetuneConfig, MemoryConfig, OptimConfig, StateConfig, parse_size

EXIT_USAGE = 2
LR_FROM_SCRATCH = 1e-3  # a preset starts from random weights: a pre-training learning rate
LR_FINETUNE = 1e-5  # a checkpoint is fine-tuned


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a model whose training state lives in a store on disk",
        formatter_class=_Formatter,
        description="Fine-tune a Hugging Face causal LM with weights, fp32 master weights and AdamW states kept in --store,\n"
        "streamed block by block. With no arguments: the llama-tiny preset on the bundled corpus.",
    )
    p.add_argument("--model", default="llama-tiny", help="Hugging Face model directory (config.json + *.safetensors) or a preset (llama-tiny, llama-220m, llama-1b, ...)")
    p.add_argument("--data", default=None, help=".jsonl ('text', or 'prompt'/'completion') or .txt; default: the bundled corpus")
    p.add_argument("--store", default="fuyou-store", help="store directory (created; on an NVMe SSD for real runs)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps to run")
    p.add_argument("--lr", type=float, default=None, help=f"learning rate (default: {LR_FROM_SCRATCH:g} for a preset, {LR_FINETUNE:g} for a checkpoint)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--micro-batches", type=int, default=2, help="micro-batches per step (all pass a block before the next block)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--gpu-mem", type=_size, default=None, help="device memory budget, e.g. 4GiB (default: 90%% of free device memory; on the CPU device what the plan needs)")
    p.add_argument("--cpu-mem", type=_size, default=None, help="pinned host memory budget, e.g. 8GiB (default: what the plan needs, at most half the RAM)")
    p.add_argument(
        "--cache-mem", type=_size, default=None,
        help="host RAM that keeps whole blocks' states and weights between steps, so their reads skip the store (writes still go to it); "
        "0 turns it off (default: up to a quarter of the RAM)",
    )
    p.add_argument("--prefetch-depth", type=int, default=2, help="blocks read ahead of the one computing")
    p.add_argument(
        "--recompute",
        choices=["auto", "always", "never"],
        default="auto",
        help="backward of a decoder layer: recompute its forward from the saved input (least memory), or keep the forward's "
        "activations (no recompute, ~25%% less compute); auto keeps them when they fit --gpu-mem",
    )
    p.add_argument(
        "--plan", choices=["auto"], default=None, help="let the planner choose --prefetch-depth, --micro-batches and the memory budgets (see `fuyou plan`)"
    )
    p.add_argument(
        "--weights",
        choices=["fp32", "bf16", "fp8"],
        default="fp32",
        help="compute weights kept in the store: fp32, bf16, or fp8 (E4M3, a scale per 128x128 tile; 1 B/param read per pass)",
    )
    p.add_argument("--master", choices=["fp32", "bf16+rem"], default="fp32", help="master weights: fp32, or bf16 + 16-bit remainder (exact fp32 in 2+2 bytes)")
    p.add_argument(
        "--optim-states", choices=["fp32", "bf16", "fp8", "de8"], default="fp32", help="AdamW moments codec: fp8 = E4M3 with dynamic range expansion per 128, de8 = dynamic 8-bit per 256"
    )
    p.add_argument(
        "--linear",
        choices=["fp8-blockwise", "mxfp4", "nvfp4"],
        default=None,
        help="run the decoder layers' linear GEMMs in this low-precision recipe (Triton on CUDA, the torch reference on CPU); default: the weights' dtype",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the data order (and of a preset's initial weights)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="compute device (default: cuda when present)")
    p.add_argument("--io-backend", default="auto", help="store I/O backend: auto, python, threads, uring (auto = fastest available)")
    p.add_argument("--resume", action="store_true", help="continue the run in --store from its last committed step")
    p.add_argument("--overwrite", action="store_true", help="replace an existing fuyou store at --store")
    p.add_argument("--trace", dest="trace_dir", default=None, help="write a Chrome/Perfetto trace of every task to this directory")
    p.add_argument("--max-grad-norm", type=float, default=None, help="clip the global gradient norm (exact: a clipped step redoes the optimizer pass)")
    p.add_argument(
        "--disk-mode",
        choices=["safe", "lean"],
        default="safe",
        help="safe: a step's old states stay until it commits (exact clipping and non-finite skipping; peak disk up to 2x the state); "
        "lean: each block's states are replaced as soon as they are written, journaled per block (peak disk ~1.25x; no clipping/skipping)",
    )
    p.add_argument("--no-verify", dest="verify_reads", action="store_false", help="skip the CRC-32 check of every block read")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a Hugging Face checkpoint from a store's master weights", formatter_class=_Formatter)
    p.add_argument("--store", required=True, help="the store directory")
    p.add_argument("--to", required=True, help="output directory (new or empty)")


def _export(args) -> int:
    from ..export import export_store

    out = export_store(args.store, args.to)
    print(f"exported {args.store} to {out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fuyou", description="Fine-tune models far larger than GPU memory, with the training state on SSD.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_finetune(sub)
    _add_export(sub)
    from .plan import add_subcommands

    add_subcommands(sub)
    return parser


def _finetune(args) -> int:
    from rich.console import Console

    from ..model.source import PRESETS
    from ..train import finetune, print_summary

    lr = args.lr if args.lr is not None else (LR_FROM_SCRATCH if args.model in PRESETS else LR_FINETUNE)
    cfg = FinetuneConfig(
        model=args.model,
        data=args.data,
        store=args.store,
        steps=args.steps,
        seed=args.seed,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        io_backend=args.io_backend,
        trace_dir=args.trace_dir,
        max_grad_norm=args.max_grad_norm,
        verify_reads=args.verify_reads,
        disk_mode=args.disk_mode,
        linear=args.linear,
        state=StateConfig(weights=args.weights, master=args.master, states=args.optim_states),
        optim=OptimConfig(lr=lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps),
        batch=BatchConfig(batch_size=args.batch_size, micro_batches=args.micro_batches, seq_len=args.seq_len),
        memory=MemoryConfig(
            gpu_mem_bytes=args.gpu_mem, cpu_mem_bytes=args.cpu_mem, cache_mem_bytes=args.cache_mem, prefetch_depth=args.prefetch_depth,
            recompute=args.recompute,
        ),
    )
    if args.plan == "auto":
        import dataclasses

        from ..config import PlanConfig
        from ..planning.search import auto_memory_config
        from ..train import resolve_device

        plan_cfg = PlanConfig(
            model=args.model, batch=cfg.batch, state=cfg.state, device=resolve_device(args.device).type, gpu_mem_bytes=args.gpu_mem, cpu_mem_bytes=args.cpu_mem,
            cache_mem_bytes=args.cache_mem,
        )
        mem, batch = auto_memory_config(plan_cfg)
        cfg = dataclasses.replace(cfg, memory=mem, batch=batch)  # mem carries --cache-mem through PlanConfig
    trace = None
    if cfg.trace_dir:
        from scheduler import Trace

        trace = Trace()
    probe = Console(stderr=True)
    console = probe if probe.is_terminal else Console(stderr=True, width=250)  # logs: one line per report
    res = finetune(cfg, console=console, trace=trace)
    print_summary(res, console)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from ..store.store import StoreError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        from .plan import COMMANDS

        return {"finetune": _finetune, "export": _export, **COMMANDS}[args.command](args)
    except KeyboardInterrupt:
        print("fuyou: interrupted; the store keeps its last committed step", file=sys.stderr)
        return 130
    except (ValueError, OSError, StoreError, FloatingPointError) as exc:
        # Expected failures (bad input, budgets, disk errors): one line naming the fix. Anything
        # else is a bug and keeps its traceback.
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"fuyou: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
