"""`ModelConfig.attention_impl`: the fused `jax.nn.dot_product_attention` paths agree with the
model's own einsum attention (values and gradients), with left padding, sliding windows and
grouped-query heads; configs the fused forms cannot run are refused. The cuDNN form is checked
on a GPU only (`tools/gpu_check.sh` runs this file there)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalign.models import init_params
from scalign.models.config import ModelConfig
from scalign.models.presets import get
from scalign.models.transformer import forward


def _config(**kw):
    base = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                mlp_dim=96, family="llama")
    base.update(kw)
    return ModelConfig(**base)


def _hidden_and_grad(config, params, tokens, key_start):
    def loss(p):
        h, _ = forward(config, p, tokens, key_start=key_start)
        valid = (jnp.arange(tokens.shape[1])[None] >= key_start[:, None])[..., None]
        return jnp.sum(jnp.where(valid, h.astype(jnp.float32), 0.0) ** 2), h
    (val, h), g = jax.value_and_grad(loss, has_aux=True)(params)
    return h, val, g


@pytest.mark.parametrize("windowed", [False, True])
def test_dot_product_matches_einsum(windowed):
    kw = dict(sliding_window=5, layer_types=("local", "global")) if windowed else {}
    ref_cfg = _config(**kw)
    params = init_params(ref_cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (3, 12)), jnp.int32)
    key_start = jnp.asarray([0, 3, 7], jnp.int32)  # left padding on two rows
    h0, v0, g0 = _hidden_and_grad(ref_cfg, params, tokens, key_start)
    h1, v1, g1 = _hidden_and_grad(ref_cfg.replace(attention_impl="dot_product"), params,
                                  tokens, key_start)
    valid = np.arange(12)[None] >= np.asarray(key_start)[:, None]
    np.testing.assert_allclose(np.asarray(h1)[valid], np.asarray(h0)[valid], rtol=2e-5,
                               atol=2e-5)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)


def test_invalid_attention_impls_are_refused():
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        _config(attention_impl="flash")
    with pytest.raises(ValueError, match="soft-cap"):
        get("gemma2_9b", attention_impl="dot_product")
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        _config(attention_impl="cudnn")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_matches_einsum_in_bf16():
    ref_cfg = _config(dtype="bfloat16", head_dim=64, d_model=128, n_heads=4, n_kv_heads=2)
    params = init_params(ref_cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 127)), jnp.int32)  # odd: padded
    key_start = jnp.asarray([0, 0], jnp.int32)
    h0, v0, g0 = _hidden_and_grad(ref_cfg, params, tokens, key_start)
    h1, v1, g1 = _hidden_and_grad(ref_cfg.replace(attention_impl="cudnn"), params, tokens,
                                  key_start)
    # bf16 compute: both forms round activations to 8 mantissa bits; compare at that scale
    np.testing.assert_allclose(np.asarray(h1, np.float32), np.asarray(h0, np.float32),
                               rtol=5e-2, atol=5e-2)
    np.testing.assert_allclose(float(v1), float(v0), rtol=2e-2)
