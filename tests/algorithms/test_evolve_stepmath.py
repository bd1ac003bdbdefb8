"""StepMathEvolver: every mutation gives a verifier-valid problem of a design level, with
lineage through evolve_chain; search designs get harder in the way each mutation says."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from scalign.algorithms.evolve import StepMathEvolver, classify_level, evolve_chain
from scalign.algorithms.loop import PromptPool
from scalign.data import stepmath


@pytest.mark.parametrize("design", ["graded99", "reach4"])
def test_every_mutation_is_verifier_valid_and_leveled(design):
    levels = stepmath.levels(design)
    problems = [p for lv in levels[:3] for p in stepmath.generate(lv, 6, 0, design=design)]
    ev = StepMathEvolver(design=design)
    rng = np.random.default_rng(0)
    seen_mutations = collections.Counter()
    for _ in range(4):
        out = ev.mutate([stepmath.to_record(p) for p in problems], rng)
        for item in out:
            if item is None:
                continue
            seen_mutations[item["mutation"]] += 1
            child = stepmath.from_record(item)
            assert child.level == item["level"] == classify_level(child, design)
            verdict = stepmath.verify(child, item["response"])
            assert verdict.all_steps_correct and verdict.outcome_correct
    if design == "reach4":
        assert set(seen_mutations) == set(ev.mutations)  # every mutation kind occurred
    else:  # every graded99 level has 4 operations: "longer" never lands in a level
        assert set(seen_mutations) == set(ev.mutations) - {"longer"}
    assert ev.counts["accepted"] >= 0.8 * sum(ev.counts.values())


def test_reach_mutations_make_search_harder():
    design = "reach4"
    p = stepmath.generate(1, 1, 3, design=design)[0]
    rng = np.random.default_rng(1)
    free = StepMathEvolver(design=design, mutations=("free",))
    child = stepmath.from_record(free.mutate([stepmath.to_record(p)], rng)[0] or {})
    assert len(child.free) == len(p.free) + 1 and child.level > p.level
    target = StepMathEvolver(design=design, mutations=("target",))
    base = stepmath.generate(2, 8, 4, design=design)
    for q in base:
        out = target.mutate([stepmath.to_record(q)], rng)[0]
        if out is not None:
            c = stepmath.from_record(out)
            assert c.target != q.target and c.num_solutions() <= q.num_solutions()
    with pytest.raises(ValueError, match="do not apply"):
        StepMathEvolver(design=design, mutations=("longer",))


def test_chained_stepmath_evolution_keeps_lineage_and_levels():
    design = "reach4"
    seeds = stepmath.generate(1, 4, 0, design=design)
    pool = PromptPool.from_prompts([stepmath.to_record(p) for p in seeds])
    ev = StepMathEvolver(design=design)
    new = evolve_chain(pool, [0, 1, 2, 3], ev, 4, np.random.default_rng(2), iteration=1)
    assert len(new) == ev.counts["accepted"] >= 8
    for i in new:
        assert pool.lineage(i)[0] < 4
        assert pool[i].data["level"] in stepmath.levels(design)
    again = StepMathEvolver(design=design)
    again.load_state_dict(ev.state_dict())
    assert again.seen == ev.seen and again.counts == ev.counts
