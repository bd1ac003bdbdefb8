"""The real-scale PPO config `experiments/configs/e2h_llemma7b_ppo.py`, checked on CPU.

It validates for 8 devices with the e2h PPO hyperparameters, and the stage's PPO policy step
and value step (critic = the PRM's 7B preset with a scalar head) lower for Llemma-7B shapes on
the fake 8-device mesh from abstract values only, built from the config's keys the way stage
`rl` builds them (`method_plan`, `training_model`, the loop's `make_train_step`): params and
AdamW state sharded over fsdp, the state donated, [64, 768] minibatches. Lowering the scanned
32 layers took ~4.5 s each on 2 shared, loaded cores; nothing of the 7B models is allocated.
"""

from __future__ import annotations

import resource
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalign import experiment, parallel
from scalign.experiment import load_config_file
from scalign.models import presets
from scalign.objectives import policy_gradient as pg
from scalign.stages.common import training_model
from scalign.stages.rl import method_plan
from scalign.training.state import OptimizerConfig, make_optimizer
from scalign.training.step import abstract_train_state, make_train_step

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "experiments" / "configs" / "e2h_llemma7b_ppo.py"
GiB = 2**30


@pytest.fixture(scope="module")
def config(hf_folder_of):
    c = load_config_file(CONFIG)
    c.checkpoint.path = str(hf_folder_of("llemma_7b"))
    return c


def test_config_validates_with_the_e2h_ppo_settings(config):
    assert experiment.validate(config, num_devices=8) == {"data": 1, "fsdp": 8, "tensor": 1}
    stages = list(config.stages)
    assert stages.index("reward_models") < stages.index("rl") < stages.index("report")
    assert tuple(config.rl.methods) == ("sft", "ppo_prm")
    plan = method_plan(config, "ppo_prm")
    assert plan.algorithm == "ppo" and plan.use_prm and plan.levels == (1, 2, 3, 4, 5)
    assert plan.hparams == pg.PPOConfig(kl_coef=0.01, kl_estimator="k1_clamped", gamma=1.0,
                                        lam=1.0, clip_eps=0.2, value_clip=0.2, vf_coef=0.1,
                                        whiten_rewards=True, whiten_advantages=True,
                                        temperature=0.7, minibatches=8, logprob_chunk=128)
    assert plan.optimizer["learning_rate"] == 2e-5
    assert plan.reward.hard_reward == 0.25 and plan.reward.shaping_upper == 0.5
    rollout = config.rl.prompts_per_iteration * config.rl.samples_per_prompt
    assert rollout == 512 and rollout // plan.hparams.minibatches == 64
    assert (config.rl.seq_len, config.rl.remat) == (768, "full")
    with config.unlocked():
        config.rl.per_method.ppo_prm.minibatches = 3
    try:
        with pytest.raises(experiment.ConfigError, match="minibatches=3"):
            experiment.validate(config, num_devices=8)
    finally:
        config.rl.per_method.ppo_prm.minibatches = 8


def _abstract_step(config, kind: str, mesh):
    """(step, abstract sharded state, abstract minibatch) of the stage's PPO policy or value
    step for Llemma-7B."""
    plan = method_plan(config, "ppo_prm")
    model = presets.get(config.model.preset).replace(dtype=config.checkpoint.compute_dtype)
    model = training_model(model, config.rl)
    optimizer = make_optimizer(OptimizerConfig.from_config(
        {**plan.optimizer, "total_steps": plan.iterations * 8}))
    if kind == "value":
        loss = pg.make_value_loss(model, plan.hparams)
        keys = ("tokens", "response_mask", "old_values", "returns")
    else:
        loss = pg.make_ppo_loss(model, plan.hparams)
        keys = ("tokens", "response_mask", "old_logp", "advantages")
    state, st_sh = abstract_train_state(model, optimizer, mesh, head=kind == "value")
    step = make_train_step(loss, optimizer, mesh, state_sharding=st_sh, clip_norm=1.0)
    rows = (config.rl.prompts_per_iteration * config.rl.samples_per_prompt
            // plan.hparams.minibatches)
    batch = {k: jax.ShapeDtypeStruct((rows, int(config.rl.seq_len)),
                                     jnp.int32 if k == "tokens" else jnp.float32)
             for k in keys}
    return model, step, state, batch


@pytest.mark.parametrize("kind", ["policy", "value"])
def test_ppo_step_lowers_for_llemma_7b_on_a_fake_8_device_mesh(config, kind):
    mesh = parallel.make_mesh(experiment.validate(config, num_devices=8))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, step, state, batch = _abstract_step(config, kind, mesh)
    assert model.n_layers == 32 and model.remat == "full" and model.dtype == "bfloat16"
    lowered = step.lower(state, batch)
    text = lowered.as_text()
    assert model.scanned and text.count("stablehlo.while") >= 2  # layers: forward + backward
    assert "tf.aliasing_output" in text                          # the state is donated
    out_state, metrics = lowered.out_info
    assert {"loss", "grad_norm"} <= set(metrics)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), out_state) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), state)
    total = per_device = 0
    for leaf in jax.tree.leaves(state):
        nbytes = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        total += nbytes
        per_device += int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
    assert total > 12 * 6.7e9 * 0.98           # f32 params + 2 AdamW moments of ~6.7B params
    assert per_device <= total / 8 * 1.01      # ZeRO-3: everything big split 8 ways
    for leaf in jax.tree.leaves(batch):
        assert leaf.shape == (64, 768)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    assert grown < 2 * GiB, f"peak RSS grew by {grown / GiB:.1f} GiB: something was allocated"
