"""Reward-model labels from the policy's own solutions on *easy* problems.

Easy-to-hard generalization (Sun et al. 2024) trains its evaluators on supervision that exists
only for easy problems (levels 1-3). Here the supervision is the domain's verifier, applied to
solutions the SFT policy samples for easy *training* problems:

  1. sample K solutions per easy train problem, drop exact duplicates;
  2. verify each: per-step labels (PRM800K convention, Lightman et al. 2023) and the outcome;
  3. place the labels on tokens:
       PRM   one label per step, read at the step's end token (the first token of the "\\n\\n"
             delimiter that closes the step; the last token if the text ends there), and the
             answer segment's label (1 iff every step and the answer are right) at the last
             answer token. With `after_first_error="drop"` (PRM800K's data ends at the first
             wrong step) labels after the first 0 are not used, so the PRM models
             p(step k right | steps < k right) and `prod` aggregation is the chain rule; "keep"
             labels every later step 0 (prefix correctness).
       ORM   the outcome (final answer right) at the last answer token, or at the last token
             when there is no answer (Cobbe et al. 2021; Uesato et al. 2022).
       OPRM  the union of the PRM and ORM examples (Sun et al. 2024).
  4. balance ORM positives:negatives per problem to at most `max_ratio`:1 either way by
     subsampling the larger class (the paper balances its ORM data); problems whose samples
     are all right or all wrong keep at most `keep_one_class` samples. Every drop is counted.

`assert_levels` guards the experiment's premise: it raises if any example comes from a level
outside the supervised ones.

**Human labels instead of the verifier** (`prm800k_solutions`): on real MATH there is no step
verifier, and Sun et al. (2024) train their PRMs on PRM800K (Lightman et al. 2023), whose
step labels come from human raters. `prm800k_solutions` turns PRM800K's step-labelled
solutions of easy problems into the same `LabelledSolutions` shape the policy samples have
(texts in the PRM800K layout, token ids, verdicts carrying the human step labels and the
graded outcome), so `build_reward_records` places the labels exactly as it does for sampled
solutions.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from scalign.data.domain import format_solution
from scalign.data.math import MathProblem, StepLabelledSolution, problem_key
from scalign.data.stepmath import STEP_DELIMITER, split_solution
from scalign.objectives.reward import oprm_records, token_positions_of_chars


@dataclasses.dataclass(frozen=True)
class ScoredPositions:
    """Where an evaluator reads its scores in one tokenized solution.

    tokens: prompt + response ids (the response cut at its stop).
    step_positions: index into `tokens` of each step's score token.
    answer_position: index of the last answer token, or None without an answer.
    final_position: the ORM read-out: answer_position, else the last token.
    response_start: index of the first response token (None if unknown).
    """

    tokens: np.ndarray
    step_positions: tuple[int, ...]
    answer_position: int | None
    final_position: int
    response_start: int | None = None

    def reads(self, kind: str) -> tuple[int, ...]:
        """The positions whose scores make up evaluator `kind`'s solution score.

        ORM: (final_position,) -- its score is the score there. PRM and OPRM: every step's
        position, then the answer's (the answer segment is the final step) -- their solution
        score is an aggregation of these step scores (`evaluation.rerank.aggregate`: min,
        prod, ...; "last" = the answer-token score). An OPRM is read like a PRM: it is
        trained on the PRM and ORM examples together, and Sun et al. (2024) re-rank with
        both through the same step aggregations.
        """
        if kind == "orm":
            return (self.final_position,)
        if kind in ("prm", "oprm"):
            answer = () if self.answer_position is None else (self.answer_position,)
            return tuple(self.step_positions) + answer
        raise ValueError(f"evaluator kind must be 'orm', 'prm' or 'oprm', got {kind!r}")


def score_positions(token_bytes: Sequence[bytes], prompt_ids: Sequence[int],
                    response_ids: Sequence[int], text: str, parsed: Any) -> ScoredPositions:
    """Token positions of the step ends, the answer and the final read-out of one solution.

    `text` is the decoded response (`response_ids`' text, possibly cut at a stop string) and
    `parsed` its `split_solution` (step_ends / answer_end character offsets). A step ending at
    character e is read at the token holding character e (the delimiter's first token), or at
    the last token when the text ends there; the answer at the token holding its last character.
    """
    response_ids = list(response_ids)
    tokens = np.asarray(list(prompt_ids) + response_ids, np.int32)
    offset = len(prompt_ids)
    last = len(tokens) - 1
    if not response_ids or not text:
        return ScoredPositions(tokens, (), None, last, offset)
    inside = [e for e in parsed.step_ends if e < len(text)]
    chars = inside + ([min(parsed.answer_end, len(text)) - 1]
                      if parsed.answer_end is not None and parsed.answer_end > 0 else [])
    owner = token_positions_of_chars(response_ids, chars, token_bytes) + offset
    steps = [int(p) for p in owner[:len(inside)]] + [last] * (len(parsed.step_ends) - len(inside))
    answer = int(owner[-1]) if len(chars) > len(inside) else None
    return ScoredPositions(tokens, tuple(steps), answer, answer if answer is not None else last,
                           offset)


@dataclasses.dataclass
class LabelStats:
    problems: int = 0
    samples: int = 0
    duplicates: int = 0
    orm_dropped_balance: int = 0
    orm_dropped_one_class: int = 0
    prm_examples: int = 0
    orm_examples: int = 0
    prm_labels_pos: int = 0
    prm_labels_neg: int = 0
    orm_pos: int = 0
    orm_neg: int = 0
    orm_no_answer: int = 0

    def as_rows(self) -> list[dict[str, Any]]:
        return [{"metric": k, "value": v} for k, v in dataclasses.asdict(self).items()]


def prm_record(pos: ScoredPositions, verdict: Any, *, after_first_error: str,
               level: int, uid: str) -> dict[str, Any] | None:
    """A PRM record for `RewardFeaturizer` (step positions + labels, answer label), or None.

    With "drop" the labels stop at the first wrong step (and the answer is labelled only when
    no step before it is wrong); with "keep" every step keeps its prefix label.
    """
    if after_first_error not in ("drop", "keep"):
        raise ValueError(f"after_first_error must be 'drop' or 'keep', got {after_first_error!r}")
    labels = [int(y) for y in list(verdict.step_labels)[:len(pos.step_positions)]]
    positions = list(pos.step_positions[:len(labels)])
    if after_first_error == "drop" and 0 in labels:
        cut = labels.index(0) + 1
        labels, positions = labels[:cut], positions[:cut]
    rec: dict[str, Any] = {"kind": "prm", "tokens": pos.tokens, "step_end_positions": positions,
                           "step_labels": labels, "answer_position": None,
                           "answer_label": None, "level": level, "uid": uid,
                           "response_start": pos.response_start}
    if pos.answer_position is not None and (after_first_error == "keep" or all(labels)) \
            and pos.answer_position not in positions:
        rec["answer_position"] = pos.answer_position
        rec["answer_label"] = int(verdict.answer_label)
    if not positions and rec["answer_position"] is None:
        return None
    return rec


def orm_record(pos: ScoredPositions, verdict: Any, *, level: int, uid: str) -> dict[str, Any]:
    """An ORM record: the outcome at the final read-out position."""
    return {"kind": "orm", "tokens": pos.tokens, "final_position": pos.final_position,
            "outcome": int(bool(verdict.outcome_correct)), "level": level, "uid": uid}


def balance_indices(outcomes: Sequence[bool], *, max_ratio: float, keep_one_class: int,
                    rng: np.random.Generator) -> tuple[list[int], str | None]:
    """Indices kept so that positives:negatives lies within [1/max_ratio, max_ratio].

    Returns (kept indices in original order, drop reason or None).
    """
    pos = [i for i, o in enumerate(outcomes) if o]
    neg = [i for i, o in enumerate(outcomes) if not o]
    if not pos or not neg:
        both = pos or neg
        kept = sorted(rng.choice(both, size=min(keep_one_class, len(both)), replace=False)
                      .tolist()) if both else []
        return kept, "one_class"
    cap_pos = int(np.floor(max_ratio * len(neg)))
    cap_neg = int(np.floor(max_ratio * len(pos)))
    reason = None
    if len(pos) > cap_pos:
        pos = sorted(rng.choice(pos, size=cap_pos, replace=False).tolist())
        reason = "balance"
    if len(neg) > cap_neg:
        neg = sorted(rng.choice(neg, size=cap_neg, replace=False).tolist())
        reason = "balance"
    return sorted(pos + neg), reason


def build_reward_records(solutions: Any, domain: Any, token_bytes: Sequence[bytes],
                         prompt_ids: Sequence[Sequence[int]], *, after_first_error: str = "drop",
                         max_ratio: float = 3.0, keep_one_class: int = 2, seed: int = 0,
                         orm_needs_answer: bool = False
                         ) -> tuple[dict[str, list[dict[str, Any]]], LabelStats]:
    """PRM, ORM and OPRM record lists from sampled solutions (`evaluation.generation.Solutions`
    with tokens, or `LabelledSolutions`) of easy training problems. `prompt_ids[i]` are problem
    i's prompt ids as the sampler saw them (bos included).

    With `orm_needs_answer=True` a solution without an answer (`verdict.answer is None`, e.g. a
    PRM800K path that stops at its first wrong step) gives no ORM example: its outcome is
    unknown rather than wrong. Such solutions are counted in `stats.orm_no_answer` and left
    out of the ORM balancing; they still give PRM examples.
    """
    rng = np.random.default_rng(seed)
    stats = LabelStats(problems=len(solutions.problems))
    prm: list[dict[str, Any]] = []
    orm: list[dict[str, Any]] = []
    for i, problem in enumerate(solutions.problems):
        seen: set[str] = set()
        items = []
        for j, text in enumerate(solutions.texts[i]):
            stats.samples += 1
            if text in seen:
                stats.duplicates += 1
                continue
            seen.add(text)
            items.append(j)
        level = int(problem.level)
        uid = str(getattr(problem, "uid", i))
        orm_items = [j for j in items if not orm_needs_answer
                     or solutions.verdicts[i][j].answer is not None]
        stats.orm_no_answer += len(items) - len(orm_items)
        outcomes = [bool(solutions.verdicts[i][j].outcome_correct) for j in orm_items]
        keep, reason = balance_indices(outcomes, max_ratio=max_ratio,
                                       keep_one_class=keep_one_class, rng=rng)
        dropped = len(orm_items) - len(keep)
        if reason == "one_class":
            stats.orm_dropped_one_class += dropped
        elif reason == "balance":
            stats.orm_dropped_balance += dropped
        keep_set = {orm_items[k] for k in keep}
        for j in items:
            verdict = solutions.verdicts[i][j]
            pos = score_positions(token_bytes, prompt_ids[i], solutions.response_ids(i, j),
                                  solutions.texts[i][j], domain.parse(solutions.texts[i][j]))
            rec = prm_record(pos, verdict, after_first_error=after_first_error, level=level,
                             uid=uid)
            if rec is not None:
                prm.append(rec)
                labels = rec["step_labels"] + ([rec["answer_label"]]
                                               if rec["answer_label"] is not None else [])
                stats.prm_labels_pos += sum(1 for y in labels if y)
                stats.prm_labels_neg += sum(1 for y in labels if not y)
            if j in keep_set:
                orm.append(orm_record(pos, verdict, level=level, uid=uid))
                if verdict.outcome_correct:
                    stats.orm_pos += 1
                else:
                    stats.orm_neg += 1
    stats.prm_examples, stats.orm_examples = len(prm), len(orm)
    return {"prm": prm, "orm": orm, "oprm": oprm_records(prm, orm)}, stats


def assert_levels(records: Sequence[dict[str, Any]], allowed: Sequence[int]) -> None:
    """Raise if a record comes from a level outside `allowed` (no hard-level supervision)."""
    allowed_set = {int(a) for a in allowed}
    bad = sorted({int(r["level"]) for r in records} - allowed_set)
    if bad:
        raise AssertionError(f"reward-model training data contains levels {bad}; only "
                             f"{sorted(allowed_set)} are supervised")


# ------------------------------------------------------------------------- PRM800K
@dataclasses.dataclass
class LabelledSolutions:
    """Given (not sampled) solutions in the shape `build_reward_records` reads.

    problems[i]: the problem (`level`, `uid`); texts[i][j]: solution j's text, equal to the
    decoded bytes of its token ids (`Tokenizer.token_bytes`), so character offsets map onto
    tokens; verdicts[i][j]: its labels (`step_labels`, `answer_label`, `outcome_correct`,
    `answer`); prompt_ids[i]: the prompt's ids (bos included); ids[i][j]: the response's ids.
    """

    problems: list[Any]
    texts: list[list[str]]
    verdicts: list[list[Any]]
    prompt_ids: list[list[int]]
    ids: list[list[list[int]]]

    def response_ids(self, i: int, j: int) -> np.ndarray:
        return np.asarray(self.ids[i][j], np.int32)


_BLANK_LINE_RE = re.compile(r"\n[ \t]*\n\s*")


def prm800k_text(steps: Sequence[str]) -> tuple[str, bool] | None:
    """PRM800K steps in the layout the policy writes: (text, has_answer), or None.

    Steps are stripped and joined by "\\n\\n" (a blank line inside a step becomes one
    newline, so the delimiter only separates steps). PRM800K's final step "# Answer\\n\\nX"
    becomes the answer section. None when a step is empty or a step other than the last holds
    an answer header (the labels could not be aligned with the text).
    """
    out: list[str] = []
    for k, step in enumerate(steps):
        parsed = split_solution(step)
        if parsed.answer is not None:
            if k != len(steps) - 1 or parsed.steps or not parsed.answer:
                return None
            return format_solution(out, parsed.answer), True
        text = _BLANK_LINE_RE.sub("\n", step.strip())
        if not text:
            return None
        out.append(text)
    return STEP_DELIMITER.join(out), False


def prm800k_solutions(solutions: Sequence[StepLabelledSolution], domain: Any, tokenizer: Any, *,
                      levels: Sequence[int], max_tokens: int | None = None
                      ) -> tuple[LabelledSolutions, collections.Counter[str]]:
    """PRM800K step-labelled solutions of the supervised `levels` as `LabelledSolutions`.

    For each solution (grouped by problem text, in first-seen order):
      - its level must be known and in `levels`; a problem of the domain's test split is never
        used (drops: "level_unknown", "level_not_supervised", "test_problem");
      - text = `prm800k_text(steps)` after `domain.prompt` (drop: "unaligned_steps");
      - ids = `Tokenizer.encode_continuation` (bos added); longer than `max_tokens` in all:
        drop "too_long";
      - verdict = `domain.verify` of the text against the reference answer (PRM800K's
        `ground_truth_answer`, else the MATH answer of the same problem, `domain.reference`;
        drop "no_reference_answer"), with the human labels put in: `step_labels` = the labels
        of the non-answer steps, `answer_label` = the label of the "# Answer" step (0 without
        one), `outcome_correct` = `is_equiv(answer, reference)` from `domain.verify`; a
        path without its "# Answer" step (it stopped at a wrong step) gets `answer=None`, so
        `build_reward_records(orm_needs_answer=True)` gives it no ORM example;
      - the parsed text must have one step per label (drop: "unaligned_steps").

    Returns (solutions, drop counts by reason). `domain` needs `prompt`, `verify`, `parse`,
    `split_of` and `reference` (`data.domain.MathDomain`); `tokenizer` needs
    `encode_continuation` and `token_bytes`.
    """
    allowed = {int(lv) for lv in levels}
    token_bytes = tokenizer.token_bytes()
    drops: collections.Counter[str] = collections.Counter()
    groups: dict[str, int] = {}
    out = LabelledSolutions([], [], [], [], [])
    for sol in solutions:
        if sol.level is None:
            drops["level_unknown"] += 1
            continue
        if int(sol.level) not in allowed:
            drops["level_not_supervised"] += 1
            continue
        if domain.split_of(sol.problem) == "test":
            drops["test_problem"] += 1
            continue
        ref = domain.reference(sol.problem)
        answer = sol.answer if sol.answer else (ref.answer if ref is not None else None)
        if answer is None:
            drops["no_reference_answer"] += 1
            continue
        laid_out = prm800k_text(sol.steps)
        if laid_out is None:
            drops["unaligned_steps"] += 1
            continue
        text, has_answer = laid_out
        problem = MathProblem(uid=ref.uid if ref is not None else sol.uid, problem=sol.problem,
                              solution=ref.solution if ref is not None else "", answer=answer,
                              level=int(sol.level),
                              subject=ref.subject if ref is not None else "")
        prompt_ids, ids = tokenizer.encode_continuation(domain.prompt(problem), text,
                                                         add_bos=True)
        if max_tokens is not None and len(prompt_ids) + len(ids) > max_tokens:
            drops["too_long"] += 1
            continue
        decoded = b"".join(token_bytes[t] for t in ids).decode("utf-8", errors="replace")
        labels = [int(y) for y in sol.labels]
        step_labels = labels[:-1] if has_answer else labels
        if len(domain.parse(decoded).steps) != len(step_labels):
            drops["unaligned_steps"] += 1
            continue
        verdict = domain.verify(problem, text)
        if not has_answer:  # the path stops before its answer: the outcome is unknown
            verdict = dataclasses.replace(verdict, answer=None, outcome_correct=False)
        verdict = dataclasses.replace(verdict, step_labels=tuple(step_labels),
                                      answer_label=labels[-1] if has_answer else 0)
        key = problem_key(sol.problem)
        if key not in groups:
            groups[key] = len(out.problems)
            out.problems.append(problem)
            out.prompt_ids.append(prompt_ids)
            for part in (out.texts, out.verdicts, out.ids):
                part.append([])
        i = groups[key]
        out.texts[i].append(decoded)
        out.verdicts[i].append(verdict)
        out.ids[i].append(ids)
    return out, drops
