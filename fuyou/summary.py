"""The run summary printed before step 1: model, data, schedule, codecs, budgets, and the plan's
predicted step time and bytes per step (the cost model on this machine's rates)."""
from __future__ import annotations

from typing import List

from scheduler.costmodel import predict

from .memory import format_bytes
from .optim.schedule import warmup_steps
from .planning.rates import load_rates
from .step.graph import LANES, build_step_graph, bytes_per_step


def summary_lines(job, store, rt, dataset, eval_set, run_root: str = "") -> List[str]:
    """`run_root`: where the run keeps its metrics (a LoRA run's directory; default the store)."""
    cfg, plan = job.cfg, rt.plan
    numel, b = store.numel(), cfg.batch
    o = cfg.optim
    model = store.manifest["model"]
    tokens = b.batch_size * b.seq_len
    evaluation = "none"
    if eval_set is not None:
        evaluation = f"{len(eval_set)} rows ({'held out of the data' if cfg.eval.split else cfg.eval.data}), every {cfg.eval.every or cfg.steps} steps"
    rates, source = load_rates(rt.device.type)
    graph = build_step_graph(rt.spec)
    pred = predict(graph, rates.for_codec(cfg.state.states, cfg.state.master, cfg.state.weights), LANES)
    moved = bytes_per_step(graph.tasks)
    lines = [
        f"model: {model['source']} ({model.get('architecture', '?')}, {numel / 1e6:,.2f} M params) on {rt.device}",
        rt.ctx.skeleton.describe(),
        f"data: {job.data_path}: {len(dataset)} rows of {b.seq_len} tokens; {tokens:,} tokens per step ({b.batch_size} x {b.seq_len} "
        f"in {b.micro_batches} micro-batches); validation: {evaluation}",
        f"schedule: steps {store.step} -> {cfg.steps}; lr {o.lr:g} {o.lr_scheduler}, warm-up {warmup_steps(o, cfg.steps)} steps; AdamW betas "
        f"({o.beta1:g}, {o.beta2:g}) eps {o.eps:g} weight decay {o.weight_decay:g}; clip {cfg.max_grad_norm if cfg.max_grad_norm else 'none'}",
        f"codecs: weights {cfg.state.weights}, master {cfg.state.master}, moments {cfg.state.states}; disk mode {cfg.disk_mode}"
        + (f"; linears {cfg.linear}" if cfg.linear else ""),
        f"memory: host {format_bytes(plan.cpu_bytes())} of {format_bytes(plan.cpu_budget_bytes)}, device {format_bytes(plan.device_bytes())} of "
        f"{format_bytes(plan.device_budget_bytes)}, block cache {format_bytes(plan.cache_bytes)} ({len(plan.cache_blocks)} blocks); "
        f"slots: {plan.weight_slots} weight, {plan.opt_slots} optimizer" + (f" + the {' and '.join(plan.edge_blocks)}'s own" if plan.edge_blocks else "")
        + f"; {'recompute' if plan.recompute else 'keep activations'}",
        f"plan: predicted step {pred.step_s:.3f} s (bottleneck {pred.bottleneck}; {source.split(' (')[0]}); store traffic "
        f"{(moved['ssd read'] + moved['ssd written']) / max(numel, 1):.1f} B/param/step",
        f"store: {store.root}; metrics: {run_root or store.root}/metrics.jsonl" + (f"; checkpoints: {cfg.output.dir}" if cfg.output.dir else ""),
    ]
    group = rt.ctx.group
    if group is not None:
        owned = [blk for blk, r in rt.ctx.owners.items() if r == group.rank]
        lines.append(f"ranks: {group.size} (this is rank {group.rank}: {rt.batch_cfg.batch_size} rows in {rt.batch_cfg.micro_batches} micro-batches "
                     f"per step; updates {len(owned)} of {len(rt.ctx.owners)} blocks); between ranks "
                     f"{moved['between ranks'] / max(numel, 1):.1f} B/param/step; the figures above are this rank's")
    return lines
