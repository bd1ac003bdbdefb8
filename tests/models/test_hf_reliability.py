"""Issue 16, findings 6-7: loaders never ignore what transformers applies, and their errors
name the file. A legacy `rope_scaling` block next to `rope_parameters` is applied exactly as
transformers applies it (parity-tested here) or refused by name; NaN weights warn; a truncated
safetensors file and an empty GGUF path are named in the message."""

from __future__ import annotations

import json
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

from scalign.models import load_gguf, load_hf, logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              initializer_range=0.1)


def _save_tiny(folder, cfg_cls="LlamaConfig", model_cls="LlamaForCausalLM", **overrides):
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **overrides}, attn_implementation="eager")
    getattr(transformers, model_cls)(cfg).eval().save_pretrained(str(folder))
    return str(folder)


def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    json.dump(cfg, open(path, "w"))


def _ids():
    return np.random.default_rng(0).integers(0, VOCAB, size=(2, 40))


def _hf_logits(folder, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def _our_logits(folder, ids):
    config, params = load_hf(folder)
    return np.asarray(logits(config, params, jnp.asarray(ids, jnp.int32))), config


LEGACY = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "linear_old_key": {"type": "linear", "factor": 3.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("top_theta", [50_000.0, None])
@pytest.mark.parametrize("kind", list(LEGACY))
def test_legacy_rope_scaling_next_to_rope_parameters_is_applied(tmp_path, kind, top_theta):
    folder = _save_tiny(tmp_path, rope_parameters={"rope_type": "default",
                                                   "rope_theta": 500_000.0})
    ids = _ids()
    unscaled, _ = _our_logits(folder, ids)
    _edit_config(folder, rope_scaling=LEGACY[kind], rope_theta=top_theta)
    ref = _hf_logits(folder, ids)
    ours, config = _our_logits(folder, ids)
    assert config.rope_scaling is not None
    assert np.abs(ref - unscaled).max() > 1e-3  # the block changes the model: not ignorable
    assert np.abs(ours - ref).max() < 1e-4


def test_gemma3_legacy_rope_scaling_merges_into_full_attention(tmp_path):
    folder = _save_tiny(tmp_path, "Gemma3TextConfig", "Gemma3ForCausalLM", num_hidden_layers=2,
                        head_dim=16, sliding_window=6, query_pre_attn_scalar=20,
                        layer_types=["sliding_attention", "full_attention"],
                        rope_parameters={"full_attention": {"rope_type": "default",
                                                            "rope_theta": 1_000_000.0},
                                         "sliding_attention": {"rope_type": "default",
                                                               "rope_theta": 10_000.0}})
    _edit_config(folder, rope_scaling={"rope_type": "linear", "factor": 4.0})
    ids = _ids()
    ours, config = _our_logits(folder, ids)
    assert config.rope_scaling is not None and not config.rope_scaling_local
    assert np.abs(ours - _hf_logits(folder, ids)).max() < 1e-4


@pytest.mark.parametrize("block", [
    {"rope_type": "dynamic", "factor": 2.0},
    {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
])
def test_unimplemented_legacy_rope_scaling_is_refused_by_name(tmp_path, block):
    folder = _save_tiny(tmp_path)
    _edit_config(folder, rope_scaling=block)
    with pytest.raises(ValueError, match=r"config\.json: rope_scaling\.rope_type=.* is not "
                                         r"supported"):
        load_hf(folder)


def test_nan_weights_warn_naming_the_tensor(tmp_path, caplog):
    from safetensors.numpy import load_file, save_file

    folder = _save_tiny(tmp_path)
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][0, :3] = np.nan
    save_file(tensors, path, metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        load_hf(folder)
    assert "NaN or inf" in caplog.text and name in caplog.text


def test_clean_weights_do_not_warn(tmp_path, caplog):
    folder = _save_tiny(tmp_path)
    with caplog.at_level(logging.WARNING):
        load_hf(folder)
    assert "NaN" not in caplog.text


def test_truncated_safetensors_names_the_file(tmp_path):
    folder = _save_tiny(tmp_path)
    path = os.path.join(folder, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{path}: cannot read this safetensors file"):
        load_hf(folder)


def test_empty_gguf_path_and_file_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="the path is empty"):
        load_gguf("")
    empty = tmp_path / "model.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{empty}: empty file \(0 bytes\)"):
        load_gguf(empty)
