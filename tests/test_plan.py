"""`python -m scalign.plan`: every train step of a config compiles from abstract shapes on a
fake mesh of a TPU slice's size, with bytes per device that add up."""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np
import pytest

from scalign import plan
from scalign.models import init_params, presets


def _config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name, c.seed, c.stages = "tiny plan", 0, ("sft", "reward_models")
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.model = ml_collections.ConfigDict({"preset": "tiny"})
    opt = {"learning_rate": 1e-3, "warmup_steps": 1}
    c.sft = ml_collections.ConfigDict({"batch_size": 8, "seq_len": 32, "steps": 10,
                                       "remat": "full", "optimizer": opt})
    c.reward_models = ml_collections.ConfigDict(
        {"train": {"batch_size": 8, "seq_len": 32, "steps": 10, "optimizer": opt}})
    return c


def test_tpu_types():
    assert plan.tpu_type("v5e-16") == (16, 16.0)
    assert plan.tpu_type("v5p-8") == (4, 95.0)
    assert plan.tpu_type("v4-32") == (16, 32.0)
    with pytest.raises(ValueError, match="unknown TPU type"):
        plan.tpu_type("v9-8")


def test_plan_compiles_every_step_with_bytes_per_device():
    lines = []
    rows = plan.run(_config(), ["v5e-8", "v5p-8"], ["config", "none"], log=lines.append)
    # sft: config remat (full) + none; reward model: config is none -> once; two slices
    assert [(r.tpu, r.step, r.remat) for r in rows] == [
        ("v5e-8", "sft", "full"), ("v5e-8", "sft", "none"), ("v5e-8", "reward_model", "none"),
        ("v5p-8", "sft", "full"), ("v5p-8", "sft", "none"), ("v5p-8", "reward_model", "none")]
    n_params = sum(x.size for x in jax.tree.leaves(
        jax.eval_shape(functools.partial(init_params, presets.get("tiny")),
                       jax.random.PRNGKey(0))))
    sft8 = rows[0]
    assert sft8.mesh == {"data": 1, "fsdp": 8, "tensor": 1} and rows[3].mesh["fsdp"] == 4
    # f32 params sharded 8 ways (dims fsdp cannot divide stay whole: at least 1/8)
    assert n_params * 4 / 8 <= sft8.params <= n_params * 4
    assert abs(sft8.opt - 2 * sft8.params) <= 64  # AdamW mu + nu (+ the step count)
    assert sft8.batch == 8 * 32 * (4 + 4) // 8  # tokens int32 + loss_mask f32, 1 row per chip
    assert rows[3].params > sft8.params  # 4 chips hold more each than 8
    assert all(r.temp > 0 and r.total >= r.params + r.opt and r.fits for r in rows)
    assert all(r.act > 0 and r.estimate == 2 * r.params + r.opt + r.act for r in rows)
    full, none = rows[0], rows[1]
    assert full.act < none.act  # remat keeps less
    assert len(lines) == len(rows) and lines[0].startswith("| v5e-8 | sft | full | 1, 8, 1 |")
    assert np.isfinite([r.compile_s for r in rows]).all()
