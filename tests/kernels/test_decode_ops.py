"""The CPU decode ops (`scalign.kernels.decode_ops`) against the model's plain XLA ops: the same
decode steps in every formulation, the packed weights' layouts, and loud errors when a packing
meets the wrong op."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalign.kernels.decode_ops import (
    CpuDecodeOps,
    PanelWeight,
    from_output_major,
    pack_panel_params,
    pack_params,
    to_output_major,
)
from scalign.models.config import ModelConfig
from scalign.models.transformer import forward, init_cache, init_params, lm_logits, logits


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

    def step(weights, ops):
        h, c = forward(config, weights, tokens[:, :1], cache=cache, cache_index=2, ops=ops)
        return lm_logits(config, weights, h[:, 0], ops), c

    ref, ref_cache = step(params, None)
    got, got_cache = jax.jit(lambda p: step(from_output_major(p, params),
                                            CpuDecodeOps(weight_left=True)))(packed)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         atol=1e-5), got_cache, ref_cache)
    hidden = jax.random.normal(jax.random.PRNGKey(1), (5, 16))
    left = lm_logits(config, params, hidden, CpuDecodeOps(weight_left=True))  # stored layout
    np.testing.assert_allclose(np.asarray(left), np.asarray(lm_logits(config, params, hidden)),
                               atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "window", "gemma"])
@pytest.mark.usefixtures("cpu_kernels")
def test_cpu_kernels_give_the_same_decode_steps(kind):
    """Decode steps with the FFI attention kernels, and with them the panel-matmul kernels on
    `PanelWeight`s, = XLA's ops: ragged left padding, a sliding window shorter than the
    sequence (which the kernels' slot ranges enforce alone without a soft-cap), soft-caps,
    grouped queries (G = 2), a tied LM head (gemma), widths on and off the 16-column panels."""
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

    panels = jax.jit(pack_panel_params)(params)
    q = panels["layer_0"]["attn"]["q"]
    assert isinstance(q, PanelWeight) and q.data.shape == (2, 16, 16)  # [D, H*Dh=32] panels
    np.testing.assert_array_equal(q.unpack(), params["layer_0"]["attn"]["q"])
    np.testing.assert_array_equal(panels["layer_0"]["mlp"]["up"], params["layer_0"]["mlp"]["up"])

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def run(kernel, matmul):
        _, cache = forward(config, params, prompts, cache=init_cache(config, 3, 9),
                           cache_index=0, key_start=key_start)  # the prefill: stored weights
        ops = CpuDecodeOps(attention=kernel, panels=matmul)
        weights = panels if matmul else params
        hs, logits = [], []
        for t in range(4):  # slots 5..8, the window slides past the padded starts
            h, cache = forward(config, weights, prompts[:, t:t + 1], cache=cache,
                               cache_index=5 + t, key_start=key_start, ops=ops)
            hs.append(h)
            logits.append(lm_logits(config, weights, h[:, 0], ops))
        return jnp.concatenate(hs, 1), jnp.stack(logits, 1), cache

    ref, ref_logits, ref_cache = run(False, False)
    for matmul in (False, True):
        got, got_logits, got_cache = run(True, matmul)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(got_logits), np.asarray(ref_logits), atol=1e-4,
                                   rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                             atol=2e-5), got_cache, ref_cache)


def _small(**kw) -> tuple[ModelConfig, dict]:
    config = ModelConfig(vocab_size=48, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=8, mlp_dim=32, **kw)
    return config, init_params(config, jax.random.PRNGKey(0))


def test_raw_params_in_a_panel_decode_raise_instead_of_misreading():
    """A panel-traced decode given the stored params (same shapes as before the packing was a
    type of its own) must fail loudly, and panels given to the plain ops too."""
    config, params = _small()
    tokens = jnp.zeros((2, 1), jnp.int32)
    cache = init_cache(config, 2, 4)
    with pytest.raises(TypeError, match="raw float32 weight.*pack_panel_params"):
        forward(config, params, tokens, cache=cache, cache_index=1,
                ops=CpuDecodeOps(panels=True))
    with pytest.raises(TypeError, match="raw float32 weight"):
        jax.jit(lambda p: lm_logits(config, p, jnp.zeros((2, 16)),
                                    CpuDecodeOps(panels=True)))(params)
    panels = pack_panel_params(params)
    with pytest.raises(TypeError, match="PanelWeight.*packed for another op"):
        forward(config, panels, tokens, cache=cache, cache_index=1)  # the default XLA ops
    with pytest.raises(TypeError, match="PanelWeight"):
        forward(config, panels, tokens, cache=cache, cache_index=1,
                ops=CpuDecodeOps(weight_left=True))


def test_panel_weights_are_a_distinct_pytree_type():
    config, params = _small()
    packed = jax.jit(pack_panel_params)(params)
    w = packed["layer_1"]["mlp"]["down"]
    assert isinstance(w, PanelWeight) and not isinstance(w, jax.Array)
    assert w.raw_shape == (32, 16) and w.in_axes == 1 and w.data.shape == (1, 32, 16)
    o = packed["layer_0"]["attn"]["o"]  # [H, Dh, D]: two input axes
    assert o.raw_shape == (4, 8, 16) and o.in_axes == 2 and o.data.shape == (1, 32, 16)
    np.testing.assert_array_equal(o.unpack(), params["layer_0"]["attn"]["o"])
    # a pytree: it crosses jit boundaries and tree maps keep its type
    same = jax.jit(lambda t: t)(packed)
    assert isinstance(same["lm_head"], PanelWeight)
    assert jax.tree.structure(same) == jax.tree.structure(packed)


@pytest.mark.parametrize("layout", ["panels", "output_major"])
def test_pack_params_copies_only_the_matmul_weights(layout):
    """The sampler's packing: matmul weights packed (new buffers), everything else the caller's
    own arrays, so the packing adds one copy of the matmul weights and nothing more."""
    config, params = _small(qkv_bias=True)
    packed = pack_params(layout, params)
    assert packed["embedding"] is params["embedding"]
    assert packed["layer_0"]["attn"]["q_bias"] is params["layer_0"]["attn"]["q_bias"]
    assert packed["layer_0"]["pre_attn_norm"]["scale"] is params["layer_0"]["pre_attn_norm"]["scale"]
    q = packed["layer_0"]["attn"]["q"]
    if layout == "panels":
        assert isinstance(q, PanelWeight)
    else:
        np.testing.assert_array_equal(q, params["layer_0"]["attn"]["q"].reshape(16, 32).T)
    assert pack_params("native", params) is params
