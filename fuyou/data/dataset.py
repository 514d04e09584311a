"""Training data: .jsonl ("text", or "prompt"/"completion") or .txt, tokenized into fixed-length rows.

- "text" records and .txt files (documents separated by blank lines) are *packed*: documents are
  concatenated, each ended by the EOS token, and the stream is cut into rows of seq_len tokens; every
  token is a target and no padding is needed (attention runs across document boundaries, as in
  GPT-style packing).
- "prompt"/"completion" records become one row each: prompt + completion + EOS, truncated to seq_len
  and right-padded; the loss covers only the completion (labels -100 on the prompt and the padding)
  and the attention mask hides the padding.

Rows are visited in a seeded random order, epoch after epoch; the position (rows consumed) is all
that is needed to resume the same order.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional

import torch

from .tokenizer import DataError


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S] int64
    labels: torch.Tensor  # [B, S] int64, -100 where no loss
    attention_mask: Optional[torch.Tensor]  # [B, S] int64, or None when there is no padding

    def to(self, device) -> "Batch":
        mask = None if self.attention_mask is None else self.attention_mask.to(device, non_blocking=True)
        return Batch(self.input_ids.to(device, non_blocking=True), self.labels.to(device, non_blocking=True), mask)

    def split(self, parts: int) -> List["Batch"]:
        mb = self.input_ids.shape[0] // parts
        out = []
        for i in range(parts):
            s = slice(i * mb, (i + 1) * mb)
            out.append(Batch(self.input_ids[s], self.labels[s], None if self.attention_mask is None else self.attention_mask[s]))
        return out


def check_data_file(path: str) -> None:
    """Refuse a data path that is not a file (the dataset reads it later)."""
    if not os.path.exists(path):
        raise DataError(f"data file {path} does not exist; pass a .jsonl or .txt file with --data")
    if os.path.isdir(path):
        raise DataError(f"data path {path} is a directory; pass a .jsonl or .txt file")


def _read_records(path: str) -> List[dict]:
    check_data_file(path)
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read data file {path} ({exc}); it must be readable UTF-8 text") from None
    if ext == ".txt":
        return [{"text": doc.strip()} for doc in raw.split("\n\n") if doc.strip()]
    if ext not in (".jsonl", ".json"):
        raise DataError(f"data file {path}: unsupported extension {ext!r}; use .jsonl (one JSON object per line) or .txt")
    records = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
        if not isinstance(rec, dict) or not ("text" in rec or ("prompt" in rec and "completion" in rec)):
            raise DataError(f'{path}:{lineno}: expected an object with "text", or with "prompt" and "completion"')
        records.append(rec)
    return records


class TokenDataset:
    """All rows of a data file, tokenized; `batch(position, size)` gives the rows in seeded order."""

    def __init__(self, path: str, tokenizer, seq_len: int, seed: int = 0):
        self.path = path
        self.seq_len = seq_len
        self.seed = seed
        records = _read_records(path)
        if not records:
            raise DataError(f"data file {path} holds no examples; add at least one record")
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        pad = eos if pad is None else pad
        texts = [r["text"] for r in records if "text" in r]
        pairs = [r for r in records if "text" not in r]
        rows_ids, rows_labels, rows_mask = [], [], []
        if texts:
            stream: List[int] = []
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
                stream.extend(ids)
                stream.append(eos)
            n = len(stream) // seq_len
            if n:
                t = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
                rows_ids.append(t)
                rows_labels.append(t.clone())
                rows_mask.append(torch.ones_like(t))
        for rec in pairs:
            p = tokenizer(str(rec["prompt"]), add_special_tokens=False)["input_ids"]
            c = tokenizer(str(rec["completion"]), add_special_tokens=False)["input_ids"] + [eos]
            ids = (p + c)[:seq_len]
            lab = ([-100] * len(p) + c)[:seq_len]
            n = len(ids)
            ids += [pad] * (seq_len - n)
            lab += [-100] * (seq_len - n)
            rows_ids.append(torch.tensor([ids]))
            rows_labels.append(torch.tensor([lab]))
            rows_mask.append(torch.tensor([[1] * n + [0] * (seq_len - n)]))
        if not rows_ids:
            raise DataError(f"data file {path} has fewer than seq-len={seq_len} tokens; add data or lower --seq-len")
        self.input_ids = torch.cat(rows_ids)
        self.labels = torch.cat(rows_labels)
        mask = torch.cat(rows_mask)
        self.attention_mask = None if bool(mask.all()) else mask
        if not bool((self.labels[:, 1:] != -100).any()):
            raise DataError(f"data file {path} has no target tokens (every completion is empty or truncated); raise --seq-len")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def _rows(self, rows: torch.Tensor) -> "TokenDataset":
        out = object.__new__(TokenDataset)
        out.path, out.seq_len, out.seed = self.path, self.seq_len, self.seed
        out.input_ids, out.labels = self.input_ids[rows], self.labels[rows]
        mask = None if self.attention_mask is None else self.attention_mask[rows]
        out.attention_mask = None if mask is None or bool(mask.all()) else mask
        return out

    def split(self, fraction: float) -> tuple:
        """(training rows, held-out rows): a seeded `fraction` of the rows held out for validation."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(self.seed * 1_000_003 - 1))
        n_eval = max(1, round(fraction * len(self)))
        if n_eval >= len(self):
            raise DataError(f"data file {self.path} has {len(self)} rows of seq-len={self.seq_len}: too few to hold out {fraction:g} of them; "
                            "add data or lower --eval-split")
        return self._rows(order[n_eval:].sort().values), self._rows(order[:n_eval].sort().values)

    def in_order(self, size: int) -> List[Batch]:
        """Every row once, in file order, in batches of at most `size` rows (validation)."""
        out = []
        for start in range(0, len(self), size):
            s = slice(start, start + size)
            mask = None if self.attention_mask is None else self.attention_mask[s]
            out.append(Batch(self.input_ids[s], self.labels[s], None if mask is None or bool(mask.all()) else mask))
        return out

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self), generator=g)

    def batch(self, position: int, size: int) -> Batch:
        """Rows position .. position+size-1 of the endless seeded order."""
        n = len(self)
        rows = []
        cache = {}
        for pos in range(position, position + size):
            epoch, i = divmod(pos, n)
            if epoch not in cache:
                cache[epoch] = self._order(epoch)
            rows.append(int(cache[epoch][i]))
        sel = torch.tensor(rows)
        mask = None if self.attention_mask is None else self.attention_mask[sel]
        if mask is not None and bool(mask.all()):
            mask = None
        return Batch(self.input_ids[sel], self.labels[sel], mask)
