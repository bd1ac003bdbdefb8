"""Verifier-labelled failure augmentation of the easy PRM data (stepmath).

Why: on the search design `reach4` the SFT policy writes the target as the last step's result
("4+4=6" for target 6), so whether a solution is right is decided by one check -- is
`x op b` really the target? -- and the PRM trained on the policy's own easy samples never
learns it (hard outcome ROC-AUC ~0.5, `experiments/results/e2h_reach4_evaluators_2026-12-04`).
`experiments/studies/prm_last_step_probe.py` showed the same tiny PRM learns the check from
*balanced* easy data half of which are such policy-like failures. This module makes that data
from easy problems only, as a pipeline option (`config.reward_models.augment_failures`).

**What is made.** For an easy training problem, a *correct* solution is its gold demonstration
or a policy sample the verifier passed (every step right and the answer right); its operations
(`ops`, the filling of a search problem) are the base. A corruption changes one step k:

  operation_kept     step k's operation replaced by another of + - *, the written result kept
                     (the remaining steps as before); in a search problem k is a "?" position
                     (the policy copies the given operations; it errs where it chooses), so the
                     step's arithmetic is what is wrong. At the last step this is the policy's
                     failure: "x op' b = target".
  operation_forward  step k's operation replaced, every later result computed from it, but the
                     last step's result written as the original final value (the target of a
                     search problem, the gold answer of a chain problem): a chain that went
                     astray and still claims the goal. In a search problem k is a "?" position.
  operand_kept       step k's operand replaced by another in its range, the result kept.

The answer section is the written chain (search: the start, the written operations and the
question's operands, as the policy writes it; chain: the last written result). Each text is
labelled by `stepmath.verify` -- PRM800K convention (Lightman et al. 2023): a step is positive
iff it is locally valid, the first invalid step and every later one negative -- never by the
corruption's intent; a corruption the verifier passes as a perfect solution is discarded and
redrawn. Records are then built exactly as for sampled solutions (`build_reward_records`,
hence `prm_record`), so the PRM sees the same token layout.

No information from a level outside the supervised ones is used: the problems, the bases and
the corruptions all come from the easy training problems that were sampled for labelling.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from scalign.algorithms.reward_labels import LabelledSolutions, build_reward_records
from scalign.data import stepmath
from scalign.objectives.reward import oprm_records

CORRUPTIONS = ("operation_kept", "operation_forward", "operand_kept")


def base_fillings(problem: stepmath.Problem, texts: Sequence[str] = (),
                  verdicts: Sequence[Any] = ()) -> list[tuple[str, ...]]:
    """Distinct operation sequences of correct solutions: the gold one first, then those of the
    verified samples (`texts[j]` with `verdicts[j].answer_label == 1`), in order."""
    out = [tuple(problem.ops)]
    for text, verdict in zip(texts, verdicts, strict=True):
        if not verdict.answer_label:
            continue
        steps = [stepmath.parse_step(s) for s in stepmath.split_solution(text).steps]
        if any(s is None for s in steps) or len(steps) != problem.num_steps:
            continue
        ops = tuple(s.op for s in steps)  # type: ignore[union-attr]
        if ops not in out:
            out.append(ops)
    return out


def _text(problem: stepmath.Problem, steps: Sequence[tuple[int, str, int, int]],
          ops: Sequence[str]) -> str:
    """Steps (a, op, b, c) in the gold layout, then the answer the written chain gives."""
    lines = [problem.step_text(a, op, b, c) for a, op, b, c in steps]
    if problem.search:
        answer = stepmath.format_expression(problem.start, ops, problem.operands, spaced=False)
    else:
        answer = str(steps[-1][3])
    return (stepmath.STEP_DELIMITER.join(lines) + stepmath.STEP_DELIMITER
            + stepmath.ANSWER_HEADER + stepmath.STEP_DELIMITER + answer)


def corrupt(problem: stepmath.Problem, ops: Sequence[str], kind: str,
            rng: np.random.Generator) -> str:
    """One corrupted solution text of `problem` from the correct operations `ops` (see the
    module docstring for the kinds). Its labels are whatever `stepmath.verify` says."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"corruption kind must be one of {CORRUPTIONS}, got {kind!r}")
    m, n, b = problem.modulus, problem.num_steps, list(problem.operands)
    ops = list(ops)
    values = [problem.start]
    for op, x in zip(ops, b, strict=True):
        values.append(stepmath.apply_op(values[-1], op, x, m))
    steps = [(values[k], ops[k], b[k], values[k + 1]) for k in range(n)]
    if kind == "operand_kept":
        k = int(rng.integers(n))
        lo, hi = stepmath.operand_range(ops[k], m)
        other = [x for x in range(lo, hi + 1) if x != b[k]]
        a, op, _, c = steps[k]
        steps[k] = (a, op, int(rng.choice(other)), c)
        return _text(problem, steps, ops)
    free = list(problem.free) if problem.search else list(range(n))
    k = int(rng.choice(free))
    new_op = str(rng.choice([o for o in stepmath.OPS if o != ops[k]]))
    written = list(ops)
    written[k] = new_op
    if kind == "operation_kept":
        a, _, x, c = steps[k]
        steps[k] = (a, new_op, x, c)
        return _text(problem, steps, written)
    v = values[k]  # operation_forward: recompute from step k, claim the goal at the end
    for j in range(k, n):
        c = stepmath.apply_op(v, written[j], b[j], m)
        steps[j] = (v, written[j], b[j], values[-1] if j == n - 1 else c)
        v = c
    return _text(problem, steps, written)


@dataclasses.dataclass
class AugmentStats:
    """Counts of what `failure_solutions` made."""

    requested: int = 0
    made: int = 0
    not_made: int = 0  # no new failing text found within the attempts
    by_kind: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    by_error: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def as_rows(self) -> list[dict[str, Any]]:
        rows = [{"metric": "augment_requested", "value": self.requested},
                {"metric": "augment_made", "value": self.made},
                {"metric": "augment_not_made", "value": self.not_made}]
        rows += [{"metric": f"augment_kind_{k}", "value": v} for k, v in sorted(self.by_kind.items())]
        rows += [{"metric": f"augment_error_{k}", "value": v}
                 for k, v in sorted(self.by_error.items())]
        return rows


def augment_counts(real_per_problem: Sequence[int], fraction: float,
                   rng: np.random.Generator) -> list[int]:
    """How many corrupted solutions each problem gets: `fraction` x its real PRM records,
    rounded stochastically (floor, plus one with probability equal to the remainder), so the
    expected total is `fraction` x the real total."""
    if fraction < 0:
        raise ValueError(f"augment fraction must be >= 0, got {fraction}")
    want = np.asarray(real_per_problem, np.float64) * float(fraction)
    base = np.floor(want)
    return [int(x) for x in base + (rng.random(len(want)) < want - base)]


def failure_solutions(problems: Sequence[stepmath.Problem], counts: Sequence[int], tokenizer: Any,
                      rng: np.random.Generator, *, samples: Sequence[Sequence[str]] | None = None,
                      sample_verdicts: Sequence[Sequence[Any]] | None = None,
                      max_attempts: int = 20) -> tuple[LabelledSolutions, AugmentStats]:
    """`counts[i]` distinct verifier-labelled failing solutions of each `problems[i]`.

    Bases are `base_fillings` (gold + the verified samples `samples[i]`); each draw picks a base
    and a corruption kind uniformly, and keeps the text if the verifier finds a wrong step
    (`first_error < len(step_labels)`) and it is new for the problem (not drawn before, not one
    of its samples: those are labelled already); at most
    `max_attempts * counts[i]` draws. Returns the solutions in the shape `build_reward_records`
    reads (prompt ids with bos, response ids = the text's continuation ids + eos) and counts.
    """
    if any(isinstance(p, stepmath.PathProblem) for p in problems):
        raise ValueError("failure augmentation corrupts chain steps ('a op b = c'); it does not "
                         "apply to path designs")
    stats = AugmentStats()
    out = LabelledSolutions([], [], [], [], [])
    token_bytes = tokenizer.token_bytes()
    for i, (problem, want) in enumerate(zip(problems, counts, strict=True)):
        stats.requested += int(want)
        if want <= 0:
            continue
        bases = base_fillings(problem, samples[i] if samples is not None else (),
                              sample_verdicts[i] if sample_verdicts is not None else ())
        texts: list[str] = []
        verdicts: list[Any] = []
        kinds: list[str] = []
        seen: set[str] = set(samples[i]) if samples is not None else set()
        for _ in range(max_attempts * int(want)):
            if len(texts) == want:
                break
            kind = CORRUPTIONS[int(rng.integers(len(CORRUPTIONS)))]
            text = corrupt(problem, bases[int(rng.integers(len(bases)))], kind, rng)
            if text in seen:
                continue
            seen.add(text)
            verdict = stepmath.verify(problem, text)
            if verdict.first_error is None or verdict.first_error >= len(verdict.step_labels):
                continue  # no wrong step: not a failure of a step
            texts.append(text)
            verdicts.append(verdict)
            kinds.append(kind)
        stats.not_made += int(want) - len(texts)
        if not texts:
            continue
        prompt_ids = None
        ids = []
        for text in texts:
            prompt_ids, cont = tokenizer.encode_continuation(problem.prompt, text, add_bos=True)
            decoded = b"".join(token_bytes[t] for t in cont).decode("utf-8", errors="replace")
            if decoded != text:
                raise ValueError(f"failure augmentation: the tokenizer does not round-trip "
                                 f"{text!r} (decoded {decoded!r}); step positions would be "
                                 f"misplaced")
            ids.append(list(cont) + [tokenizer.eos_id])
        out.problems.append(problem)
        out.prompt_ids.append(prompt_ids)
        out.texts.append(texts)
        out.verdicts.append(verdicts)
        out.ids.append(ids)
        stats.made += len(texts)
        stats.by_kind.update(kinds)
        stats.by_error.update(v.error for v in verdicts)
    return out, stats


def augment_records(records: dict[str, list[dict[str, Any]]], solutions: Any, domain: Any,
                    tokenizer: Any, fraction: float, *, after_first_error: str, seed: int
                    ) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """`records` (from `build_reward_records` on the policy samples `solutions` of easy train
    problems) plus failing corruptions of those problems' correct solutions.

    Problem i gets about `fraction` x (its real PRM records) corruptions (`augment_counts`),
    made by `failure_solutions` and turned into PRM records by `build_reward_records` (hence
    `prm_record`, with the same `after_first_error`). They are added to the PRM data and so to
    OPRM's PRM part; the ORM data is unchanged. Returns (records, report rows).
    """
    rng = np.random.default_rng([int(seed), 15])
    real = collections.Counter(str(r["uid"]) for r in records["prm"])
    problems = list(solutions.problems)
    counts = augment_counts([real[str(p.uid)] for p in problems], fraction, rng)
    made, stats = failure_solutions(problems, counts, tokenizer, rng, samples=solutions.texts,
                                    sample_verdicts=solutions.verdicts)
    extra, label_stats = build_reward_records(made, domain, tokenizer.token_bytes(),
                                              made.prompt_ids,
                                              after_first_error=after_first_error, seed=seed)
    prm = list(records["prm"]) + extra["prm"]
    out = {"prm": prm, "orm": records["orm"], "oprm": oprm_records(prm, records["orm"])}
    rows = [{"metric": "augment_fraction", "value": float(fraction)}, *stats.as_rows(),
            {"metric": "augment_prm_examples", "value": label_stats.prm_examples},
            {"metric": "augment_prm_labels_pos", "value": label_stats.prm_labels_pos},
            {"metric": "augment_prm_labels_neg", "value": label_stats.prm_labels_neg}]
    return out, rows
