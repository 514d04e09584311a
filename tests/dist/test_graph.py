"""The step graph of a data-parallel rank: every block's gradient reduced to its owner after its
backward and before its optimizer, its new weights broadcast after the optimizer and before the
write, all collectives in one chain (every rank issues them in the same order), and the cost model
and byte counts see them."""
import pytest

from scheduler.costmodel import Rates, predict
from fuyou.step.graph import LANES, build_redo_graph, build_step_graph, bytes_per_step
from fuyou.step.spec import BlockSizes, StepSpec, assign_opt_slots, consumers
from tests.runtime.test_schedule import _ancestors as ancestors

NAMES = ["embed"] + [f"layer{i:04d}" for i in range(5)] + ["head"]


def spec(ranks=2, opt_slots=2, grad_slots=2, tied=False):
    cons = consumers(NAMES, {"head": ("embed",)} if tied else {})
    # This rank updates every other block: the others keep their weights alone (no state bytes).
    blocks = {b: BlockSizes(1000 + i, 4000, 12000 if i % 2 else 0) for i, b in enumerate(NAMES)}
    return StepSpec(cons, blocks, 3, 0, opt_slots, assign_opt_slots(cons, ("embed",) if tied else (), opt_slots), [10] * len(cons), grad_slots, ranks=ranks)


@pytest.mark.parametrize("opt_slots,grad_slots,tied", [(2, 2, False), (1, 1, False), (3, 2, True)])
def test_collectives_sit_between_backward_optimizer_and_write_in_one_chain(opt_slots, grad_slots, tied):
    g = build_step_graph(spec(opt_slots=opt_slots, grad_slots=grad_slots, tied=tied))
    by = {t.name: t for t in g.tasks}
    comm = [t for t in g.tasks if t.lane == "comm"]
    assert all(t.kind == "collective" for t in comm)
    for prev, t in zip(comm, comm[1:]):
        assert prev in t.deps  # chained in graph order
    assert {t.name for t in comm} == {f"reduce:{b}" for b in NAMES} | {f"bcast:{b}" for b in NAMES}
    backward = {b: f"bwd:{b}" for b in NAMES if b != "head"} | {"head": "head:head"}
    for b in NAMES:
        assert backward[b] in {d.name for d in by[f"reduce:{b}"].deps}
        assert f"reduce:{b}" in ancestors(by[f"optim:{b}"])
        assert f"optim:{b}" in {d.name for d in by[f"bcast:{b}"].deps}
        assert f"bcast:{b}" in {d.name for d in by[f"write:{b}"].deps}
    order = [t.name for t in comm]
    # Reduces come in backward order, each block's broadcast after the next block's reduce.
    assert [n for n in order if n.startswith("reduce:")] == [f"reduce:{b}" for b in ["head"] + NAMES[-2::-1]]
    assert order.index("bcast:head") > order.index("reduce:layer0004")


def test_one_process_has_no_collectives_and_the_cost_model_times_them():
    assert not [t for t in build_step_graph(spec(ranks=1)).tasks if t.lane == "comm"]
    g = build_step_graph(spec())
    moved = bytes_per_step(g.tasks)
    assert moved["between ranks"] == sum(4 * (1000 + i) + 4000 for i in range(len(NAMES)))
    rates = Rates(read_Bps=1e9, write_Bps=1e9, h2d_Bps=1e9, d2h_Bps=1e9, compute_flops=1e9, optim_params_per_s=1e9, collective_Bps=1e6)
    slow = predict(g, rates, LANES)
    fast = predict(g, rates.replace(collective_Bps=1e12), LANES)
    assert slow.busy_s["comm"] == pytest.approx(moved["between ranks"] / 1e6)
    assert slow.step_s > fast.step_s and slow.bottleneck == "comm"


def test_a_clipped_redo_broadcasts_again_and_reads_only_its_own_gradients():
    g = build_redo_graph(spec())
    comm = [t for t in g.tasks if t.lane == "comm"]
    assert [t.name for t in comm] == [f"redo_bcast:{b}" for b in ["head"] + NAMES[-2::-1]]
    grads = {t.meta["block"]: t.nbytes for t in g.tasks if t.meta.get("role") == "read_grad"}
    assert grads == {b: (4 * (1000 + i) if i % 2 else 0) for i, b in enumerate(NAMES)}
