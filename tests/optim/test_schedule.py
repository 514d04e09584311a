"""Learning-rate schedules: fuyou in fp32 mode trains exactly like torch.optim.AdamW stepped by
transformers.get_scheduler, element-wise, over 21 steps with warm-up."""
import pytest
import torch

from fuyou.config import LR_SCHEDULERS, OptimConfig
from fuyou.optim.schedule import lr_schedule
from tests.helpers import random_batches, reference_train, run_fuyou, save_checkpoint, store_master_weights, tiny_config

STEPS, WARMUP, LR, WD = 21, 5, 2e-3, 0.05


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(str(tmp_path_factory.mktemp("sched") / "ckpt"), tiny_config("llama", num_hidden_layers=2), tokenizer=False)


def _hf(name):
    from transformers import get_scheduler

    kwargs = {"min_lr_rate": 0.1} if name == "cosine_with_min_lr" else None
    name = "constant_with_warmup" if name == "constant" else name  # fuyou's constant with a warm-up
    return lambda opt: get_scheduler(name, opt, num_warmup_steps=WARMUP, num_training_steps=STEPS, scheduler_specific_kwargs=kwargs)


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_schedule_trains_like_adamw_with_get_scheduler(ckpt, tmp_path, name):
    batches = random_batches(STEPS, 4, 16, 128)
    optim = OptimConfig(lr=LR, weight_decay=WD, lr_scheduler=name, warmup_steps=WARMUP, min_lr_rate=0.1, beta2=0.99, eps=1e-7)
    _rt, results = run_fuyou(ckpt, str(tmp_path / "store"), batches, 2, optim=optim)
    ref_model, ref_losses = reference_train(ckpt, batches, 2, lr=LR, weight_decay=WD, scheduler=_hf(name), betas=(0.9, 0.99), eps=1e-7)
    torch.testing.assert_close(torch.tensor([r.lr for r in results]), torch.tensor(_lrs(name)), rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor([r.loss for r in results]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    ref = dict(ref_model.named_parameters())
    for pname, value in store_master_weights(str(tmp_path / "store")).items():
        torch.testing.assert_close(value, ref[pname].detach().reshape(-1), rtol=1e-5, atol=1e-6, msg=lambda m, n=pname: f"{n}: {m}")
    assert len({r.lr for r in results}) > 2  # the schedule moved the learning rate


def _lrs(name):
    """The learning rate each optimizer step ran at under torch + get_scheduler."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched, out = _hf(name)(opt), []
    for _ in range(STEPS):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_ratio_rounds_up_like_trainer():
    lr_at = lr_schedule(OptimConfig(lr=1.0, lr_scheduler="linear", warmup_ratio=0.1), total_steps=25)  # ceil(2.5) = 3 warm-up steps
    assert [lr_at(t) for t in (1, 2, 3, 4)] == [0.0, 1 / 3, 2 / 3, 1.0]
    with pytest.raises(ValueError, match="total steps"):
        lr_schedule(OptimConfig(lr=1.0, lr_scheduler="cosine"))
