"""Stage `rl`: the e2h_rl_stepmath config validates for every method, bad blocks are named, and
(slow) a toy data -> sft -> reward_models -> rl run trains and reports Table-2 rows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from scalign import experiment

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "experiments" / "configs" / "e2h_rl_stepmath.py"
METHODS = ("rest_em", "iterative_dpo", "ppo_answers", "ppo_prm", "grpo_answers", "grpo_prm")


def load_config(method: str):
    spec = importlib.util.spec_from_file_location("e2h_rl_stepmath", CONFIG)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(method)


@pytest.mark.parametrize("method", METHODS)
def test_config_validates(method):
    c = load_config(method)
    experiment.validate(c, num_devices=1)
    assert c.rl.method in ("rest_em", "iterative_dpo", "ppo", "grpo")
    assert c.rl.use_prm == (not method.endswith("_answers"))


def test_bad_rl_blocks_are_named():
    c = load_config("ppo_prm")
    c.rl.ppo.minibatches = 3
    with pytest.raises(experiment.ConfigError, match="minibatches"):
        experiment.validate(c, num_devices=1)
    c = load_config("grpo_prm")
    c.stages = ("data", "sft", "rl", "report")
    with pytest.raises(experiment.ConfigError, match="reward_models"):
        experiment.validate(c, num_devices=1)
    c = load_config("rest_em")
    c.rl.rest_em.nonsense = 1
    with pytest.raises(experiment.ConfigError, match="nonsense"):
        experiment.validate(c, num_devices=1)


TOY = {"data.n_train": 300, "data.n_test": 20, "sft.steps": 30, "sft.checkpoint_every": 30,
       "sft.log_every": 10, "reward_models.problems_per_level": 8,
       "reward_models.samples_per_problem": 4, "reward_models.train.steps": 6,
       "reward_models.train.checkpoint_every": 6, "reward_models.train.batch_size": 8,
       "rl.problems_per_level": 4, "rl.iterations": 2, "rl.prompts_per_iteration": 4,
       "rl.samples_per_prompt": 4, "rl.max_new_tokens": 24, "rl.eval_problems": 4,
       "rl.checkpoint_every": 1}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ppo_prm", "grpo_prm"])
def test_tiny_rl_run(tmp_path, method):
    c = load_config(method)
    c.rl.ppo.minibatches = 2
    for key, value in TOY.items():
        node = c
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    experiment.run(c, tmp_path / "run")
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["rl"]["rows"]
    assert {r["method"] for r in rows} == {"sft", method}
    assert {r["split"] for r in rows} == {"easy", "hard", "all"}
    assert all(set(r) >= {"method", "split", "mean", "std", "seeds", "wall_s"} for r in rows)
    assert "## RL: " + method in (tmp_path / "run" / "report.md").read_text()
