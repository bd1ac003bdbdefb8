"""Stage `rl`: configs validate (every method, subsets), per-method overrides resolve, bad
blocks are named, the rows/report schema, a resumed stage skips finished methods, and (slow) a
toy data -> sft -> reward_models -> rl run of two methods reports Table-2 rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scalign import experiment
from scalign.algorithms.rest_em import RestEMConfig
from scalign.evaluation.rl_table import table2
from scalign.experiment import load_config_file
from scalign.objectives import policy_gradient as pg
from scalign.stages.rl import METHODS as STAGE_METHODS
from scalign.stages.rl import method_plan

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "experiments" / "configs" / "e2h_rl_stepmath.py"
DEMO = ROOT / "experiments" / "configs" / "demo.py"
METHODS = ("rest_em", "iterative_dpo", "ppo_answers", "ppo_prm", "grpo_answers", "grpo_prm")


def load(path: Path, *args):
    return load_config_file(path, *args)


def load_config(methods: str | None = None):
    return load(CONFIG, *([methods] if methods else []))


def test_default_config_runs_every_method_and_validates():
    c = load_config()
    assert tuple(c.rl.methods) == ("sft", *METHODS)
    assert set(STAGE_METHODS) == {"sft", *METHODS}
    experiment.validate(c, num_devices=1)
    experiment.validate(c, num_devices=8)   # 256 rollout rows, minibatches split 8 ways


def test_subset_config_and_unknown_method():
    c = load_config("ppo_prm,grpo_prm")
    assert tuple(c.rl.methods) == ("sft", "ppo_prm", "grpo_prm")
    assert set(c.rl.per_method.keys()) == {"ppo_prm", "grpo_prm"}
    experiment.validate(c, num_devices=1)
    with pytest.raises(ValueError, match="ppo_nonsense"):
        load_config("ppo_nonsense")


def test_method_plans_read_shared_keys_and_per_method_overrides():
    c = load_config()
    c.rl.per_method.grpo_prm.optimizer = {"learning_rate": 3e-5}
    c.rl.per_method.grpo_prm.iterations = 7
    ppo = method_plan(c, "ppo_answers")
    assert ppo.algorithm == "ppo" and not ppo.use_prm and ppo.levels == (1, 2, 3)
    assert ppo.hparams == pg.PPOConfig(minibatches=4, temperature=0.7)
    assert ppo.iterations == 30 and ppo.prompts_per_iteration == 32
    assert ppo.optimizer["learning_rate"] == 1e-4
    grpo = method_plan(c, "grpo_prm")
    assert grpo.use_prm and grpo.reward.use_prm and grpo.levels == (1, 2, 3, 4, 5)
    assert grpo.iterations == 7
    assert grpo.optimizer == {**c.rl.optimizer.to_dict(), "learning_rate": 3e-5}
    rest = method_plan(c, "rest_em")
    assert rest.iterations == 4 and rest.prompts_per_iteration == 256
    assert rest.hparams == RestEMConfig(prm_threshold=0.9, max_per_problem=4, batch_size=16,
                                        epochs=2)
    assert rest.temperature == 0.7


def test_bad_rl_blocks_are_named():
    c = load_config()
    c.rl.per_method.ppo_prm.minibatches = 3
    with pytest.raises(experiment.ConfigError, match="per_method.ppo_prm.minibatches"):
        experiment.validate(c, num_devices=1)
    c = load_config("grpo_prm")
    c.stages = ("data", "sft", "rl", "report")
    with pytest.raises(experiment.ConfigError, match="reward_models"):
        experiment.validate(c, num_devices=1)
    c = load_config("grpo_answers")
    c.stages = ("data", "sft", "rl", "report")   # answers only, no PRM, no critic: fine
    experiment.validate(c, num_devices=1)
    c = load_config()
    c.rl.per_method.rest_em.nonsense = 1
    with pytest.raises(experiment.ConfigError, match="nonsense"):
        experiment.validate(c, num_devices=1)
    c = load_config()
    c.rl.methods = ("sft", "dpo_prm")
    with pytest.raises(experiment.ConfigError, match="dpo_prm"):
        experiment.validate(c, num_devices=1)
    c = load_config("ppo_prm")
    c.rl.per_method.grpo_prm = {"minibatches": 1}   # a block for a method that does not run
    with pytest.raises(experiment.ConfigError, match="grpo_prm"):
        experiment.validate(c, num_devices=1)
    c = load_config()
    c.rl.method = "ppo"   # the single-method key of before
    with pytest.raises(experiment.ConfigError, match="config.rl.methods"):
        experiment.validate(c, num_devices=1)
    c = load_config()
    c.rl.seq_len = 40
    with pytest.raises(experiment.ConfigError, match="seq_len"):
        experiment.validate(c, num_devices=1)
    c = load_config("ppo_prm")
    c.rl.grad_accum_steps = 3   # 64-row minibatches do not split into 3 micro-batches
    with pytest.raises(experiment.ConfigError, match="grad_accum_steps"):
        experiment.validate(c, num_devices=1)
    c.rl.grad_accum_steps = 2
    experiment.validate(c, num_devices=8)
    c.rl.value_optimizer = {"learning_rate": -1.0}
    with pytest.raises(experiment.ConfigError, match="value_optimizer"):
        experiment.validate(c, num_devices=1)


def test_demo_rl_stage_is_short_grpo_prm_before_rerank():
    c = load(DEMO)
    stages = list(c.stages)
    assert stages.index("reward_models") < stages.index("rl") < stages.index("rerank")
    assert stages[-1] == "report"
    assert tuple(c.rl.methods) == ("sft", "grpo_prm")
    assert c.rl.iterations * c.rl.prompts_per_iteration * c.rl.samples_per_prompt <= 1024
    experiment.validate(c, num_devices=1)


def test_table2_layout():
    rows = [{"method": m, "split": s, "mean": acc, "std": 0.01, "seeds": 3, "wall_s": w}
            for m, acc, w in (("grpo_prm", 0.5, 70.0), ("sft", 0.4, 0.0))
            for s in ("easy", "hard", "all")]
    md = table2(rows).splitlines()
    assert md[0].startswith("| method | answers | PRM on | easy | hard | all | RL wall s |")
    assert md[2].startswith("| SFT")     # paper order: SFT first, whatever the row order
    assert "| 50.0 ± 1.0 | 50.0 ± 1.0 | 50.0 ± 1.0 | 70 |" in md[3]
    assert "mean ± std over 3 seeds" in table2(rows)


TOY = {"data.n_train": 300, "data.n_test": 20, "sft.steps": 30, "sft.checkpoint_every": 30,
       "sft.log_every": 10, "reward_models.problems_per_level": 8,
       "reward_models.samples_per_problem": 4, "reward_models.train.steps": 6,
       "reward_models.train.checkpoint_every": 6, "reward_models.train.batch_size": 8,
       "rl.problems_per_level": 8, "rl.iterations": 2, "rl.prompts_per_iteration": 4,
       "rl.samples_per_prompt": 4, "rl.max_new_tokens": 24, "rl.eval_problems": 4,
       "rl.eval_levels": (1, 4), "rl.checkpoint_every": 1,
       # the optional shared keys `scalign.plan` reads too: taken by the loop
       "rl.grad_accum_steps": 2, "rl.clip_norm": 0.5,
       "rl.value_optimizer": {"learning_rate": 3e-5}}


def toy_config(methods: str):
    c = load_config(methods)
    for key, value in TOY.items():
        node = c
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    for name in c.rl.per_method:
        block = c.rl.per_method[name]
        if "minibatches" in block:   # 16 rows on 8 devices, 2 micro-batches of 8
            block.minibatches = 1
        if "prompts_per_iteration" in block:
            block.prompts_per_iteration = 8
        if "batch_size" in block:
            block.batch_size = 4
    return c


@pytest.mark.slow
def test_tiny_rl_run_two_methods_then_resume_skips_finished(tmp_path):
    c = toy_config("ppo_prm,grpo_answers")
    experiment.run(c, tmp_path / "run")
    out = tmp_path / "run"
    rows = json.loads((out / "results.json").read_text())["rl"]["rows"]
    assert {r["method"] for r in rows} == {"sft", "ppo_prm", "grpo_answers"}
    assert {r["split"] for r in rows} == {"easy", "hard", "all"}
    assert all(set(r) == {"method", "split", "mean", "std", "seeds", "problems", "wall_s"}
               for r in rows)
    by = {(r["method"], r["split"]): r for r in rows}
    assert by[("sft", "easy")]["wall_s"] == 0.0 and by[("ppo_prm", "easy")]["wall_s"] > 0
    assert by[("sft", "all")]["problems"] == 8
    report = (out / "report.md").read_text()
    assert "Table 2 layout" in report and "PPO, all problems + PRM" in report
    for m in ("ppo_prm", "grpo_answers"):
        assert (out / "stages" / "rl" / m / "policy" / "model_config.json").exists()
        res = json.loads((out / "stages" / "rl" / m / "result.json").read_text())
        assert len(res["history"]) == 2
    plan = json.loads((out / "stages" / "rl" / "grpo_answers" / "result.json").read_text())
    assert plan["plan"]["levels"] == [1, 2, 3] and not plan["plan"]["use_prm"]

    # resume of an unfinished stage: finished methods are read back, not rerun
    (out / "stages" / "rl" / "done.json").unlink()
    res = out / "stages" / "rl" / "grpo_answers" / "result.json"
    marked = json.loads(res.read_text())
    marked["wall_s"] = 12345.0   # a rerun would overwrite this
    res.write_text(json.dumps(marked))
    (out / "stages" / "rl" / "ppo_prm" / "result.json").unlink()   # this one reruns
    experiment.run(c, out, resume=True)
    rows2 = json.loads((out / "results.json").read_text())["rl"]["rows"]
    by2 = {(r["method"], r["split"]): r for r in rows2}
    assert by2[("grpo_answers", "hard")]["wall_s"] == 12345.0
    # the rerun method resumes from its final loop checkpoint: same policy, same accuracy
    assert by2[("ppo_prm", "all")]["mean"] == by[("ppo_prm", "all")]["mean"]
    assert by2[("sft", "all")]["mean"] == by[("sft", "all")]["mean"]
