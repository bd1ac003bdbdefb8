"""`python -m scalign.plan`: every train step of a config compiles from abstract shapes on a
fake mesh of a TPU slice's size, with bytes per device that add up."""

from __future__ import annotations

import functools
import re

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
    assert all(r.act > 0 and r.gathered > 0 and
               r.estimate == 2 * r.params + r.opt + r.act + r.gathered for r in rows)
    full, none = rows[0], rows[1]
    assert full.act < none.act  # remat keeps less
    assert len(lines) == len(rows) and lines[0].startswith("| v5e-8 | sft | full | 1, 8, 1 |")
    assert np.isfinite([r.compile_s for r in rows]).all()


# ============================================================================ online-loop steps
def _online_config() -> ml_collections.ConfigDict:
    """SFT -> reward models (two evaluators) -> RL (PPO, GRPO) -> eva, tiny shapes."""
    c = _config()
    c.stages = ("sft", "reward_models", "rl", "eva")
    opt = {"learning_rate": 1e-3, "warmup_steps": 1}
    c.reward_models.evaluators = ("orm", "prm")
    c.rl = ml_collections.ConfigDict({
        "methods": ("sft", "ppo_answers", "ppo_prm", "grpo_prm"),
        "prompts_per_iteration": 16, "samples_per_prompt": 4, "seq_len": 48, "iterations": 2,
        "optimizer": opt, "per_method": {"ppo_prm": {"minibatches": 2, "use_prm": True},
                                         "grpo_prm": {"minibatches": 2}}})
    c.eva = ml_collections.ConfigDict({"loss": "dpo", "batch_size": 8, "seq_len": 40,
                                       "optimizer": opt, "remat": "full"})
    return c


def test_online_loop_steps_and_their_resident_models():
    specs = {s.name: s for s in plan.planned_steps(_online_config())}
    # "sft" is a row of the RL table, not a step; ppo_answers keeps PPOConfig's 8 minibatches
    assert list(specs) == ["sft", "reward_model", "rl/ppo_answers/policy",
                           "rl/ppo_answers/value", "rl/ppo_prm/policy", "rl/ppo_prm/value",
                           "rl/grpo_prm/policy", "eva/dpo"]
    assert specs["rl/ppo_answers/policy"].rows == 16 * 4 // 8
    assert specs["rl/ppo_prm/policy"].rows == specs["rl/grpo_prm/policy"].rows == 16 * 4 // 2
    assert specs["eva/dpo"].rows == 2 * 8 and specs["eva/dpo"].remat == "full"
    rms = ("reward_model:orm", "reward_model:prm")
    assert specs["rl/ppo_prm/policy"].resident == ("reference", *rms, "value_state")
    assert specs["rl/ppo_prm/value"].resident == ("policy_state", "reference", *rms)
    assert specs["rl/ppo_prm/value"].model == "reward"
    assert specs["rl/grpo_prm/policy"].resident == ("reference", *rms)
    assert specs["eva/dpo"].resident == ("reference", *rms)
    assert specs["sft"].resident == ()
    # methods with identical steps share a row; a reference-free loss keeps no reference
    c = _online_config()
    c.rl.methods = ("ppo_answers", "ppo_prm")
    c.rl.per_method = ml_collections.ConfigDict()
    c.eva = ml_collections.ConfigDict({**c.eva.to_dict(), "loss": ("dpo", "simpo")})
    c.stages = ("rl", "eva")
    specs = {s.name: s for s in plan.planned_steps(c)}
    assert list(specs) == ["rl/ppo_answers,ppo_prm/policy", "rl/ppo_answers,ppo_prm/value",
                           "eva/dpo", "eva/simpo"]
    assert specs["eva/simpo"].resident == () and specs["eva/dpo"].resident == ("reference",)


def test_online_loop_steps_compile_on_a_fake_mesh():
    lines = []
    rows = plan.run(_online_config(), ["v5e-8"], ["config"],
                    steps=["rl/ppo_prm", "rl/grpo_prm", "eva"], log=lines.append)
    assert [(r.step, r.remat) for r in rows] == [
        ("rl/ppo_prm/policy", "none"), ("rl/ppo_prm/value", "none"),
        ("rl/grpo_prm/policy", "none"), ("eva/dpo", "full")]
    for r in rows:
        assert r.temp > 0 and r.total >= r.params + r.opt and r.other > 0 and r.fits
        assert r.xla_peak == r.total + r.other and r.fits_xla
        assert r.estimate == 2 * r.params + r.opt + r.act + r.gathered + r.other
    policy, value, grpo, eva = rows
    assert (policy.rows, policy.length) == (32 // 8, 48) and (eva.rows, eva.length) == (2, 40)
    # the value model is the reward model's preset with a scalar head: a few more params
    assert value.params > policy.params
    # PPO keeps a value state next to what GRPO keeps (reference + reward models)
    assert policy.other == grpo.other + value.params + value.opt + 4 * 2 + 4  # + step, rng
    assert lines[0].startswith("| v5e-8 | rl/ppo_prm/policy | none | 1, 8, 1 | 4 x 48 |")


def _device_bytes(tree, device) -> int:
    """Bytes of `tree`'s real arrays that live on `device`."""
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards
               if s.device == device)


def test_resident_models_are_counted_exactly():
    """The planner's 'other resident' bytes equal what a real PPO loop (built by
    `PPO.create_loop`, as stage rl builds it) and two reward models placed as stage
    reward_models places them hold on one device of a 4-chip (v5p-8) mesh."""
    from scalign import parallel
    from scalign.algorithms.ppo import PPO
    from scalign.algorithms.rollout import RolloutSpec
    from scalign.evaluation.scoring import scalar_param_shardings
    from scalign.models.heads import add_scalar_head, scalar_head_logical_axes
    from scalign.models.transformer import param_logical_axes
    from scalign.objectives import policy_gradient as pg
    from scalign.training.state import OptimizerConfig, make_optimizer

    config = _online_config()
    config.stages = ("reward_models", "rl")
    rows = {r.step: r for r in plan.run(config, ["v5p-8"], ["none"], steps=["rl/ppo_prm"],
                                        compile=False)}
    mesh = parallel.make_mesh(rows["rl/ppo_prm/policy"].mesh, jax.devices()[:4])
    model = presets.get("tiny")
    key = jax.random.PRNGKey(0)
    params = init_params(model, key)
    rms = []
    for i in range(2):  # orm, prm: full reward models (backbone + scalar head) on the mesh
        p = add_scalar_head(model, init_params(model, jax.random.fold_in(key, i)), key)
        rms.append(jax.device_put(p, scalar_param_shardings(model, p, mesh)))
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=16))
    spec = RolloutSpec(prompts_per_iteration=16, samples_per_prompt=4, max_new_tokens=8,
                       width=48)
    loop = PPO(spec, reward_fn=None, ppo=pg.PPOConfig(minibatches=2)).create_loop(
        model, params, value_params=rms[1], value_config=model,
        value_logical_axes={**param_logical_axes(model), "scalar_head": scalar_head_logical_axes()},
        value_optimizer=opt, mesh=mesh, sampler=None, optimizer=opt, seed=0, progress=False)
    dev = mesh.devices.flat[0]
    ref = _device_bytes(loop.state.reference, dev)
    rm = sum(_device_bytes(p, dev) for p in rms)
    assert 0 < ref < sum(x.nbytes for x in jax.tree.leaves(params))  # sharded, not replicated
    assert rows["rl/ppo_prm/policy"].other == ref + rm + _device_bytes(loop.state.value, dev)
    assert rows["rl/ppo_prm/value"].other == ref + rm + _device_bytes(loop.state.policy, dev)
    assert rows["rl/ppo_prm/policy"].params == _device_bytes(loop.state.policy.params, dev)
    assert rows["rl/ppo_prm/value"].params == _device_bytes(loop.state.value.params, dev)


# ============================================================================ --set
def _write_config(tmp_path, config) -> str:
    path = tmp_path / "cfg.py"
    path.write_text("import ml_collections\n\ndef get_config():\n"
                    f"    return ml_collections.ConfigDict({config.to_dict()!r})\n")
    return str(path)


def test_set_overrides_change_the_plan(tmp_path):
    path = _write_config(tmp_path, _online_config())
    config = plan.load_config(path, ["rl.remat=full", "rl.per_method.ppo_answers.minibatches=4",
                                     "eva.batch_size=16", "eva.loss=simpo",
                                     "rl.methods=('ppo_answers',)", "reward_models.preset=tiny"])
    specs = {s.name: s for s in plan.planned_steps(config)}
    assert specs["rl/ppo_answers/policy"].remat == "full"       # optional key created
    assert specs["rl/ppo_answers/policy"].rows == 16 * 4 // 4   # new per-method block
    assert specs["eva/simpo"].rows == 32 and specs["eva/simpo"].resident == (
        "reward_model:orm", "reward_model:prm")
    assert "rl/ppo_prm/policy" not in specs and config.eva.loss == "simpo"


def test_cli_plans_with_set_and_names_a_bad_key(tmp_path, capsys):
    path = _write_config(tmp_path, _online_config())
    assert plan.main(["--config", path, "--tpu=v5e-8", "--steps=eva", "--no_compile",
                      "--set", "eva.batch_size=16", "--set", "eva.remat=none"]) == 0
    out = capsys.readouterr().out
    assert "| v5e-8 | eva/dpo | none | 1, 8, 1 | 4 x 40 |" in out
    assert "| - | - | " in out and out.count("yes, - |") == 1  # not compiled: no XLA verdict
    assert "--set eva.batch_size=16 --set eva.remat=none" in out
    assert "other resident: eva/dpo: the frozen reference policy's params" in out
    assert plan.main(["--config", path, "--tpu=v5e-8", "--no_compile",
                      "--set", "rl.remta=full"]) == 2
    err = capsys.readouterr().err
    assert "config.rl.remta" in err and "config.rl has" in err


@pytest.mark.parametrize("item, message", [
    ("rl.remta=full", "no key config.rl.remta"),
    ("rll.remat=full", "no key config.rll"),
    ("eva2.remat=full", "no key config.eva2"),
    ("rl.prompts_per_iteration=many", "config.rl.prompts_per_iteration cannot take 'many'"),
    ("rl.optimizer.learning_rate.x=1", "config.rl.optimizer.learning_rate is a float"),
    ("rl.remat", "expected key=value"),
])
def test_bad_set_keys_name_the_key(item, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        plan.apply_overrides(_online_config(), [item])


def test_missing_planning_keys_name_the_key():
    c = _online_config()
    del c.rl["seq_len"]
    with pytest.raises(ValueError, match=re.escape("config.rl.seq_len is missing")):
        plan.planned_steps(c)
    c = _online_config()
    c.rl.methods = ("ppo_answers", "dpo_online")
    with pytest.raises(ValueError, match="unknown method 'dpo_online'"):
        plan.planned_steps(c)
    c = _online_config()
    c.stages = ("rl",)
    c.rl.per_method.ppo_prm.minibatches = 3   # 64 rows do not split into 3
    with pytest.raises(ValueError, match=re.escape("config.rl.per_method.ppo_prm.minibatches")):
        plan.planned_steps(c)
    c = _online_config()
    c.stages = ("rl",)
    c.rl.per_method.ppo_prm.minibatches = 16  # 4 rows per update on 8 devices
    with pytest.raises(ValueError, match="do not split into grad_accum_steps=1 micro-batches "
                                         "over data\\*fsdp=8"):
        plan.run(c, ["v5e-8"], ["none"], steps=["rl/ppo_prm"], compile=False)


def test_gathered_bytes_by_hand():
    """FSDP's working set for the tiny llama (tied embeddings: the embedding is the LM head):
    two blocks in the compute dtype, one block's gradient and the embedding with its gradient,
    f32 everywhere here; nothing without fsdp; the tensor axis divides it."""
    m = presets.get("tiny")
    D, H, K, d, F = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.mlp_dim
    block = 2 * D * H * d + 2 * D * K * d + 3 * D * F + 2 * D  # q, o, k, v, gated MLP, 2 norms
    params = jax.eval_shape(functools.partial(init_params, m), jax.random.PRNGKey(0))
    want = block * (2 * 4 + 4) + m.vocab_size * D * (4 + 4)
    assert plan.gathered_bytes(m, params, {"data": 1, "fsdp": 8, "tensor": 1}) == want
    assert plan.gathered_bytes(m, params, {"data": 1, "fsdp": 4, "tensor": 2}) == want // 2
    assert plan.gathered_bytes(m, params, {"data": 8, "fsdp": 1, "tensor": 1}) == 0
    bf16 = m.replace(dtype="bfloat16")  # weights gathered in the compute dtype, grads in f32
    assert plan.gathered_bytes(bf16, params, {"data": 1, "fsdp": 8, "tensor": 1}) == \
        block * (2 * 2 + 4) + m.vocab_size * D * (2 + 4)
