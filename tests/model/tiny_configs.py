"""Tiny random configs for every decoder-only causal LM transformers builds: a few layers, a small
hidden size and vocabulary, a few experts. Common sizes go to every config that has the field (by
its own name or through its attribute_map); OVERRIDES fix what a config needs besides."""
from __future__ import annotations

import dataclasses

H, HEADS, KV, LAYERS, VOCAB = 32, 4, 2, 2, 128

COMMON = dict(
    hidden_size=H, num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=H // HEADS, num_hidden_layers=LAYERS, num_layers=LAYERS,
    intermediate_size=64, vocab_size=VOCAB, unpadded_vocab_size=VOCAB, max_position_embeddings=128,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
    # mixture of experts: 4 experts, 2 per token, the first layer dense where the config has one
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2, zero_expert_num=2,
    moe_intermediate_size=32, shared_expert_intermediate_size=32, moe_shared_expert_intermediate_size=32, shared_intermediate_size=32,
    expert_ffn_hidden_size=32, first_k_dense_replace=1, n_group=1, topk_group=1,
    # latent attention and sparse indexers
    q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    index_head_dim=8, index_n_heads=2, index_topk=4, index_block_size=4, index_topk_blocks=2,
    # other attention variants
    swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8, linear_head_dim=8, linear_num_heads=4,
    linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, dim_head=8,
    # state-space and recurrent mixers
    ssm_state_size=8, mamba_num_heads=8, mamba_head_dim=8, chunk_size=8, mamba_d_ssm=64, mamba_n_heads=8, mamba_d_state=8,
    mamba_chunk_size=8, mamba_d_head=8,
    # feed-forward sizes under other names
    ffn_hidden_size=64, dim_ff=64, dff=64, ffn_dim=64, d_inner=64, dense_intermediate_size=64,
    vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8, position_bias_num_buckets=32, position_bias_max_distance=64,
)
WINDOW_FIELDS = ("sliding_window", "sliding_window_size", "attention_window_size", "window_size", "local_attention_window_len")
WINDOW = 8  # below the matrix's sequence length, so windowed attention is exercised

MLA = dict(num_key_value_heads=HEADS)  # latent attention: as many key/value heads as query heads
OVERRIDES = {
    "axk1": MLA, "axk2": MLA, "deepseek_v2": MLA, "deepseek_v3": MLA, "deepseek_v32": MLA, "glm4_moe_lite": MLA,
    "glm_moe_dsa": MLA, "longcat_flash": MLA, "minicpm3": MLA, "sarvam_mla": MLA, "youtu": MLA,
    "dots3_note_text": dict(MLA, head_dim=8),
    "codegen": dict(rotary_dim=4), "gptj": dict(rotary_dim=4),
    # its rotary sections must add up to half the head size
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}}),
    "dbrx": dict(d_model=H, n_heads=HEADS, n_layers=LAYERS, max_seq_len=128, attn_config={"kv_n_heads": KV, "rope_theta": 10000.0, "clip_qkv": 8.0},
                 ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2}),
    "dots1": dict(n_shared_experts=1),
    "lfm2_moe": dict(num_dense_layers=1, layer_types=["conv", "full_attention"]),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    "mamba2": dict(num_heads=8, head_dim=8, n_groups=1, state_size=8),
    "xlnet": dict(d_head=8, n_head=HEADS),
    "zamba": dict(layers_block_type=["hybrid", "hybrid"], mamba_d_state=8, n_mamba_heads=2, attention_head_dim=8),
    "zamba2": dict(layers_block_type=["mamba", "hybrid"], mamba_d_state=8, n_mamba_heads=4, mamba_headdim=16),
    "zaya": dict(num_experts_per_tok=1),
    "bamba": dict(attn_layer_indices=[1]),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"]),
    # key/value sharing as its checkpoints have it: the last layers reuse earlier layers' keys and values
    "gemma3n_text": dict(num_hidden_layers=4, num_kv_shared_layers=2, layer_types=["sliding_attention", "full_attention"] * 2,
                         laurel_rank=4, altup_num_inputs=2, activation_sparsity_pattern=[0.0] * 4),
    "xlstm": dict(num_heads=HEADS),
    # its keys and values are rounded to NVFP4 in blocks of 16
    "kolibri1_1": dict(head_dim=16, index_num_heads=2, index_topk=4, index_pool_size=16, index_compression=4),
    "blt": dict(patcher_config=dict(hidden_size=H, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=64, head_dim=8),
                encoder_config=dict(hidden_size=H, num_attention_heads=HEADS, intermediate_size=64, hidden_size_global=H),
                decoder_config=dict(hidden_size=H, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=64, hidden_size_global=H, head_dim=8),
                global_config=dict(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=64, head_dim=8),
                encoder_hash_byte_group_vocab=64),
}


def accepted_fields(cls) -> set:
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return names | set(getattr(cls, "attribute_map", {}))


def tiny_config(model_type: str, **overrides):
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    fields = accepted_fields(cls)
    kw = {k: v for k, v in COMMON.items() if k in fields}
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            if f.name in WINDOW_FIELDS and f.default not in (None, dataclasses.MISSING):
                kw[f.name] = WINDOW
    kw.update(OVERRIDES.get(model_type, {}))
    kw.update(overrides)
    return cls(**kw)
