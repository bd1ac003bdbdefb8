"""Reward labels: token positions, PRM/ORM/OPRM records, balancing, the easy-only guard."""

import numpy as np
import pytest

from scalign.algorithms.reward_labels import (
    assert_levels,
    balance_indices,
    build_reward_records,
    score_positions,
)
from scalign.data import stepmath
from scalign.data.domain import StepMathDomain
from scalign.data.tokenizer import Tokenizer
from scalign.evaluation.generation import Solutions


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    probs = [p for lv in (1, 2, 3) for p in stepmath.generate(lv, 200, seed=0)]
    return Tokenizer.train([p.prompt + p.solution for p in probs],
                           tmp_path_factory.mktemp("t") / "t.model", vocab_size=64,
                           user_defined_symbols=("\n\n",))


def _corrupt(problem, k):
    """The gold solution with step k's result changed (a wrong arithmetic step)."""
    steps = list(problem.steps)
    head, res = steps[k].rsplit("=", 1)
    steps[k] = f"{head}={(int(res) + 1) % 10}"
    return "\n\n".join(steps) + "\n\n# Answer\n\n" + problem.answer


def _solutions(tok, problems, texts_per_problem):
    domain = StepMathDomain({}, "x", 0)
    P, K = len(problems), len(texts_per_problem[0])
    ids = [[tok.encode(t) + [tok.eos_id] for t in row] for row in texts_per_problem]
    M = max(len(x) for row in ids for x in row)
    tokens = np.full((P, K, M), tok.pad_id, np.int32)
    lengths = np.zeros((P, K), np.int32)
    for i in range(P):
        for j in range(K):
            tokens[i, j, :len(ids[i][j])] = ids[i][j]
            lengths[i, j] = len(ids[i][j])
    verdicts = [[stepmath.verify(p, t) for t in row] for p, row in
                zip(problems, texts_per_problem, strict=True)]
    sols = Solutions(list(problems), texts_per_problem, verdicts,
                     [["eos"] * K for _ in range(P)], tokens, lengths,
                     [tok.encode(p.prompt, add_bos=True) for p in problems])
    return sols, domain


def test_positions_point_at_delimiters_and_answer(tok):
    p = stepmath.generate(3, 1, seed=1)[0]
    prompt = tok.encode(p.prompt, add_bos=True)
    resp = tok.encode(p.solution) + [tok.eos_id]
    pos = score_positions(tok.token_bytes(), prompt, resp, p.solution,
                          stepmath.split_solution(p.solution))
    assert len(pos.step_positions) == p.num_steps
    delim = tok.piece_to_id("\n\n")
    for q in pos.step_positions:
        assert pos.tokens[q] == delim
    # the answer token decodes to the answer's last character
    assert tok.decode([int(pos.tokens[pos.answer_position])]).endswith(p.answer[-1])
    assert pos.final_position == pos.answer_position


def test_each_evaluator_reads_its_solution_score_positions(tok):
    """ORM: the final read-out only; PRM and OPRM (one meaning): every step, then the answer."""
    p = stepmath.generate(3, 1, seed=1)[0]
    pos = score_positions(tok.token_bytes(), tok.encode(p.prompt, add_bos=True),
                          tok.encode(p.solution) + [tok.eos_id], p.solution,
                          stepmath.split_solution(p.solution))
    assert pos.reads("orm") == (pos.final_position,)
    want = (*pos.step_positions, pos.answer_position)
    assert len(want) == p.num_steps + 1
    assert pos.reads("prm") == want and pos.reads("oprm") == want
    # without an answer the steps alone; ORM falls back to the last token
    text = p.steps[0] + "\n\n" + p.steps[1]
    cut = score_positions(tok.token_bytes(), tok.encode(p.prompt, add_bos=True),
                          tok.encode(text), text, stepmath.split_solution(text))
    assert cut.answer_position is None
    assert cut.reads("oprm") == cut.step_positions and len(cut.step_positions) == 2
    assert cut.reads("orm") == (len(cut.tokens) - 1,)
    with pytest.raises(ValueError, match="evaluator kind"):
        pos.reads("bt")


def test_truncated_solution_reads_last_token(tok):
    p = stepmath.generate(2, 1, seed=2)[0]
    text = p.steps[0]  # one step, no delimiter, no answer
    pos = score_positions(tok.token_bytes(), tok.encode(p.prompt, add_bos=True),
                          tok.encode(text), text, stepmath.split_solution(text))
    assert pos.step_positions == (len(pos.tokens) - 1,)
    assert pos.answer_position is None and pos.final_position == len(pos.tokens) - 1


def test_records_follow_the_verifier(tok):
    problems = stepmath.generate(3, 4, seed=3)
    texts = [[p.solution, _corrupt(p, 0), _corrupt(p, 1), p.solution + ""] for p in problems]
    sols, domain = _solutions(tok, problems, texts)
    records, stats = build_reward_records(sols, domain, tok.token_bytes(), sols.prompt_ids,
                                          after_first_error="drop", max_ratio=3.0,
                                          keep_one_class=2, seed=0)
    assert stats.duplicates == 4  # the repeated gold solution
    prm = records["prm"]
    gold = [r for r in prm if all(r["step_labels"])]
    assert len(gold) == 4 and all(r["answer_label"] == 1 for r in gold)
    first_wrong = [r for r in prm if r["step_labels"] == [0]]
    second_wrong = [r for r in prm if r["step_labels"] == [1, 0]]
    assert len(first_wrong) == 4 and len(second_wrong) == 4  # labels stop at the first 0
    assert all(r["answer_position"] is None for r in first_wrong + second_wrong)
    # ORM: outcome = answer correct; corrupted steps keep the gold answer, so all positive here
    assert {r["outcome"] for r in records["orm"]} == {1}
    assert len(records["oprm"]) == len(prm) + len(records["orm"])
    assert {r["kind"] for r in records["oprm"]} == {"prm", "orm"}

    keep, _ = build_reward_records(sols, domain, tok.token_bytes(), sols.prompt_ids,
                                   after_first_error="keep", seed=0)
    # "keep": every step after the first error stays, labelled 0 (prefix correctness)
    lengths = {p.num_steps for p in problems}
    assert any(r["step_labels"] == [0] * len(r["step_labels"]) and len(r["step_labels"]) in lengths
               and len(r["step_labels"]) > 1 for r in keep["prm"])


def test_balance_within_ratio():
    rng = np.random.default_rng(0)
    kept, reason = balance_indices([True] * 10 + [False] * 2, max_ratio=3.0, keep_one_class=2,
                                   rng=rng)
    pos = sum(1 for i in kept if i < 10)
    neg = len(kept) - pos
    assert reason == "balance" and pos == 6 and neg == 2
    kept, reason = balance_indices([False] * 5, max_ratio=3.0, keep_one_class=2, rng=rng)
    assert reason == "one_class" and len(kept) == 2
    kept, reason = balance_indices([True, False, True], max_ratio=3.0, keep_one_class=2,
                                   rng=rng)
    assert reason is None and kept == [0, 1, 2]


def test_assert_levels_rejects_hard_labels():
    assert_levels([{"level": 1}, {"level": 3}], (1, 2, 3))
    with pytest.raises(AssertionError, match=r"levels \[4\]"):
        assert_levels([{"level": 1}, {"level": 4}], (1, 2, 3))
