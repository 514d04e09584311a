"""Checkpoint keys to model tensors and back, through transformers' own conversion mapping.

`from_pretrained` renames legacy keys and fuses tensors (one per expert -> one per layer) with the
transforms `conversion_mapping.get_model_conversion_mapping` lists for the model; `save_pretrained`
writes them back with the reversed transforms. fuyou applies the same transforms, key by key in the
order `from_pretrained` uses, but runs each one only when the block holding its result is imported,
so a checkpoint is still read one block at a time. Export reverts them block by block, so what
fuyou writes is what `save_pretrained` would have written.

transformers older than the conversion mapping (before 5.0) reads keys as they are named; the
import then matches names directly, with or without the causal LM's prefix.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Tuple

import torch

from .errors import ModelError


def _api():
    try:
        from transformers import conversion_mapping, core_model_loading
    except ImportError:
        return None
    needed = ("WeightConverter", "WeightRenaming", "rename_source_key", "dot_natural_key", "revert_weight_conversion")
    if not hasattr(conversion_mapping, "get_model_conversion_mapping") or not all(hasattr(core_model_loading, n) for n in needed):
        return None
    return conversion_mapping, core_model_loading


class LoadPlan:
    """For each model tensor a checkpoint provides: the transform that produces it and the checkpoint
    keys it reads (the first target of a transform with several names every result)."""

    def __init__(self, model, checkpoint_keys):
        self.model = model
        self.state = model.state_dict()  # meta parameters and real buffers: names, shapes, dtypes
        self.entries: Dict[str, Tuple[object, List[Tuple[str, str]]]] = {}
        api = _api()
        if api is None:
            self._match_by_name(checkpoint_keys)
            return
        conv, core = api
        rules = conv.get_model_conversion_mapping(model)  # fresh objects: renamings keep state while matching
        renamings = [r for r in rules if isinstance(r, core.WeightRenaming)]
        converters = [r for r in rules if isinstance(r, core.WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        prefix = model.base_model_prefix
        for key in sorted(checkpoint_keys, key=core.dot_natural_key):
            target, pattern = core.rename_source_key(key, renamings, converters, prefix, self.state)
            if target not in self.state and key in self.state:  # a key that must not be renamed
                target, pattern = core.rename_source_key(key, [], [], prefix, self.state)
            if target not in self.state:
                continue  # a tensor the model does not have: from_pretrained drops it too
            if pattern is None:
                transform, pattern = core.WeightRenaming(key, target), key
            else:
                transform = copy.deepcopy(by_pattern[pattern])
            self.entries.setdefault(target, (transform, []))[1].append((pattern, key))

    def _match_by_name(self, checkpoint_keys) -> None:
        keys = set(checkpoint_keys)
        for name in self.state:
            tail = name.split(".", 1)[1] if "." in name else name
            for key in (name, tail):
                if key in keys:
                    self.entries[name] = (None, [(key, key)])
                    break

    def produce(self, names, read: Callable[[str], torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The named model tensors (and any others their transforms yield), read with `read(key)`,
        in the dtype the model keeps each in (fp32 for weights, as from_pretrained(dtype=float32))."""
        out: Dict[str, torch.Tensor] = {}
        for name in names:
            if name in out or name not in self.entries:
                continue
            transform, sources = self.entries[name]
            dtype = self.state[name].dtype

            def load(key, dtype=dtype):
                t = read(key)
                return t.to(dtype) if t.is_floating_point() and dtype.is_floating_point else t

            if transform is None:
                out[name] = load(sources[0][1])
                continue
            transform = copy.deepcopy(transform)  # convert() consumes what add_tensor collected
            for pattern, key in sources:
                transform.add_tensor(name, key, pattern, lambda key=key: load(key))
            try:
                made = transform.convert(name, model=self.model, config=self.model.config)
            except (RuntimeError, ValueError, IndexError, KeyError) as exc:
                raise ModelError(
                    f"cannot assemble {name!r} from the checkpoint's {len(sources)} tensors {sources[0][1]!r}, ... with transformers' conversion "
                    f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); the checkpoint does not match its config.json"
                ) from None
            for target, value in made.items():
                out[target] = value[0] if isinstance(value, list) else value
        return out


def to_checkpoint(model, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Model tensors (one block's) under the names and layout save_pretrained writes."""
    api = _api()
    if api is None:
        return tensors
    return api[1].revert_weight_conversion(model, tensors)

