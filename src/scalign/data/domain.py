"""Domains: a problem set with difficulty levels, demonstrations and a verifier.

The experiment stages talk to a `Domain`, not to a data set: SFT asks for demonstration records
of some levels, evaluation asks for test problems per level and grades generated solutions,
reward labelling asks for per-step labels. `StepMathDomain` is the synthetic graded domain
(`scalign.data.stepmath`); `MathDomain` is Hendrycks MATH (with MATH500 as the test split) in the
PRM800K text layout, graded by final answer (`scalign.data.grading`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from etils import epath

from scalign.data import grading, stepmath
from scalign.data.math import MathProblem, problem_key, read_math
from scalign.data.records import OnError, PathLike, ReadStats

# What `train_records(exclude_goal=True)` leaves out of the SFT loss: the last result(s) that
# repeat the goal ("result"), those and the last step's copy of the goal ("goal"), or every
# number of the last step from its result on ("line").
GOAL_SPANS = ("result", "goal", "line")


class Domain(Protocol):
    name: str
    levels: tuple[int, ...]

    def train_problems(self, level: int) -> Sequence[Any]: ...
    def test_problems(self, level: int) -> Sequence[Any]: ...
    def train_records(self, levels: Sequence[int]) -> list[dict[str, Any]]: ...
    def prompt(self, problem: Any) -> str: ...
    def verify(self, problem: Any, solution: str) -> Any: ...
    def parse(self, solution: str) -> Any: ...
    def answer_key(self, answer: str | None) -> Any: ...


@dataclasses.dataclass
class StepMathDomain:
    """stepmath train/test splits per level (no overlap), with the stepmath verifier."""

    splits: dict[int, stepmath.LevelSplit]
    design: str
    seed: int
    name: str = "stepmath"

    @classmethod
    def build(cls, levels: Sequence[int], n_train: int | dict[int, int],
              n_test: int | dict[int, int], seed: int, design: str | None = None
              ) -> StepMathDomain:
        d = stepmath.get_design(design)
        return cls(stepmath.splits(list(levels), n_train, n_test, seed, design=d), d.name, seed)

    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(sorted(self.splits))

    def train_problems(self, level: int) -> Sequence[stepmath.Problem]:
        return self._split(level).train

    def test_problems(self, level: int) -> Sequence[stepmath.Problem]:
        return self._split(level).test

    def _split(self, level: int) -> stepmath.LevelSplit:
        if level not in self.splits:
            raise KeyError(f"domain {self.name!r} has no level {level}; levels: {self.levels}")
        return self.splits[level]

    def train_records(self, levels: Sequence[int], *, blind: bool = False,
                      exclude_goal: bool = False, goal_span: str = "result",
                      miss_fraction: float = 0.0) -> list[dict[str, Any]]:
        """SFT records of the train problems; `blind`: prompts with the goal hidden
        (`stepmath.Problem.blind_prompt`); `exclude_goal`: each record carries
        "exclude_spans" = `Problem.goal_spans` (`goal_span="result"`: the response characters
        that repeat the goal), `Problem.goal_copy_spans` ("goal": also the last step's copy of
        the goal) or `Problem.goal_line_spans` ("line": every number of the last step from its
        result on), left out of the SFT loss by `SftFeaturizer`; `miss_fraction`: also a miss
        demonstration (`stepmath.miss_records`: a filling that misses the target, worked out,
        its loss on the last step's check only) for about that fraction of the problems,
        appended after the gold records."""
        if goal_span not in GOAL_SPANS:
            raise ValueError(f"goal_span must be one of {GOAL_SPANS}, got {goal_span!r}")
        problems = [p for lv in levels for p in self.train_problems(lv)]
        records = [stepmath.to_record(p) for p in problems]
        if blind:
            records = [{**r, "prompt": p.blind_prompt} for r, p in zip(records, problems,
                                                                        strict=True)]
        if exclude_goal:
            records = [{**r, "exclude_spans": [list(s) for s in (
                {"result": p.goal_spans, "goal": p.goal_copy_spans,
                 "line": p.goal_line_spans}[goal_span])]}
                for r, p in zip(records, problems, strict=True)]
        if miss_fraction:
            records += stepmath.miss_records(problems, miss_fraction, self.seed)
        return records

    def prompt(self, problem: stepmath.Problem) -> str:
        return problem.prompt

    def verify(self, problem: stepmath.Problem, solution: str) -> stepmath.Verdict:
        return stepmath.verify(problem, solution)

    def parse(self, solution: str) -> stepmath.ParsedSolution:
        """Steps, their end offsets and the answer section of a generated solution."""
        return stepmath.split_solution(solution)

    def answer_key(self, answer: str | None) -> int | str | None:
        """Canonical form of an extracted answer for voting: an int, or for a search design's
        filled chain ("3+4*5*2-6") or a path design's path ("s>x>t") the text without spaces;
        None if not an answer."""
        if answer is None:
            return None
        text = answer.strip()
        if not text or len(text) > 64:
            return None
        if text.lstrip("-").isdigit():
            return int(text) if len(text) <= 32 else None
        chain = text.replace(" ", "")
        if re.fullmatch(r"\d(?:[+\-*]\d)+", chain):
            return chain
        if re.fullmatch(r"[a-z](?:>[a-z])+", chain):  # a path design's path ("s>x>t")
            return chain
        return None

    # ---------------------------------------------------------------- persistence
    def save(self, directory: epath.PathLike) -> None:
        directory = epath.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"name": self.name, "design": self.design, "seed": self.seed,
                "levels": list(self.levels)}
        (directory / "domain.json").write_text(json.dumps(meta))
        for part in ("train", "test"):
            with (directory / f"{part}.jsonl").open("w") as f:
                for lv in self.levels:
                    for p in getattr(self.splits[lv], part):
                        f.write(json.dumps(stepmath.to_record(p)) + "\n")

    @classmethod
    def load(cls, directory: epath.PathLike) -> StepMathDomain:
        directory = epath.Path(directory)
        meta = json.loads((directory / "domain.json").read_text())
        parts: dict[str, dict[int, list[stepmath.Problem]]] = {}
        for part in ("train", "test"):
            by_level: dict[int, list[stepmath.Problem]] = {lv: [] for lv in meta["levels"]}
            for i, line in enumerate((directory / f"{part}.jsonl").read_text().splitlines()):
                try:
                    p = stepmath.from_record(json.loads(line))
                except (ValueError, KeyError) as e:
                    raise ValueError(f"{directory / part}.jsonl:{i + 1}: {e}") from e
                by_level[p.level].append(p)
            parts[part] = by_level
        splits = {lv: stepmath.LevelSplit(lv, tuple(parts["train"][lv]), tuple(parts["test"][lv]))
                  for lv in meta["levels"]}
        return cls(splits, meta["design"], meta["seed"], meta["name"])


# --------------------------------------------------------------------------------- MATH
_MATH_DELIM_RE = re.compile(r"\\\$|\$\$|\$|\\\[|\\\]|\\\(|\\\)|\\begin\{[^}]*\}|\\end\{[^}]*\}")
_PARAGRAPH_BREAK_RE = re.compile(r"\n[ \t]*\n\s*")
# End of a sentence: . ! or ? (possibly closed by $, a bracket or a quote, or after whitespace
# by $$, \] or \)), then whitespace, then an uppercase letter.
_SENTENCE_END_RE = re.compile(
    r"[.!?](?:\s*(?:\$\$|\\\]|\\\))|\$|[)\"'])*([ \t\n]+)(?=[A-Z])")


def math_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) character spans of `text` inside LaTeX math.

    Math is `$...$`, `$$...$$`, `\\[...\\]`, `\\(...\\)` and `\\begin{env}...\\end{env}` (nested
    environments count once, `\\$` is a dollar sign). An unclosed delimiter makes the rest of
    the text math, so a broken formula is never cut.
    """
    spans: list[tuple[int, int]] = []
    stack: list[str] = []
    start = 0
    for m in _MATH_DELIM_RE.finditer(text):
        tok = m.group(0)
        if tok == "\\$":
            continue
        opens = tok in ("$", "$$", "\\[", "\\(") or tok.startswith("\\begin")
        if not stack:
            if opens:
                stack.append(tok)
                start = m.start()
            continue
        top = stack[-1]
        if tok.startswith("\\begin"):
            stack.append(tok)
        elif tok.startswith("\\end"):
            if top.startswith("\\begin"):
                stack.pop()
        elif tok == top and tok in ("$", "$$"):
            stack.pop()
        elif (top, tok) in (("\\[", "\\]"), ("\\(", "\\)")):
            stack.pop()
        if not stack:
            spans.append((start, m.end()))
    if stack:
        spans.append((start, len(text)))
    return spans


def _in_spans(pos: int, spans: Sequence[tuple[int, int]]) -> bool:
    return any(a <= pos < b for a, b in spans)


def unbox(text: str) -> str:
    """`text` with every `\\boxed{X}` / `\\fbox{X}` / `\\boxed X` replaced by X (nested too).

    A truncated box (unbalanced braces) and everything after it are kept as they are.
    """
    out: list[str] = []
    pos = 0
    while (m := grading._BOX_RE.search(text, pos)) is not None:
        content, stop = grading._box_span(text, m.start(), m.end())
        if content is None:
            break
        out += [text[pos:m.start()], unbox(content)]
        pos = stop
    out.append(text[pos:])
    return "".join(out)


def solution_steps(solution: str) -> list[str]:
    """A MATH reference solution cut into PRM800K-style steps (one sentence or formula each).

    MATH solutions are free-form paragraphs; PRM800K solutions (Lightman et al. 2023), the
    layout Sun et al. (2024) fine-tune on, are short steps separated by blank lines. The cut:

      1. boxes are unwrapped (`unbox`): the answer moves to the answer section, the sentence
         keeps its content;
      2. paragraphs: split at blank lines outside math (`math_spans`);
      3. sentences: split a paragraph after ".", "!" or "?" (optionally closed by `$`, a
         bracket, a quote, or `$$` / `\\]` / `\\)` after whitespace) followed by whitespace
         outside math and an uppercase letter (so "i.e. x" and decimals stay whole; "Mr.
         Smith" would be cut);
      4. each step is stripped and any blank line left inside it (in display math) becomes one
         newline, so "\\n\\n" only ever separates steps. Empty steps are dropped.
    """
    text = unbox(solution).strip()
    spans = math_spans(text)
    paragraphs, start = [], 0
    for m in _PARAGRAPH_BREAK_RE.finditer(text):
        if not _in_spans(m.start(), spans):
            paragraphs.append(text[start:m.start()])
            start = m.end()
    paragraphs.append(text[start:])
    steps: list[str] = []
    for par in paragraphs:
        par_spans = math_spans(par)
        start = 0
        for m in _SENTENCE_END_RE.finditer(par):
            if not _in_spans(m.start(1), par_spans):
                steps.append(par[start:m.start(1)])
                start = m.end(1)
        steps.append(par[start:])
    steps = [_PARAGRAPH_BREAK_RE.sub("\n", s.strip()) for s in steps]
    return [s for s in steps if s]


def format_solution(steps: Sequence[str], answer: str) -> str:
    """PRM800K layout: steps joined by "\\n\\n", then "\\n\\n# Answer\\n\\n{answer}"."""
    answer = _PARAGRAPH_BREAK_RE.sub(" ", answer.strip())
    tail = stepmath.ANSWER_HEADER + stepmath.STEP_DELIMITER + answer
    return stepmath.STEP_DELIMITER.join([*steps, tail])


class MathVerdict(stepmath.Verdict):
    """What `MathDomain.verify` says about one solution (the fields of `stepmath.Verdict`).

    Real MATH has no step verifier, so step labels are never invented here:

      step_labels: always () (step labels come from humans: PRM800K, see
        `algorithms.reward_labels.prm800k_solutions`).
      outcome_correct: `grading.is_equiv(gold, answer, symbolic=True)` within the domain's
        time limit.
      answer: the extracted answer (`answer_of`), or None.
      answer_label: int(outcome_correct) (the only label an answer segment can get).
      first_error: None when correct, else 0 (= len(step_labels): no known wrong step).
      error: None, "wrong_answer" or "no_answer".
      num_expected_steps: 0 (unknown: a MATH problem has no fixed number of steps).
    """


def answer_of(text: str, parsed: stepmath.ParsedSolution | None = None) -> str | None:
    """The final answer of a solution: its "# Answer" section (a `\\boxed{}` in it unwrapped),
    else the last `\\boxed{}` anywhere in the text (`grading.extract_answer`), else None."""
    parsed = parsed if parsed is not None else stepmath.split_solution(text)
    if parsed.answer:
        return grading.extract_answer(parsed.answer) or parsed.answer
    return grading.extract_answer(text)


def _per_level_cap(cap: int | Mapping[int, int] | None, level: int) -> int | None:
    if cap is None or isinstance(cap, int):
        return cap
    return cap.get(level)


def _by_level(problems: Sequence[MathProblem], levels: Sequence[int],
              cap: int | Mapping[int, int] | None) -> dict[int, tuple[MathProblem, ...]]:
    """The problems of each level in file order, the first `cap` (per level) of them."""
    out: dict[int, tuple[MathProblem, ...]] = {}
    for lv in levels:
        items = [p for p in problems if p.level == lv]
        n = _per_level_cap(cap, lv)
        out[int(lv)] = tuple(items if n is None else items[:n])
    return out


def _stats_dict(stats: ReadStats) -> dict[str, Any]:
    return {"read": stats.read, "skipped": stats.skipped, "reasons": dict(stats.reasons)}


@dataclasses.dataclass
class MathDomain:
    """Hendrycks MATH per level, prompted and answered in the PRM800K layout.

    prompt      "# Question\\n\\n{problem}\\n\\n# Solution\\n\\n" (Lightman et al. 2023; the
                layout Sun et al. 2024 use).
    SFT demo    `format_solution(solution_steps(MATH solution), answer)`.
    verify      final-answer grading (`MathVerdict`); no step labels.
    parse       `stepmath.split_solution` (steps at "\\n\\n", then the "# Answer" section).
    answer_key  `grading.normalize_answer`, so answers that normalise alike vote together
                ("\\dfrac12" and "1/2"; not "0.5" and "1/2", which only `is_equiv` matches).

    Train problems whose text also appears in the test split are dropped (counted in
    `info["train"]["dropped_test_overlap"]`). Use PRM800K's `math_splits/train.jsonl` (the
    12,000 MATH problems outside MATH500) as the train files and `math_splits/test.jsonl`
    (MATH500) as the test file, or the MATH train/test trees.
    """

    train: dict[int, tuple[MathProblem, ...]]
    test: dict[int, tuple[MathProblem, ...]]
    timeout_s: float = 2.0
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    name: str = "math"

    @classmethod
    def build(cls, train_paths: PathLike | Sequence[PathLike],
              test_paths: PathLike | Sequence[PathLike], levels: Sequence[int], *,
              n_train: int | Mapping[int, int] | None = None,
              n_test: int | Mapping[int, int] | None = None, on_error: OnError = "raise",
              timeout_s: float = 2.0) -> MathDomain:
        """Read MATH train/test files (`data.math.read_math`) and keep `levels`.

        `n_train` / `n_test` cap the problems per level (an int, {level: n}, or None = all),
        taking them in file order. `on_error` is `read_math`'s bad-record policy.
        """
        test_items, test_stats = read_math(test_paths, on_error=on_error)
        train_items, train_stats = read_math(train_paths, on_error=on_error)
        test_keys = {problem_key(p.problem) for p in test_items}
        kept = [p for p in train_items if problem_key(p.problem) not in test_keys]
        info = {
            "train_paths": [str(p) for p in _as_list(train_paths)],
            "test_paths": [str(p) for p in _as_list(test_paths)],
            "train": {**_stats_dict(train_stats),
                      "dropped_test_overlap": len(train_items) - len(kept)},
            "test": _stats_dict(test_stats),
        }
        return cls(_by_level(kept, levels, n_train), _by_level(test_items, levels, n_test),
                   float(timeout_s), info)

    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(sorted(self.train))

    def _split(self, part: dict[int, tuple[MathProblem, ...]], level: int
               ) -> tuple[MathProblem, ...]:
        if level not in part:
            raise KeyError(f"domain {self.name!r} has no level {level}; levels: {self.levels}")
        return part[level]

    def train_problems(self, level: int) -> Sequence[MathProblem]:
        return self._split(self.train, level)

    def test_problems(self, level: int) -> Sequence[MathProblem]:
        return self._split(self.test, level)

    def demonstration(self, problem: MathProblem) -> str:
        """The SFT target of a problem: its MATH solution in the PRM800K layout."""
        return format_solution(solution_steps(problem.solution), problem.answer)

    def train_records(self, levels: Sequence[int]) -> list[dict[str, Any]]:
        """SFT records {"prompt", "response", "level", "answer", "uid"} of `levels`."""
        return [{"prompt": self.prompt(p), "response": self.demonstration(p), "level": p.level,
                 "answer": p.answer, "uid": p.uid}
                for lv in levels for p in self.train_problems(lv)]

    def prompt(self, problem: MathProblem) -> str:
        return stepmath.PROMPT_TEMPLATE.format(question=problem.problem)

    def verify(self, problem: MathProblem, solution: str | bytes) -> MathVerdict:
        """Grade the final answer of a generated solution (never raises on str/bytes input).

        A text that repeats the prompt first is accepted (the prompt is stripped).
        """
        if isinstance(solution, bytes):
            solution = solution.decode("utf-8", errors="replace")
        text = str(solution)
        prompt = self.prompt(problem)
        if text.startswith(prompt):
            text = text[len(prompt):]
        answer = answer_of(text)
        correct = grading.is_equiv(problem.answer, answer, symbolic=True,
                                   timeout_s=self.timeout_s)
        error = None if correct else ("no_answer" if answer is None else "wrong_answer")
        return MathVerdict((), bool(correct), answer, int(correct), None if correct else 0,
                           error, 0)

    def parse(self, solution: str) -> stepmath.ParsedSolution:
        """Steps, their end offsets and the answer section (`stepmath.split_solution`)."""
        return stepmath.split_solution(solution)

    def answer_key(self, answer: str | None) -> str | None:
        """Canonical answer for voting: `grading.normalize_answer`, None if empty or missing."""
        if answer is None:
            return None
        key = grading.normalize_answer(answer)
        return key or None

    def split_of(self, problem_text: str) -> str | None:
        """"test" / "train" if a problem with this text is in that split (test first), else
        None (texts match by `data.math.problem_key`)."""
        found = self._index().get(problem_key(problem_text))
        return None if found is None else found[0]

    def reference(self, problem_text: str) -> MathProblem | None:
        """The train problem with this text, or None."""
        found = self._index().get(problem_key(problem_text))
        return found[1] if found is not None and found[0] == "train" else None

    def level_index(self) -> dict[str, int]:
        """problem text key -> level of every train problem (for `data.math.read_prm800k`)."""
        return {k: p.level for k, (part, p) in self._index().items() if part == "train"}

    def _index(self) -> dict[str, tuple[str, MathProblem]]:
        """problem key -> (split, first problem with that text); built once, test first."""
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {}
            for part, table in (("test", self.test), ("train", self.train)):
                for lv in self.levels:
                    for p in table[lv]:
                        cached.setdefault(problem_key(p.problem), (part, p))
            self.__dict__["_index_cache"] = cached
        return cached

    # ---------------------------------------------------------------- persistence
    def save(self, directory: epath.PathLike) -> None:
        directory = epath.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"name": self.name, "levels": list(self.levels), "timeout_s": self.timeout_s,
                "info": self.info}
        (directory / "domain.json").write_text(json.dumps(meta))
        for part in ("train", "test"):
            with (directory / f"{part}.jsonl").open("w") as f:
                for lv in self.levels:
                    for p in getattr(self, part)[lv]:
                        f.write(json.dumps(dataclasses.asdict(p)) + "\n")

    @classmethod
    def load(cls, directory: epath.PathLike) -> MathDomain:
        directory = epath.Path(directory)
        meta = json.loads((directory / "domain.json").read_text())
        parts: dict[str, dict[int, list[MathProblem]]] = {}
        for part in ("train", "test"):
            by_level: dict[int, list[MathProblem]] = {int(lv): [] for lv in meta["levels"]}
            path = directory / f"{part}.jsonl"
            for i, line in enumerate(path.read_text().splitlines()):
                try:
                    p = MathProblem(**json.loads(line))
                    by_level[p.level].append(p)
                except (ValueError, TypeError, KeyError) as e:
                    raise ValueError(f"{path}:{i + 1}: {e}") from e
            parts[part] = by_level
        return cls({lv: tuple(ps) for lv, ps in parts["train"].items()},
                   {lv: tuple(ps) for lv, ps in parts["test"].items()},
                   float(meta["timeout_s"]), meta.get("info", {}), meta["name"])


def _as_list(paths: PathLike | Sequence[PathLike]) -> list[PathLike]:
    if isinstance(paths, (str, epath.Path)) or not isinstance(paths, Sequence):
        return [paths]
    return list(paths)


def load_domain(directory: epath.PathLike) -> StepMathDomain | MathDomain:
    """The domain saved in `directory` (by `StepMathDomain.save` or `MathDomain.save`)."""
    name = json.loads((epath.Path(directory) / "domain.json").read_text())["name"]
    return MathDomain.load(directory) if name == MathDomain.name else StepMathDomain.load(
        directory)
