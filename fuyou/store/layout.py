"""Where each parameter's state sits inside a block's files, from a layout its caller supplies.

The store does not know what the state means. Its caller (the optimizer side, fuyou.optim.state)
hands it a `StateLayout`: the kinds of state every parameter has (one file per block and kind) and,
for each kind, the flat arrays (`PartSpec`) a parameter of a given size and shape is stored as. The
store places those parts in the files and gives back views of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from .directio import aligned_bytes

PART_ALIGN = 256  # bytes; keeps every part's view aligned for vector loads and GPU coalescing


@dataclass(frozen=True)
class PartSpec:
    """One flat stored array of a kind of state."""

    name: str
    numel: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class StateLayout(Protocol):
    """What a store's caller says about the state it keeps (the manifest's "state" entry is its JSON)."""

    kinds: Tuple[str, ...]

    def parts(self, kind: str, numel: int, shape: Optional[Sequence[int]] = None) -> List[PartSpec]:
        """The flat arrays that store `kind` of a parameter of `numel` elements and `shape`."""
        ...

    def to_json(self) -> dict:
        ...


@dataclass(frozen=True)
class PartRef:
    param: str
    part: str
    offset: int
    numel: int
    dtype: torch.dtype


class KindLayout:
    """Where each parameter's parts of one kind sit inside one block file."""

    def __init__(self, params: List[tuple], kind: str, state: StateLayout):
        self.kind = kind
        self.parts: List[PartRef] = []
        off = 0
        for name, numel, shape in params:
            for spec in state.parts(kind, numel, shape):
                off = (off + PART_ALIGN - 1) // PART_ALIGN * PART_ALIGN
                self.parts.append(PartRef(name, spec.name, off, spec.numel, spec.dtype))
                off += spec.nbytes
        self.nbytes = off
        self.file_bytes = aligned_bytes(off)

    def gaps(self) -> List[Tuple[int, int]]:
        """[(start, end)] byte ranges of the file no part covers: the alignment padding between parts and
        after the last one."""
        out, end = [], 0
        for p in self.parts:
            if p.offset > end:
                out.append((end, p.offset))
            end = p.offset + PartSpec(p.part, p.numel, p.dtype).nbytes
        if self.file_bytes > end:
            out.append((end, self.file_bytes))
        return out

    def zero_gaps(self, buf: torch.Tensor) -> None:
        """Zero the bytes of buf (a file's worth, uint8) that no part covers: a writer that fills
        every part then leaves a file that is a function of the state alone, without a pass over
        the parts' bytes."""
        for start, end in self.gaps():
            buf[start:end].zero_()

    def views(self, buf: torch.Tensor) -> Dict[str, Dict[str, torch.Tensor]]:
        """{param: {part: flat tensor view into buf}} (buf: uint8, at least nbytes)."""
        out: Dict[str, Dict[str, torch.Tensor]] = {}
        for p in self.parts:
            nbytes = PartSpec(p.part, p.numel, p.dtype).nbytes
            out.setdefault(p.param, {})[p.part] = buf[p.offset : p.offset + nbytes].view(p.dtype)
        return out


class BlockLayout:
    """Every kind's layout for one block (`kinds`: the block's own, when it holds fewer than the
    state's: a block whose optimizer state another rank's store holds keeps its weights alone)."""

    def __init__(self, name: str, params: List[tuple], state: StateLayout, kinds: Optional[Sequence[str]] = None):
        self.name = name
        self.params = [(n, numel) for n, numel, _shape in params]  # [(param name, numel)]
        self.shapes = {n: shape for n, _numel, shape in params}
        self.kinds = {kind: KindLayout(params, kind, state) for kind in (state.kinds if kinds is None else kinds)}

    @property
    def numel(self) -> int:
        return sum(n for _, n in self.params)
