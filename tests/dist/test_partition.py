"""Which rank updates which block: whole blocks, balanced by parameters, alternating on equal layers."""
import pytest

from fuyou.dist.partition import assign_owners


def test_equal_layers_alternate_and_the_big_blocks_go_to_different_ranks():
    blocks = [("embed", 500), *[(f"layer{i:04d}", 100) for i in range(6)], ("head", 500)]
    owners = assign_owners(blocks, 2)
    assert list(owners) == [b for b, _n in blocks]  # forward order kept
    assert owners["embed"] != owners["head"]
    layers = [owners[f"layer{i:04d}"] for i in range(6)]
    assert layers == [0, 1, 0, 1, 0, 1]
    load = [sum(n for b, n in blocks if owners[b] == r) for r in range(2)]
    assert load == [800, 800]


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 8])
def test_balanced_within_one_block_and_deterministic(ranks):
    blocks = [("embed", 1000), *[(f"layer{i:04d}", 300 + (i % 3)) for i in range(13)], ("head", 1001)]
    owners = assign_owners(blocks, ranks)
    assert owners == assign_owners(list(blocks), ranks)
    assert set(owners.values()) <= set(range(ranks))
    load = [sum(n for b, n in blocks if owners[b] == r) for r in range(ranks)]
    assert max(load) - min(load) <= max(n for _b, n in blocks)  # greedy largest-first: within one block
    if ranks == 1:
        assert set(owners.values()) == {0}


def test_more_ranks_than_blocks_leaves_some_ranks_without_blocks():
    owners = assign_owners([("embed", 10), ("head", 10)], 4)
    assert sorted(owners.values()) == [0, 1]
    with pytest.raises(ValueError, match="at least one rank"):
        assign_owners([("embed", 10)], 0)
