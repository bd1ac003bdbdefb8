"""Models: one decoder for every family, its heads, presets and checkpoint converters."""

from scalign.models import presets
from scalign.models.config import ModelConfig
from scalign.models.convert import load_gguf, load_hf, save_hf
from scalign.models.transformer import (
    forward,
    init_cache,
    init_params,
    lm_logits,
    logits,
    param_logical_axes,
)

__all__ = ["ModelConfig", "presets", "init_params", "logits", "forward", "lm_logits",
           "init_cache", "param_logical_axes", "load_hf", "save_hf", "load_gguf"]
