"""The ranks of a data-parallel run: torch.distributed, launched by torchrun, over gloo.

    torchrun --nproc-per-node 2 -m fuyou finetune --store /nvme/run{rank} ...

Every collective of a step runs on host tensors: the gradients are reduced where the CPU optimizer
reads them (the host gradient slots) and the new compute weights are broadcast from the optimizer
slot they were written into, so gloo moves them whatever the compute device is. Collectives run on
the step graph's `comm` lane, one at a time in the graph's order, so every rank issues them in the
same order (graph.py chains them).
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Callable, List, Optional, Sequence, TypeVar

import torch

T = TypeVar("T")
# A collective waits this long for the slowest rank: a block's backward and its I/O on the largest
# models take minutes, not hours; a rank that died is noticed by torchrun well before.
TIMEOUT = datetime.timedelta(minutes=30)


class RankError(RuntimeError):
    """Another rank failed; the message is its own (every rank stops with it)."""


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


class RankGroup:
    """This process's rank among `size`; one per run (`from_env`), closed at its end."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    @classmethod
    def from_env(cls) -> Optional["RankGroup"]:
        """The group torchrun launched this process into (gloo over its rendezvous), or None for a
        single-process run."""
        if not launched_by_torchrun():
            return None
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    # -- collectives (host tensors) -----------------------------------------------------------
    def reduce_(self, t: torch.Tensor, owner: int) -> None:
        """Sum `t` over the ranks into `owner`'s `t` (the others' `t` is left undefined)."""
        import torch.distributed as dist

        dist.reduce(t, dst=owner, op=dist.ReduceOp.SUM)

    def broadcast_(self, t: torch.Tensor, owner: int) -> None:
        """`owner`'s `t` into every rank's `t`."""
        import torch.distributed as dist

        dist.broadcast(t, src=owner)

    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return t

    def sum(self, x: float) -> float:
        """x summed over the ranks (in fp64)."""
        return float(self.all_reduce_(torch.tensor([x], dtype=torch.float64))[0])

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def gather(self, obj) -> List:
        """Every rank's `obj`, in rank order, on every rank. It travels as JSON (never pickled):
        numbers, strings, lists, dicts, None; a tuple comes back a list."""
        import torch.distributed as dist

        data = json.dumps(obj).encode()
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64))
        longest = max(int(n) for n in sizes)
        mine = torch.zeros(longest, dtype=torch.uint8)
        mine[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
        out = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.size)]
        dist.all_gather(out, mine)
        return [json.loads(bytes(t[: int(n)].tolist())) for t, n in zip(out, sizes)]

    def first(self, value: Optional[str], choices: Sequence[str]) -> Optional[str]:
        """The latest of `choices` any rank holds (its position in `choices`), or None on every rank."""
        code = torch.tensor([choices.index(value) + 1 if value is not None else 0], dtype=torch.int64)
        got = int(self.all_reduce_(code, "max")[0])
        return choices[got - 1] if got else None

    def agree(self, fn: Callable[[], T]) -> T:
        """Run `fn` on every rank; if it raised on any, raise on all (the lowest failing rank's own
        error there, a RankError quoting it elsewhere), so no rank goes on into a step its peers
        never reach."""
        error: Optional[BaseException] = None
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - reported to every rank, raised below
            error = exc
        reports = self.gather(None if error is None else (type(error).__name__, str(error).splitlines()[0] if str(error) else ""))
        failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
        if not failed:
            return result
        if error is not None and failed[0][0] == self.rank:
            raise error
        rank, (_kind, message) = failed[0]
        raise RankError(f"rank {rank} stopped the run: {message}")
