"""Pools never exceed their budget; sizes parse with units; configs validate."""
import pytest
import torch

from fuyou.config import BatchConfig, MemoryConfig, OptimConfig, parse_size
from fuyou.memory import MemoryBudgetError, Pool


def test_pool_budget_is_enforced_and_peak_recorded():
    pool = Pool("cpu", 3 * 4096, torch.device("cpu"))
    a = pool.alloc(4096)
    b = pool.alloc(100)  # charged as one 4 KiB page
    assert a.data_ptr() % 4096 == 0 and b.numel() == 100
    with pytest.raises(MemoryBudgetError, match="budget"):
        pool.alloc(4097)
    pool.free(a)
    c = pool.alloc(8192)
    assert pool.peak_bytes == 3 * 4096 and pool.in_use_bytes == 3 * 4096
    pool.free(b)
    pool.free(c)
    assert pool.in_use_bytes == 0
    with pytest.raises(ValueError, match="did not hand out"):
        pool.free(torch.empty(4, dtype=torch.uint8))


@pytest.mark.parametrize("text,value", [("4GiB", 4 << 30), ("512MiB", 512 << 20), ("1.5G", int(1.5 * (1 << 30))), ("4096", 4096), ("2 kib", 2048),
                                        ("4GB", 4_000_000_000), ("500 MB", 500_000_000), ("2 kB", 2000), ("64B", 64), (1024, 1024)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_garbage():
    with pytest.raises(ValueError, match="4GiB"):
        parse_size("lots")


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        BatchConfig(batch_size=5, micro_batches=2)
    with pytest.raises(ValueError, match="--lr"):
        OptimConfig(lr=0)
    with pytest.raises(ValueError):
        MemoryConfig(cpu_mem_bytes=0)
    from fuyou.optim.schedule import lr_schedule

    # transformers' constant_with_warmup: optimizer step t runs at lr * min(1, (t - 1) / warmup).
    warm = lr_schedule(OptimConfig(lr=1.0, warmup_steps=4))
    assert [warm(t) for t in (1, 2, 5, 10)] == [0.0, 0.25, 1.0, 1.0]
