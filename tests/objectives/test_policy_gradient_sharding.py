"""The PPO, value and GRPO steps give the same losses and params on 8-device meshes as on one
device (f32), and gradient accumulation over micro-batches equals the full batch (`weight` =
token count)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scalign import parallel
from scalign.models import ModelConfig, init_params, param_logical_axes
from scalign.models.heads import add_scalar_head, scalar_head_logical_axes
from scalign.objectives import policy_gradient as pg
from scalign.objectives.logprobs import token_log_probs
from scalign.training.step import init_train_state, make_train_step

CONFIG = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8,
                     mlp_dim=128, tie_embeddings=False)
B, T = 16, 16


def _batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, CONFIG.vocab_size, size=(B, T)).astype(np.int32)
    mask = np.zeros((B, T), np.float32)
    for b in range(B):  # ragged prompts and completions
        mask[b, 2 + b % 5: T - b % 3] = 1.0
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    lp = np.asarray(token_log_probs(CONFIG, params, jnp.asarray(tokens)))
    noise = rng.normal(scale=0.3, size=(B, T)).astype(np.float32)  # ratios away from 1
    return {"tokens": tokens, "response_mask": mask, "old_logp": (lp + noise) * mask,
            "ref_logp": (lp - noise) * mask,
            "advantages": rng.normal(size=(B, T)).astype(np.float32) * mask,
            "old_values": rng.normal(size=(B, T)).astype(np.float32) * mask,
            "returns": rng.normal(size=(B, T)).astype(np.float32) * mask}


def _run(kind: str, mesh_shape, accum: int = 1, steps: int = 2):
    mesh = parallel.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
    optimizer = optax.sgd(0.5, momentum=0.9)  # linear in the gradient: compares gradients
    axes = param_logical_axes(CONFIG)
    init = functools.partial(init_params, CONFIG)
    if kind == "value":
        axes = {**axes, "scalar_head": scalar_head_logical_axes()}
        init = lambda k: add_scalar_head(CONFIG, init_params(CONFIG, k), k)  # noqa: E731
        loss = pg.make_value_loss(CONFIG)
    elif kind == "ppo":
        loss = pg.make_ppo_loss(CONFIG)
    else:
        loss = pg.make_grpo_loss(CONFIG)
    state, st_sh = init_train_state(init, axes, optimizer, mesh, seed=0)
    step = make_train_step(loss, optimizer, mesh, state_sharding=st_sh, grad_accum_steps=accum)
    losses = []
    for i in range(steps):
        state, metrics = step(state, parallel.shard_batch(_batch(i), mesh))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


def _assert_tree_close(a, b, rtol):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b),
                            strict=True):
        err, scale = float(np.max(np.abs(x - y))), float(np.max(np.abs(y)))
        assert err <= rtol * scale, f"{jax.tree_util.keystr(path)}: {err:.3g} > {rtol}*{scale:.3g}"


@pytest.mark.parametrize("kind", ["ppo", "value", "grpo"])
def test_step_is_sharding_equivalent(kind):
    ref_losses, ref_params = _run(kind, (1, 1, 1))
    for mesh_shape, accum in [((2, 2, 2), 1), ((8, 1, 1), 2)]:
        losses, params = _run(kind, mesh_shape, accum)
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, err_msg=str(mesh_shape))
        _assert_tree_close(params, ref_params, rtol=2e-5)
