"""Optimizer math (AdamW reference), optimizer-state codecs and the fused CPU kernel binding."""
from .adamw import adamw_step_

__all__ = ["adamw_step_"]
