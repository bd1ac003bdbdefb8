"""Failure augmentation of the easy PRM data: corrupted easy solutions labelled by the verifier."""

import collections
import importlib.util
import json
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from scalign import experiment
from scalign.algorithms.failure_augment import (
    CORRUPTIONS,
    augment_counts,
    augment_records,
    base_fillings,
    corrupt,
    failure_solutions,
)
from scalign.algorithms.reward_labels import build_reward_records
from scalign.data import stepmath
from scalign.data.domain import StepMathDomain
from scalign.data.tokenizer import Tokenizer
from scalign.evaluation.generation import Solutions

EASY = (1, 2, 3)
DEMO = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "demo.py"


def _demo(overrides=None, **reward_models):
    """The demo config with `config.reward_models` keys replaced (any type: a bad value too)
    and dotted `overrides` ({"sft.steps": 30})."""
    spec = importlib.util.spec_from_file_location("demo_cfg", DEMO)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config().to_dict()
    cfg["reward_models"].update(reward_models)
    for key, value in (overrides or {}).items():
        *path, leaf = key.split(".")
        node = cfg
        for part in path:
            node = node[part]
        node[leaf] = value
    return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    probs = [p for lv in EASY for p in stepmath.generate(lv, 200, seed=0)]
    return Tokenizer.train([p.prompt + p.solution for p in probs],
                           tmp_path_factory.mktemp("t") / "t.model", vocab_size=64,
                           user_defined_symbols=("\n\n",))


def _sample_like(problem, rng):
    """A policy-like sample: the gold solution, or one with its last result written wrong."""
    if rng.random() < 0.5:
        return problem.solution
    steps = list(problem.steps)
    head, res = steps[-1].rsplit("=", 1)
    steps[-1] = f"{head}={(int(res) + 1) % problem.modulus}"
    return "\n\n".join(steps) + "\n\n# Answer\n\n" + problem.answer


def _solutions(tok, problems, k=4, seed=0):
    rng = np.random.default_rng(seed)
    texts = [[_sample_like(p, rng) for _ in range(k)] for p in problems]
    ids = [[tok.encode(t) + [tok.eos_id] for t in row] for row in texts]
    width = max(len(x) for row in ids for x in row)
    tokens = np.full((len(problems), k, width), tok.pad_id, np.int32)
    lengths = np.zeros((len(problems), k), np.int32)
    for i, row in enumerate(ids):
        for j, x in enumerate(row):
            tokens[i, j, :len(x)] = x
            lengths[i, j] = len(x)
    verdicts = [[stepmath.verify(p, t) for t in row] for p, row in zip(problems, texts,
                                                                        strict=True)]
    return Solutions(list(problems), texts, verdicts, [["eos"] * k for _ in problems], tokens,
                     lengths, [tok.encode(p.prompt, add_bos=True) for p in problems])


def _easy_problems(n=12, design="reach4"):
    return [p for lv in EASY for p in stepmath.generate(lv, n, seed=3, design=design)]


@pytest.mark.parametrize("design", ["reach4", "reach4g", "reach4c", "graded99"])
def test_corruptions_change_one_step_and_the_verifier_finds_a_wrong_step(design):
    rng = np.random.default_rng(0)
    counts = collections.Counter()
    for p in _easy_problems(20, design):
        for kind in CORRUPTIONS:
            text = corrupt(p, p.ops, kind, rng)
            steps = stepmath.split_solution(text).steps
            assert len(steps) == p.num_steps
            verdict = stepmath.verify(p, text)
            counts[kind, verdict.first_error is not None] += 1
            if kind != "operation_forward":  # exactly one step differs from the gold text
                changed = [k for k, (a, b) in enumerate(zip(steps, p.steps, strict=True))
                           if a != b]
                assert len(changed) == 1
                if kind == "operation_kept" and p.search:  # where the solver chooses
                    assert changed[0] in p.free
            else:  # the last step claims the original final value
                assert stepmath.parse_step(steps[-1]).c == p.values[-1]
    for kind in CORRUPTIONS:  # most corruptions are failures (a few may be valid by chance)
        assert counts[kind, True] > counts[kind, False]


def test_base_fillings_are_gold_then_verified_samples():
    p = next(q for q in stepmath.generate(2, 50, seed=1) if q.num_solutions() >= 2)
    other = next(f for f in _fillings(p) if f != p.ops)
    good = _text_of(p, other)
    bad = good.replace("# Answer", "").rstrip()  # no answer: not a verified solution
    texts = [good, bad, good]
    verdicts = [stepmath.verify(p, t) for t in texts]
    assert base_fillings(p, texts, verdicts) == [p.ops, other]


def _fillings(p):
    import itertools
    for fill in itertools.product(stepmath.OPS, repeat=len(p.free)):
        ops = list(p.ops)
        for k, op in zip(p.free, fill, strict=True):
            ops[k] = op
        if p.solves(ops):
            yield tuple(ops)


def _text_of(p, ops):
    v = [p.start]
    for op, b in zip(ops, p.operands, strict=True):
        v.append(stepmath.apply_op(v[-1], op, b, p.modulus))
    steps = [p.step_text(v[k], op, b, v[k + 1])
             for k, (op, b) in enumerate(zip(ops, p.operands, strict=True))]
    return ("\n\n".join(steps) + "\n\n# Answer\n\n"
            + stepmath.format_expression(p.start, ops, p.operands, spaced=False))


def test_augment_counts_follow_the_fraction():
    rng = np.random.default_rng(0)
    assert augment_counts([3, 5, 0], 0.0, rng) == [0, 0, 0]
    assert augment_counts([3, 5, 0], 2.0, rng) == [6, 10, 0]
    counts = augment_counts([4] * 2000, 0.3, rng)  # 1.2 per problem: 1 or 2
    assert set(counts) == {1, 2} and abs(np.mean(counts) - 1.2) < 0.05
    with pytest.raises(ValueError, match=">= 0"):
        augment_counts([1], -0.5, rng)


def test_every_augmented_record_carries_the_verifiers_labels_on_its_own_text(tok):
    problems = _easy_problems()
    sols = _solutions(tok, problems)
    made, stats = failure_solutions(problems, [3] * len(problems), tok,
                                    np.random.default_rng(1), samples=sols.texts,
                                    sample_verdicts=sols.verdicts)
    assert stats.made == stats.requested - stats.not_made and stats.made > 0.9 * stats.requested
    domain = StepMathDomain({}, "x", 0)
    records, _ = build_reward_records(made, domain, tok.token_bytes(), made.prompt_ids)
    assert len(records["prm"]) == stats.made
    by_uid = {p.uid: p for p in problems}
    tb = tok.token_bytes()
    delim = tok.piece_to_id("\n\n")
    for rec in records["prm"]:
        p = by_uid[rec["uid"]]
        tokens = list(rec["tokens"])
        assert tokens[:rec["response_start"]] == tok.encode(p.prompt, add_bos=True)
        text = b"".join(tb[t] for t in tokens[rec["response_start"]:]).decode()
        assert text not in sols.texts[problems.index(p)]  # new, not a labelled sample
        verdict = stepmath.verify(p, text)
        labels = list(verdict.step_labels)
        assert 0 in labels  # a failure of a step
        assert rec["step_labels"] == labels[:labels.index(0) + 1]  # PRM800K: up to the 1st error
        assert all(tokens[q] == delim for q in rec["step_end_positions"])
        assert rec["answer_label"] is None  # the answer is labelled only after all-right steps


def test_augment_records_use_only_the_supervised_levels_and_are_off_at_zero(tok):
    problems = _easy_problems()
    sols = _solutions(tok, problems)
    domain = StepMathDomain({}, "x", 0)
    base, _ = build_reward_records(sols, domain, tok.token_bytes(), sols.prompt_ids)
    same, rows = augment_records(base, sols, domain, tok, 0.0, after_first_error="drop", seed=0)
    assert same["prm"] == base["prm"] and same["orm"] == base["orm"]
    assert {r["metric"]: r["value"] for r in rows}["augment_made"] == 0

    more, rows = augment_records(base, sols, domain, tok, 1.0, after_first_error="drop", seed=0)
    row = {r["metric"]: r["value"] for r in rows}
    assert more["prm"][:len(base["prm"])] == base["prm"] and more["orm"] == base["orm"]
    extra = more["prm"][len(base["prm"]):]
    assert len(extra) == row["augment_prm_examples"] > 0.9 * len(base["prm"])
    assert {r["level"] for r in extra} <= set(EASY)
    assert {r["uid"] for r in extra} <= {p.uid for p in problems}
    assert len(more["oprm"]) == len(more["prm"]) + len(more["orm"])
    negatives = sum(r["step_labels"].count(0) for r in extra)
    assert negatives == len(extra)  # every corrupted record ends at its first wrong step
    again, _ = augment_records(base, sols, domain, tok, 1.0, after_first_error="drop", seed=0)
    assert [r["tokens"].tolist() for r in again["prm"]] == [r["tokens"].tolist()
                                                             for r in more["prm"]]


def test_validate_names_the_key():
    assert _demo().reward_models.augment_failures == 0.0  # off by default
    experiment.validate(_demo(augment_failures=0.5))
    for bad in (-1.0, "lots", True, float("nan")):
        with pytest.raises(experiment.ConfigError, match="reward_models.augment_failures"):
            experiment.validate(_demo(augment_failures=bad))
    with pytest.raises(experiment.ConfigError, match="augment_failures > 0 needs"):
        experiment.validate(_demo(augment_failures=1.0, label_source="prm800k"))


@pytest.mark.slow
def test_stage_adds_the_augmented_records_to_the_prm_data(tmp_path):
    """The reward_models stage at toy sizes with augment_failures=1: the PRM trains on the
    policy samples' records plus about as many corruptions, all of easy levels."""
    toy = {"stages": ("data", "sft", "reward_models"), "data.n_train": 300, "data.n_test": 20,
           "sft.steps": 30, "sft.checkpoint_every": 30, "reward_models.problems_per_level": 8,
           "reward_models.samples_per_problem": 4, "reward_models.train.steps": 6,
           "reward_models.train.checkpoint_every": 6, "reward_models.train.batch_size": 8}
    cfg = _demo(toy, augment_failures=1.0, evaluators=("prm", "oprm"))
    experiment.run(cfg, tmp_path / "run")
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["reward_models"]["rows"]
    value = {r["metric"]: r["value"] for r in rows if "level" not in r}
    real, extra = value["prm_examples"], value["augment_prm_examples"]
    assert extra > 0.8 * real and value["augment_made"] == extra
    assert value["prm_records"] == real + extra
    assert value["oprm_records"] == real + extra + value["orm_examples"]
    levels = {r["level"] for r in rows if r["metric"] == "oprm_records_of_level"}
    assert levels and levels <= set(EASY)
