"""Domains: a problem set with difficulty levels, demonstrations and a verifier.

The experiment stages talk to a `Domain`, not to a data set: SFT asks for demonstration records
of some levels, evaluation asks for test problems per level and grades generated solutions,
reward labelling asks for per-step labels. `StepMathDomain` is the synthetic graded domain
(`scalign.data.stepmath`); a MATH / PRM800K domain plugs in behind the same methods.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, Protocol

from etils import epath

from scalign.data import stepmath


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

    def train_records(self, levels: Sequence[int]) -> list[dict[str, Any]]:
        return [stepmath.to_record(p) for lv in levels for p in self.train_problems(lv)]

    def prompt(self, problem: stepmath.Problem) -> str:
        return problem.prompt

    def verify(self, problem: stepmath.Problem, solution: str) -> stepmath.Verdict:
        return stepmath.verify(problem, solution)

    def parse(self, solution: str) -> stepmath.ParsedSolution:
        """Steps, their end offsets and the answer section of a generated solution."""
        return stepmath.split_solution(solution)

    def answer_key(self, answer: str | None) -> int | None:
        """Canonical form of an extracted answer for voting (an int), None if not an answer."""
        if answer is None:
            return None
        text = answer.strip()
        if not text or len(text) > 32 or not text.lstrip("-").isdigit():
            return None
        return int(text)

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
