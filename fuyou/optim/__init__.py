"""Optimizer math (AdamW reference), optimizer-state codecs and the fused CPU kernel binding."""
from .adamw import adamw_step_
from .codecs import Codec, ParamCodecs, master_codec, moment_codec, weights_codec
from .state import (
    KINDS,
    OPTIM_KINDS,
    SMALL_NUMEL,
    StateCodecs,
    adamw_update_,
    bytes_per_param_step,
    decode_master,
    decode_state,
    decode_weights,
    init_state_,
    param_codecs,
    state_layout,
)

__all__ = [
    "KINDS",
    "OPTIM_KINDS",
    "SMALL_NUMEL",
    "Codec",
    "ParamCodecs",
    "StateCodecs",
    "adamw_step_",
    "adamw_update_",
    "bytes_per_param_step",
    "decode_master",
    "decode_state",
    "decode_weights",
    "init_state_",
    "master_codec",
    "moment_codec",
    "param_codecs",
    "state_layout",
    "weights_codec",
]
