"""The SFT step, and a DPO step with a frozen reference model, give the same loss and params on
every mesh as on one device (f32)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

import functools  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from scalign import parallel  # noqa: E402
from scalign.models import ModelConfig, init_params, param_logical_axes  # noqa: E402
from scalign.objectives.preference import make_preference_loss  # noqa: E402
from scalign.objectives.sft import make_sft_loss  # noqa: E402
from scalign.training.state import OptimizerConfig, make_optimizer  # noqa: E402
from scalign.training.step import init_train_state, make_train_step  # noqa: E402

CONFIG = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8,
                     mlp_dim=128, tie_embeddings=False)
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]


def _batch(seed=0, batch=16, length=16):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, CONFIG.vocab_size, size=(batch, length)).astype(np.int32)
    mask = np.zeros((batch, length), np.float32)
    for b in range(batch):  # ragged prompts: targets start at different offsets
        mask[b, 2 + b % 5:] = 1.0
    return {"tokens": tokens, "loss_mask": mask}


def _run(mesh_shape, steps=2, accum=1, adam=False):
    """Two SFT steps on `mesh_shape`.

    Params are compared after SGD with momentum: its update is linear in the gradient, so a
    1e-5 relative tolerance checks the sharded gradients themselves. Adam's first updates are
    ~lr * g / |g|, which turns f32 summation-order noise in near-zero gradients into O(lr)
    changes, so with Adam only the losses (and the moments' shardings) are compared.
    """
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = parallel.make_mesh(mesh_shape, devices)
    if adam:
        optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=10))
    else:
        optimizer = optax.sgd(0.5, momentum=0.9)
    state, st_sh = init_train_state(functools.partial(init_params, CONFIG),
                                    param_logical_axes(CONFIG), optimizer, mesh, seed=0)
    step = make_train_step(make_sft_loss(CONFIG), optimizer, mesh, state_sharding=st_sh,
                           grad_accum_steps=accum)
    losses = []
    for i in range(steps):
        state, metrics = step(state, parallel.shard_batch(_batch(i), mesh))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state


@pytest.fixture(scope="module")
def reference():
    return _run((1, 1, 1))


def _assert_tree_close(a, b, rtol):
    """Per tensor: max |a - b| <= rtol * max |b| (relative to the tensor's scale)."""
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b),
                            strict=True):
        err = float(np.max(np.abs(x - y)))
        scale = float(np.max(np.abs(y)))
        assert err <= rtol * scale, f"{jax.tree_util.keystr(path)}: {err:.3g} > {rtol} * {scale:.3g}"


def test_eight_devices_present():
    assert len(jax.devices()) == 8


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_sft_step_matches_single_device(reference, mesh_shape):
    ref_losses, ref_params, _ = reference
    losses, params, state = _run(mesh_shape)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    _assert_tree_close(params, ref_params, rtol=1e-5)
    # params really are sharded according to the rule table
    q = state.params["layer_0"]["attn"]["q"]
    if mesh_shape[2] > 1:
        assert "tensor" in str(q.sharding.spec)
    if mesh_shape[1] > 1:
        assert "fsdp" in str(q.sharding.spec)
    # optimizer state follows its params
    trace = state.opt_state[0].trace["layer_0"]["attn"]["q"]
    assert trace.sharding == q.sharding


def test_adam_losses_match_and_moments_are_sharded(reference):
    ref_losses, _, _ = _run((1, 1, 1), adam=True, steps=3)
    losses, _, state = _run((2, 2, 2), adam=True, steps=3)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    q = state.params["layer_0"]["mlp"]["gate"]
    assert state.opt_state[0].mu["layer_0"]["mlp"]["gate"].sharding == q.sharding
    assert state.opt_state[0].nu["layer_0"]["mlp"]["gate"].sharding == q.sharding


def test_grad_accumulation_matches_full_batch(reference):
    ref_losses, ref_params, _ = reference
    losses, params, _ = _run((2, 2, 2), accum=2)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    _assert_tree_close(params, ref_params, rtol=1e-5)


# ----------------------------------------------------------------------------- frozen reference


def _pair_batch(seed=0, batch=8, length=16):
    rng = np.random.default_rng(seed)
    out = {}
    for side in ("chosen", "rejected"):
        tokens = rng.integers(3, CONFIG.vocab_size, size=(batch, length)).astype(np.int32)
        mask = np.zeros((batch, length), np.float32)
        for b in range(batch):   # prompts of 2..4 tokens, responses ending at 9..16
            end = int(rng.integers(9, length + 1))
            mask[b, 2 + b % 3:end] = 1.0
            tokens[b, end:] = 0
        out[f"{side}_tokens"], out[f"{side}_mask"] = tokens, mask
    return out


def _run_dpo(mesh_shape, steps=2):
    """Two DPO steps whose reference model is a frozen tree sharded like the params.

    `frozen_sharding` is passed explicitly (the params' rule-table shardings), so this checks
    a reference that is *not* replicated, whatever make_train_step's default placement is.
    """
    mesh = parallel.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    optimizer = optax.sgd(0.5, momentum=0.9)
    init = functools.partial(init_params, CONFIG)
    state, st_sh = init_train_state(init, param_logical_axes(CONFIG), optimizer, mesh, seed=0)
    ref_sh = parallel.tree_shardings(param_logical_axes(CONFIG),
                                     jax.eval_shape(init, jax.random.PRNGKey(0)), mesh)
    reference = jax.device_put(init(jax.random.PRNGKey(1)), ref_sh)   # a different model
    step = make_train_step(make_preference_loss(CONFIG, "dpo", beta=0.5), optimizer, mesh,
                           state_sharding=st_sh, use_frozen=True, frozen_sharding=ref_sh)
    losses = []
    for i in range(steps):
        state, metrics = step(state, parallel.shard_batch(_pair_batch(i), mesh), reference)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), reference


@pytest.fixture(scope="module")
def dpo_reference():
    return _run_dpo((1, 1, 1))


def test_dpo_step_with_sharded_frozen_reference_matches_single_device(dpo_reference):
    """On the 8 virtual devices as data x fsdp x tensor = 2 x 2 x 2."""
    ref_losses, ref_params, _ = dpo_reference
    losses, params, reference = _run_dpo((2, 2, 2))
    assert abs(ref_losses[0] - np.log(2.0)) > 1e-3     # the reference is not the policy
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    _assert_tree_close(params, ref_params, rtol=1e-5)
    # the reference really is sharded (not a replicated copy per device) and still alive
    q = reference["layer_0"]["attn"]["q"]
    assert not q.sharding.is_fully_replicated
    assert "tensor" in str(q.sharding.spec) and "fsdp" in str(q.sharding.spec)
    assert np.isfinite(float(np.asarray(jax.device_get(q)).sum()))
