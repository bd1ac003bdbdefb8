"""Unit tests of decoder pieces the checkpoint families need: RoPE scaling variants, per-layer
RoPE tables for local/global layers, sliding windows through the KV cache, config checks."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalign.models.config import ModelConfig
from scalign.models.transformer import (
    DecodeKernels,
    decode_kernels,
    forward,
    from_output_major,
    init_cache,
    init_params,
    lm_logits,
    logits,
    rope_attention_factor,
    rope_inv_freq,
    to_output_major,
    to_panels,
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


# ------------------------------------------------------------------------ config
def test_rope_scaling_config_is_checked():
    with pytest.raises(ValueError, match=r"needs key\(s\) \['original_max_position_embeddings'\]"):
        _tiny(rope_scaling=(("factor", 2.0), ("type", "yarn")))
    with pytest.raises(ValueError, match="rope_scaling type"):
        _tiny(rope_scaling=(("factor", 2.0), ("type", "dynamic")))
    c = _tiny(rope_scaling=(("factor", 2.0), ("original_max_position_embeddings", 64),
                            ("type", "yarn")), max_position_embeddings=256)
    assert ModelConfig.from_dict(c.to_dict()) == c


def test_output_major_weights_round_trip_and_give_the_same_forward():
    config = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=8, mlp_dim=24, qkv_bias=True, qk_norm=True)
    params = init_params(config, jax.random.PRNGKey(0))
    packed = to_output_major(params)
    attn, mlp = packed["layer_0"]["attn"], packed["layer_0"]["mlp"]
    assert attn["q"].shape == (4 * 8, 16) and attn["k"].shape == (2 * 8, 16)  # [out, in]
    assert attn["o"].shape == (16, 4 * 8) and mlp["down"].shape == (16, 24)
    assert packed["lm_head"].shape == (40, 16) and packed["embedding"].shape == (40, 16)
    assert attn["q_bias"].shape == (4, 8)  # not a matmul weight: unchanged
    back = from_output_major(packed, params)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    np.testing.assert_array_equal(np.asarray(packed["layer_1"]["mlp"]["gate"]),
                                  np.asarray(params["layer_1"]["mlp"]["gate"]).T)

    tokens = jnp.asarray(np.arange(12, dtype=np.int32).reshape(2, 6) % 40)

    @jax.jit
    def through_views(packed):
        packed = jax.lax.optimization_barrier(packed)
        return logits(config, from_output_major(packed, params), tokens)

    np.testing.assert_allclose(np.asarray(through_views(packed)),
                               np.asarray(logits(config, params, tokens)), atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_weight_left_kernels_give_the_same_decode_step(tie):
    """W x^T products on [out, in] views (the CPU decode loop's formulation) = the plain model."""
    config = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=8, mlp_dim=24, qkv_bias=True, qk_norm=True, tie_embeddings=tie)
    params = init_params(config, jax.random.PRNGKey(0))
    packed = to_output_major(params)
    tokens = jnp.asarray(np.arange(12, dtype=np.int32).reshape(3, 4) % 40)
    cache = init_cache(config, 3, 6)

    def step(weights, kernels):
        with decode_kernels(kernels):
            h, c = forward(config, weights, tokens[:, :1], cache=cache, cache_index=2)
            return lm_logits(config, weights, h[:, 0]), c

    ref, ref_cache = step(params, DecodeKernels())
    got, got_cache = jax.jit(lambda p: step(from_output_major(p, params),
                                            DecodeKernels(weight_left=True)))(packed)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         atol=1e-5), got_cache, ref_cache)
    hidden = jax.random.normal(jax.random.PRNGKey(1), (5, 16))
    with decode_kernels(DecodeKernels(weight_left=True)):  # on the stored layout too
        left = lm_logits(config, params, hidden)
    np.testing.assert_allclose(np.asarray(left), np.asarray(lm_logits(config, params, hidden)),
                               atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "window", "gemma"])
def test_cpu_kernels_give_the_same_decode_steps(kind):
    """Decode steps with the FFI attention kernels, and with them the panel-matmul kernels on
    `to_panels` weights, = XLA's ops: ragged left padding, a sliding window shorter than the
    sequence (which the kernels' slot ranges enforce alone without a soft-cap), soft-caps,
    grouped queries (G = 2), a tied LM head (gemma), widths on and off the 16-column panels."""
    from scalign.kernels import cpu_attention

    if not cpu_attention.available():
        pytest.skip(f"kernels unavailable: {cpu_attention.unavailable_reason()}")
    extra = (dict(attn_softcap=5.0, qk_norm=True, sliding_window=3, norm_offset=1.0,
                  layer_types=("local", "global")) if kind == "gemma"
             else dict(sliding_window=3, layer_types=("local", "global")) if kind == "window"
             else dict(qkv_bias=True))
    config = ModelConfig(vocab_size=48, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=8, mlp_dim=24, tie_embeddings=kind == "gemma", **extra)
    params = init_params(config, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda w: w * 4.0, params)  # peaked attention, not near-uniform
    prompts = jnp.asarray(np.random.default_rng(0).integers(0, 40, (3, 5)), jnp.int32)
    key_start = jnp.array([0, 2, 4], jnp.int32)

    panels = jax.jit(to_panels)(params)
    assert not np.array_equal(panels["layer_0"]["attn"]["q"], params["layer_0"]["attn"]["q"])
    assert np.array_equal(panels["layer_0"]["mlp"]["up"], params["layer_0"]["mlp"]["up"])  # 24

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def run(kernel, matmul):
        _, cache = forward(config, params, prompts, cache=init_cache(config, 3, 9),
                           cache_index=0, key_start=key_start)  # the prefill: stored weights
        with decode_kernels(DecodeKernels(cpu_attention=kernel, cpu_matmul=matmul)):
            weights = panels if matmul else params
            hs, logits = [], []
            for t in range(4):  # slots 5..8, the window slides past the padded starts
                h, cache = forward(config, weights, prompts[:, t:t + 1], cache=cache,
                                   cache_index=5 + t, key_start=key_start)
                hs.append(h)
                logits.append(lm_logits(config, weights, h[:, 0]))
            return jnp.concatenate(hs, 1), jnp.stack(logits, 1), cache

    ref, ref_logits, ref_cache = run(False, False)
    for matmul in (False, True):
        got, got_logits, got_cache = run(True, matmul)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(got_logits), np.asarray(ref_logits), atol=1e-4,
                                   rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                             atol=2e-5), got_cache, ref_cache)
