"""Unit tests of decoder pieces the checkpoint families need: RoPE scaling variants, per-layer
RoPE tables for local/global layers, sliding windows through the KV cache, config checks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalign.models.config import ModelConfig
from scalign.models.transformer import (
    forward,
    init_cache,
    init_params,
    lm_logits,
    logits,
    rope_attention_factor,
    rope_inv_freq,
)


def _tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                mlp_dim=48)
    return ModelConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- RoPE
def test_linear_scaling_divides_frequencies():
    base = rope_inv_freq(16, 10_000.0, None)
    scaled = rope_inv_freq(16, 10_000.0, {"type": "linear", "factor": 4.0})
    np.testing.assert_allclose(scaled, base / 4.0, rtol=1e-7)
    np.testing.assert_allclose(base, 10_000.0 ** (-np.arange(0, 16, 2) / 16), rtol=1e-6)


def test_yarn_limits_and_ramp():
    """High frequencies (many rotations in the original context) are kept, low ones are
    interpolated by `factor`, the ramp between is monotone (Peng et al. 2023)."""
    dh, theta, factor = 64, 10_000.0, 8.0
    scaling = {"type": "yarn", "factor": factor, "original_max_position_embeddings": 4096}
    base = np.asarray(rope_inv_freq(dh, theta, None))
    yarn = np.asarray(rope_inv_freq(dh, theta, scaling))
    ratio = yarn / base
    assert ratio[0] == pytest.approx(1.0) and ratio[-1] == pytest.approx(1 / factor)
    assert np.all(np.diff(ratio) <= 1e-7)
    assert rope_attention_factor(scaling) == pytest.approx(0.1 * math.log(factor) + 1)
    assert rope_attention_factor({**scaling, "attention_factor": 1.5}) == 1.5
    both = {**scaling, "mscale": 1.0, "mscale_all_dim": 0.5}
    assert rope_attention_factor(both) == pytest.approx(
        (0.1 * math.log(factor) + 1) / (0.05 * math.log(factor) + 1))
    assert rope_attention_factor({"type": "linear", "factor": 2.0}) == 1.0
    assert rope_attention_factor(None) == 1.0


@pytest.mark.parametrize("params", [
    dict(rope_type="linear", factor=3.0),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=64),
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=16.0,
         beta_slow=2.0, truncate=False),
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, mscale=0.707,
         mscale_all_dim=0.5),
])
def test_rope_scaling_matches_transformers(params):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, dh = 50_000.0, 32
    cfg = transformers.LlamaConfig(hidden_size=128, num_attention_heads=4, head_dim=dh,
                                   max_position_embeddings=256,
                                   rope_parameters={**params, "rope_theta": theta})
    ref_inv, ref_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, None)
    scaling = {("type" if k == "rope_type" else k): v for k, v in params.items()}
    ours = np.asarray(rope_inv_freq(dh, theta, scaling))
    np.testing.assert_allclose(ours, ref_inv.to(torch.float32).numpy(), rtol=2e-6)
    assert rope_attention_factor(scaling) == pytest.approx(ref_factor, rel=1e-12)


def test_local_layers_skip_global_only_scaling_even_with_the_same_base():
    """RoPE tables are cached per (base, scaled?): with rope_scaling_local=False a local layer
    must not reuse the scaled table of a global layer that has the same base."""
    key = jax.random.PRNGKey(0)
    scaling = (("factor", 4.0), ("type", "linear"))
    same = _tiny(layer_types=("global", "local"), sliding_window=8, rope_theta=1e4,
                 rope_local_theta=1e4, rope_scaling=scaling, rope_scaling_local=False)
    near = same.replace(rope_local_theta=1e4 * (1 + 1e-12))  # a distinct base: no sharing
    scaled_too = same.replace(rope_scaling_local=True)
    params = init_params(same, key)
    tokens = jax.random.randint(key, (2, 12), 0, same.vocab_size)

    def run(c: ModelConfig) -> np.ndarray:
        return np.asarray(jax.jit(lambda p, t: logits(c, p, t))(params, tokens))

    a = run(same)
    np.testing.assert_allclose(a, run(near), atol=1e-5)
    assert np.abs(a - run(scaled_too)).max() > 1e-4


# ------------------------------------------------------------------- sliding windows
@pytest.mark.parametrize("layer_types", [("local", "global"), ("local", "local")])
def test_cached_decode_with_sliding_window_matches_full_forward(layer_types):
    """Token-by-token decoding through the KV cache (left-padded rows) gives the full causal
    forward's logits for sequences longer than the window."""
    config = _tiny(layer_types=layer_types, sliding_window=3, norm_offset=1.0,
                   embed_scale=True, post_norms=True, qk_norm=True, attn_softcap=20.0,
                   final_softcap=15.0, rope_local_theta=100.0)
    key = jax.random.PRNGKey(1)
    params = init_params(config, key)
    params = jax.tree.map(lambda x: x * 5.0 if x.ndim >= 2 else x, params)  # sharper attention
    T, pad = 10, (0, 3)
    rows = np.asarray(jax.random.randint(key, (2, T), 1, config.vocab_size))
    full_logits = jax.jit(lambda c, t: logits(c, params, t), static_argnums=0)
    full = np.asarray(full_logits(config, jnp.asarray(rows)))
    S = T + max(pad)
    tokens = np.zeros((2, S), np.int32)
    for b, p in enumerate(pad):
        tokens[b, p:p + T] = rows[b]
    key_start = jnp.asarray(pad, jnp.int32)
    cache = init_cache(config, 2, S)

    @jax.jit
    def step(c, t, i):
        hidden, c = forward(config, params, t, cache=c, cache_index=i, key_start=key_start)
        return lm_logits(config, params, hidden)[:, 0], c

    out = []
    for i in range(S):
        step_logits, cache = step(cache, jnp.asarray(tokens[:, i:i + 1]), i)
        out.append(np.asarray(step_logits))
    out = np.stack(out, axis=1)
    for b, p in enumerate(pad):
        np.testing.assert_allclose(out[b, p:p + T], full[b], atol=1e-4)
    no_window = np.asarray(full_logits(config.replace(layer_types=(), sliding_window=None),
                                       jnp.asarray(rows)))
    assert np.abs(no_window - full).max() > 1e-3  # the window changes the result



# ------------------------------------------------------------------ blocked attention
@pytest.mark.parametrize("layer_types", [(), ("local", "global")])
def test_blocked_attention_matches_one_block_and_the_cached_prefill(layer_types):
    """`attention_block` (query blocks that skip the tiles above the causal diagonal, softmax
    normalised after p.v) gives the same logits and gradients as one block, and the same logits
    as a cached prefill (a separate code path: one softmax over every slot), with left padding,
    a soft-cap, grouped-query heads and sliding windows; block sizes that do and do not divide T."""
    config = _tiny(layer_types=layer_types, sliding_window=4 if layer_types else None,
                   attn_softcap=20.0, attention_block=0)
    key = jax.random.PRNGKey(3)
    params = jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, init_params(config, key))
    T = 13
    tokens = jnp.asarray(jax.random.randint(key, (2, T), 1, config.vocab_size))
    key_start = jnp.asarray([0, 4], jnp.int32)

    def run(block):
        c = config.replace(attention_block=block)

        def loss(p):
            hidden, _ = forward(c, p, tokens, key_start=key_start)
            out = lm_logits(c, p, hidden)
            return jnp.sum(jnp.where(jnp.arange(T)[None, :, None] >= key_start[:, None, None],
                                     jnp.sin(out), 0.0)), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return np.asarray(out), grads

    one, one_grads = run(0)
    hidden, _ = forward(config, params, tokens, cache=init_cache(config, 2, T), cache_index=0,
                        key_start=key_start)
    cached = np.asarray(lm_logits(config, params, hidden))
    for b, start in enumerate([0, 4]):
        np.testing.assert_allclose(one[b, start:], cached[b, start:], atol=2e-4)
    for block in (1, 4, 5, 64):
        out, grads = run(block)
        for b, start in enumerate([0, 4]):
            np.testing.assert_allclose(out[b, start:], one[b, start:], atol=2e-4)
        for g, g1 in zip(jax.tree.leaves(grads), jax.tree.leaves(one_grads), strict=True):
            np.testing.assert_allclose(g, g1, atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="attention_block"):
        config.replace(attention_block=-1)


# ------------------------------------------------------------------------ config
def test_rope_scaling_config_is_checked():
    with pytest.raises(ValueError, match=r"needs key\(s\) \['original_max_position_embeddings'\]"):
        _tiny(rope_scaling=(("factor", 2.0), ("type", "yarn")))
    with pytest.raises(ValueError, match="rope_scaling type"):
        _tiny(rope_scaling=(("factor", 2.0), ("type", "dynamic")))
    c = _tiny(rope_scaling=(("factor", 2.0), ("original_max_position_embeddings", 64),
                            ("type", "yarn")), max_position_embeddings=256)
    assert ModelConfig.from_dict(c.to_dict()) == c


