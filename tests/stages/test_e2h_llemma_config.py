"""The real-scale config `experiments/configs/e2h_llemma7b_prm800k.py`, checked on CPU.

The config validates for 8 devices, and its reward-model train step is built for Llemma-7B's
shapes on the fake 8-device CPU mesh from abstract values only (`jax.eval_shape` params,
rule-table shardings, abstract AdamW state, an abstract [128, 768] batch): nothing of the 7B
model is allocated. The 32 layers are scanned (`ModelConfig.scan_layers`, on from 16 layers):
lowering takes ~0.5 s of CPU and compiling ~7 s (unrolled: ~4.5 s and ~38 s; see
`experiments/studies/rm_step_compile.py`). The fast tests lower the full model and compile a
2-layer model of the same widths, scanned and unrolled; the full compile is a heavy test.
"""

from __future__ import annotations

import functools
import json
import re
import resource
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from scalign import experiment, parallel
from scalign.experiment import load_config_file
from scalign.models import presets
from scalign.models.convert.hf import config_from_hf
from scalign.models.transformer import init_params
from scalign.objectives.reward import make_reward_loss
from scalign.stages.common import optimizer_for, training_model
from scalign.stages.reward_models import epoch_steps, train_block
from scalign.stages.sft import check_shapes
from scalign.training.step import abstract_train_state, make_train_step

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "experiments" / "configs" / "e2h_llemma7b_prm800k.py"
# PRM800K level 1-3 solutions that fit 768 tokens: an estimate for the schedule's length only.
EST_RECORDS = 50_000
GiB = 2**30


def load_config() -> ml_collections.ConfigDict:
    return load_config_file(CONFIG)


@pytest.fixture(scope="module")
def hf_folder(hf_folder_of) -> Path:
    """What validation looks at in an HF Llemma-7B folder: its config.json and tokenizer."""
    return hf_folder_of("llemma_7b")


@pytest.fixture
def config(hf_folder) -> ml_collections.ConfigDict:
    c = load_config()
    c.checkpoint.path = str(hf_folder)  # the placeholder gs:// path is for the TPU VM
    return c


def rm_model(config: ml_collections.ConfigDict, hf_folder: Path, **overrides):
    """The reward model's config as the stages build it: HF config.json -> compute dtype ->
    the training block's remat (checkpoint -> sft -> reward_models)."""
    model = config_from_hf(json.loads((hf_folder / "config.json").read_text()))
    model = model.replace(dtype=config.checkpoint.compute_dtype, **overrides)
    return training_model(model, config.reward_models.train)


def abstract_step(config, model, mesh):
    """(step, abstract state with shardings, abstract batch) of the reward-model train step."""
    train = train_block(config.reward_models.train, EST_RECORDS)
    optimizer, schedule = optimizer_for(train)

    state, st_sh = abstract_train_state(model, optimizer, mesh, head=True)
    step = make_train_step(make_reward_loss(model), optimizer, mesh, state_sharding=st_sh,
                           clip_norm=train.clip_norm,
                           grad_accum_steps=int(train.grad_accum_steps), lr_schedule=schedule)
    B, T = int(train.batch_size), int(train.seq_len)
    batch = {"tokens": jax.ShapeDtypeStruct((B, T), jnp.int32),
             "labels": jax.ShapeDtypeStruct((B, T), jnp.float32),
             "label_mask": jax.ShapeDtypeStruct((B, T), jnp.float32)}
    return step, state, batch


_ARG_RE = re.compile(r"%arg\d+: tensor<((?:\d+x)*)(\w+)> \{sdy\.sharding = "
                     r"#sdy\.sharding<@mesh, \[([^\]]*)\]>(, tf\.aliasing_output)?")


def main_args(lowered) -> list[tuple[tuple[int, ...], list[str], bool]]:
    """(shape, per-dim mesh axes, donated) of each argument of the lowered step."""
    text = lowered.as_text()
    head = text[text.index("func.func public @main"):]
    head = head[:head.index("->")]
    out = []
    for dims, _, spec, alias in _ARG_RE.findall(head):
        shape = tuple(int(d) for d in dims.split("x") if d)
        axes = re.findall(r"\{([^}]*)\}", spec)
        out.append((shape, [a.strip('"') for a in axes], bool(alias)))
    return out


def state_bytes_per_device(state, mesh) -> tuple[int, int]:
    """(total bytes of the abstract state, bytes one device holds under its shardings)."""
    total = per_device = 0
    for leaf in jax.tree.leaves(state):
        nbytes = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += nbytes
        per_device += int(np.prod(shard)) * leaf.dtype.itemsize
    return total, per_device


def test_config_validates_for_8_devices_and_its_checkpoint_matches_the_preset(config,
                                                                              hf_folder):
    shape = experiment.validate(config, num_devices=8)
    assert shape == {"data": 1, "fsdp": 8, "tensor": 1}
    assert config.stages == ("checkpoint", "data", "sft", "reward_models", "rerank", "report")
    # what the checkpoint stage would load has the preset's shapes (sft checks it again)
    check_shapes(presets.get(config.model.preset),
                 config_from_hf(json.loads((hf_folder / "config.json").read_text())))
    train = config.reward_models.train
    assert (train.batch_size, train.seq_len, train.epochs) == (128, 768, 2)
    assert train.optimizer.learning_rate == 2e-5 and train.remat == "full"
    assert config.checkpoint.compute_dtype == "bfloat16"
    assert config.reward_models.levels == config.sft.levels == (1, 2, 3)
    assert config.reward_models.label_source == "prm800k" and config.data.domain == "math"
    assert epoch_steps(2, 50_000, 128) == 782
    assert train_block(train, 50_000).steps == 782
    with pytest.raises(experiment.ConfigError, match=r"data\*fsdp\*grad_accum_steps"):
        c = load_config()
        c.checkpoint.path = config.checkpoint.path
        c.reward_models.train.batch_size = 100
        experiment.validate(c, num_devices=8)


@pytest.mark.parametrize("edit,message", [
    (lambda c: setattr(c, "stages", ("data", "checkpoint", "sft", "reward_models", "rerank")),
     "put stage 'checkpoint' before 'data'"),
    (lambda c: setattr(c.data, "tokenizer", "train"), "tokenizer='train' would replace"),
    (lambda c: setattr(c.data, "math_test", None), r"config\.data\.math_test is missing"),
    (lambda c: setattr(c.data, "on_error", "ignore"), r"config\.data\.on_error"),
    (lambda c: setattr(c.sft, "init", "hub"), r"config\.sft\.init must be one of"),
    (lambda c: setattr(c.reward_models, "label_source", "humans"),
     r"config\.reward_models\.label_source"),
    (lambda c: setattr(c.reward_models, "prm800k", ()), r"config\.reward_models\.prm800k is"),
    (lambda c: setattr(c.reward_models, "levels", (1, 2, 6)), r"levels \[6\] are not in"),
    (lambda c: setattr(c.reward_models.train, "epochs", 0), r"train\.epochs=0 must be > 0"),
    (lambda c: setattr(c.reward_models.train, "remat", "some"), r"\.remat must be one of"),
])
def test_validation_names_the_key(config, edit, message):
    with config.unlocked():
        edit(config)
    with pytest.raises(experiment.ConfigError, match=message):
        experiment.validate(config, num_devices=8)


def test_sft_from_checkpoint_needs_the_checkpoint_stage_first(config):
    config.stages = ("data", "sft")
    config.data.tokenizer = "train"
    config.data.tokenizer_vocab_size = 1000
    with pytest.raises(experiment.ConfigError, match="put stage 'checkpoint' before 'sft'"):
        experiment.validate(config, num_devices=8)
    config.reward_models.label_source = "prm800k"
    config.data.domain = "stepmath"
    config.stages = ("data", "reward_models")
    with pytest.raises(experiment.ConfigError, match="needs config.data.domain='math'"):
        experiment.validate(config, num_devices=8)


def test_reward_step_lowers_for_llemma_7b_on_a_fake_8_device_mesh(config, hf_folder):
    """The full 32-layer step, lowered from abstract shapes: shardings, donation, remat,
    output shapes, and no real allocation."""
    mesh = parallel.make_mesh(experiment.validate(config, num_devices=8))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = rm_model(config, hf_folder)
    assert model.n_layers == 32 and model.vocab_size == 32_016 and model.remat == "full"
    step, state, batch = abstract_step(config, model, mesh)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    lower_s = time.perf_counter() - t0
    args = main_args(lowered)
    n_state = len(jax.tree.leaves(state))
    assert len(args) == n_state + 3
    for shape, axes, donated in args[:n_state]:
        assert donated  # the state's buffers are reused for the new state
        # a stacked param [L, ...] of the scanned blocks: a norm scale [L, D] is one D vector
        # per layer (replicated like the unrolled model's [D] scales)
        stacked = len(shape) >= 2 and shape[0] == model.n_layers
        for dim, ax in zip(shape, axes, strict=False):
            if dim == model.d_model and len(shape) - stacked >= 2:
                assert ax == "fsdp", (shape, axes)  # embed -> fsdp: ZeRO-3 sharding
    for shape, axes, donated in args[n_state:]:
        assert shape == (128, 768) and axes[0] == "fsdp" and not donated
    # 32 layers are scanned by default (`ModelConfig.scan_layers`): one block in the program,
    # run by one while loop forward and one backward (remat inside the scan, no CSE barrier)
    assert model.scanned and state.params["layers"]["attn"]["q"].shape[0] == 32
    text = lowered.as_text()
    assert text.count("stablehlo.while") == 2 and "optimization_barrier" not in text
    total, per_device = state_bytes_per_device(state, mesh)
    n_params = model.num_params() + model.d_model + 1  # backbone + scalar head
    assert abs(total - 12 * n_params) < 1024  # f32 params + 2 f32 AdamW moments (~75 GiB)
    assert per_device < total / 8 * 1.001  # everything big is split 8 ways
    out_state, metrics = lowered.out_info
    assert jax.tree.map(lambda x: (x.shape, x.dtype), out_state) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), state)
    assert {"loss", "accuracy", "grad_norm", "lr", "num_labels"} <= set(metrics)
    assert all(m.shape == () for m in metrics.values())
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    assert grown < 2 * GiB, f"peak RSS grew by {grown / GiB:.1f} GiB: something was allocated"
    print(f"\nllemma-7B RM step: lower {lower_s:.1f}s, state {total / GiB:.1f} GiB, "
          f"{per_device / GiB:.2f} GiB/device, peak RSS +{grown / GiB:.2f} GiB")


def _compile_and_check(config, hf_folder, n_layers: int, **overrides) -> dict[str, float]:
    mesh = parallel.make_mesh(experiment.validate(config, num_devices=8))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = rm_model(config, hf_folder, n_layers=n_layers, **overrides)
    step, state, batch = abstract_step(config, model, mesh)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    _, per_device = state_bytes_per_device(state, mesh)
    batch_bytes = 128 * 768 * 12 // 8
    # the compiled step takes exactly this device's shard of the state and of the batch
    assert abs(mem.argument_size_in_bytes - per_device - batch_bytes) < 1024**2
    assert mem.alias_size_in_bytes >= per_device - 1024**2  # donated state
    out = jax.eval_shape(step, state, batch)
    assert out[1]["loss"].shape == () and out[0].params["scalar_head"]["kernel"].shape == (4096,)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    assert grown < 3 * GiB, f"peak RSS grew by {grown / GiB:.1f} GiB"
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "state_gib_per_device": per_device / GiB,
            "temp_gib_per_device": mem.temp_size_in_bytes / GiB, "rss_growth_gib": grown / GiB}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_reward_step_compiles_at_llemma_widths_with_two_layers(config, hf_folder, scan_layers):
    facts = _compile_and_check(config, hf_folder, n_layers=2, scan_layers=scan_layers)
    print(f"\n2-layer llemma-width RM step (scan_layers={scan_layers}): {facts}")


@pytest.mark.slow
@pytest.mark.heavy  # ~30 s of compile scanned (~2 min unrolled); the 2-layer test above checks
# the same at llemma widths
def test_reward_step_compiles_for_llemma_7b(config, hf_folder):
    facts = _compile_and_check(config, hf_folder, n_layers=32)  # scanned (>= 16 layers)
    print(f"\nllemma-7B RM step: {facts}")


def test_abstract_init_matches_the_presets_param_count(config, hf_folder):
    model = rm_model(config, hf_folder)
    params = jax.eval_shape(functools.partial(init_params, model), jax.random.PRNGKey(0))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert n == model.num_params() and 6.7e9 < n < 6.8e9
