"""Readers for the MATH dataset and PRM800K step labels (local or ``gs://`` paths).

* `read_math`: Hendrycks MATH (Hendrycks et al., 2021) as a directory tree
  ``{split}/{type}/{id}.json`` or as JSONL (including the MATH500 test split of Lightman et
  al., 2023) -> `MathProblem`.
* `read_prm800k`: PRM800K phase-1/phase-2 label files (Lightman et al., 2023, "Let's Verify
  Step by Step") -> `StepLabelledSolution`, labelled as in Easy-to-Hard (Sun et al., 2024).
* `level_index`, `split_by_level`: level lookup by problem text and the easy (1-3) / hard
  (4-5) split of Easy-to-Hard.

All readers follow the error policy of `scalign.data.records`: bad records raise a
`DataError` naming file, line (or file path for one-object-per-file layouts) and key, or,
with ``on_error="skip"``, are skipped and counted. Each reader returns a `ReadResult`
``(items, stats)``; ``stats.read + stats.skipped`` equals the number of input records.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol, TypeVar

from etils import epath

from scalign.data.grading import extract_answer
from scalign.data.records import (
    DataError,
    Fields,
    OnError,
    PathLike,
    ReadResult,
    Skip,
    check_on_error,
    convert_records,
    iter_jsonl,
    load_json_file,
    location,
    merge_results,
)

MATH_LEVELS = (1, 2, 3, 4, 5)
EASY_LEVELS = (1, 2, 3)
HARD_LEVELS = (4, 5)

_LEVEL_RE = re.compile(r"^\s*(?:level\s*)?(\d+)\s*$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class MathProblem:
    """One MATH problem.

    Attributes:
      uid: ``unique_id`` when the record has one (MATH500: ``"test/algebra/1.json"``); for
        the directory layout the last three path parts ``"{split}/{type}/{id}.json"`` (the
        same convention); otherwise ``"{file name}:{line}"``.
      problem: problem statement (LaTeX).
      solution: reference solution (LaTeX), ends with a ``\\boxed{}`` answer in MATH.
      answer: the record's ``answer`` field, else `extract_answer` of the solution.
      level: difficulty 1-5.
      subject: ``subject`` (MATH500) or ``type`` (MATH), e.g. ``"Algebra"``.
    """

    uid: str
    problem: str
    solution: str
    answer: str
    level: int
    subject: str


@dataclasses.dataclass(frozen=True)
class StepLabelledSolution:
    """A solution split into steps with one 0/1 correctness label per step (PRM target).

    Attributes:
      uid: ``"{file name}:{line}"`` of the PRM800K record.
      problem: problem statement.
      steps: step texts along the labelled path.
      labels: ``1`` = correct step, ``0`` = first wrong step (only ever the last label).
      level: MATH level of the problem if known, else None.
      answer: the problem's ground-truth answer (``question.ground_truth_answer``) or None.
      finish_reason: PRM800K ``label.finish_reason`` (``"solution"``, ``"found_error"``,
        ``"give_up"``, ``"bad_problem"``) or None.
    """

    uid: str
    problem: str
    steps: tuple[str, ...]
    labels: tuple[int, ...]
    level: int | None
    answer: str | None
    finish_reason: str | None


# ------------------------------------------------------------------------------------------
# Fields
# ------------------------------------------------------------------------------------------


def parse_level(value: Any) -> int:
    """MATH level from ``3``, ``"3"`` or ``"Level 3"``; ValueError unless it is in 1..5.

    Note: a handful of MATH train problems carry ``"Level ?"``; they are bad records here.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a level 1-5, got {value!r}")
    if isinstance(value, int):
        level = value
    elif isinstance(value, str) and (m := _LEVEL_RE.match(value)):
        level = int(m.group(1))
    else:
        raise ValueError(f"expected a level 1-5 (int or 'Level N'), got {value!r}")
    if level not in MATH_LEVELS:
        raise ValueError(f"expected a level 1-5, got {value!r}")
    return level


def _level_field(fields: Fields, key: str, *, required: bool) -> int | None:
    """The level stored under ``key`` (int or string), parsed with `parse_level`."""
    value = fields.req(key, int, str) if required else fields.opt(key, int, str)
    if value is None:
        return None
    try:
        return parse_level(value)
    except ValueError as e:
        raise fields.error(key, str(e), reason="bad_level") from None


# ------------------------------------------------------------------------------------------
# MATH
# ------------------------------------------------------------------------------------------


def _math_problem(fields: Fields, default_uid: str) -> MathProblem:
    """A `MathProblem` from a MATH / MATH500 record."""
    problem = fields.req("problem", str)
    solution = fields.req("solution", str)
    level = _level_field(fields, "level", required=True)
    assert level is not None
    subject = fields.opt("subject", str)
    if subject is None:
        subject = fields.req("type", str)
    answer = fields.opt("answer", str, int, float)
    if answer is None or answer == "":
        answer = extract_answer(solution)
        if answer is None:
            raise fields.error("solution", "no 'answer' key and no \\boxed{} answer in the "
                               "solution", reason="no_answer")
    uid = fields.opt("unique_id", str, default=default_uid)
    return MathProblem(uid=uid, problem=problem, solution=solution, answer=str(answer),
                       level=level, subject=subject)


def _math_json_files(root: epath.Path) -> list[epath.Path]:
    """All ``*.json`` files under ``root`` (any depth), sorted for a stable order."""
    files = [epath.Path(dirpath) / name
             for dirpath, _, names in root.walk()
             for name in names if name.endswith(".json")]
    return sorted(files, key=str)


def _read_math_one(path: PathLike, on_error: OnError) -> ReadResult[MathProblem]:
    path = epath.Path(path)
    if path.is_dir():
        # One problem per file; the uid is "{split}/{type}/{id}.json" as in MATH500.
        return convert_records(
            ((location(file), load_json_file(file)) for file in _math_json_files(path)),
            lambda f: _math_problem(f, "/".join(f.where.path.split("/")[-3:])),
            on_error=on_error,
        )
    return convert_records(
        iter_jsonl(path),
        lambda f: _math_problem(f, f"{f.where.name}:{f.where.line}"),
        on_error=on_error,
    )


def read_math(
    paths: PathLike | Sequence[PathLike], *, on_error: OnError = "raise"
) -> ReadResult[MathProblem]:
    """Reads MATH problems from directory trees and/or JSONL files.

    A directory is read as the Hendrycks layout: every ``*.json`` file below it (sorted by
    path) is one problem with keys ``problem``, ``solution``, ``level`` (``"Level 3"`` or
    ``3``) and ``type``; errors name the file. Anything else is read as JSONL with keys
    ``problem``, ``solution``, ``level`` and ``type`` or ``subject``, optionally ``answer``
    and ``unique_id`` (the MATH500 format); errors name file and line. The answer is the
    ``answer`` field when present, else the last ``\\boxed{}`` of the solution (a record with
    neither is a bad record, reason ``"no_answer"``).

    Args:
      paths: one path or several (results are concatenated in order); local or ``gs://``.
      on_error: ``"raise"`` or ``"skip"`` (see `scalign.data.records`).
    """
    check_on_error(on_error)
    if isinstance(paths, (str, epath.Path)) or not isinstance(paths, Sequence):
        paths = [paths]
    return merge_results(_read_math_one(p, on_error) for p in paths)


# ------------------------------------------------------------------------------------------
# PRM800K
# ------------------------------------------------------------------------------------------


def problem_key(problem: str) -> str:
    """Key for matching problem texts across datasets: the text with outer whitespace removed."""
    return problem.strip()


def level_index(
    problems: Iterable[MathProblem], *, on_conflict: Literal["raise", "first"] = "raise"
) -> dict[str, int]:
    """Maps `problem_key` of each problem text to its level (for `read_prm800k`).

    The same text with two different levels raises ValueError naming both uids, unless
    ``on_conflict="first"`` keeps the first level seen.
    """
    index: dict[str, int] = {}
    first_uid: dict[str, str] = {}
    for p in problems:
        key = problem_key(p.problem)
        if key in index and index[key] != p.level:
            if on_conflict == "raise":
                raise ValueError(
                    f"problem text of {p.uid!r} (level {p.level}) also appears as "
                    f"{first_uid[key]!r} with level {index[key]}; pass on_conflict='first' "
                    "to keep the first"
                )
            continue
        index.setdefault(key, p.level)
        first_uid.setdefault(key, p.uid)
    return index


def _rating(step: Fields, key: str) -> int | None:
    """A PRM800K rating: -1, 0, 1 or None (unrated)."""
    rating = step.opt(key, int)
    if rating is not None and rating not in (-1, 0, 1):
        raise step.error(key, f"expected -1, 0, 1 or null, got {rating!r}", reason="bad_value")
    return rating


def _path_step(step: Fields) -> tuple[str, int] | None:
    """The (text, label) of one PRM800K step on the chosen path, or None if the path ends.

    See `read_prm800k` for the rules.
    """
    completions = step.obj.get("completions")
    if completions is None:
        completions_list: list[Fields] = []
    else:
        completions_list = step.objects("completions")
    chosen = step.opt("chosen_completion", int)
    if chosen is not None:
        if not 0 <= chosen < len(completions_list):
            raise step.error("chosen_completion", f"index {chosen} out of range for "
                             f"{len(completions_list)} completions", reason="bad_value")
        completion = completions_list[chosen]
        rating = _rating(completion, "rating")
    elif isinstance(step.obj.get("human_completion"), str):
        return step.obj["human_completion"], 1  # A bare human-written step text.
    elif step.obj.get("human_completion") is not None:
        completion = step.sub("human_completion")
        rating = _rating(completion, "rating")
        if rating is None:
            rating = 1  # Human-written steps are correct by construction (PRM800K phase 1).
    elif len(completions_list) == 1:
        completion = completions_list[0]
        rating = _rating(completion, "rating")
    else:
        return None
    text = completion.req("text", str)
    if rating is None:
        return None
    return text, (1 if rating >= 0 else 0)


def _prm800k_solution(fields: Fields, uid: str,
                      levels: Mapping[str, int] | None) -> StepLabelledSolution:
    question = fields.sub("question")
    problem = question.req("problem", str)
    answer = question.opt("ground_truth_answer", str)
    label = fields.sub("label")
    finish_reason = label.opt("finish_reason", str)
    steps: list[str] = []
    labels: list[int] = []
    for step in label.objects("steps"):
        labelled = _path_step(step)
        if labelled is None:
            break
        steps.append(labelled[0])
        labels.append(labelled[1])
        if labelled[1] == 0:
            break
    if not steps:
        raise Skip("no_labelled_steps")
    level = levels.get(problem_key(problem)) if levels is not None else None
    if level is None:
        level = _level_field(fields, "level", required=False)
    if level is None:
        level = _level_field(question, "level", required=False)
    return StepLabelledSolution(uid=uid, problem=problem, steps=tuple(steps),
                                labels=tuple(labels), level=level, answer=answer,
                                finish_reason=finish_reason)


def read_prm800k(
    paths: PathLike | Sequence[PathLike],
    *,
    levels: Mapping[str, int] | None = None,
    on_error: OnError = "raise",
) -> ReadResult[StepLabelledSolution]:
    """Reads PRM800K label files (JSONL) into step-labelled solutions.

    Each line holds ``question`` (``problem``, ``ground_truth_answer``, ...) and ``label``
    (``steps``, ``finish_reason``). Following Easy-to-Hard (Sun et al., 2024), which follows
    the trajectory reconstruction documented with PRM800K, one solution per line is built
    from the *chosen path*, step by step:

    1. The step on the path is ``completions[chosen_completion]`` when
       ``chosen_completion`` is an index; else ``human_completion`` when present (phase 1:
       a labeler-written step, an object with ``text`` or a bare string; label 1 unless
       rated -1); else the only completion when
       there is exactly one (phase 2, where the erroneous last step has no chosen index);
       otherwise (several alternatives, none chosen) the path ends before this step.
    2. Its label is ``1`` if ``rating >= 0`` (neutral 0 and good +1 are merged) and ``0``
       if ``rating == -1``. An unrated step (``rating`` null) ends the path, unlabelled.
    3. The path stops after the first step labelled 0 (PRM800K labels nothing after the
       first mistake), so ``labels`` is all ones, optionally followed by a single zero.
    4. ``flagged`` is ignored; alternative (non-chosen) completions are not emitted.

    A record whose path has no labelled step is dropped and counted as
    ``stats.reasons["no_labelled_steps"]`` (not an error). ``level`` comes from ``levels``
    (see `level_index`) by problem text, else from a ``level`` key of the record or its
    ``question`` if present, else None.

    Args:
      paths: one or several JSONL files (phase1/phase2 train/test), local or ``gs://``.
      levels: optional problem text -> level lookup (`level_index` of MATH problems).
      on_error: ``"raise"`` or ``"skip"`` (see `scalign.data.records`).
    """
    check_on_error(on_error)
    if isinstance(paths, (str, epath.Path)) or not isinstance(paths, Sequence):
        paths = [paths]

    return merge_results(
        convert_records(
            iter_jsonl(path),
            lambda f: _prm800k_solution(f, f"{f.where.name}:{f.where.line}", levels),
            on_error=on_error,
        )
        for path in paths
    )


# ------------------------------------------------------------------------------------------
# Easy / hard split
# ------------------------------------------------------------------------------------------


class _HasLevel(Protocol):
    @property
    def uid(self) -> str: ...

    @property
    def level(self) -> int | None: ...


L = TypeVar("L", bound=_HasLevel)


def split_by_level(
    items: Iterable[L],
    easy_levels: Sequence[int] = EASY_LEVELS,
    hard_levels: Sequence[int] = HARD_LEVELS,
    *,
    on_missing: OnError = "raise",
) -> tuple[list[L], list[L]]:
    """Splits items into ``(easy, hard)`` by their ``level`` (Easy-to-Hard: 1-3 vs 4-5).

    Items whose level is in neither set (e.g. level 3 with ``easy_levels=(1, 2)``) are in
    neither list, as asked. An item with ``level is None`` raises ValueError naming its uid
    unless ``on_missing="skip"``, which leaves it out.
    """
    easy_set, hard_set = set(easy_levels), set(hard_levels)
    if easy_set & hard_set:
        raise ValueError(f"easy_levels {sorted(easy_set)} and hard_levels {sorted(hard_set)} "
                         "overlap")
    if on_missing not in ("raise", "skip"):
        raise ValueError(f"on_missing must be 'raise' or 'skip', got {on_missing!r}")
    easy: list[L] = []
    hard: list[L] = []
    for item in items:
        if item.level is None:
            if on_missing == "raise":
                raise ValueError(
                    f"item {item.uid!r} has no level; pass levels=level_index(math_problems) "
                    "to read_prm800k, or on_missing='skip' to leave such items out")
            continue
        if item.level in easy_set:
            easy.append(item)
        elif item.level in hard_set:
            hard.append(item)
    return easy, hard


__all__ = [
    "DataError",
    "EASY_LEVELS",
    "HARD_LEVELS",
    "MathProblem",
    "StepLabelledSolution",
    "level_index",
    "parse_level",
    "problem_key",
    "read_math",
    "read_prm800k",
    "split_by_level",
]
