"""Checkpoint converters: Hugging Face folders (safetensors) and GGUF files <-> our params.

  load_hf(path, *, dtype=None, mesh=None) -> (ModelConfig, params)
  save_hf(config, params, path) -> None
  load_gguf(path, *, dtype=None) -> (ModelConfig, params, Tokenizer)

Our param layout (see `scalign.models.transformer`): embedding [V, D]; per layer
attn/{q [D, H, Dh], k/v [D, K, Dh], o [H, Dh, D], q_bias [H, Dh], k_bias/v_bias [K, Dh],
q_norm/k_norm scale [Dh]}, mlp/{gate, up [D, F], down [F, D]}, norms [D]; final_norm; lm_head
[D, V] when untied. HF `nn.Linear` weights are [out, in]; `convert.hf.hf_tensor_specs` states
the mapping tensor by tensor.
"""

from scalign.models.convert.gguf import load_gguf
from scalign.models.convert.hf import config_from_hf, config_to_hf, load_hf, save_hf

__all__ = ["load_hf", "save_hf", "load_gguf", "config_from_hf", "config_to_hf"]
