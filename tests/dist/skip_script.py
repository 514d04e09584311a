"""One rank of tests/dist/test_data_parallel.py's non-finite test, launched by torchrun: import a
checkpoint into this rank's store, then train the batches of a JSON file, each rank on its rows,
printing one JSON line per step (status, step, loss) and the store's files after each step.

    torchrun --nproc-per-node 2 tests/dist/skip_script.py CKPT STORE{rank} BATCHES.json
"""
import hashlib
import json
import os
import sys

import torch

from fuyou.config import BatchConfig, OptimConfig, StateConfig
from fuyou.data.dataset import Batch
from fuyou.dist.group import RankGroup
from fuyou.dist.ranks import owners_of, ranks_record, rows_of, store_of, weights_only_blocks
from fuyou.model.importer import import_model
from fuyou.model.skeleton import Skeleton, count_targets
from fuyou.model.source import ModelSource
from fuyou.step.runtime import Runtime


def files(store: str) -> dict:
    d = os.path.join(store, "blocks")
    return {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest() for f in sorted(os.listdir(d))}


def main(ckpt: str, stores: str, batches_path: str) -> None:
    group = RankGroup.from_env()
    source = ModelSource(ckpt)
    record = {"ranks": ranks_record(Skeleton(source.config).manifest_blocks(), group)}
    path = store_of(stores, group.rank)
    store = import_model(source, path, StateConfig(), train={"run": record}, weights_only_blocks=weights_only_blocks(record, group))
    batches = [Batch(torch.tensor(ids), torch.tensor(ids), None) for ids in json.load(open(batches_path))]
    rows, seq = batches[0].input_ids.shape
    rt = Runtime(store, Skeleton(source.config), device=torch.device("cpu"), batch=BatchConfig(batch_size=rows // group.size, micro_batches=1, seq_len=seq),
                 optim=OptimConfig(lr=1e-3), group=group, owners=owners_of(record))
    try:
        for b in batches:
            res = rt.step(rows_of(b, group), train_meta={"run": record}, targets=count_targets(b.labels))
            print(json.dumps({"rank": group.rank, "status": res.status, "step": res.step, "loss": res.loss, "files": files(path)}), flush=True)
    finally:
        rt.close()
        group.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
