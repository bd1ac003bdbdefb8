"""MathDomain: MATH files -> levels, PRM800K-layout prompts/demonstrations, answer grading."""

from __future__ import annotations

import json

import pytest

from scalign.data import stepmath
from scalign.data.domain import (
    MathDomain,
    StepMathDomain,
    format_solution,
    load_domain,
    math_spans,
    solution_steps,
    unbox,
)
from scalign.data.records import DataError

TRAIN = [
    {"problem": "What is $2+3$?", "level": "Level 1", "type": "Prealgebra",
     "solution": r"We add: $2+3=5$. So the answer is $\boxed{5}$."},
    {"problem": "What is $4+4$?", "level": "Level 1", "type": "Prealgebra",
     "solution": r"Adding gives $\boxed{8}$."},
    {"problem": r"Simplify $\frac{6}{8}$.", "level": "Level 2", "type": "Prealgebra",
     "solution": r"Divide the numerator and the denominator by 2. We get $\boxed{\frac34}$."},
    {"problem": "Solve $2x+1=7$.", "level": "Level 3", "type": "Algebra",
     "solution": "Subtract 1 from both sides: $2x=6$.\n\nDivide by 2: $x=\\boxed{3}$."},
    {"problem": r"Compute $\sqrt{144}$.", "level": "Level 4", "type": "Algebra",
     "solution": r"Since $12^2=144$, $\sqrt{144}=\boxed{12}$."},
    # the same text as a test problem: must be dropped from train
    {"problem": "What is $1+1$?", "level": "Level 1", "type": "Prealgebra",
     "solution": r"It is $\boxed{2}$."},
]
TEST = [
    {"problem": "What is $1+1$?", "solution": r"It is $\boxed{2}$.", "answer": "2",
     "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"},
    {"problem": "Find the sum of the roots of $x^2-5x+6=0$.",
     "solution": r"By Vieta's formulas the sum is $\boxed{5}$.", "answer": "5",
     "subject": "Algebra", "level": 5, "unique_id": "test/algebra/9.json"},
    {"problem": r"Write $0.5$ as a fraction.", "solution": r"It is $\boxed{\frac{1}{2}}$.",
     "answer": r"\frac{1}{2}", "subject": "Prealgebra", "level": 2,
     "unique_id": "test/prealgebra/3.json"},
]


def write_jsonl(path, records):
    path.write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n"
                            for r in records))
    return path


@pytest.fixture
def files(tmp_path):
    return (write_jsonl(tmp_path / "train.jsonl", TRAIN),
            write_jsonl(tmp_path / "test.jsonl", TEST))


def test_solution_steps_cut_sentences_outside_math_and_unbox():
    sol = ("We have $x^2 = 4.$ So $x = \\pm 2$. Note that e.g. 3.5 stays whole. "
           "The answer is $\\boxed{\\frac{1}{2}}$.\n\nAlso \\[\na = 1.\n\nB = 2.\n\\] Then done!")
    assert solution_steps(sol) == [
        "We have $x^2 = 4.$", "So $x = \\pm 2$.", "Note that e.g. 3.5 stays whole.",
        "The answer is $\\frac{1}{2}$.", "Also \\[\na = 1.\nB = 2.\n\\]", "Then done!"]
    assert unbox(r"\boxed{\boxed{3}} and \fbox{x} and \boxed 5 and \boxed{oops") == \
        r"3 and x and 5 and \boxed{oops"
    text = r"a $b. C$ d \[e\] f \begin{align}g\end{align} \$ h"
    assert [text[a:b] for a, b in math_spans(text)] == [
        "$b. C$", r"\[e\]", r"\begin{align}g\end{align}"]


def test_format_solution_round_trips_through_the_parser():
    steps = solution_steps(TRAIN[3]["solution"])
    text = format_solution(steps, "3")
    assert text == ("Subtract 1 from both sides: $2x=6$.\n\nDivide by 2: $x=3$.\n\n"
                    "# Answer\n\n3")
    parsed = stepmath.split_solution(text)
    assert list(parsed.steps) == steps and parsed.answer == "3"


def test_build_levels_caps_overlap_and_records(files):
    train, test = files
    d = MathDomain.build(str(train), [str(test)], (1, 2, 3, 5))
    assert d.levels == (1, 2, 3, 5)
    assert [p.problem for p in d.train_problems(1)] == ["What is $2+3$?", "What is $4+4$?"]
    assert d.info["train"]["dropped_test_overlap"] == 1  # "What is $1+1$?" is a test problem
    assert d.info["train"]["read"] == len(TRAIN)
    assert [p.uid for p in d.test_problems(5)] == ["test/algebra/9.json"]
    assert d.train_problems(5) == () and d.test_problems(3) == ()
    with pytest.raises(KeyError, match="no level 4"):
        d.train_problems(4)
    capped = MathDomain.build(str(train), str(test), (1, 2), n_train={1: 1}, n_test=0)
    assert len(capped.train_problems(1)) == 1 and len(capped.train_problems(2)) == 1
    assert capped.test_problems(1) == ()
    rec = d.train_records((1,))[0]
    assert rec["prompt"] == "# Question\n\nWhat is $2+3$?\n\n# Solution\n\n"
    assert rec["response"] == ("We add: $2+3=5$.\n\nSo the answer is $5$.\n\n# Answer\n\n5")
    assert rec["level"] == 1 and rec["answer"] == "5"
    assert d.split_of("  What is $1+1$? ") == "test" and d.split_of("What is $4+4$?") == "train"
    assert d.split_of("unknown") is None and d.reference("What is $1+1$?") is None
    assert d.reference("What is $4+4$?").answer == "8"
    assert d.level_index() == {"What is $2+3$?": 1, "What is $4+4$?": 1,
                               r"Simplify $\frac{6}{8}$.": 2, "Solve $2x+1=7$.": 3}


def test_bad_records_raise_or_are_counted(tmp_path, files):
    _, test = files
    bad = write_jsonl(tmp_path / "bad.jsonl", [*TRAIN[:2], {**TRAIN[2], "level": "Level ?"},
                                               "{not json"])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: key 'level'"):
        MathDomain.build(str(bad), str(test), (1, 2))
    d = MathDomain.build(str(bad), str(test), (1, 2), on_error="skip")
    assert d.info["train"]["skipped"] == 2 and len(d.train_problems(1)) == 2
    assert d.info["train"]["reasons"] == {"bad_level": 1, "bad_json": 1}


def test_verify_grades_answers_and_gives_no_step_labels(files):
    train, test = files
    d = MathDomain.build(str(train), str(test), (1, 2, 5))
    half = d.test_problems(2)[0]
    good = d.verify(half, "Halve it.\n\n# Answer\n\n\\frac12")
    assert good.outcome_correct and good.answer == "\\frac12" and good.answer_label == 1
    assert good.step_labels == () and good.first_error is None and good.error is None
    assert good.num_expected_steps == 0
    assert d.verify(half, "It is $\\boxed{1/2}$.").outcome_correct  # no answer section: box
    assert d.verify(half, d.prompt(half) + "x\n\n# Answer\n\n0.5").outcome_correct  # numeric
    wrong = d.verify(half, "# Answer\n\n3")
    assert not wrong.outcome_correct and wrong.error == "wrong_answer" and wrong.first_error == 0
    none = d.verify(half, "I do not know")
    assert none.answer is None and none.error == "no_answer" and not none.outcome_correct
    assert d.verify(half, b"# Answer\n\n\\dfrac{1}{2}").outcome_correct
    parsed = d.parse("a\n\nb\n\n# Answer\n\n7")
    assert parsed.steps == ("a", "b") and parsed.answer == "7"


def test_answer_key_groups_equivalent_forms():
    d = MathDomain({1: ()}, {1: ()})
    assert d.answer_key("\\dfrac12") == d.answer_key("1/2") == d.answer_key("\\frac{1}{2}")
    assert d.answer_key("x = 5") == d.answer_key("5") == d.answer_key("5.")
    assert d.answer_key("5") != d.answer_key("6")
    assert d.answer_key(None) is None and d.answer_key("  ") is None


def test_save_load_round_trip(tmp_path, files):
    train, test = files
    d = MathDomain.build(str(train), str(test), (1, 2, 3, 4, 5), timeout_s=1.5)
    d.save(tmp_path / "domain")
    back = load_domain(tmp_path / "domain")
    assert isinstance(back, MathDomain)
    assert back.train == d.train and back.test == d.test and back.info == d.info
    assert back.timeout_s == 1.5 and back.levels == d.levels
    step = StepMathDomain.build((1,), 2, 1, seed=0)
    step.save(tmp_path / "step")
    assert isinstance(load_domain(tmp_path / "step"), StepMathDomain)
    (tmp_path / "domain" / "train.jsonl").write_text('{"uid": "x"}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:1"):
        MathDomain.load(tmp_path / "domain")
