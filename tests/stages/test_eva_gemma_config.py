"""The real-scale eva config (Gemma-2-9B-it, DPO: the paper's beta 0.05, lr 5e-7, cosine,
warmup 0.1, 6 responses per prompt) validates for 8 devices with the eva stage's validator, and
its DPO step lowers for Gemma-2-9B shapes on the fake 8-device CPU mesh from abstract values
only (nothing of the 9B model is allocated): params and AdamW state sharded over fsdp, the state
donated, the scanned rematerialised layers, a batch of `config.eva.batch_size` pairs of
`config.eva.seq_len` tokens with precomputed reference log-probs. Lowering only."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from scalign import experiment, parallel
from scalign.experiment import load_config_file
from scalign.models.convert.hf import config_from_hf
from scalign.objectives.preference import make_preference_loss
from scalign.stages.common import training_model
from scalign.stages.eva import optimizer_config
from scalign.training.state import make_optimizer
from scalign.training.step import abstract_train_state, make_train_step

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "experiments" / "configs" / "eva_gemma2_9b_dpo.py"


def load_config() -> ml_collections.ConfigDict:
    return load_config_file(CONFIG)


@pytest.fixture(scope="module")
def hf_folder(hf_folder_of) -> Path:
    return hf_folder_of("gemma2_9b")


@pytest.fixture
def config(hf_folder) -> ml_collections.ConfigDict:
    c = load_config()
    c.checkpoint.path = str(hf_folder)
    return c


def test_config_validates_with_the_papers_settings(config):
    assert experiment.validate(config, num_devices=8) == {"data": 1, "fsdp": 8, "tensor": 1}
    e = config.eva
    assert (e.loss, e.hparams.beta, e.samples) == ("dpo", 0.05, 6)
    assert (e.temperature, e.top_p, e.fraction, e.evolutions, e.evolved_share) == (
        0.7, 0.9, 0.25, 4, 0.8)
    opt = optimizer_config(e)
    assert opt.learning_rate == 5e-7 and opt.schedule == "cosine"
    assert opt.total_steps == e.iterations * e.updates
    assert opt.warmup_steps == round(0.1 * opt.total_steps)
    # the keys scalign.plan reads
    assert {"loss", "batch_size", "seq_len", "remat"} <= set(e)


@pytest.mark.parametrize("key,value,message", [
    ("loss", "kto", r"config\.eva\.loss must be one of"),
    ("variant", "evolved", r"config\.eva\.variant must be one of"),
    ("informativeness", "entropy", r"config\.eva\.informativeness must be one of"),
    ("batch_size", 100, r"eva\.batch_size=100 must be divisible by data\*fsdp"),
    ("seq_len", 512, r"config\.eva\.seq_len=512 must exceed max_new_tokens"),
    ("remat", "some", r"config\.eva\.remat must be one of"),
    ("grad_accum_steps", 3, r"eva\.batch_size=128 must be divisible by data\*fsdp\*grad_accum"),
    ("prompts", "", r"config\.eva\.prompts is missing"),
])
def test_validation_names_the_key(config, key, value, message):
    config.eva[key] = value
    with pytest.raises(experiment.ConfigError, match=message):
        experiment.validate(config, num_devices=8)


def test_dpo_step_lowers_for_gemma2_9b_on_a_fake_8_device_mesh(config, hf_folder):
    mesh = parallel.make_mesh(experiment.validate(config, num_devices=8))
    model = config_from_hf(json.loads((hf_folder / "config.json").read_text()))
    model = training_model(model.replace(dtype=config.checkpoint.compute_dtype), config.eva)
    assert model.n_layers == 42 and model.remat == "full" and model.dtype == "bfloat16"
    optimizer = make_optimizer(optimizer_config(config.eva))
    state, st_sh = abstract_train_state(model, optimizer, mesh)
    loss = make_preference_loss(model, config.eva.loss, **config.eva.hparams.to_dict())
    accum = int(config.eva.grad_accum_steps)
    assert accum == 4  # 4 micro-batches of 32 pairs (tpu/README.md: fits a v5p-16)
    step = make_train_step(loss, optimizer, mesh, state_sharding=st_sh, grad_accum_steps=accum)
    B, T = int(config.eva.batch_size), int(config.eva.seq_len)
    batch = {"chosen_tokens": jax.ShapeDtypeStruct((B, T), jnp.int32),
             "rejected_tokens": jax.ShapeDtypeStruct((B, T), jnp.int32),
             "chosen_mask": jax.ShapeDtypeStruct((B, T), jnp.float32),
             "rejected_mask": jax.ShapeDtypeStruct((B, T), jnp.float32),
             "ref_chosen_logps": jax.ShapeDtypeStruct((B,), jnp.float32),
             "ref_rejected_logps": jax.ShapeDtypeStruct((B,), jnp.float32),
             "weight": jax.ShapeDtypeStruct((B,), jnp.float32)}
    lowered = step.lower(state, batch)
    text = lowered.as_text()
    assert model.scanned and text.count("stablehlo.while") >= 3  # micro-batches; layers fwd + bwd
    assert "tf.aliasing_output" in text                          # the state is donated
    _, metrics = lowered.out_info
    assert {"loss", "grad_norm", "accuracy", "margins"} <= set(metrics)
    total = per_device = 0
    for leaf in jax.tree.leaves(state):
        nbytes = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        total += nbytes
        per_device += int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
    assert total > 3 * 9.0e9 * 4              # f32 params + mu + nu of ~9.2B params
    assert per_device <= total / 8 * 1.01     # all of it sharded 8 ways
