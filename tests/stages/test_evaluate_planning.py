"""The evaluate stage's planning table for search designs: greedy accuracy by planning horizon
beside the random-filling rate, counted by hand on real reach4c problems."""

import types

import numpy as np
import pytest

from scalign.data import stepmath
from scalign.stages.evaluate import EvaluateStage, _planning_section


def _solutions(problems, correct):
    verdicts = [[types.SimpleNamespace(outcome_correct=c)] for c in correct]
    return types.SimpleNamespace(problems=problems, verdicts=verdicts)


def test_planning_rows_group_by_horizon_and_average_random_fill_rate():
    problems = stepmath.generate(1, 30, seed=5, design="reach4c")
    correct = [i % 3 == 0 for i in range(len(problems))]
    rows = EvaluateStage._planning_rows((1,), {1: _solutions(problems, correct)})
    horizons = sorted({p.horizon for p in problems})
    assert len(horizons) > 1  # one "?" at a random position: several horizons
    assert sorted({r["horizon"] for r in rows}) == horizons
    for h in horizons:
        idx = [i for i, p in enumerate(problems) if p.horizon == h]
        got = {r["metric"]: r for r in rows if r["horizon"] == h}
        assert got["greedy"]["problems"] == len(idx)
        assert got["greedy"]["value"] == pytest.approx(np.mean([correct[i] for i in idx]))
        assert got["random_filling"]["value"] == pytest.approx(
            np.mean([problems[i].num_solutions() / 3 for i in idx]))
    md = "\n".join(_planning_section(rows))
    assert "| level | horizon | problems | greedy | random filling |" in md


def test_planning_rows_skip_non_search_designs():
    problems = stepmath.generate(1, 5, seed=5, design="graded99")
    assert EvaluateStage._planning_rows((1,), {1: _solutions(problems, [True] * 5)}) == []
