"""convert_to_low_precision on a tiny Hugging Face Llama built in code."""
import copy

import pytest
import torch
from torch import nn

from fuyou.kernels import LowPrecisionConfig, LowPrecisionLinear, convert_to_low_precision

transformers = pytest.importorskip("transformers")

# Logits vs the fp32 model, as max |err| / rms(fp32 logits) (elementwise, fp8) and relative
# Frobenius error (FP4). Measured (seed 0, 2 layers, random init): fp8 0.25 / 0.057,
# mxfp4 1.37 / 0.32, nvfp4 1.09 / 0.25.
# fp8 elementwise 0.5 (> 1e-1): every one of the 14 linears adds ~3.6% relative rms error
# (3 mantissa bits), and the largest of 2x32x512 logits sits at several rms of that error.
FP8_LOGITS_ELEMENTWISE = 0.5
# FP4: an E2M1 element carries 1 mantissa bit; through two decoder layers the logits keep about
# 70% of their signal, which is why FP4 training keeps the LM head and embeddings in high precision.
FP4_LOGITS_RELATIVE = {"mxfp4": 0.45, "nvfp4": 0.35}
FP8_LOGITS_RELATIVE = 0.1


def _tiny_llama(intermediate=384):
    cfg = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def base():
    model = _tiny_llama()
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    return model, ids, logits


@pytest.mark.parametrize("recipe", ["fp8-blockwise", "mxfp4", "nvfp4"])
def test_convert_swaps_block_linears_and_trains(base, recipe):
    model, ids, ref_logits = base
    model = copy.deepcopy(model)
    params_before = {n: p for n, p in model.named_parameters()}
    assert convert_to_low_precision(model, recipe) is model

    swapped = {n for n, m in model.named_modules() if isinstance(m, LowPrecisionLinear)}
    assert len(swapped) == 2 * 7 and all(n.startswith("model.layers.") for n in swapped)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    # The very same Parameters under the same names: optimizers and the store see no change.
    params_after = dict(model.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[n] is p for n, p in params_before.items())

    out = model(ids, labels=ids)
    logits = out.logits.detach()
    rel = ((logits - ref_logits).norm() / ref_logits.norm()).item()
    if recipe == "fp8-blockwise":
        assert rel < FP8_LOGITS_RELATIVE
        rms = ref_logits.pow(2).mean().sqrt().item()
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=FP8_LOGITS_ELEMENTWISE * rms)
    else:
        assert rel < FP4_LOGITS_RELATIVE[recipe]
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


def test_filter_fn_and_strict_shapes():
    model = _tiny_llama(intermediate=200)  # 200, and k_proj/v_proj 64 wide: not multiples of 128
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj.*out_features=64.*strict_shapes=False"):
        convert_to_low_precision(model, LowPrecisionConfig(strict_shapes=True))
    assert not any(isinstance(m, LowPrecisionLinear) for m in model.modules())  # refused atomically
    convert_to_low_precision(model, "fp8-blockwise", filter_fn=lambda name, m: name.endswith("q_proj"))
    swapped = sorted(n for n, m in model.named_modules() if isinstance(m, LowPrecisionLinear))
    assert swapped == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    ids = torch.randint(0, 512, (1, 5))
    assert model(ids).logits.shape == (1, 5, 512)  # partial blocks zero-padded (default)


def test_convert_on_meta_device_model():
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, vocab_size=512)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    convert_to_low_precision(model, "nvfp4")
    assert isinstance(model.model.layers[1].self_attn.o_proj, LowPrecisionLinear)
    assert model.model.layers[1].self_attn.o_proj.weight.is_meta
