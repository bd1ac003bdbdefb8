"""Goal layouts of the search designs: every step carries the goal, first ("reach4g":
"[7] 3+4=7") or as a distance step after it ("reach4c": "3+4=7, 7-7=0"), so the last step's
check against the goal needs nothing outside its own line."""

import collections

import numpy as np
import pytest

from scalign.algorithms import failure_augment
from scalign.data import stepmath

LAYOUT_OF = {"reach4g": "prefix", "reach4c": "check"}


def _problem(word):
    # Mod 10, <word> 2: 4?7+6*7*2 -> only 4-7 (=7) then +6 *7 *2 reaches 2
    p = stepmath.parse_prompt(stepmath.PROMPT_TEMPLATE.format(
        question=f"Mod 10, {word} 2: 4?7+6*7*2"), level=1)
    assert p.free == (0,) and p.target == 2
    return p


@pytest.mark.parametrize("design", sorted(LAYOUT_OF))
@pytest.mark.parametrize("level", [1, 3, 5])
def test_goal_designs_have_reach4_levels_and_carry_the_goal_in_every_step(design, level):
    d = stepmath.get_design(design)
    assert d.goal_layout == LAYOUT_OF[design] and d.search
    assert d.spec(level) == stepmath.get_design("reach4").spec(level)
    word = stepmath.GOAL_LAYOUTS[d.goal_layout]
    for p in stepmath.generate(level, 30, seed=1, design=design):
        assert p.goal_layout == d.goal_layout
        assert p.question.startswith(f"Mod 10, {word} {p.target}: ")
        for k, s in enumerate(p.steps):
            parsed = stepmath.parse_step(s)
            assert parsed.c == p.values[k + 1]
            if d.goal_layout == "prefix":
                assert s.startswith(f"[{p.target}] ") and parsed.goal == p.target
            else:
                assert parsed.check == (p.values[k + 1], p.target,
                                        (p.values[k + 1] - p.target) % 10)
        v = stepmath.verify(p, p.solution)
        assert v.all_steps_correct and v.answer_label == 1
        assert stepmath.from_record(stepmath.to_record(p)) == p
        # goal spans: the last result (and in "check" the last distance, always 0)
        spans = [p.solution[a:b] for a, b in p.goal_spans]
        assert spans == ([str(p.target)] if d.goal_layout == "prefix" else [str(p.target), "0"])
        assert p.solution[:p.goal_spans[-1][1]].endswith(p.steps[-1])
    # a different name draws different problems from the reach4 ones
    assert stepmath.generate(level, 1, seed=1, design=design)[0].pattern != \
        stepmath.generate(level, 1, seed=1, design="reach4")[0].pattern


def test_prefix_layout_labels_and_errors():
    p = _problem("goal")
    assert p.goal_layout == "prefix"
    assert p.solution.startswith("[2] 4-7=7\n\n[2] 7+6=3\n\n[2] 3*7=1\n\n[2] 1*2=2\n\n")
    # valid steps that miss the goal: the last one compares its result with its own "[2]"
    v = stepmath.verify(p, "[2] 4+7=1\n\n[2] 1+6=7\n\n[2] 7*7=9\n\n[2] 9*2=8\n\n# Answer\n\n"
                           "4+7+6*7*2")
    assert v.step_labels == (1, 1, 1, 0) and v.error == stepmath.ERR_TARGET
    # a wrong copy of the goal is the first error of its step, before the arithmetic
    v = stepmath.verify(p, "[2] 4-7=7\n\n[3] 7+6=3\n\n[2] 3*7=1\n\n[2] 1*2=2\n\n# Answer\n\n"
                           "4-7+6*7*2")
    assert v.step_labels == (1, 0, 0, 0) and v.error == stepmath.ERR_GOAL
    assert v.first_error == 1 and v.outcome_correct and v.answer_label == 0
    # a step without the goal is malformed in this layout
    v = stepmath.verify(p, "[2] 4-7=7\n\n7+6=3\n\n[2] 3*7=1\n\n[2] 1*2=2\n\n# Answer\n\n"
                           "4-7+6*7*2")
    assert v.error == stepmath.ERR_MALFORMED and v.first_error == 1
    assert stepmath.check_step(p, 0, "[ 2 ]4 - 7 = 8", 4) == stepmath.ERR_ARITHMETIC
    assert stepmath.parse_step("[2] 4-7=7") == stepmath.ParsedStep(4, "-", 7, 7, goal=2)
    assert p.step_text(4, "-", 7, 7) == "[2] 4-7=7"


def test_check_layout_labels_and_errors():
    p = _problem("target")
    assert p.goal_layout == "check"
    assert p.solution.startswith("4-7=7, 7-2=5\n\n7+6=3, 3-2=1\n\n3*7=1, 1-2=9\n\n1*2=2, 2-2=0\n\n")
    # valid steps that miss the goal: the last distance step is right but not 0
    text = "4+7=1, 1-2=9\n\n1+6=7, 7-2=5\n\n7*7=9, 9-2=7\n\n9*2=8, 8-2=6\n\n# Answer\n\n4+7+6*7*2"
    v = stepmath.verify(p, text)
    assert v.step_labels == (1, 1, 1, 0) and v.error == stepmath.ERR_TARGET
    # the distance step: wrong echo of the result, wrong goal, wrong subtraction
    assert stepmath.check_step(p, 0, "4-7=7, 6-2=4", 4) == stepmath.ERR_OPERAND
    assert stepmath.check_step(p, 0, "4-7=7, 7-3=4", 4) == stepmath.ERR_GOAL
    assert stepmath.check_step(p, 0, "4-7=7, 7-2=4", 4) == stepmath.ERR_ARITHMETIC
    assert stepmath.check_step(p, 0, "4 - 7 = 7 ,7 - 2 = 5", 4) is None
    # a last step that claims distance 0 without reaching the goal: wrong arithmetic first
    assert stepmath.check_step(p, 3, "9*2=8, 8-2=0", 9) == stepmath.ERR_ARITHMETIC
    # other layouts are malformed here, and this layout is malformed elsewhere
    for step in ("4-7=7", "[2] 4-7=7", "[2] 4-7=7, 7-2=5"):
        assert stepmath.check_step(p, 0, step, 4) == stepmath.ERR_MALFORMED, step
    plain, prefix = _problem("reach"), _problem("goal")
    assert plain.goal_layout == "" and plain.step_text(4, "-", 7, 7) == "4-7=7"
    assert stepmath.check_step(plain, 0, "4-7=7, 7-2=5", 4) == stepmath.ERR_MALFORMED
    assert stepmath.check_step(prefix, 0, "4-7=7, 7-2=5", 4) == stepmath.ERR_MALFORMED
    assert stepmath.check_step(plain, 0, "4-7=7", 4) is None
    assert stepmath.parse_step("4-7=7, 7-2=5") == stepmath.ParsedStep(4, "-", 7, 7,
                                                                     check=(7, 2, 5))


def test_goal_layouts_only_for_search():
    with pytest.raises(ValueError, match="goal_layout needs a search design"):
        stepmath.Design("bad", {1: stepmath.LevelSpec((4,), (0,))}, goal_layout="check")
    with pytest.raises(ValueError, match="unknown goal_layout"):
        stepmath.Design("bad", {1: stepmath.ReachSpec(4, 1, (1, 3))}, goal_layout="suffix")
    with pytest.raises(ValueError, match="goal_layout needs a search problem"):
        stepmath.Problem(1, 3, ("+",), (4,), goal_layout="prefix")
    # the blind prompt hides the goal in these layouts' questions too
    assert _problem("target").blind_prompt == stepmath.PROMPT_TEMPLATE.format(
        question="Mod 10, target ?: 4?7+6*7*2")


@pytest.mark.parametrize("design", sorted(LAYOUT_OF))
def test_failure_augment_writes_the_problems_layout(design):
    """Synthetic negatives keep the problem's goal layout, so the verifier judges their steps,
    never a missing goal."""
    rng = np.random.default_rng(0)
    errors = collections.Counter()
    for p in stepmath.generate(3, 20, seed=0, design=design):
        for kind in failure_augment.CORRUPTIONS:
            text = failure_augment.corrupt(p, p.ops, kind, rng)
            assert all(stepmath.parse_step(s).layout == p.goal_layout
                       for s in stepmath.split_solution(text).steps)
            errors[stepmath.verify(p, text).error] += 1
    assert stepmath.ERR_MALFORMED not in errors and errors[stepmath.ERR_ARITHMETIC] > 0


def test_goal_line_spans_cover_the_last_step_from_its_result_on():
    p = _problem("target")
    assert [p.solution[a:b] for a, b in p.goal_spans] == ["2", "0"]
    spans = p.goal_line_spans
    assert [p.solution[a:b] for a, b in spans] == ["2", "2", "2", "0"]
    assert p.solution[:spans[-1][1]].endswith(p.steps[-1])
    assert p.solution[spans[0][0]:spans[-1][1]] == "2, 2-2=0"
    plain = _problem("reach")
    assert plain.goal_line_spans == plain.goal_spans
    from scalign.data.domain import StepMathDomain

    dom = StepMathDomain.build([1], n_train=3, n_test=1, seed=0, design="reach4c")
    for r in dom.train_records([1], exclude_goal=True, goal_span="line"):
        assert [r["response"][a:b] for a, b in r["exclude_spans"]][-1] == "0"
        assert len(r["exclude_spans"]) == 4
    with pytest.raises(ValueError, match="goal_span"):
        dom.train_records([1], exclude_goal=True, goal_span="all")


def test_goal_copy_spans_add_the_last_steps_copy_of_the_goal_but_not_the_echo():
    p = _problem("target")
    last = p.steps[-1]  # "a op b=2, 2-2=0": result, echo, goal copy, distance
    start = p.solution.index(last)
    spans = p.goal_copy_spans
    assert [p.solution[a:b] for a, b in spans] == ["2", "2", "0"]
    # the result, the goal's copy after the "-" and the distance; the echo (before "-") stays in
    assert [a - start for a, _ in spans] == [last.index("=") + 1, last.rindex("-") + 1,
                                             last.rindex("=") + 1]
    prefix = _problem("goal")
    got = [(prefix.solution[a - 1], prefix.solution[a:b]) for a, b in prefix.goal_copy_spans]
    assert got == [("[", str(prefix.target)), ("=", str(prefix.target))]
    plain = _problem("reach")
    assert plain.goal_copy_spans == plain.goal_spans
    from scalign.data.domain import StepMathDomain

    dom = StepMathDomain.build([1], n_train=3, n_test=1, seed=0, design="reach4c")
    for r in dom.train_records([1], exclude_goal=True, goal_span="goal"):
        assert len(r["exclude_spans"]) == 3
        assert [r["response"][a:b] for a, b in r["exclude_spans"]][-1] == "0"


# ------------------------------------------------------------------ miss demonstrations
@pytest.mark.parametrize("word,tail", [("target", ["8, 8-2=6"]), ("goal", ["2", "8"]),
                                       ("reach", ["8"])])
def test_miss_demonstration_works_out_a_missing_filling_and_marks_only_its_check(word, tail):
    """4?7+6*7*2 with target 2: only "-" at the "?" reaches it; "+" ends at 8. The demonstration
    computes every step right, so the verifier fails it at the last step by the missed target,
    and its spans hold the last step from its result on (plus the goal's copy in "[2] ...")."""
    p = _problem(word)
    assert p.missed_fillings() == (("+", "+", "*", "*"), ("*", "+", "*", "*"))
    text, spans = p.miss_demonstration(("+", "+", "*", "*"))
    assert [text[a:b] for a, b in spans] == tail
    assert text.endswith("# Answer\n\n4+7+6*7*2")
    v = stepmath.verify(p, text)
    assert v.error == stepmath.ERR_TARGET and v.first_error == 3
    assert v.step_labels == (1, 1, 1, 0) and not v.outcome_correct
    with pytest.raises(ValueError, match="misses the target"):
        p.miss_demonstration(p.ops)  # the gold filling reaches it
    with pytest.raises(ValueError, match="misses the target"):
        p.miss_demonstration(("+", "-", "*", "*"))  # a given operation changed
    with pytest.raises(ValueError, match="misses the target"):
        p.miss_demonstration(("+", "+", "*", "*", "*"))  # one operation too many
    with pytest.raises(ValueError, match="not a search problem"):
        stepmath.Problem(1, 3, ("+",), (4,)).miss_demonstration(("+",))


def test_miss_records_are_deterministic_and_leave_only_the_check_in_the_loss():
    from scalign.data.domain import StepMathDomain
    from scalign.data.pipeline import SftFeaturizer
    from scalign.data.tokenizer import Tokenizer

    problems = stepmath.generate(3, 400, seed=0, design="reach4c")
    recs = stepmath.miss_records(problems, 0.25, seed=5)
    assert 60 <= len(recs) <= 140 and all(r["kind"] == "miss" for r in recs)
    # keyed by (seed, uid): the same records in any order of the problems, others by seed
    again = stepmath.miss_records(problems[::-1], 0.25, seed=5)
    assert sorted(r["response"] for r in again) == sorted(r["response"] for r in recs)
    assert {r["uid"] for r in stepmath.miss_records(problems, 0.25, seed=6)} != {
        r["uid"] for r in recs}
    assert stepmath.miss_records(problems, 0.0, seed=5) == []
    assert len(stepmath.miss_records(problems, 1.0, seed=5)) == sum(
        bool(p.missed_fillings()) for p in problems)
    with pytest.raises(ValueError, match="fraction"):
        stepmath.miss_records(problems, 1.5, seed=5)
    chains = stepmath.generate(1, 10, seed=0, design="graded99")
    assert stepmath.miss_records(chains, 1.0, seed=0) == []

    by_uid = {p.uid: p for p in problems}
    texts = [p.prompt + p.solution for p in problems]
    tok = Tokenizer.train(texts, None, vocab_size=64, model_type="char")
    featurize = SftFeaturizer(tok)
    for r in recs[:20]:
        p = by_uid[r["uid"]]
        assert r["prompt"] == p.prompt and stepmath.verify(p, r["response"]).error == \
            stepmath.ERR_TARGET
        ex = featurize(r)
        kept = ex["tokens"][ex["loss_mask"] > 0]
        assert kept[-1] == tok.eos_id
        learned = tok.decode([int(t) for t in kept[:-1]])
        last = stepmath.split_solution(r["response"]).steps[-1]
        assert learned == last[last.index("=") + 1:]  # "5, 5-2=3": result, echo, goal, distance
    dom = StepMathDomain.build([1, 2], n_train=50, n_test=1, seed=3, design="reach4c")
    gold = dom.train_records([1, 2], exclude_goal=True)
    mixed = dom.train_records([1, 2], exclude_goal=True, miss_fraction=0.5)
    assert mixed[:len(gold)] == gold and {r.get("kind") for r in mixed[len(gold):]} == {"miss"}
    assert mixed[len(gold):] == stepmath.miss_records(
        [p for lv in (1, 2) for p in dom.train_problems(lv)], 0.5, 3)
