"""Stage `eva`: its rewards, the shared pair helper, the study config's names, and the stage on a
tiny pipeline (rows schema, the fixed-prompt variant, a killed run resuming with the same pool).

The kill/resume test (three tiny pipeline runs) is marked slow; the loop-level resume of an eva
iteration is also covered fast in tests/algorithms/test_eva.py. The stage tests share one tiny
SFT run (30 steps: a weak policy, enough to exercise the code,
not to measure anything) and start every eva run from it through checkpoint source "saved", as
the study does."""

from __future__ import annotations

import importlib.util
import json
import types
from pathlib import Path

import numpy as np
import pytest

from scalign import experiment
from scalign.algorithms.eva import update_order
from scalign.algorithms.loop import pair_batches
from scalign.algorithms.rewards import PRMReward, VerifierReward
from scalign.data import stepmath
from scalign.data.tokenizer import Tokenizer
from scalign.stages.eva import ROW_FIELDS
from scalign.training.loop import Interrupted

ROOT = Path(__file__).resolve().parents[2]


def _config_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / "configs" /
                                                  f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _out(texts):
    return types.SimpleNamespace(texts=texts, lengths=np.ones((len(texts), len(texts[0])), int),
                                 tokens=None)


# ------------------------------------------------------------------ rewards
def test_verifier_reward_half_answer_half_valid_prefix():
    problem = stepmath.generate(3, 1, seed=0)[0]
    steps = problem.steps
    gold = problem.solution
    first_step_only = "\n\n".join(steps[:1])
    wrong = gold.replace(problem.answer, "zzz") if problem.answer in gold else ""
    rec = stepmath.to_record(problem)
    r = VerifierReward()([rec], _out([[gold, "", first_step_only]]))
    n = problem.num_steps
    np.testing.assert_allclose(r, [[1.0, 0.0, 0.5 * 1 / n]])
    if wrong:  # all steps right, answer wrong: the prefix half only
        v = stepmath.verify(problem, wrong)
        assert VerifierReward.score_text(problem, wrong) == pytest.approx(
            0.5 * float(v.outcome_correct) + 0.5 * min(1.0, v.num_leading_correct / n))


def test_prm_reward_is_the_minimum_step_score(tmp_path):
    problems = stepmath.generate(2, 3, seed=1)
    corpus = [p.prompt + p.solution for p in stepmath.generate(2, 50, seed=2)]
    tok = Tokenizer.train(corpus, tmp_path / "t.model", vocab_size=60,
                          user_defined_symbols=("\n\n",))
    recs = [stepmath.to_record(p) for p in problems]

    def encode(item):
        return tok.encode(item["prompt"], add_bos=True)

    class Scorer:  # the probability at token t is (t + 1) / 1000: min step = first step's
        def score(self, seqs, progress=False):
            self.seqs = seqs
            return [(np.arange(len(s)) + 1) / 1000.0 for s in seqs]

    texts = [[p.solution, ""] for p in problems]
    ids = [[tok.encode(t) for t in row] for row in texts]
    M = max(len(x) for row in ids for x in row) + 1
    tokens = np.zeros((3, 2, M), np.int32)
    lengths = np.zeros((3, 2), np.int32)
    for p, row in enumerate(ids):
        for j, x in enumerate(row):
            tokens[p, j, :len(x)] = x
            lengths[p, j] = len(x)
    out = types.SimpleNamespace(texts=texts, tokens=tokens, lengths=lengths)
    scorer = Scorer()
    r = PRMReward(scorer, tok, encode)(recs, out)
    assert r.shape == (3, 2)
    np.testing.assert_array_equal(r[:, 1], 0.0)  # no step: 0
    from scalign.algorithms.reward_labels import score_positions
    for p, rec in enumerate(recs):
        pos = score_positions(tok.token_bytes(), encode(rec), ids[p][0], texts[p][0],
                              stepmath.split_solution(texts[p][0]))
        assert len(pos.step_positions) == problems[p].num_steps
        assert r[p, 0] == pytest.approx((min(pos.step_positions) + 1) / 1000.0)


# ------------------------------------------------------------------ pairs and update counts
def test_pair_batches_carry_reference_and_extras_and_pad_with_weight_zero():
    tokens = np.arange(12, dtype=np.int32).reshape(6, 2)
    mask = np.ones((6, 2), np.float32)
    ref = np.arange(6, dtype=np.float32) * 10
    pairs = [(0, 1), (2, 3), (4, 5)]
    batches = pair_batches(tokens, mask, pairs, rows=2, order=[2, 0, 1],
                           ref_logps=ref, extras={"chosen_win_rate": np.array([.1, .2, .3])})
    assert len(batches) == 2
    b0, b1 = batches
    np.testing.assert_array_equal(b0["chosen_tokens"], tokens[[4, 0]])
    np.testing.assert_array_equal(b0["rejected_tokens"], tokens[[5, 1]])
    np.testing.assert_array_equal(b0["ref_chosen_logps"], [40, 0])
    np.testing.assert_array_equal(b0["ref_rejected_logps"], [50, 10])
    np.testing.assert_allclose(b0["chosen_win_rate"], [.3, .1])
    np.testing.assert_array_equal(b1["weight"], [1, 0])        # padded
    np.testing.assert_array_equal(b1["pair_index"], [1, -1])
    assert "ref_chosen_logps" not in pair_batches(tokens, mask, pairs, rows=4)[0]


@pytest.mark.parametrize("n,rows,updates,steps", [(5, 4, None, 2), (5, 4, 3, 3), (40, 4, 3, 3),
                                                  (0, 4, 3, 0)])
def test_update_order_fixes_the_number_of_updates(n, rows, updates, steps):
    order = update_order(n, rows, updates, np.random.default_rng(0))
    assert -(-order.size // rows) == steps
    if updates is not None and n:
        assert order.size == updates * rows
        counts = np.bincount(order, minlength=n)
        assert counts.max() - counts.min() <= 1  # each pair used floor or ceil times
    elif n:
        assert sorted(order) == list(range(n))


def test_study_config_names():
    mod = _config_module("eva_stepmath")
    assert mod.parse("dpo") == ("dpo", "eva", "gap")
    assert mod.parse("dpo_fixed") == ("dpo", "fixed", "gap")
    assert mod.parse("dpo_eva_var") == ("dpo", "eva", "var")
    assert mod.parse("dpo_eva_mean_inv") == ("dpo", "eva", "mean_inv")
    assert mod.parse("sppo_eva_prm") == ("sppo", "eva_prm", "gap")
    assert mod.parse("orpo_fixed_prm") == ("orpo", "fixed_prm", "gap")
    for bad in ("kto_eva", "dpo_evolved", "dpo_eva_entropy", "dpo_fixed_var"):
        with pytest.raises(ValueError):
            mod.parse(bad)
    c = mod.get_config("simpo_eva_prm")
    assert c.stages == ("checkpoint", "data", "reward_models", "eva", "report")
    assert c.checkpoint.source == "saved" and "{seed}" in c.checkpoint.path
    assert mod.get_config("sft").stages == ("data", "sft", "report")


# ------------------------------------------------------------------ the stage
TINY_DATA = {"n_train": 300, "n_test": 20}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    c = _config_module("eva_stepmath").get_config("sft")
    c.data.update(TINY_DATA)
    c.sft.steps, c.sft.checkpoint_every, c.sft.log_every = 30, 30, 10
    out = tmp_path_factory.mktemp("eva_sft") / "sft"
    experiment.run(c, out)
    return out


def _eva_config(sft: Path, arg: str, **eva):
    c = _config_module("eva_stepmath").get_config(arg)
    c.data.update(TINY_DATA)
    c.checkpoint.path = str(sft)
    c.eva.update({"prompts_per_level": 2, "iterations": 2, "samples": 3, "max_new_tokens": 16,
                  "seq_len": 48, "batch_size": 8, "updates": 2, "eval_problems": 2,
                  "eval_samples": 2, "n_boot": 200, **eva})
    c.eva.optimizer.learning_rate = 1e-3
    c.debug.stop_after_iterations = None
    return c


def test_stage_rows_schema_and_fixed_variant(sft_run, tmp_path):
    ctx = experiment.run(_eva_config(sft_run, "dpo_fixed"), tmp_path / "fixed")
    res = json.loads((tmp_path / "fixed" / "results.json").read_text())
    rows = res["eva"]["rows"]
    assert all(tuple(r) == ROW_FIELDS for r in rows)
    got = {(r["variant"], r["metric"]) for r in rows}
    assert got == {("fixed", "winrate"), ("fixed", "hard_acc"), ("fixed", "all_acc"),
                   ("sft", "hard_acc"), ("sft", "all_acc")}
    for r in rows:
        assert r["ci_low"] <= r["mean"] <= r["ci_high"] and r["seeds"] == 1
        assert r["informativeness"] == "none" and r["loss"] == "dpo"
    # fixed prompts: the pool never grows and its levels never move
    pool = json.loads((tmp_path / "fixed" / "stages" / "eva" / "pool" /
                       "iteration_2.json").read_text())
    assert len(pool["entries"]) == 6 and pool["active"] == list(range(6))
    shares = {(r["iteration"], r["level"]): r["share"] for r in res["eva_pool"]["rows"]}
    assert shares[(2, 1)] == shares[(0, 1)] == pytest.approx(1 / 3)
    assert "eva_policy" in ctx.artifacts
    report = (tmp_path / "fixed" / "report.md").read_text()
    assert "Level shares of the active prompt set" in report and "eva_pool_levels.png" in report


@pytest.mark.slow
def test_stage_killed_and_resumed_restores_pool_and_evolver(sft_run, tmp_path):
    straight = tmp_path / "straight"
    experiment.run(_eva_config(sft_run, "dpo_eva"), straight)
    killed = tmp_path / "killed"
    c = _eva_config(sft_run, "dpo_eva")
    c.debug.stop_after_iterations = 1
    with pytest.raises(Interrupted):
        experiment.run(c, killed)
    assert not (killed / "stages" / "eva" / "pool" / "iteration_2.json").exists()
    experiment.run(_eva_config(sft_run, "dpo_eva"), killed, resume=True)
    a = json.loads((straight / "stages" / "eva" / "pool" / "iteration_2.json").read_text())
    b = json.loads((killed / "stages" / "eva" / "pool" / "iteration_2.json").read_text())
    assert a == b and len(a["entries"]) > 6  # evolved prompts with stats and lineage
    assert any(e["parent"] is not None for e in a["entries"])
    ra = json.loads((straight / "results.json").read_text())["eva"]["rows"]
    rb = json.loads((killed / "results.json").read_text())["eva"]["rows"]
    assert ra == rb
