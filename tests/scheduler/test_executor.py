"""Executor: dependencies respected, lanes overlap, errors surface, trace in Chrome format."""
import json
import threading
import time

import pytest

from scheduler import Executor, Graph, Trace


def test_dependencies_and_results():
    order = []
    lock = threading.Lock()

    def rec(name, value):
        def fn():
            with lock:
                order.append(name)
            return value

        return fn

    g = Graph()
    a = g.add("a", "read", "read", rec("a", 1))
    b = g.add("b", "compute", "compute", rec("b", 2), [a])
    c = g.add("c", "optim", "optim", rec("c", 3), [a])
    g.add("d", "write", "write", rec("d", 4), [b, c])
    with Executor() as ex:
        res = ex.run(g)
    assert res == {"a": 1, "b": 2, "c": 3, "d": 4}
    assert order[0] == "a" and order[-1] == "d"


def test_lanes_run_concurrently():
    barrier = threading.Barrier(2, timeout=10)
    g = Graph()
    # Each waits for the other: only completes if the two lanes really run at the same time.
    g.add("x", "compute", "compute", barrier.wait)
    g.add("y", "optim", "optim", barrier.wait)
    with Executor() as ex:
        ex.run(g)
    ev = ex.trace.by_name()
    assert ev["x"].start_ns < ev["y"].end_ns and ev["y"].start_ns < ev["x"].end_ns


def test_first_error_is_raised_and_dependents_do_not_run():
    ran = []
    g = Graph()

    def boom():
        raise OSError(5, "read of /store/x at offset 0 failed")

    a = g.add("a", "read", "read", boom)
    g.add("b", "compute", "compute", lambda: ran.append("b"), [a])
    g.add("c", "write", "write", lambda: ran.append("c"))
    with Executor() as ex:
        with pytest.raises(OSError, match="offset 0"):
            ex.run(g)
    assert ran == ["c"]


def test_graph_validation():
    g = Graph()
    g.add("a", "read", "read", lambda: None)
    with pytest.raises(ValueError, match="duplicate"):
        g.add("a", "read", "read", lambda: None)
    with pytest.raises(ValueError, match="kind"):
        g.add("b", "nonsense", "read", lambda: None)


def test_chrome_trace_has_one_lane_per_resource(tmp_path):
    g = Graph()
    a = g.add("r", "read", "read", lambda: time.sleep(0.001), nbytes=4096)
    g.add("c", "compute", "compute", lambda: None, [a], flops=10)
    g.add("w", "write", "write", lambda: None, [a], nbytes=4096)
    trace = Trace()
    with Executor(trace=trace) as ex:
        ex.run(g, step=3)
    path = tmp_path / "t.json"
    trace.save_chrome(str(path))
    data = json.load(open(path))
    names = {e["tid"]: e["args"]["name"] for e in data["traceEvents"] if e.get("name") == "thread_name"}
    assert sorted(names.values()) == ["compute", "read", "write"]
    spans = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert {e["name"] for e in spans} == {"r", "c", "w"}
    for e in spans:
        assert names[e["tid"]] == e["cat"]  # each task sits on its own resource's lane
        assert e["dur"] >= 0 and e["args"]["step"] == 3
