"""describe(): the schedule of one step, read off the step graph the runtime runs."""
import pytest

from fuyou.step.graph import build_step_graph
from fuyou.step.spec import BlockSizes, StepSpec, assign_opt_slots, consumers
from fuyou.step.schedule import describe, schedule_rows

LAYERS = 6


def _spec(*, weight_slots=3, device_slots=0, opt_slots=2, grad_slots=2, n_offloaded=0, n_on_ssd=0, recomputed=(), tied=False, ranks=1) -> StepSpec:
    names = ["embed"] + [f"layer{i:04d}" for i in range(LAYERS)] + ["head"]
    cons = consumers(names, {"head": ("embed",)} if tied else {})
    blocks = {b: BlockSizes(1000, 4000, 12000) for b in names}
    return StepSpec(cons, blocks, weight_slots, device_slots, opt_slots, assign_opt_slots(cons, tied, opt_slots, "embed"), [10] * len(cons),
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
    offload = describe(SPECS["offloaded inputs"])
    assert "offload in[1]" in offload and "bring back in[1]" in offload
