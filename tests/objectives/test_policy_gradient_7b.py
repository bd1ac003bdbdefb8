"""The PPO policy, PPO value and GRPO steps lower for Llemma-7B shapes (Sun et al. 2024's PPO:
a 7B policy, a 7B value model initialised from the 7B PRM) on the fake 8-device CPU mesh, from
abstract values only (nothing of the 7B models is allocated): params and optimizer state sharded
over fsdp (ZeRO-3), the state donated, one rematerialised block per layer, and the e2h step
batch of 64 sequences. Lowering only (a 32-layer compile takes minutes on this machine)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalign import parallel
from scalign.models import presets
from scalign.objectives import policy_gradient as pg
from scalign.training.state import OptimizerConfig, make_optimizer
from scalign.training.step import abstract_train_state, make_train_step

B, T = 64, 1024   # e2h PPO step batch; prompt + response length


def _abstract_step(kind: str, mesh):
    model = presets.get("llemma_7b").replace(dtype="bfloat16", remat="full")
    optimizer = make_optimizer(OptimizerConfig(learning_rate=2e-5, total_steps=100))
    if kind == "value":
        loss = pg.make_value_loss(model)
        keys = ("tokens", "response_mask", "old_values", "returns")
    else:
        if kind == "ppo":
            loss = pg.make_ppo_loss(model, pg.PPOConfig(logprob_chunk=128))
            keys = ("tokens", "response_mask", "old_logp", "advantages")
        else:
            loss = pg.make_grpo_loss(model, pg.GRPOConfig(logprob_chunk=128))
            keys = ("tokens", "response_mask", "ref_logp", "advantages")
    state, st_sh = abstract_train_state(model, optimizer, mesh, head=kind == "value")
    step = make_train_step(loss, optimizer, mesh, state_sharding=st_sh, grad_accum_steps=2)
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32 if k == "tokens" else jnp.float32)
             for k in keys}
    return model, step, state, batch


@pytest.mark.parametrize("kind", ["ppo", "value", "grpo"])
def test_step_lowers_for_llemma_7b_on_a_fake_8_device_mesh(kind):
    mesh = parallel.make_mesh((1, 8, 1), jax.devices()[:8])
    model, step, state, batch = _abstract_step(kind, mesh)
    lowered = step.lower(state, batch)
    text = lowered.as_text()
    if model.scanned:  # 32 layers: one scanned block, remat inside the scan (no CSE barrier)
        assert text.count("stablehlo.while") >= 2  # forward and backward over the layers
    else:
        assert text.count("optimization_barrier") >= model.n_layers  # remat per block
    out_state, metrics = lowered.out_info
    assert {"loss", "weight", "grad_norm"} <= set(metrics)
    # the 7B params and both Adam moments are sharded 8 ways: <= 1/8 of the bytes per device
    total = per_device = 0
    for leaf in jax.tree.leaves(state):
        nbytes = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        total += nbytes
        per_device += int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
    assert total > 3 * 6.5e9 * 4 * 0.95          # f32 params + mu + nu of ~6.7B params
    assert per_device <= total / 8 * 1.01
    assert "tf.aliasing_output" in text           # the state is donated
