"""A data-parallel run as each rank sees it: its own store, its share of every batch, the blocks it
updates, and what its store records of the run's ranks.

    torchrun --nproc-per-node 2 -m fuyou finetune --store /nvme/run{rank} --batch-size 8 --micro-batches 4

`--batch-size` and `--micro-batches` stay the run's (the global batch): each of the N ranks takes
the rows of batch_size / N of them, in micro_batches / N micro-batches, so the micro-batch size and
the data order are those of the same run on one process, and so are the step's loss and gradient
(summed in another order: equal to rounding).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional

from ..config import BatchConfig, FinetuneConfig
from ..data.dataset import Batch
from .group import RankGroup
from .partition import assign_owners, block_sizes

RANK = "{rank}"  # --store's placeholder for the rank's number


def rank_config(cfg: FinetuneConfig, group: RankGroup) -> FinetuneConfig:
    """The run's settings on this rank: its store (and trace directory); refused, before anything is
    touched, where a data-parallel run cannot do what they ask."""
    n = group.size
    if n > 1 and RANK not in cfg.store:
        raise ValueError(f"{n} ranks need a store each: put {RANK} in --store (e.g. --store /nvme/run{RANK}); each rank keeps its blocks' "
                         "optimizer state in its own")
    if cfg.batch.batch_size % n or cfg.batch.micro_batches % n:
        raise ValueError(f"--batch-size {cfg.batch.batch_size} and --micro-batches {cfg.batch.micro_batches} must both divide among {n} ranks; "
                         f"pass multiples of {n}")
    if cfg.disk_mode != "safe":
        raise ValueError("a data-parallel run needs --disk-mode safe (lean mode replaces states before every rank has its step)")
    if cfg.peft.method is not None:
        raise ValueError("--peft runs on one process; launch it without torchrun")
    if cfg.output.dir is not None:
        raise ValueError("--output-dir checkpoints are written by one-process runs; after a data-parallel run, "
                         f"fuyou export --store '{cfg.store}' --to DIR gathers every rank's blocks")
    trace = os.path.join(cfg.trace_dir, f"rank{group.rank}") if cfg.trace_dir else None
    output = cfg.output if group.is_main else dataclasses.replace(cfg.output, tensorboard=None)  # one writer of the scalars
    return dataclasses.replace(cfg, store=store_of(cfg.store, group.rank), trace_dir=trace, output=output)


def store_of(path: str, rank: int) -> str:
    return path.replace(RANK, str(rank))


def rank_batch(batch: BatchConfig, group: Optional[RankGroup]) -> BatchConfig:
    """One rank's share of the step: its rows in its micro-batches (the micro-batch size stays)."""
    if group is None:
        return batch
    return BatchConfig(batch_size=batch.batch_size // group.size, micro_batches=batch.micro_batches // group.size, seq_len=batch.seq_len)


def rows_of(batch: Batch, group: RankGroup) -> Batch:
    """This rank's rows of a batch: the rank-th of `size` equal runs of rows (an uneven last
    validation batch: the first ranks take one more row; a rank may get none)."""
    n = batch.input_ids.shape[0]
    share, extra = divmod(n, group.size)
    start = group.rank * share + min(group.rank, extra)
    stop = start + share + (1 if group.rank < extra else 0)
    mask = None if batch.attention_mask is None else batch.attention_mask[start:stop]
    return Batch(batch.input_ids[start:stop], batch.labels[start:stop], mask)


def ranks_record(blocks: List[dict], group: RankGroup) -> dict:
    """What a new run's stores record of its ranks: how many, and which rank updates which block."""
    return {"world_size": group.size, "owners": assign_owners(block_sizes(blocks), group.size)}


def check_ranks(stored: Optional[dict], group: Optional[RankGroup], store: str) -> None:
    """A resumed run continues on the ranks it was trained by (the optimizer state is split among
    them: a different number cannot read it)."""
    had = int(stored["world_size"]) if stored else None
    now = group.size if group is not None else None
    if had == now:
        return
    if had is None:
        raise ValueError(f"the run in {store} was trained by one process; resume it without torchrun")
    raise ValueError(f"the run in {store} was trained by {had} ranks, each with its share of the optimizer state; resume it with "
                     f"torchrun --nproc-per-node {had} -m fuyou finetune --store <its stores, with {RANK}> --resume")


def weights_only_blocks(record: dict, group: Optional[RankGroup]) -> List[str]:
    """The blocks whose master and moments other ranks' stores hold."""
    if group is None:
        return []
    return [b for b, r in record["ranks"]["owners"].items() if r != group.rank]


def owners_of(record: dict) -> Dict[str, int]:
    return {b: int(r) for b, r in record.get("ranks", {}).get("owners", {}).items()}
