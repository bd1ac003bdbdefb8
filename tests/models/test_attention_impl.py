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


def _assert_impl_matches_einsum(ref_cfg, impl, params, tokens, key_start):
    """Hidden states on the real (unpadded) rows, the loss and every gradient of
    `attention_impl=impl` equal the einsum path's."""
    h0, v0, g0 = _hidden_and_grad(ref_cfg, params, tokens, key_start)
    h1, v1, g1 = _hidden_and_grad(ref_cfg.replace(attention_impl=impl), params, tokens,
                                  key_start)
    valid = np.arange(tokens.shape[1])[None] >= np.asarray(key_start)[:, None]
    np.testing.assert_allclose(np.asarray(h1)[valid], np.asarray(h0)[valid], rtol=2e-5,
                               atol=2e-5)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("windowed", [False, True])
def test_dot_product_matches_einsum(windowed):
    kw = dict(sliding_window=5, layer_types=("local", "global")) if windowed else {}
    ref_cfg = _config(**kw)
    params = init_params(ref_cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (3, 12)), jnp.int32)
    key_start = jnp.asarray([0, 3, 7], jnp.int32)  # left padding on two rows
    _assert_impl_matches_einsum(ref_cfg, "dot_product", params, tokens, key_start)


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


@pytest.mark.slow
def test_splash_matches_einsum_with_padding_windows_and_softcap():
    """The Pallas splash kernel (interpret mode off a TPU): left padding as segment ids, a local
    layer, a soft-cap, grouped heads; values and gradients as the einsum path's."""
    ref_cfg = _config(sliding_window=5, layer_types=("local", "global"), attn_softcap=20.0,
                      scan_layers=False)
    params = init_params(ref_cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 12)), jnp.int32)
    key_start = jnp.asarray([0, 4], jnp.int32)
    _assert_impl_matches_einsum(ref_cfg, "splash", params, tokens, key_start)


@pytest.mark.slow
def test_splash_train_step_on_a_sharded_mesh_matches_one_device():
    """On a (2, 2, 2) mesh the kernel runs under shard_map (batch over data x fsdp, heads over
    tensor): the SFT step's loss equals the single-device einsum step's."""
    import functools

    import optax

    from scalign import parallel
    from scalign.models import param_logical_axes
    from scalign.objectives.sft import make_sft_loss
    from scalign.training.step import init_train_state, make_train_step

    base = _config(n_heads=4, n_kv_heads=2)
    batch = {"tokens": np.random.default_rng(1).integers(3, 97, (4, 10)).astype(np.int32),
             "loss_mask": np.ones((4, 10), np.float32)}

    def loss_of(config, mesh_shape):
        mesh = parallel.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
        optimizer = optax.sgd(0.1)
        state, st_sh = init_train_state(functools.partial(init_params, config),
                                        param_logical_axes(config), optimizer, mesh, seed=0)
        step = make_train_step(make_sft_loss(config), optimizer, mesh, state_sharding=st_sh)
        state, m1 = step(state, parallel.shard_batch(batch, mesh))
        _, m2 = step(state, parallel.shard_batch(batch, mesh))
        return float(m1["loss"]), float(m2["loss"])

    ref = loss_of(base, (1, 1, 1))
    got = loss_of(base.replace(attention_impl="splash"), (2, 2, 2))
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_splash_refuses_scanned_local_layers():
    with pytest.raises(ValueError, match="static sliding windows"):
        _config(n_layers=2, sliding_window=4, layer_types=("local", "global"),
                scan_layers=True, attention_impl="splash")
