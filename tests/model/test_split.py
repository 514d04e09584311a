"""The block split learned from the model's own forward: what goes into the embed and the head
block, head transforms trained as the model computes them, refusals that name the class and the
reason, and the attention implementation chosen per model."""
import pytest

from fuyou.model.errors import UnsupportedModelError
from fuyou.model.skeleton import EMBED, HEAD, Skeleton
from fuyou.step.slot_sizes import least_slot_bytes
from tests.helpers import LR, WD, assert_trains_like_pytorch, random_batches, reference_train, run_fuyou
from tests.model.matrix import MICRO, _save, quiet
from tests.model.tiny_configs import tiny_config


@pytest.fixture(autouse=True)
def _quiet():
    quiet()


def test_embed_and_head_are_what_the_forward_runs_before_and_after_the_layers():
    gpt2 = Skeleton(tiny_config("gpt2"))
    assert gpt2.block(EMBED).params == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert gpt2.block(HEAD).params == ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    assert gpt2.block(HEAD).borrowed == [(EMBED, "transformer.wte.weight")]
    # OPT registers its final norm before its layers; the forward runs it after them.
    opt = Skeleton(tiny_config("opt"))
    assert "model.decoder.final_layer_norm.weight" in opt.block(HEAD).params
    assert "model.decoder.embed_positions.weight" in opt.block(EMBED).params
    # OLMo's final norm has no parameters: the head block holds the LM head alone.
    olmo = Skeleton(tiny_config("olmo"))
    assert olmo.block(HEAD).params == ["lm_head.weight"]
    for sk in (gpt2, opt, olmo):
        assert sorted(p for b in sk.blocks for p in b.params) == sorted(sk.params)


@pytest.mark.parametrize(
    "model_type,override",
    [("falcon_h1", {"lm_head_multiplier": 0.5}), ("granite", {"logits_scaling": 4.0}), ("cohere", {"logit_scale": 0.5}),
     ("gemma2", {"final_logit_softcapping": 0.1}), ("minicpm3", {"scale_emb": 3.0, "dim_model_base": 8})],
    ids=["falcon_h1-lm_head_multiplier", "granite-logits_scaling", "cohere-logit_scale", "gemma2-softcap", "minicpm3-scales"],
)
def test_head_and_embedding_scales_train_exactly(tmp_path, model_type, override):
    """Multipliers, logit scales and soft-capping outside the layers take effect (the loss differs from
    the default config's) and fuyou trains them exactly as PyTorch does."""
    batches = random_batches(2, 4, 16, 128, seed=1)
    default = _save(tiny_config(model_type), str(tmp_path / "default"))
    cfg = tiny_config(model_type)
    for k, v in override.items():
        setattr(cfg, k, v)
    ckpt = _save(cfg, str(tmp_path / "ckpt"))
    _rt, results = run_fuyou(ckpt, str(tmp_path / "store"), batches, MICRO)
    assert_trains_like_pytorch(str(tmp_path / "store"), ckpt, batches, MICRO, results)
    _model, default_losses = reference_train(default, batches, MICRO, lr=LR, weight_decay=WD)
    assert abs(results[0].loss - default_losses[0]) > 1e-4, f"{override} did not change the loss"


@pytest.mark.parametrize(
    "model_type,reason",
    [("zamba", "ZambaForCausalLM cannot be cut into layer-wise blocks: parameter .* is shared by decoder layers 0 and 1"),
     ("hrm_text", "HrmTextForCausalLM cannot be cut into layer-wise blocks: its forward runs its decoder layers in the order \\[0, 1, 0, 1, ")],
)
def test_refusals_name_the_class_and_the_reason(model_type, reason):
    with pytest.raises(UnsupportedModelError, match=reason):
        Skeleton(tiny_config(model_type))


def test_attention_is_chosen_per_model():
    """sdpa where transformers can use it, else eager: what from_pretrained picks, so the reference agrees."""
    assert Skeleton(tiny_config("llama")).attn_implementation == "sdpa"
    assert Skeleton(tiny_config("gpt_oss")).attn_implementation == "eager"  # attention sinks: eager only
    assert Skeleton(tiny_config("llama"), attn_implementation="eager").attn_implementation == "eager"


def test_split_of_a_70b_model_is_learned_without_its_weights():
    """The split is traced on the meta device: a 70B skeleton costs no weight memory."""
    import resource

    from fuyou.model.source import preset_config

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sk = Skeleton(preset_config("llama-70b"))
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    assert sk.numel() > 70e9 and len(sk.blocks) == 82
    assert grown < 1 << 30, f"building the skeleton grew RSS by {grown} B"
    assert all(p.device.type == "meta" for p in sk.model.parameters())


@pytest.mark.parametrize("model_type", ["gemma3n_text", "cpmant", "zaya", "glm_moe_dsa", "opt"])
def test_inputs_besides_the_hidden_state_train_exactly_when_recomputed(tmp_path, model_type):
    """Stored key/values (Gemma-3n), an embed-computed side input (CPM-Ant's position bias), a router
    state and top-k indices handed between layers (ZAYA, GLM-MoE-DSA), a tied head (OPT): exact
    with the backward recomputing each layer too (the matrix runs the kept-graph backward)."""
    from fuyou.config import MemoryConfig

    ckpt = _save(tiny_config(model_type), str(tmp_path / "ckpt"))
    batches = random_batches(3, 4, 16, 128, seed=1)
    rt, results = run_fuyou(ckpt, str(tmp_path / "store"), batches, MICRO, MemoryConfig(recompute="always"))
    assert rt.plan.recompute
    assert_trains_like_pytorch(str(tmp_path / "store"), ckpt, batches, MICRO, results)


@pytest.mark.parametrize(
    "model_type,override,batch,seq",
    # inputs must weigh more than a layer's weights for the plan to drop them
    [("gemma3n_text", dict(num_hidden_layers=8, layer_types=["sliding_attention", "full_attention"] * 4, activation_sparsity_pattern=[0.0] * 8), 8, 256)],
)
def test_inputs_besides_the_hidden_state_train_exactly_when_recomputed_from_below(tmp_path, model_type, override, batch, seq):
    """The plan drops every other layer's input (no host room): the backward recomputes it from the
    layer below, which must leave the keys and values the forward stored as it left them."""
    from fuyou.config import MemoryConfig

    ckpt = _save(tiny_config(model_type, **override), str(tmp_path / "ckpt"))
    batches = random_batches(2, batch, seq, 128, seed=5)
    full, _res = run_fuyou(ckpt, str(tmp_path / "full"), batches[:1], MICRO, MemoryConfig(recompute="always", cache_mem_bytes=0))
    p = full.plan
    host = 2 * p.stage_slot_bytes + least_slot_bytes(full.store, full.ctx.skeleton.tied) + 4096  # two weight slots, no inputs
    budget = p.device_bytes() - MICRO * p.act_bytes
    memory = MemoryConfig(recompute="always", gpu_mem_bytes=budget, cpu_mem_bytes=host, cache_mem_bytes=0)
    rt, results = run_fuyou(ckpt, str(tmp_path / "store"), batches, MICRO, memory)
    assert rt.plan.recomputed_inputs
    assert_trains_like_pytorch(str(tmp_path / "store"), ckpt, batches, MICRO, results)
