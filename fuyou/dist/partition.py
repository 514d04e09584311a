"""Which rank updates which block: the ZeRO-style partition of a data-parallel run's optimizer state.

Each rank owns whole blocks: their master weights and AdamW moments live in that rank's store only,
its optimizer updates them, and it broadcasts their new compute weights to the others. Whole
blocks, not a 1/N slice of every block, because a block's state then stays one file per kind in one
codec layout (fp8 weights' 128x128 tiles and the moments' scale groups never straddle two ranks),
the optimizer task runs unchanged, and each rank's store I/O per step is its own blocks' states plus
every block's compute weights. The balance is within one block: blocks go, largest first, to the
rank with the fewest parameters so far (70B, 80 layers on 8 ranks: 10 layers each, the embedding
and the head on the two lightest).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple


def block_sizes(blocks: Sequence[dict]) -> List[Tuple[str, int]]:
    """[(name, numel)] of manifest blocks ({"name", "params": [{"numel", ...}]}), in their order."""
    return [(b["name"], sum(p["numel"] for p in b["params"])) for b in blocks]


def assign_owners(blocks: Sequence[Tuple[str, int]], ranks: int) -> Dict[str, int]:
    """{block: rank} for `blocks` = [(name, numel)] in forward order: largest first to the least
    loaded rank (ties: the earlier block, the lower rank), so equal layers alternate between ranks
    and the optimizer work of the backward is spread over them as it arrives."""
    if ranks < 1:
        raise ValueError(f"a run needs at least one rank, got {ranks}")
    load = [0] * ranks
    owners: Dict[str, int] = {}
    order = sorted(range(len(blocks)), key=lambda i: (-blocks[i][1], i))
    for i in order:
        name, numel = blocks[i]
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += numel
    return {name: owners[name] for name, _ in blocks}
