"""The demo pipeline end to end at toy sizes, and a killed launcher resuming bitwise."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from scalign import experiment
from scalign.training.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "experiments" / "configs" / "demo.py"


def _demo_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_cfg", DEMO)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _demo(**overrides):
    cfg = _demo_module().get_config()
    for key, value in overrides.items():
        node = cfg
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return cfg


TOY = {
    "data.n_train": 300, "data.n_test": 20, "sft.steps": 30,
    "sft.checkpoint_every": 10, "sft.log_every": 5,
    "evaluate.greedy_problems": 8, "evaluate.pass_problems": 4, "evaluate.pass_n": 4,
    "reward_models.problems_per_level": 8, "reward_models.samples_per_problem": 4,
    "reward_models.train.steps": 6, "reward_models.train.checkpoint_every": 6,
    "reward_models.train.batch_size": 8,
    "rl.problems_per_level": 8, "rl.iterations": 2, "rl.prompts_per_iteration": 4,
    "rl.samples_per_prompt": 4, "rl.max_new_tokens": 24, "rl.eval_problems": 4,
    "rerank.problems_per_level": 4, "rerank.max_n": 8, "rerank.num_subsets": 3,
    "eva.prompts_per_level": 2, "eva.samples": 3, "eva.eval_problems": 2,
}


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path):
    cfg = _demo(**TOY)
    experiment.run(cfg, tmp_path / "run")
    out = tmp_path / "run"
    results = json.loads((out / "results.json").read_text())
    for stage in ("data", "sft", "evaluate", "reward_models", "rl", "rerank", "evaluators"):
        assert results[stage]["rows"], stage
    rl = {(r["method"], r["split"]) for r in results["rl"]["rows"]}
    assert rl == {(m, s) for m in ("sft", "grpo_prm") for s in ("easy", "hard", "all")}
    sft = {r["metric"]: r["value"] for r in results["sft"]["rows"]}
    assert sft["loss_final"] < sft["loss_first_logged"]
    levels = {r["level"]: r for r in results["reward_models"]["rows"]
              if r["metric"] == "oprm_records_of_level"}
    assert levels and set(levels) <= {1, 2, 3}  # no hard-level label reaches training
    row = results["rerank"]["rows"][0]
    assert set(row) >= {"split", "evaluator", "method", "aggregation", "n", "mean", "std", "seeds"}
    majority = [r for r in results["rerank"]["rows"] if r["method"] == "majority"]
    assert {r["evaluator"] for r in majority} == {"none"}
    assert {r["split"] for r in majority} == {"easy", "hard", "all"}
    assert {r["n"] for r in majority} == {1, 2, 4, 8}
    paired = {(r["split"], r["evaluator"], r["method"], r["aggregation"], r["n"], r["stat"]):
              r["value"] for r in results["rerank"]["rows"] if "stat" in r}
    acc = {(r["split"], r["evaluator"], r["method"], r["aggregation"], r["n"]): r["mean"]
           for r in results["rerank"]["rows"] if "stat" not in r}
    for split in ("easy", "hard"):
        key = (split, "prm", "weighted", "prod", 8)
        d = paired[(*key, "diff_to_majority")]
        # every subset of n = K is the full set, so the paired difference is the accuracy gap
        assert d == pytest.approx(acc[key] - acc[(split, "none", "majority", "none", 8)])
        assert paired[(*key, "diff_ci_low")] <= d <= paired[(*key, "diff_ci_high")]
        # stepmath's verifier checks steps: pass@N with every step verified is reported, never
        # above the answer-only oracle on the same subsets, and non-decreasing in N
        every = [acc[(split, "none", "oracle_all_steps", "none", n)] for n in (1, 2, 4, 8)]
        assert all(e <= acc[(split, "none", "oracle", "none", n)] + 1e-9
                   for e, n in zip(every, (1, 2, 4, 8), strict=True))
        assert every == sorted(every)
    kinds = {(r["evaluator"], r["kind"]) for r in results["evaluators"]["rows"]}
    assert ("prm", "step_auc") in kinds and ("orm", "outcome_auc") in kinds
    report = (out / "report.md").read_text()
    assert "pass@N (oracle, every step verified)" in report
    eva = results["eva"]["rows"]
    assert {(r["variant"], r["metric"]) for r in eva} >= {("eva", "winrate"), ("eva", "hard_acc")}
    assert all(r["ci_low"] <= r["mean"] <= r["ci_high"] for r in eva)
    assert {r["iteration"] for r in results["eva_pool"]["rows"]} == {0, 1, 2}
    for fig in ("sft_loss.png", "accuracy_by_level.png", "rerank_accuracy_vs_n.png",
                "eva_pool_levels.png"):
        assert f"figures/{fig}" in report and (out / "figures" / fig).exists()
    assert (out / "metrics.jsonl").exists() and (out / "tensorboard").exists()



@pytest.mark.slow
def test_killed_launcher_resumes_bitwise(tmp_path, demo_sft):
    straight = demo_sft.launch(tmp_path / "a", checkpoint_every=5, stdout=subprocess.DEVNULL)
    killed = demo_sft.launch(tmp_path / "b", checkpoint_every=5, stdout=subprocess.DEVNULL)
    deadline = time.time() + 400
    while (demo_sft.sft_steps(tmp_path / "b") < 12 and killed.poll() is None
           and time.time() < deadline):
        time.sleep(0.5)
    assert killed.poll() is None, killed.stderr.read()
    killed.send_signal(signal.SIGKILL)  # no clean-up: a real crash
    killed.wait()
    assert straight.wait(timeout=600) == 0, straight.stderr.read()
    resumed = demo_sft.launch(tmp_path / "b", "--resume", checkpoint_every=5,
                              stdout=subprocess.DEVNULL)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    _, a, _ = load_model(tmp_path / "a" / "stages" / "sft" / "policy")
    _, b, _ = load_model(tmp_path / "b" / "stages" / "sft" / "policy")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_launcher_seeds_runs_each_seed_and_aggregates(tmp_path):
    work = tmp_path / "multi"
    args = [sys.executable, str(ROOT / "experiments" / "launch.py"), f"--config={DEMO}",
            f"--workdir={work}", "--seeds=3,4", "--config.stages=('data','sft','evaluate')",
            "--config.data.n_train=200", "--config.data.n_test=8", "--config.sft.steps=8",
            "--config.sft.checkpoint_every=8", "--config.evaluate.greedy_problems=4",
            "--config.evaluate.pass_problems=2", "--config.evaluate.pass_n=2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_seed = {}
    for seed in (3, 4):
        cfg = json.loads((work / f"seed_{seed}" / "config.json").read_text())
        assert cfg["seed"] == seed
        rows = json.loads((work / f"seed_{seed}" / "results.json").read_text())["evaluate"]["rows"]
        per_seed[seed] = next(r["value"] for r in rows if r["level"] == "all"
                              and r["decoding"] == "greedy" and r["criterion"] == "answer")
    agg = json.loads((work / "results.json").read_text())
    row = next(r for r in agg["evaluate"]["rows"] if r["level"] == "all"
               and r["decoding"] == "greedy" and r["criterion"] == "answer")
    assert row["seeds"] == 2
    assert row["mean"] == pytest.approx(np.mean(list(per_seed.values())))
    assert "SFT policy by level" in (work / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["blind", "goal"])
def test_own_backbone_is_trained_on_easy_demos_and_saved(tmp_path, which):
    """reward_models.backbone='blind' / 'goal': the evaluators' own backbone, SFT'd (config.sft
    recipe) on the reward levels' demonstrations with the goal hidden / kept in the loss, and
    saved beside the evaluators."""
    toy = {**TOY, "stages": ("data", "sft", "reward_models"), "reward_models.backbone": which,
           "reward_models.evaluators": ("prm",)}
    cfg = _demo(**toy)
    experiment.run(cfg, tmp_path / "run")
    out = tmp_path / "run"
    _, own, meta = load_model(out / "stages" / "reward_models" / "backbone")
    _, policy, _ = load_model(out / "stages" / "sft" / "policy")
    assert meta["kind"] == f"{which}_backbone"
    # its own weights: not the policy's, and the PRM's backbone starts from them
    pairs = zip(jax.tree.leaves(own), jax.tree.leaves(policy), strict=True)
    assert not all(np.allclose(a, b) for a, b in pairs)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if m.get("stage") == "rm_backbone" and "loss" in m]
    assert steps and max(steps) == cfg.sft.steps
    rows = {r["metric"]: r["value"] for r in
            json.loads((out / "results.json").read_text())["reward_models"]["rows"]}
    assert "backbone_final_loss" in rows and "prm_final_loss" in rows


def test_validation_names_the_goal_and_tokenizer_keys():
    experiment.validate(_demo(**{"sft.exclude_goal": True, "data.design": "path5",
                                 "data.tokenizer_model_type": "char"}))
    with pytest.raises(experiment.ConfigError, match=r"config\.data\.tokenizer_model_type"):
        experiment.validate(_demo(**{"data.tokenizer_model_type": "wordpiece"}))
    bad = _demo(**{"sft.exclude_goal": True})
    bad.data.domain = "math"
    with pytest.raises(experiment.ConfigError, match=r"config\.sft\.exclude_goal"):
        experiment.validate(bad)
    # a chain design has no target to miss: the option adds nothing there (stepmath.miss_records)
    experiment.validate(_demo(**{"sft.miss_demos": 0.25, "data.design": "graded99"}))
    bad = _demo(**{"sft.miss_demos": 0.25, "sft.exclude_goal": False})
    bad.data.domain = "math"
    with pytest.raises(experiment.ConfigError, match=r"config\.sft\.miss_demos needs the stepmath"):
        experiment.validate(bad)


@pytest.mark.parametrize("design", ["reach4c", "reach4g", "reach4"])
def test_demo_token_budgets_hold_each_designs_demonstrations(design):
    """`demo.py:<design>` sets budgets the design's gold solutions fit, with the tokenizer the
    data stage trains (BPE, vocab 96, easy levels): SFT rows hold bos + prompt + response + eos,
    samplers may write a response plus eos, evaluator rows hold a prompt plus a full sample."""
    from scalign.data import stepmath
    from scalign.data.domain import StepMathDomain
    from scalign.data.tokenizer import Tokenizer

    assert _demo_module().DEFAULT_DESIGN == stepmath.DEFAULT_DESIGN
    cfg = experiment.load_config_file(DEMO, design)
    assert cfg.data.design == design
    dom = StepMathDomain.build([1, 2, 3, 4, 5], n_train=400, n_test=100, seed=0, design=design)
    records = dom.train_records([1, 2, 3])
    tok = Tokenizer.train([r["prompt"] + r["response"] for r in records], None,
                          vocab_size=int(cfg.data.tokenizer_vocab_size),
                          user_defined_symbols=("\n\n",))
    problems = [p for lv in (1, 2, 3, 4, 5) for p in dom.splits[lv].test]
    prompt = max(len(tok.encode(p.prompt)) for p in problems)
    response = max(len(tok.encode(p.solution)) for p in problems)
    assert 1 + prompt + response + 1 <= cfg.sft.seq_len
    for stage in ("evaluate", "reward_models", "rl", "rerank", "eva"):
        assert response + 1 <= cfg[stage].max_new_tokens, stage
    for seq_len in (cfg.reward_models.train.seq_len, cfg.eva.seq_len):
        assert 1 + prompt + cfg.rerank.max_new_tokens <= seq_len

