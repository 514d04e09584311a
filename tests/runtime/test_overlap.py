"""The CPU optimizer of block b runs while the backward of the block before it computes (trace)."""

from scheduler import Trace
from tests.helpers import random_batches, save_checkpoint, tiny_config
from tests.helpers import run_fuyou


def test_optimizer_overlaps_next_backward(tmp_path):
    # Layers wide enough that a block's backward takes longer than its optimizer step.
    cfg = tiny_config("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=5, num_attention_heads=8)
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), cfg, tokenizer=False)
    trace = Trace()
    run_fuyou(ckpt, str(tmp_path / "store"), random_batches(2, 8, 64, cfg.vocab_size), 2, trace=trace)
    ev = {e.name: e for e in trace.events if e.step == 2}
    overlapped = []
    for i in range(1, cfg.num_hidden_layers):
        opt, bwd_next = ev[f"optim:layer{i:04d}"], ev[f"bwd:layer{i - 1:04d}"]
        # Dependencies: the optimizer of a block starts only after that block's backward ended.
        assert opt.start_ns >= ev[f"bwd:layer{i:04d}"].end_ns
        overlapped.append(opt.start_ns < bwd_next.end_ns and opt.end_ns > bwd_next.start_ns)
    # Every layer's optimizer ran concurrently with the next backward, except at most one that the
    # OS scheduler delayed on this 2-core machine.
    assert sum(overlapped) >= len(overlapped) - 1, overlapped
    # The whole backward is on one compute lane and the optimizers on another.
    assert {e.lane for e in trace.events if e.name.startswith("optim:")} == {"optim"}
    assert {e.lane for e in trace.events if e.name.startswith("bwd:")} == {"compute"}
