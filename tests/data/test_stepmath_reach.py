"""The search ("reach") designs of stepmath: problems, levels, verifier, answers."""

import itertools

import numpy as np
import pytest

from scalign.data import stepmath
from scalign.data.domain import StepMathDomain

REACH = "reach4"


def _fillings(p):
    for fill in itertools.product(stepmath.OPS, repeat=len(p.free)):
        ops = list(p.ops)
        for k, op in zip(p.free, fill, strict=True):
            ops[k] = op
        yield tuple(ops)


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_reach_levels_keep_length_and_operands_and_grade_by_search(level):
    spec = stepmath.get_design(REACH).spec(level)
    for p in stepmath.generate(level, 40, seed=3, design=REACH):
        assert p.num_steps == 4 and len(p.free) == spec.free
        assert all(2 <= b <= 9 for b in p.operands) and p.modulus == 10
        # the level's number of solving fillings, counted by brute force
        n = sum(p.solves(ops) for ops in _fillings(p))
        assert spec.solutions[0] <= n <= spec.solutions[1]
        # the gold filling is the first solving one in + - * order, and it verifies
        assert p.ops == next(ops for ops in _fillings(p) if p.solves(ops))
        v = stepmath.verify(p, p.solution)
        assert v.all_steps_correct and v.outcome_correct and v.answer_label == 1
        assert stepmath.from_record(stepmath.to_record(p)) == p


def _problem():
    # Mod 10, reach 2: 4?7+6*7*2 -> only 4-7 (=7) then +6 *7 *2 reaches 2
    p = stepmath.parse_prompt(stepmath.PROMPT_TEMPLATE.format(
        question="Mod 10, reach 2: 4?7+6*7*2"), level=1)
    assert p.free == (0,) and p.target == 2 and p.num_solutions() == 1
    return p


def test_reach_step_labels_are_local_validity_and_first_error_is_reported():
    p = _problem()
    # a valid step that cannot reach the target is labelled 1 (PRM800K); the last step, whose
    # result is not the target, is the first error
    text = "4+7=1\n\n1+6=7\n\n7*7=9\n\n9*2=8\n\n# Answer\n\n4+7+6*7*2"
    v = stepmath.verify(p, text)
    assert v.step_labels == (1, 1, 1, 0)
    assert not v.outcome_correct and v.answer_label == 0
    assert v.error == stepmath.ERR_TARGET and v.first_error == 3
    # wrong arithmetic at step 2: labels 1, 0, 0, 0
    v = stepmath.verify(p, "4-7=7\n\n7+6=4\n\n4*7=8\n\n8*2=6\n\n# Answer\n\n4-7+6*7*2")
    assert v.step_labels == (1, 0, 0, 0) and v.error == stepmath.ERR_ARITHMETIC
    assert v.first_error == 1 and v.outcome_correct and v.answer_label == 0
    # a given operation changed: wrong operation
    v = stepmath.verify(p, "4-7=7\n\n7-6=1\n\n1*7=7\n\n7*2=4\n\n# Answer\n\n4-7-6*7*2")
    assert v.error == stepmath.ERR_OPERATION and v.first_error == 1
    # the running value follows the solver's own previous result
    v = stepmath.verify(p, "4*7=8\n\n8+6=4\n\n4*7=8\n\n8*2=6\n\n# Answer\n\n4*7+6*7*2")
    assert v.step_labels == (1, 1, 1, 0) and v.error == stepmath.ERR_TARGET
    # right steps, an answer that is not the steps' chain: the answer is the first error
    v = stepmath.verify(p, "4-7=7\n\n7+6=3\n\n3*7=1\n\n1*2=2\n\n# Answer\n\n4+7+6*7*2")
    assert v.step_labels == (1, 1, 1, 1) and v.error == "wrong_answer" and v.first_error == 4


def test_reach_answers_and_keys():
    p = _problem()
    assert stepmath.grade_answer(p, "4-7+6*7*2") and stepmath.grade_answer(p, "4 - 7 + 6*7*2")
    for bad in ("2", "4+7+6*7*2", "4-7-6*7*2", "4-7+6*7", "5-7+6*7*2", None, "x"):
        assert not stepmath.grade_answer(p, bad), bad
    dom = StepMathDomain({}, REACH, 0)
    assert dom.answer_key(" 4 - 7+6*7*2 ") == "4-7+6*7*2"
    assert dom.answer_key("7") == 7 and dom.answer_key("4-7+") is None


def test_reach_levels_are_disjoint_and_mixing_kinds_is_rejected():
    with pytest.raises(ValueError, match="both produce"):
        stepmath.Design("bad", {1: stepmath.ReachSpec(4, 2, (1, 3)),
                                2: stepmath.ReachSpec(4, 2, (3, 9))}, modulus=10)
    with pytest.raises(ValueError, match="mixes"):
        stepmath.Design("bad", {1: stepmath.ReachSpec(4, 1, (1, 3)),
                                2: stepmath.LevelSpec((4,), (0,))}, modulus=10)


def test_blind_prompt_hides_only_the_goal():
    p = _problem()
    assert p.blind_prompt == stepmath.PROMPT_TEMPLATE.format(question="Mod 10, reach ?: 4?7+6*7*2")
    # the rest of the record (the demonstration) is unchanged; chain problems have no goal
    chain = stepmath.generate(2, 1, seed=0, design="graded99")[0]
    assert chain.blind_prompt == chain.prompt
    dom = StepMathDomain.build([1, 2], n_train=5, n_test=2, seed=0, design=REACH)
    plain, blind = dom.train_records([1, 2]), dom.train_records([1, 2], blind=True)
    assert len(plain) == len(blind) == 10
    for r, b in zip(plain, blind, strict=True):
        assert b["prompt"] != r["prompt"] and {k: v for k, v in b.items() if k != "prompt"} == \
            {k: v for k, v in r.items() if k != "prompt"}
        assert b["prompt"] == stepmath.from_record(r).blind_prompt


def test_goal_spans_cover_exactly_the_last_result_and_leave_the_sft_loss():
    """`exclude_goal`: the last step's result (the target in every demonstration) is the only
    response text whose tokens get loss_mask 0; chain problems have no goal to leave out."""
    from scalign.data.pipeline import SftFeaturizer
    from scalign.data.tokenizer import Tokenizer

    for lv in (1, 3, 5):
        p = stepmath.generate(lv, 1, seed=2, design=REACH)[0]
        ((a, b),) = p.goal_spans
        assert p.solution[a:b] == str(p.target)
        assert p.solution[:b].endswith(p.steps[-1])
    spaced = stepmath.Problem(1, 4, ("+", "*"), (7, 6), modulus=10, spaced=True, target=6,
                              free=(0,))
    ((a, b),) = spaced.goal_spans
    assert spaced.solution[a:b] == "6" and spaced.solution[a - 2:a] == "= "
    assert stepmath.generate(2, 1, seed=0, design="graded99")[0].goal_spans == ()
    dom = StepMathDomain.build([1, 2], n_train=20, n_test=2, seed=0, design=REACH)
    plain, masked = dom.train_records([1, 2]), dom.train_records([1, 2], exclude_goal=True)
    tok = Tokenizer.train([r["prompt"] + r["response"] for r in plain], None, vocab_size=64,
                          user_defined_symbols=("\n\n",))
    feat = SftFeaturizer(tok)
    for r, m in zip(plain, masked, strict=True):
        assert {k: v for k, v in m.items() if k != "exclude_spans"} == r
        full, cut = feat(r), feat(m)
        np.testing.assert_array_equal(full["tokens"], cut["tokens"])
        dropped = np.flatnonzero(full["loss_mask"] != cut["loss_mask"])
        assert len(dropped) == 1 and full["loss_mask"][dropped[0]] == 1.0
        assert tok.id_to_piece(int(cut["tokens"][dropped[0]])).lstrip("\u2581") == str(
            stepmath.from_record(r).target)


def test_horizon_and_random_fill_rate_hand_counted():
    # 3+4?5*2?6 with target 0: "?" at positions 1 and 3, so the first choice looks 3 ops ahead.
    # Fillings: 7?5 gives 2 (+), 2 (-), 5 (*); *2 gives 4, 4, 0; then ?6 reaches 0 from 4 by +,
    # from 0 by * -> (+,+), (-,+), (*,*): 3 of the 9 fillings
    p = stepmath.Problem(1, 3, ("+", "+", "*", "+"), (4, 5, 2, 6), modulus=10, target=0,
                         free=(1, 3))
    assert p.horizon == 3
    assert p.random_fill_rate() == pytest.approx(3 / 9)
    last = stepmath.Problem(1, 3, ("+", "+", "*", "+"), (4, 5, 2, 6), modulus=10, target=0,
                            free=(3,))
    assert last.horizon == 1 and last.random_fill_rate() == pytest.approx(1 / 3)  # only +6
    with pytest.raises(ValueError, match="not a search problem"):
        _ = stepmath.Problem(1, 3, ("+",), (4,), modulus=10).horizon


def test_reach_spec_horizon_puts_the_choices_on_the_last_operations():
    # reach4h: easy levels are chains of 2 / 3 / 4 operations whose one "?" is the last
    # operation (horizon 1, a local choice); hard levels are 4 operations with 2 / 3 "?"
    # anywhere, so most of them must look 3-4 operations ahead
    design = stepmath.get_design("reach4h")
    for level, n_ops in ((1, 2), (2, 3), (3, 4)):
        problems = stepmath.generate(level, 200, seed=3, design=design)
        assert {len(p.ops) for p in problems} == {n_ops}
        assert {p.free for p in problems} == {(n_ops - 1,)}
        assert {p.horizon for p in problems} == {1}
    for level, free in ((4, 2), (5, 3)):
        problems = stepmath.generate(level, 300, seed=3, design=design)
        assert {len(p.ops) for p in problems} == {4} and {len(p.free) for p in problems} == {free}
        horizons = [p.horizon for p in problems]
        assert min(horizons) >= free and max(horizons) == 4
    # a spec's free positions stay inside its horizon; an impossible horizon is rejected
    spec = stepmath.ReachSpec(5, 2, (1, 9), horizon=3)
    d = stepmath.Design("h3", {1: spec}, modulus=10)
    assert all(min(p.free) >= 2 for p in stepmath.generate(1, 100, seed=0, design=d))
    # start x operands x C(3, 2) places x fixed ops x target (an upper bound)
    assert stepmath.num_distinct(1, d) == 10 * 8 ** 5 * 3 * 3 ** 3 * 10
    with pytest.raises(ValueError, match="horizon=1 must be in free=2"):
        stepmath.ReachSpec(4, 2, (1, 9), horizon=1)
    with pytest.raises(ValueError, match="horizon=5 must be in"):
        stepmath.ReachSpec(4, 1, (1, 3), horizon=5)
