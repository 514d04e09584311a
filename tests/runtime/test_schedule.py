"""describe(): the schedule of one step, read off the step graph the runtime runs."""
import pytest

from fuyou.step.graph import build_step_graph
from fuyou.step.spec import BlockSizes, StepSpec, assign_opt_slots, consumers
from fuyou.step.schedule import describe, schedule_rows

LAYERS = 6


def _spec(*, weight_slots=3, device_slots=0, opt_slots=2, grad_slots=2, n_offloaded=0, n_on_ssd=0, recomputed=(), tied=False, ranks=1,
          edge=()) -> StepSpec:
    """`edge`: the untied head and embedding's own slot, ("head", "embed"); a tied embedding always has its own."""
    names = ["embed"] + [f"layer{i:04d}" for i in range(LAYERS)] + ["head"]
    cons = consumers(names, {"head": ("embed",)} if tied else {})
    blocks = {b: BlockSizes(1000, 4000, 12000) for b in names}
    edge = ("embed",) if tied else edge
    return StepSpec(cons, blocks, weight_slots, device_slots, opt_slots, assign_opt_slots(cons, edge, opt_slots), [10] * len(cons),
                    grad_slots, n_offloaded=n_offloaded, n_on_ssd=n_on_ssd, recomputed_inputs=frozenset(recomputed), act_block_bytes=100, ranks=ranks)


def _ancestors(task) -> set:
    seen, todo = set(), list(task.deps)
    while todo:
        t = todo.pop()
        if t.name not in seen:
            seen.add(t.name)
            todo += t.deps
    return seen


SPECS = {
    "host device": _spec(),
    "device slots": _spec(device_slots=2),
    "one device slot": _spec(device_slots=1, weight_slots=1, opt_slots=1, grad_slots=1),
    "offloaded inputs": _spec(device_slots=2, n_offloaded=4, n_on_ssd=2),
    "recomputed inputs": _spec(device_slots=2, recomputed=(5, 3)),
    "tied": _spec(tied=True),
    "edge slot": _spec(edge=("head", "embed"), opt_slots=1, grad_slots=1),
    "ranks": _spec(ranks=2, opt_slots=1, grad_slots=1),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_every_task_is_placed_once_and_never_beside_what_it_waits_for(name):
    spec = SPECS[name]
    graph = build_step_graph(spec)
    compute = [t for t in graph.tasks if t.kind == "compute"]
    rows = schedule_rows(spec)
    assert [r.compute for r in rows[1:-1]] == [t.name for t in compute]  # one line per consumer, in compute order
    placed = [t.name for r in rows for t in r.during]
    assert len(placed) == len(set(placed))
    waited = {t.name for r in rows for t in r.waits}
    others = {t.name for t in graph.tasks if t.kind != "compute"}
    assert set(placed) | waited == others  # nothing left out
    by_name = {t.name: t for t in graph.tasks}
    for k, row in enumerate(rows[1:-1]):
        for t in row.during:
            # Listed beside consumer k: it may run while k computes, so k does not wait for it, and it
            # waits for no compute task at or after k.
            assert t.name not in _ancestors(compute[k])
            assert not {c.name for c in compute[k:]} & _ancestors(by_name[t.name])
    first_line = {t.name for t in rows[0].during}
    assert first_line <= _ancestors(compute[0])  # before the first consumer: what it waits for


def test_describe_names_the_overlap_of_optimizer_and_backward():
    text = describe(SPECS["host device"])
    lines = text.splitlines()
    assert lines[0].startswith(f"one step: {LAYERS} layers; slots: 3 weight staging, 0 device, 2 optimizer, 2 gradient")
    bwd = next(line for line in lines if "bwd:layer0004" in line)
    assert "optim layer0005" in bwd.split("grad slot")[-1]  # the optimizer of the block above runs during this backward
    assert lines[-1].strip().startswith("then") and "commit" in lines[-1]
    assert "1 optimizer, 1 gradient, an edge slot (head then embed);" in describe(SPECS["edge slot"]).splitlines()[0]
    offload = describe(SPECS["offloaded inputs"])
    assert "offload in[1]" in offload and "bring back in[1]" in offload


def _deps(graph, name: str) -> set:
    return {d.name for d in next(t for t in graph.tasks if t.name == name).deps}


def _layers_down() -> list:
    return [f"layer{i:04d}" for i in reversed(range(LAYERS))]


@pytest.mark.parametrize("edge", [(), ("head", "embed")])
def test_slot_reuse_waits_for_the_slots_previous_holder(edge):
    """A state read waits for the write of the block that held its optimizer slot before it, a
    backward for the optimizer of the block that held its gradient slot: with one slot of each,
    the cycled slots pass from block to block in backward order; the edge slot passes from the head
    to the embedding, so the embedding's read no longer waits for the last layer's write. A slot's
    first block reads its states after the forward's weight reads, the head's last."""
    g = build_step_graph(_spec(edge=edge, opt_slots=1, grad_slots=1))
    order = (["head"] if not edge else []) + _layers_down() + (["embed"] if not edge else [])
    for prev, b in zip(order, order[1:]):
        assert f"write:{prev}" in _deps(g, f"read_s:{b}")
        assert f"optim:{prev}" in _deps(g, f"bwd:{b}")
    # The first block of a slot: its read waits for the head's weights read, not for a write.
    head_read = f"read_w{LAYERS + 1}:head"
    assert _deps(g, f"read_s:{order[0]}") == {head_read}
    if edge:
        assert _deps(g, "read_s:head") == {head_read}
        assert _deps(g, "read_s:embed") == {"write:head"}
        assert "optim:head" in _deps(g, "bwd:embed")
    else:
        assert _deps(g, "read_s:embed") == {"write:layer0000"}


def test_the_edge_slot_hides_the_embeddings_state_read():
    """Predicted with one cycled optimizer slot: sharing the edge slot with the head, the
    embedding's state read runs during the layers' backward; cycled, it starts after the last
    layer's write, and the step is longer by it."""
    from scheduler.costmodel import Rates, predict
    from fuyou.step.graph import LANES

    # A block's state read 0.1 s, optimizer 0.1 s, write 0.13 s; its compute 1 s.
    rates = Rates(read_Bps=120000.0, write_Bps=120000.0, h2d_Bps=1e9, d2h_Bps=1e9, compute_flops=10.0, optim_params_per_s=10000.0)
    steps = {}
    for edge in [(), ("head", "embed")]:
        pred = predict(build_step_graph(_spec(edge=edge, opt_slots=1, grad_slots=1)), rates, LANES)
        ev = {e.name: e for e in pred.trace.events}
        steps[edge] = pred.step_s
        hidden = ev["read_s:embed"].end_ns <= ev["bwd:layer0000"].end_ns
        assert hidden == bool(edge)
    assert steps[("head", "embed")] < steps[()]
