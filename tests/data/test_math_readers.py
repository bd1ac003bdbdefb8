"""Tests for scalign.data.math (MATH / MATH500 / PRM800K readers) and scalign.data.records."""

from __future__ import annotations

import json
import re

import pytest

from scalign.data.math import (
    MathProblem,
    StepLabelledSolution,
    level_index,
    parse_level,
    read_math,
    read_prm800k,
    split_by_level,
)
from scalign.data.records import DataError, ReadStats, read_jsonl

# ------------------------------------------------------------------------------------------
# Fixture writers
# ------------------------------------------------------------------------------------------


def write_jsonl(path, lines):
    """Writes dicts as JSON lines and strings verbatim (for broken lines)."""
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


def math_record(problem="What is $1+1$?", level="Level 1", type_="Algebra",
                solution=r"It is $\boxed{2}$."):
    return {"problem": problem, "level": level, "type": type_, "solution": solution}


@pytest.fixture
def math_tree(tmp_path):
    root = tmp_path / "MATH"
    files = {
        "train/algebra/1.json": math_record(),
        "train/geometry/12.json": math_record(
            "Area of a unit square?", "Level 3", "Geometry", r"Area $=\boxed{1}$ square unit."),
        "test/algebra/7.json": math_record(
            "Solve $x^2=4$, $x>0$.", "Level 5", "Algebra", r"So $x=\boxed{\frac{4}{2}}$."),
    }
    for rel, record in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(record))
    return root


def prm_step(*completions, chosen=0, human=None):
    return {
        "completions": [{"text": t, "rating": r, "flagged": None} for t, r in completions],
        "human_completion": human,
        "chosen_completion": chosen,
    }


def prm_record(problem, steps, finish_reason="solution", answer="5", **question_extra):
    return {
        "labeler": "x", "timestamp": "2023-01-01T00:00:00", "generation": 1,
        "question": {"problem": problem, "ground_truth_answer": answer, **question_extra},
        "label": {"steps": steps, "total_time": 1000, "finish_reason": finish_reason},
    }


PHASE2_FOUND_ERROR = prm_record(
    "What is $2+3$?",
    [
        prm_step(("I add the numbers.", 1)),
        prm_step(("This is a neutral step.", 0)),
        prm_step(("So $2+3=6$.", -1), chosen=None),  # phase 2: error step, no chosen index
        prm_step(("Never reached.", 1)),
    ],
    finish_reason="found_error",
)
PHASE1_HUMAN = prm_record(
    "What is $1+1$?",
    [
        prm_step(("Bad start.", -1), ("Good start.", 1), ("Meh.", 0), chosen=1),
        prm_step(("Wrong a.", -1), ("Wrong b.", -1), chosen=None,
                 human={"text": "Human step.", "rating": None, "source": "human"}),
        prm_step(("# Answer\n\n2", 0)),
    ],
    answer="2",
)
NO_CHOICE = prm_record(
    "What is $1+1$?",
    [prm_step(("Fine.", 1)), prm_step(("Alt a.", 0), ("Alt b.", -1), chosen=None)],
    finish_reason="give_up",
)
UNRATED = prm_record("Unrated?", [prm_step(("Rated.", 1)), prm_step(("Unrated.", None))])
EMPTY = prm_record("Bad problem?", [], finish_reason="bad_problem")


# ------------------------------------------------------------------------------------------
# MATH
# ------------------------------------------------------------------------------------------


def test_read_math_directory_tree(math_tree):
    items, stats = read_math(math_tree)
    assert stats == ReadStats(read=3, skipped=0, reasons={})
    assert [p.uid for p in items] == [
        "test/algebra/7.json", "train/algebra/1.json", "train/geometry/12.json"]
    first = items[0]
    assert isinstance(first, MathProblem)
    assert (first.level, first.subject, first.answer) == (5, "Algebra", r"\frac{4}{2}")
    assert items[2].answer == "1" and items[2].level == 3
    with pytest.raises(AttributeError):  # frozen
        first.level = 1  # type: ignore[misc]


def test_read_math_split_subdirectory_keeps_layout_uids(math_tree):
    items, _ = read_math(math_tree / "train")
    assert [p.uid for p in items] == ["train/algebra/1.json", "train/geometry/12.json"]


def test_read_math_jsonl_and_math500(tmp_path):
    math_jsonl = write_jsonl(tmp_path / "train.jsonl", [math_record(level="Level 2"), ""])
    math500 = write_jsonl(tmp_path / "test.jsonl", [{
        "problem": "Compute $3 \\cdot 4$.", "solution": r"$3 \cdot 4 = \boxed{12}$",
        "answer": "12", "subject": "Prealgebra", "level": 1,
        "unique_id": "test/prealgebra/1.json",
    }])
    result = read_math([math_jsonl, math500])
    assert result.stats.read == 2 and result.stats.skipped == 0
    a, b = result.items
    assert (a.uid, a.level, a.answer, a.subject) == ("train.jsonl:1", 2, "2", "Algebra")
    assert (b.uid, b.level, b.answer, b.subject) == ("test/prealgebra/1.json", 1, "12",
                                                     "Prealgebra")


def test_given_answer_wins_over_boxed(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {**math_record(solution=r"\boxed{4/2}"), "answer": "2"},
        {**math_record(solution=r"\boxed{4/2}"), "answer": ""},
    ])
    items, _ = read_math(path)
    assert [i.answer for i in items] == ["2", "4/2"]  # an empty answer falls back to the box


BAD_MATH_LINES = [
    math_record(),                                           # 1 ok
    '{"problem": "broken", ',                                # 2 bad_json
    {k: v for k, v in math_record().items() if k != "solution"},  # 3 missing_key solution
    math_record(level=["Level 2"]),                          # 4 wrong_type level
    math_record(level="Level ?"),                            # 5 bad_level
    math_record(level=7),                                    # 6 bad_level
    math_record(solution="No box here."),                    # 7 no_answer
    "[1, 2]",                                                # 8 wrong_type (not an object)
    math_record(problem=3),                                  # 9 wrong_type problem
    math_record(level=True),                                 # 10 wrong_type (bool is not int)
    math_record(level="Level 4"),                            # 11 ok
]


@pytest.mark.parametrize("line,key,reason,text", [
    (2, None, "bad_json", "invalid JSON"),
    (3, "solution", "missing_key", "missing"),
    (4, "level", "wrong_type", "expected int or str, got list"),
    (5, "level", "bad_level", "'Level ?'"),
    (6, "level", "bad_level", "7"),
    (7, "solution", "no_answer", "no 'answer' key"),
    (8, None, "wrong_type", "expected object, got list"),
    (9, "problem", "wrong_type", "expected str, got int"),
    (10, "level", "wrong_type", "got bool"),
])
def test_read_math_errors_name_file_line_and_key(tmp_path, line, key, reason, text):
    lines = [math_record()] * (line - 1) + [BAD_MATH_LINES[line - 1]]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as info:
        read_math(path)
    err = info.value
    assert (err.where.path, err.where.line, err.key, err.reason) == (str(path), line, key, reason)
    message = str(err)
    assert message.startswith(f"{path}:{line}: ")
    if key:
        assert f"key {key!r}" in message
    assert text in message


def test_read_math_skip_counts_every_bad_record(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_MATH_LINES)
    items, stats = read_math(path, on_error="skip")
    assert [p.uid for p in items] == ["bad.jsonl:1", "bad.jsonl:11"]
    assert stats.read == 2 and stats.skipped == 9
    assert stats.reasons == {"bad_json": 1, "missing_key": 1, "wrong_type": 4, "bad_level": 2,
                             "no_answer": 1}
    assert stats.read + stats.skipped == len(BAD_MATH_LINES)


def test_read_math_directory_errors_name_the_file(math_tree):
    bad = math_tree / "train" / "algebra" / "2.json"
    bad.write_text('{"problem": ')
    with pytest.raises(DataError, match=re.escape(f"{bad}: invalid JSON")) as info:
        read_math(math_tree)
    assert info.value.where.line is None
    missing = math_tree / "train" / "algebra" / "3.json"
    missing.write_text(json.dumps({"problem": "p", "solution": r"\boxed{1}", "level": 2}))
    items, stats = read_math(math_tree, on_error="skip")
    assert len(items) == 3 and stats.reasons == {"bad_json": 1, "missing_key": 1}
    with pytest.raises(DataError, match=re.escape(f"{missing}: key 'type': missing")):
        bad.unlink()
        read_math(math_tree)


def test_invalid_on_error_value(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [math_record()])
    with pytest.raises(ValueError, match="on_error"):
        read_math(path, on_error="ignore")  # type: ignore[arg-type]


@pytest.mark.parametrize("value,level", [(3, 3), ("3", 3), ("Level 5", 5), ("level 1", 1)])
def test_parse_level(value, level):
    assert parse_level(value) == level


@pytest.mark.parametrize("value", ["Level ?", "Level 0", 6, True, None, 2.0, "five"])
def test_parse_level_rejects(value):
    with pytest.raises(ValueError):
        parse_level(value)


# ------------------------------------------------------------------------------------------
# PRM800K
# ------------------------------------------------------------------------------------------


def test_prm800k_paths_and_labels(tmp_path):
    path = write_jsonl(tmp_path / "phase2_train.jsonl",
                       [PHASE2_FOUND_ERROR, PHASE1_HUMAN, NO_CHOICE, UNRATED, EMPTY])
    items, stats = read_prm800k(path)
    assert stats == ReadStats(read=4, skipped=1, reasons={"no_labelled_steps": 1})
    found_error, human, no_choice, unrated = items
    assert isinstance(found_error, StepLabelledSolution)
    assert found_error.uid == "phase2_train.jsonl:1"
    assert found_error.steps == ("I add the numbers.", "This is a neutral step.", "So $2+3=6$.")
    assert found_error.labels == (1, 1, 0)  # neutral -> 1, -1 -> 0, nothing after the error
    assert (found_error.answer, found_error.finish_reason) == ("5", "found_error")
    assert human.steps == ("Good start.", "Human step.", "# Answer\n\n2")
    assert human.labels == (1, 1, 1)
    assert no_choice.steps == ("Fine.",) and no_choice.labels == (1,)
    assert unrated.steps == ("Rated.",) and unrated.labels == (1,)
    assert all(item.level is None for item in items)


def test_prm800k_chosen_minus_one_ends_path(tmp_path):
    record = prm_record("q", [prm_step(("ok", 1)), prm_step(("wrong", -1), ("alt", 1), chosen=0),
                              prm_step(("after", 1))])
    (item,), _ = read_prm800k(write_jsonl(tmp_path / "p.jsonl", [record]))
    assert item.labels == (1, 0) and item.steps == ("ok", "wrong")


def test_prm800k_human_completion_as_bare_text_and_rated(tmp_path):
    bare = prm_record("q", [prm_step(("x", -1), ("y", -1), chosen=None, human="Human text.")])
    rated = prm_record("q", [prm_step(("x", -1), chosen=None,
                                      human={"text": "Human wrong.", "rating": -1})])
    items, _ = read_prm800k(write_jsonl(tmp_path / "p.jsonl", [bare, rated]))
    assert [(i.steps, i.labels) for i in items] == [
        (("Human text.",), (1,)), (("Human wrong.",), (0,))]


def test_prm800k_levels_from_math_lookup_and_record(tmp_path, math_tree):
    problems, _ = read_math(math_tree)
    levels = level_index(problems)
    lines = [
        prm_record("  What is $1+1$?\n", [prm_step(("a", 1))]),  # whitespace-insensitive
        prm_record("Unknown problem", [prm_step(("b", 1))], level="Level 4"),
        prm_record("Unknown problem 2", [prm_step(("c", 1))]),
    ]
    items, _ = read_prm800k(write_jsonl(tmp_path / "p.jsonl", lines), levels=levels)
    assert [i.level for i in items] == [1, 4, None]


@pytest.mark.parametrize("mutate,key,reason", [
    (lambda r: r["label"]["steps"][0]["completions"][0].update(rating=2),
     "label.steps[0].completions[0].rating", "bad_value"),
    (lambda r: r["label"]["steps"][0]["completions"][0].update(rating="1"),
     "label.steps[0].completions[0].rating", "wrong_type"),
    (lambda r: r["label"]["steps"][1].update(chosen_completion=3),
     "label.steps[1].chosen_completion", "bad_value"),
    (lambda r: r["label"]["steps"][1]["completions"][0].pop("text"),
     "label.steps[1].completions[0].text", "missing_key"),
    (lambda r: r.pop("question"), "question", "missing_key"),
    (lambda r: r["question"].update(problem=None), "question.problem", "wrong_type"),
    (lambda r: r["label"].update(steps={"0": 1}), "label.steps", "wrong_type"),
    (lambda r: r["label"]["steps"].__setitem__(0, "text"), "label.steps[0]", "wrong_type"),
    (lambda r: r["question"].update(level="hard"), "question.level", "bad_level"),
])
def test_prm800k_errors_name_file_line_and_key(tmp_path, mutate, key, reason):
    record = json.loads(json.dumps(PHASE2_FOUND_ERROR))
    mutate(record)
    path = write_jsonl(tmp_path / "p.jsonl", [PHASE1_HUMAN, record])
    with pytest.raises(DataError) as info:
        read_prm800k(path)
    err = info.value
    assert (err.where.line, err.key, err.reason) == (2, key, reason)
    assert str(err).startswith(f"{path}:2: key {key!r}: ")
    items, stats = read_prm800k(path, on_error="skip")
    assert len(items) == 1 and stats == ReadStats(read=1, skipped=1, reasons={reason: 1})


def test_prm800k_skip_mixed_file(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        PHASE2_FOUND_ERROR, "not json", EMPTY, {"question": {}}, PHASE1_HUMAN])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: invalid JSON")):
        read_prm800k(path)
    items, stats = read_prm800k(path, on_error="skip")
    assert [i.uid for i in items] == ["p.jsonl:1", "p.jsonl:5"]
    assert stats.reasons == {"bad_json": 1, "no_labelled_steps": 1, "missing_key": 1}
    assert stats.read + stats.skipped == 5


def test_prm800k_several_files(tmp_path):
    a = write_jsonl(tmp_path / "phase1.jsonl", [PHASE1_HUMAN])
    b = write_jsonl(tmp_path / "phase2.jsonl", [PHASE2_FOUND_ERROR, EMPTY])
    items, stats = read_prm800k([a, b])
    assert [i.uid for i in items] == ["phase1.jsonl:1", "phase2.jsonl:1"]
    assert stats == ReadStats(read=2, skipped=1, reasons={"no_labelled_steps": 1})


# ------------------------------------------------------------------------------------------
# Levels and the easy/hard split
# ------------------------------------------------------------------------------------------


def _problem(uid, level, text=None):
    return MathProblem(uid=uid, problem=text or uid, solution="", answer="1", level=level,
                       subject="Algebra")


def test_split_by_level():
    items = [_problem(str(level), level) for level in (1, 2, 3, 4, 5, 3)]
    easy, hard = split_by_level(items)
    assert [p.level for p in easy] == [1, 2, 3, 3] and [p.level for p in hard] == [4, 5]
    easy, hard = split_by_level(items, easy_levels=(1,), hard_levels=(5,))
    assert [p.uid for p in easy] == ["1"] and [p.uid for p in hard] == ["5"]
    with pytest.raises(ValueError, match="overlap"):
        split_by_level(items, easy_levels=(1, 2, 3), hard_levels=(3, 4))


def test_split_by_level_missing_level(tmp_path):
    items, _ = read_prm800k(write_jsonl(tmp_path / "p.jsonl", [PHASE1_HUMAN]))
    with pytest.raises(ValueError, match=re.escape("item 'p.jsonl:1' has no level")):
        split_by_level(items)
    assert split_by_level(items, on_missing="skip") == ([], [])


def test_level_index_conflicts():
    same = [_problem("a", 2, "P"), _problem("b", 2, " P ")]
    assert level_index(same) == {"P": 2}
    clash = [_problem("a", 2, "P"), _problem("b", 4, "P")]
    with pytest.raises(ValueError, match="'b' \\(level 4\\) also appears as 'a' with level 2"):
        level_index(clash)
    assert level_index(clash, on_conflict="first") == {"P": 2}


# ------------------------------------------------------------------------------------------
# records.py details
# ------------------------------------------------------------------------------------------


def test_jsonl_blank_lines_and_bad_bytes(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"a": 1}\n\n   \n\xff\xfe\n{"a": 2}\r\n')
    convert = lambda f: f.req("a", int)
    with pytest.raises(DataError, match=re.escape(f"{path}:4: not UTF-8")):
        read_jsonl(path, convert)
    items, stats = read_jsonl(path, convert, on_error="skip")
    assert items == [1, 2]
    assert stats == ReadStats(read=2, skipped=1, reasons={"bad_encoding": 1})


def test_read_stats_merge():
    a = ReadStats(2, 1, {"bad_json": 1})
    b = ReadStats(3, 2, {"bad_json": 1, "missing_key": 1})
    assert a.merge(b) == ReadStats(5, 3, {"bad_json": 2, "missing_key": 1})
    assert a == ReadStats(2, 1, {"bad_json": 1})  # merge does not mutate
