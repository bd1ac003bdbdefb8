"""Tests for scalign.data.stepmath: generation, splits, formatting and the step verifier."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalign.data import stepmath as S

LEVELS = S.levels()


def _problem(ops="+*-", operands=(4, 7, 2), start=3, level=2, spaced=False) -> S.Problem:
    return S.Problem(level, start, tuple(ops), tuple(operands), modulus=10, spaced=spaced)


def _gold_with(problem: S.Problem, steps: list[str], answer: str | None) -> str:
    text = "\n\n".join(steps)
    if answer is not None:
        text += "\n\n# Answer\n\n" + answer
    return text


# ------------------------------------------------------------------------------ problems
def test_layout_is_prm800k():
    p = _problem()
    assert p.values == (3, 7, 9, 7)
    assert p.question == "Mod 10, left to right: 3+4*7-2"
    assert p.prompt == "# Question\n\nMod 10, left to right: 3+4*7-2\n\n# Solution\n\n"
    assert p.steps == ("3+4=7", "7*7=9", "9-2=7")
    assert p.solution == "3+4=7\n\n7*7=9\n\n9-2=7\n\n# Answer\n\n7"
    assert p.answer == "7" and p.level == 2 and p.num_steps == 3 and p.num_mul == 1
    spaced = _problem(spaced=True)
    assert spaced.question == "Mod 10, left to right: 3 + 4 * 7 - 2"
    assert spaced.steps == ("3 + 4 = 7", "7 * 7 = 9", "9 - 2 = 7")
    assert S.verify(spaced, p.solution).answer_label == 1  # spacing is not graded


def test_prime_modulus_and_parse_round_trip():
    p = S.Problem(1, 5, ("*", "-", "+"), (3, 6, 4), modulus=7)
    assert p.values == (5, 1, 2, 6) and p.question == "Mod 7, left to right: 5*3-6+4"
    assert S.parse_prompt(p.prompt, level=1) == p
    spaced = S.Problem(1, 5, ("*", "-", "+"), (3, 6, 4), modulus=7, spaced=True)
    assert S.parse_prompt(spaced.prompt, level=1) == spaced


def test_subtraction_wraps_modulo_10():
    assert S.apply_op(2, "-", 7, 10) == 5 and S.apply_op(9, "*", 9, 10) == 1
    assert S.apply_op(8, "+", 5, 10) == 3 and S.apply_op(2, "-", 6, 7) == 3


def test_record_round_trip_str_and_bytes():
    p = S.generate(4, 1, seed=3)[0]
    rec = S.to_record(p)
    assert set(rec) == {"prompt", "response", "level", "answer", "uid"}
    assert rec["prompt"] == p.prompt and rec["response"] == p.solution
    assert rec["level"] == 4 and rec["answer"] == p.answer and rec["uid"] == p.uid
    assert S.from_record(rec) == p
    as_bytes = {k: (v.encode() if isinstance(v, str) else v) for k, v in rec.items()}
    assert S.from_record(as_bytes) == p
    with pytest.raises(ValueError, match="not a stepmath"):
        S.parse_prompt("# Question\n\nWhat is 2 + 2?\n\n# Solution\n\n", level=1)


@pytest.mark.parametrize("design", sorted(n for n, d in S.DESIGNS.items() if d.kind == "chain"))
@pytest.mark.parametrize("level", LEVELS)
def test_levels_follow_their_spec(design, level):
    d = S.get_design(design)
    spec, m = d.spec(level), d.modulus
    for p in S.generate(level, 100, seed=0, design=design):
        assert (p.num_steps, p.num_mul, p.ops.count("-")) in spec.shapes()
        assert p.modulus == m and p.spaced == d.spaced and 0 <= p.start < m
        for op, b in zip(p.ops, p.operands, strict=True):
            assert (2 <= b < m) if op == "*" else (1 <= b < m)
            if op == "*" and spec.mul_operands is not None:
                assert b in spec.mul_operands
        assert S.verify(p, p.solution).answer_label == 1


def test_graded99_is_graded_by_operation_kind():
    by_level = {lv: S.generate(lv, 300, seed=0, design="graded99") for lv in LEVELS}
    assert all(p.num_steps == 4 and p.modulus == 7 for ps in by_level.values() for p in ps)
    assert all(set(p.ops) == {"+"} for p in by_level[1])
    assert all("-" in p.ops and "*" not in p.ops for p in by_level[2])
    mult3 = [b for p in by_level[3] for op, b in zip(p.ops, p.operands, strict=True) if op == "*"]
    assert len(mult3) == 300 and 0.01 < sum(b >= 4 for b in mult3) / 300 < 0.15  # 3 in 51
    for lv, m in ((4, 2), (5, 3)):
        assert all(p.num_mul == m for p in by_level[lv])
        assert {b for p in by_level[lv] for op, b in zip(p.ops, p.operands, strict=True)
                if op == "*"} == {4, 5, 6}


def test_generation_is_deterministic_and_prefix_stable():
    a = S.generate(3, 50, seed=7)
    assert a == S.generate(3, 50, seed=7)
    assert S.generate(3, 20, seed=7) == a[:20]
    assert a != S.generate(3, 50, seed=8)
    assert len({p.key for p in a}) == 50  # distinct within a call


# Pinned values: any change of the random stream (platform, Python or numpy version) fails here.
PINNED = {"graded": {1: "5+6+2+1+2", 2: "2-3+4-1-2", 3: "0+6+3*2+1", 4: "2-4+5*5*6",
                     5: "6*4+1*5*4"},
          "graded99": {1: "0+1+2+3+2", 2: "6-4-1-3-3", 3: "1-1+2-1*3", 4: "3+1*6*4-6",
                       5: "1+4*5*5*4"}}


PINNED_QUESTIONS = {"reach4": {1: "Mod 10, reach 7: 0*5*5?9*7", 2: "Mod 10, reach 4: 0?3+3*2?2",
                                3: "Mod 10, reach 6: 6*3?3*2?6", 4: "Mod 10, reach 6: 9?7*4?9?8",
                                5: "Mod 10, reach 7: 8?3?9?7?8"},
                    "reach4g": {1: "Mod 10, goal 5: 9-6?7*7-5", 2: "Mod 10, goal 2: 4*7?8+2?6",
                                3: "Mod 10, goal 6: 6?7?8*6+4", 4: "Mod 10, goal 2: 3-8?3?3?9",
                                5: "Mod 10, goal 8: 0?5?3?6?3"},
                    "reach4c": {1: "Mod 10, target 9: 8+3-4+9?7", 2: "Mod 10, target 2: 0?8-9?5+7",
                                3: "Mod 10, target 4: 2?3-2*2?8", 4: "Mod 10, target 1: 4?9?6-4?4",
                                5: "Mod 10, target 9: 3?2?5?4?6"},
                    "reach4h": {1: "Mod 10, target 7: 4-6?9", 2: "Mod 10, target 2: 1-9*3?4",
                                3: "Mod 10, target 2: 1*4+4+4?6", 4: "Mod 10, target 8: 5*8?7+3?8",
                                5: "Mod 10, target 0: 8?6-5?7?5"}}


@pytest.mark.parametrize("design", sorted(PINNED))
def test_generation_matches_pinned_stream(design):
    got = {lv: S.generate(lv, 1, seed=123, design=design)[0].expression for lv in LEVELS}
    assert got == PINNED[design]
    assert S.DEFAULT_DESIGN in {**PINNED, **PINNED_QUESTIONS}


@pytest.mark.parametrize("design", sorted(PINNED_QUESTIONS))
def test_search_generation_matches_pinned_stream(design):
    got = {lv: S.generate(lv, 1, seed=123, design=design)[0].question for lv in LEVELS}
    assert got == PINNED_QUESTIONS[design]


def test_generation_is_identical_in_a_fresh_process():
    code = ("from scalign.data import stepmath as S;"
            "print('|'.join(p.uid for lv in S.levels() for p in S.generate(lv, 5, seed=11)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here = "|".join(p.uid for lv in LEVELS for p in S.generate(lv, 5, seed=11))
    assert out.stdout.strip() == here


def test_num_distinct_is_exact_on_a_small_design():
    design = S.Design("one_op", {1: S.LevelSpec((1,), (0, 1))}, modulus=10)
    # start 0..9 x (+/- with 1..9, or * with 2..9) = 10 * (18 + 8)
    assert S.num_distinct(1, design) == 260
    problems = S.generate(1, 260, seed=0, design=design)
    assert len({p.key for p in problems}) == 260
    with pytest.raises(ValueError, match="only 260 distinct"):
        S.generate(1, 261, seed=0, design=design)


def test_num_distinct_counts_weighted_multipliers_and_fixed_subtractions():
    design = S.Design("tiny", {1: S.LevelSpec((2,), (1,), (0,), (2, 2, 5))}, modulus=7)
    # 7 starts x 2 positions for the * x 2 distinct multipliers x 6 addends
    assert S.num_distinct(1, design) == 168
    assert len({p.key for p in S.generate(1, 168, seed=0, design=design)}) == 168
    with pytest.raises(ValueError, match="only 168 distinct"):
        S.generate(1, 169, seed=0, design=design)


def test_design_rejects_levels_that_share_a_shape():
    with pytest.raises(ValueError, match="levels 1 and 2"):
        S.Design("bad", {1: S.LevelSpec((3,), (0, 1)), 2: S.LevelSpec((3,), (1, 2))})
    S.Design("ok", {1: S.LevelSpec((3,), (0,), (0,)), 2: S.LevelSpec((3,), (0,), (1, 2, 3))})
    with pytest.raises(ValueError, match="levels 1 and 2"):
        S.Design("bad", {1: S.LevelSpec((3,), (0,), (0, 1)), 2: S.LevelSpec((3,), (0,), (1,))})
    with pytest.raises(ValueError, match="unknown stepmath design"):
        S.generate(1, 1, seed=0, design="nope")
    with pytest.raises(ValueError, match="no level 6"):
        S.generate(6, 1, seed=0)


# ------------------------------------------------------------------------------ splits
def test_splits_have_no_overlap_within_or_across_levels():
    spl = S.splits(LEVELS, n_train=300, n_test=100, seed=0)
    seen: dict[str, tuple[int, str]] = {}
    for lv, sp in spl.items():
        assert sp.level == lv and len(sp.train) == 300 and len(sp.test) == 100
        assert all(p.level == lv for p in sp.train + sp.test)
        for part, problems in (("train", sp.train), ("test", sp.test)):
            for p in problems:
                assert p.key not in seen, f"{p.key} in {seen.get(p.key)} and {(lv, part)}"
                seen[p.key] = (lv, part)


def test_split_test_set_does_not_depend_on_train_size_or_other_levels():
    small = S.splits([4], n_train=10, n_test=50, seed=5)
    big = S.splits([1, 4], n_train={1: 0, 4: 500}, n_test=50, seed=5)
    assert small[4].test == big[4].test
    assert big[4].train[:10] == small[4].train
    assert big[1].train == ()
    assert S.splits([4], n_train=10, n_test=50, seed=6)[4].test != small[4].test


def test_splits_refuse_more_than_the_level_has():
    design = S.Design("one_op", {1: S.LevelSpec((1,), (0,))}, modulus=10)
    with pytest.raises(ValueError, match="level 1 .* fewer than n_train \\+ n_test = 200"):
        S.splits([1], n_train=150, n_test=50, seed=0, design=design)


# ------------------------------------------------------------------------------ verifier
@pytest.mark.parametrize("level", LEVELS)
def test_gold_solutions_verify(level):
    for p in S.generate(level, 100, seed=1):
        v = S.verify(p, p.solution)
        assert v.step_labels == (1,) * p.num_steps
        assert v.outcome_correct and v.answer_label == 1 and v.all_steps_correct
        assert v.first_error is None and v.error is None and v.answer == p.answer
        assert S.verify(p, p.prompt + p.solution) == v  # prompt echoed in front


def _inject(p: S.Problem, k: int, kind: str) -> list[str]:
    """Gold steps with step k corrupted; later steps continue consistently from the error."""
    m = p.modulus

    def step(a: int, op: str, b: int, c: int) -> str:
        return p.step_text(a, op, b, c)

    steps = list(p.steps[:k])
    a, op, b = p.values[k], p.ops[k], p.operands[k]
    if kind == "arithmetic":
        c = (S.apply_op(a, op, b, m) + 1) % m
    elif kind == "operand":
        a = (a + 1) % m
        c = S.apply_op(a, op, b, m)
    else:  # operation: a different operand (stays in the operand's range)
        b = b + 1 if b < m - 1 else b - 1
        c = S.apply_op(a, op, b, m)
    steps.append(step(a, op, b, c))
    for op2, b2 in zip(p.ops[k + 1:], p.operands[k + 1:], strict=True):
        nxt = S.apply_op(c, op2, b2, m)
        steps.append(step(c, op2, b2, nxt))
        c = nxt
    return steps


@pytest.mark.parametrize("kind,err", [("arithmetic", S.ERR_ARITHMETIC),
                                      ("operand", S.ERR_OPERAND),
                                      ("operation", S.ERR_OPERATION)])
def test_injected_wrong_step_at_each_position(kind, err):
    for p in S.generate(4, 20, seed=2):
        for k in range(p.num_steps):
            steps = _inject(p, k, kind)
            v = S.verify(p, _gold_with(p, steps, steps[-1].split("=")[-1].strip()))
            assert v.step_labels == (1,) * k + (0,) * (p.num_steps - k), (p, k, steps)
            assert v.first_error == k and v.error == err
            assert v.answer_label == 0


def test_wrong_final_answer():
    p = _problem()
    v = S.verify(p, _gold_with(p, list(p.steps), "8"))
    assert v.step_labels == (1, 1, 1) and not v.outcome_correct and v.answer == "8"
    assert v.error == "wrong_answer" and v.first_error == 3 and v.answer_label == 0


def test_right_answer_after_a_wrong_step_counts_as_outcome_correct():
    p = _problem()
    steps = ["3+4=7", "7*7=3", "9-2=7"]  # step 2 wrong, step 3 ignores it
    v = S.verify(p, _gold_with(p, steps, "7"))
    assert v.step_labels == (1, 0, 0) and v.outcome_correct and v.answer_label == 0
    assert v.error == S.ERR_ARITHMETIC


def test_missing_answer_section():
    p = _problem()
    v = S.verify(p, "\n\n".join(p.steps))
    assert v.step_labels == (1, 1, 1) and v.answer is None and not v.outcome_correct
    assert v.error == "no_answer" and v.answer_label == 0
    v = S.verify(p, "\n\n".join(p.steps) + "\n\n# Answer\n\n")
    assert v.answer == "" and not v.outcome_correct


def test_incomplete_and_extra_steps():
    p = _problem()
    v = S.verify(p, _gold_with(p, list(p.steps[:2]), "9"))
    assert v.step_labels == (1, 1) and v.error == S.ERR_INCOMPLETE and v.first_error == 2
    assert not v.outcome_correct and v.answer_label == 0
    v = S.verify(p, _gold_with(p, [*p.steps, "7+1=8"], "8"))
    assert v.step_labels == (1, 1, 1, 0) and v.error == S.ERR_EXTRA and v.first_error == 3


def test_lenient_step_spelling():
    p = _problem()
    v = S.verify(p, "3+4=7\n\n7 × 7 = 9\n\n  9 − 2 =7 \n\n# Answer:\n\n 7 ")
    assert v.step_labels == (1, 1, 1) and v.outcome_correct and v.answer_label == 1


def test_truncated_gold_text_at_every_cut():
    p = S.generate(5, 1, seed=4)[0]
    text = p.solution
    for cut in range(len(text) + 1):
        v = S.verify(p, text[:cut])
        labels = list(v.step_labels)
        assert labels == sorted(labels, reverse=True)  # 1s then 0s
        assert v.outcome_correct == (cut == len(text))
        assert len(labels) <= p.num_steps + 1  # a cut "# Ans" header is an extra (bad) step


@pytest.mark.parametrize("text", ["", "hello world", "\n\n\n\n", "# Answer", "# Answer\n\n",
                                  "= = =\n\n+ + +", "3 + 4 = \n\n", "9" * 10_000,
                                  "3 + 4 = 7" + "\n\n7 * 7 = 9" * 500, "\x00\ufffd\U0001f600",
                                  "99999999999999999999 + 1 = 0"])
def test_garbage_never_raises(text):
    p = _problem()
    v = S.verify(p, text)
    assert not v.outcome_correct and v.answer_label == 0
    assert set(v.step_labels) <= {0, 1}
    assert S.verify(p, text.encode("utf-8")) == v


def test_garbage_step_is_malformed_and_zeroes_the_rest():
    p = _problem()
    v = S.verify(p, _gold_with(p, ["3+4=7", "the answer is 9", "9-2=7"], "7"))
    assert v.step_labels == (1, 0, 0) and v.error == S.ERR_MALFORMED and v.first_error == 1
    assert S.verify(p, b"3 + 4 = 7\n\n\xff\xfe").step_labels == (1, 0)


def test_split_solution_offsets_point_at_step_ends():
    p = _problem()
    text = p.solution + "\n\nextra text after the answer"
    parsed = S.split_solution(text)
    assert parsed.steps == p.steps and parsed.answer == "7"
    for step, end in zip(parsed.steps, parsed.step_ends, strict=True):
        assert text[:end].endswith(step)
    assert text[:parsed.answer_end].endswith("# Answer\n\n7")


# ------------------------------------------------------------------------------ properties
def _check_verdict(p: S.Problem, v: S.Verdict) -> None:
    labels = list(v.step_labels)
    assert set(labels) <= {0, 1} and labels == sorted(labels, reverse=True)
    assert v.answer_label in (0, 1) and isinstance(v.outcome_correct, bool)
    assert v.answer_label == 0 or (v.outcome_correct and all(labels))
    assert v.first_error is None or 0 <= v.first_error <= len(labels)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789+-*= #Answer\n\t×−x")), max_size=200))
def test_random_domain_text_never_raises(text):
    p = _problem()
    _check_verdict(p, S.verify(p, text))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_random_unicode_never_raises(text):
    p = _problem()
    _check_verdict(p, S.verify(p, text))


@settings(max_examples=200, deadline=None)
@given(level=st.sampled_from(LEVELS), seed=st.integers(0, 10_000), data=st.data())
def test_truncated_or_mutated_gold_never_raises(level, seed, data):
    p = S.generate(level, 1, seed=seed)[0]
    text = p.solution
    cut = data.draw(st.integers(0, len(text)))
    _check_verdict(p, S.verify(p, text[:cut]))
    pos = data.draw(st.integers(0, len(text)))
    junk = data.draw(st.text(max_size=5))
    mutated = text[:pos] + junk + text[pos:]
    v = S.verify(p, mutated)
    _check_verdict(p, v)
    if not junk:
        assert v.answer_label == 1
