"""Re-ranking sampled solutions: score aggregation, voting, best-of-N, ROC-AUC.

Sun et al. (2024), "Easy-to-Hard Generalization: Scalable Alignment Beyond Human Supervision",
Sec. 4: N solutions are sampled per problem, an evaluator (ORM / PRM / OPRM) scores them, and
one final answer is chosen by

- majority voting (self-consistency; Wang et al. 2023): the most frequent answer;
- best-of-N (Cobbe et al. 2021; Lightman et al. 2023): the answer of the best-scored solution;
- weighted voting (Li et al. 2023; Uesato et al. 2022): the answer whose solutions have the
  largest *sum* of scores.

A PRM scores each step, p_i = sigma(logit_i); `aggregate` turns step scores into a solution
score (min / prod, as in Lightman et al. 2023, or mean / max / last).

Conventions shared by the voting rules:

- Answers are compared through `key(answer)` (default `default_key`: strings stripped, other
  values as they are); pass a canonicaliser (e.g. grading normalisation) so that equivalent
  answers form one group. An answer that is None, or whose key is None, is *missing*: that
  solution never wins (a solution without an extractable answer cannot be submitted), and a
  problem whose solutions all miss an answer gets None.
- Ties are broken by first occurrence: among groups with equal votes / score sums, the group
  whose first member comes first wins; among equally scored solutions, the first wins. The
  chosen answer is the group's first member as given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

AGGREGATIONS = ("min", "prod", "mean", "max", "last")
METHODS = ("majority", "best_of_n", "weighted", "oracle")
# The method name of pass@N with every step verified: "oracle" over the verifier's answer_label
# (every step and the answer right) instead of the final answer alone.
ORACLE_ALL_STEPS = "oracle_all_steps"

KeyFn = Callable[[Any], Hashable | None]


# --------------------------------------------------------------------------- aggregation


_EVALUATOR_COLORS = {"orm": "tab:blue", "prm": "tab:green", "oprm": "tab:purple"}


def plot_style(evaluator: str, method: str) -> dict[str, Any]:
    """Line style of one re-ranking method in the accuracy-vs-N plots (the rerank stage and the
    seed aggregate): majority voting black, the pass@N oracle grey dashed (dotted: every step
    verified), each evaluator its own colour, its best-of-N dotted with square markers."""
    if method == "majority":
        return {"color": "black"}
    if method == "oracle":
        return {"color": "gray", "linestyle": "--", "marker": ""}
    if method == ORACLE_ALL_STEPS:
        return {"color": "gray", "linestyle": ":", "marker": ""}
    style = {"color": _EVALUATOR_COLORS.get(evaluator)}
    if method == "best_of_n":
        style |= {"linestyle": ":", "marker": "s"}
    return style


def table1_methods(evaluators: Sequence[str], aggregation: str, all_steps: bool = False
                   ) -> list[tuple[str, str, str, str]]:
    """The rows of a Table-1-style summary (Sun et al. 2024): (label, evaluator, method,
    aggregation) for majority voting, best-of-N and weighted voting per evaluator (an ORM scores
    a solution by its last token: aggregation "last"), and the pass@N oracle; with `all_steps`
    also the oracle that counts a solution only when the verifier accepts every step and the
    answer (`ORACLE_ALL_STEPS`)."""
    rows = [("Majority voting", "none", "majority", "none")]
    for e in evaluators:
        a = "last" if e == "orm" else aggregation
        rows += [(f"{e.upper()} best-of-N ({a})", e, "best_of_n", a),
                 (f"{e.upper()} weighted ({a})", e, "weighted", a)]
    rows.append(("pass@N (oracle)", "none", "oracle", "none"))
    if all_steps:
        rows.append(("pass@N (oracle, every step verified)", "none", ORACLE_ALL_STEPS, "none"))
    return rows


def aggregate(step_scores: Sequence[float] | np.ndarray, method: str,
              mask: Sequence[bool] | np.ndarray | None = None) -> float | np.ndarray:
    """Solution score from step scores p_1..p_S (probabilities, already sigma'd):

        min:  min_i p_i          prod: prod_i p_i          mean: (1/S) sum_i p_i
        max:  max_i p_i          last: p_S (the final step / answer score)

    (Sun et al. 2024, Sec. 4; Lightman et al. 2023 use prod and min.) Over a padded array
    [..., S] with `mask` [..., S] (True = a real step) the reduction runs over the last axis
    over masked entries only, "last" being the highest-index masked entry; it returns [...].
    A 1-D input without a mask returns a float. A solution with no steps (empty list or an
    all-False mask row) scores 0.0 under every method.
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}; known: {AGGREGATIONS}")
    x = np.asarray(step_scores, dtype=np.float64)
    if x.ndim == 0:
        raise ValueError("aggregate needs a sequence of step scores, got a scalar")
    m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool),
                                                                      x.shape)
    count = m.sum(axis=-1)
    if x.shape[-1] == 0:
        out = np.zeros(x.shape[:-1])
    elif method == "min":
        out = np.where(m, x, np.inf).min(axis=-1)
    elif method == "max":
        out = np.where(m, x, -np.inf).max(axis=-1)
    elif method == "prod":
        out = np.where(m, x, 1.0).prod(axis=-1)
    elif method == "mean":
        out = np.where(m, x, 0.0).sum(axis=-1) / np.maximum(count, 1)
    else:  # last
        last = x.shape[-1] - 1 - np.argmax(m[..., ::-1], axis=-1)
        out = np.take_along_axis(x, last[..., None], axis=-1)[..., 0]
    out = np.where(count > 0, out, 0.0)
    return float(out) if out.ndim == 0 else out


def pad_steps(step_scores: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged per-solution step scores -> (scores float64 [N, S_max], mask bool [N, S_max])."""
    width = max((len(s) for s in step_scores), default=0)
    out = np.zeros((len(step_scores), width))
    mask = np.zeros((len(step_scores), width), bool)
    for i, s in enumerate(step_scores):
        out[i, : len(s)] = s
        mask[i, : len(s)] = True
    return out, mask


# --------------------------------------------------------------------------- voting


def default_key(answer: Any) -> Hashable | None:
    """Strings are compared stripped of surrounding whitespace; anything else as is."""
    return answer.strip() if isinstance(answer, str) else answer


def _keys(answers: Sequence[Any], key: KeyFn) -> list[Hashable | None]:
    return [None if a is None else key(a) for a in answers]


def _check_scores(answers: Sequence[Any], scores: Sequence[float]) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(s) != len(answers):
        raise ValueError(f"{len(answers)} answers but {len(s)} scores")
    if np.any(np.isnan(s)):
        raise ValueError(f"scores contain NaN at {np.flatnonzero(np.isnan(s)).tolist()}")
    return s


def _vote(answers: Sequence[Any], weights: Sequence[float], key: KeyFn) -> Any:
    """argmax over answer groups of the summed weights; ties -> earliest group."""
    totals: dict[Hashable, float] = {}
    first: dict[Hashable, int] = {}
    for i, (k, w) in enumerate(zip(_keys(answers, key), weights, strict=True)):
        if k is None:
            continue
        if k not in totals:
            totals[k], first[k] = 0.0, i
        totals[k] += float(w)
    if not totals:
        return None
    best = max(totals.values())
    winner = min((first[k] for k, v in totals.items() if v == best))
    return answers[winner]


def majority_vote(answers: Sequence[Any], key: KeyFn = default_key) -> Any:
    """The most frequent answer (Wang et al. 2023, self-consistency).

    Missing answers (None) are ignored; ties go to the answer that occurs first; returns the
    first occurrence of the winning group, or None if every answer is missing.
    """
    return _vote(answers, [1.0] * len(answers), key)


def best_of_n(answers: Sequence[Any], scores: Sequence[float], key: KeyFn = default_key) -> Any:
    """The answer of the highest-scoring solution among those with an answer (ties: first).

    Cobbe et al. 2021; Lightman et al. 2023. None if every answer is missing.
    """
    s = _check_scores(answers, scores)
    best, best_i = -np.inf, None
    for i, k in enumerate(_keys(answers, key)):
        if k is not None and (best_i is None or s[i] > best):
            best, best_i = s[i], i
    return None if best_i is None else answers[best_i]


def weighted_vote(answers: Sequence[Any], scores: Sequence[float],
                  key: KeyFn = default_key) -> Any:
    """argmax over distinct answers a of sum_{i: key(answer_i) = a} score_i.

    Li et al. 2023; Uesato et al. 2022; Sun et al. 2024. Missing answers are ignored; ties go
    to the answer that occurs first; None if every answer is missing.
    """
    return _vote(answers, _check_scores(answers, scores), key)


# --------------------------------------------------------------------------- accuracy vs N


def answer_ids(answers: Sequence[Sequence[Any]], key: KeyFn = default_key) -> np.ndarray:
    """[P][K] answers -> int64 [P, K] group ids per problem (0, 1, ... in order of first
    occurrence), -1 for missing answers."""
    rows = [list(r) for r in answers]
    k = len(rows[0]) if rows else 0
    out = np.full((len(rows), k), -1, np.int64)
    for p, row in enumerate(rows):
        if len(row) != k:
            raise ValueError(f"answers must be rectangular [P][K]: problem 0 has {k} samples, "
                             f"problem {p} has {len(row)}")
        ids: dict[Hashable, int] = {}
        for j, a in enumerate(_keys(row, key)):
            if a is not None:
                out[p, j] = ids.setdefault(a, len(ids))
    return out


def _chosen_correct(ids: np.ndarray, correct: np.ndarray, scores: np.ndarray | None,
                    method: str) -> np.ndarray:
    """Vectorised choice over the rows of [P, n] arrays -> bool [P]: is the chosen answer right.

    Same rules as `majority_vote` / `best_of_n` / `weighted_vote` (the chosen answer is the
    group's first member, whose `correct` flag counts); "oracle" = any solution correct.
    """
    valid = ids >= 0
    any_valid = valid.any(axis=-1)
    rows = np.arange(ids.shape[0])
    if method == "oracle":
        return (correct & valid).any(axis=-1)
    if method == "best_of_n":
        masked = np.where(valid, scores, -np.inf)
        pick = np.where(masked.max(axis=-1) == -np.inf, np.argmax(valid, axis=-1),
                        np.argmax(masked, axis=-1))
        return correct[rows, pick] & any_valid
    n = ids.shape[1]
    groups = max(int(ids.max(initial=-1)) + 1, 1)
    onehot = (ids[:, :, None] == np.arange(groups)) & valid[:, :, None]      # [P, n, G]
    # samples without an answer carry no vote; their score (possibly NaN) must not reach the sum
    weights = np.ones(ids.shape) if method == "majority" else np.where(valid, scores, 0.0)
    votes = (onehot * weights[:, :, None]).sum(axis=1)                       # [P, G]
    present = onehot.any(axis=1)
    first = np.where(present, np.argmax(onehot, axis=1), n)                  # [P, G]
    best = np.where(present, votes, -np.inf).max(axis=-1, keepdims=True)
    candidate = present & (votes == best)
    winner = np.argmin(np.where(candidate, first, n + 1), axis=-1)
    rep = np.minimum(first[rows, winner], n - 1)
    return correct[rows, rep] & any_valid


def draw_subsets(num_problems: int, k: int, n: int, num_subsets: int,
                 rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Random n-of-K sample subsets: int64 [R, P, n], each row sorted (original sample order, so
    ties break as in the deterministic functions). R = num_subsets, or 1 when n = K (every subset
    is the full set). Draw it ONCE per (problem set, n) and hand it to every method, so that
    methods are compared on the same subsets (paired), not on independent random draws.
    """
    if not 1 <= n <= k:
        raise ValueError(f"n must be in [1, K={k}], got {n}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    if n == k:
        return np.broadcast_to(np.arange(k), (1, num_problems, k)).copy()
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(
        0 if rng is None else rng)
    u = gen.random((num_subsets, num_problems, k))
    return np.sort(np.argsort(u, axis=-1)[..., :n], axis=-1)


def rerank_correct(ids: np.ndarray, correct: np.ndarray, scores: np.ndarray | None,
                   method: str, subsets: np.ndarray) -> np.ndarray:
    """Per subset and problem, is the method's chosen answer right: bool [R, P].

    Args:
      ids: int [P, K] answer group ids (`answer_ids`; -1 = missing answer).
      correct: bool [P, K].
      scores: float [P, K] solution scores ("best_of_n" / "weighted"), or None. Scores of
        samples without an answer are ignored (they may be NaN).
      method: "majority" | "best_of_n" | "weighted" | "oracle".
      subsets: int [R, P, n] from `draw_subsets`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown re-ranking method {method!r}; known: {METHODS}")
    r, p, n = subsets.shape
    flat = subsets.reshape(r * p, n)
    rows = np.tile(np.arange(p), r)[:, None]
    out = _chosen_correct(ids[rows, flat], correct[rows, flat],
                          None if scores is None else scores[rows, flat], method)
    return out.reshape(r, p)


def rerank_accuracy(answers: Sequence[Sequence[Any]], correct: Sequence[Sequence[bool]],
                    scores: Sequence[Sequence[float]] | None, n: int, method: str,
                    num_subsets: int = 10, rng: np.random.Generator | int | None = None,
                    key: KeyFn = default_key, subsets: np.ndarray | None = None
                    ) -> tuple[float, float]:
    """Accuracy of a re-ranking method when only n of the K samples per problem are available.

    For each of `num_subsets` repetitions, every problem independently gets a uniformly random
    subset of n of its K samples (without replacement, kept in the original sample order so
    ties break as in the deterministic functions); the method picks an answer per problem and
    the repetition's accuracy is the fraction of problems whose chosen solution is correct.

    Args:
      answers: [P][K] extracted answers (None = missing).
      correct: [P][K] whether each sample's answer is right.
      scores: [P][K] solution scores (needed by "best_of_n" and "weighted"), or None. A sample
        without an answer never wins, so its score may be NaN (it is ignored).
      n: subset size, 1 <= n <= K. With n = K every subset is the full set.
      method: "majority" | "best_of_n" | "weighted" | "oracle" (any of the n correct).
      num_subsets: repetitions averaged over.
      rng: numpy Generator or seed (None = seed 0) drawing the subsets.
      key: answer canonicaliser (see the module docstring).
      subsets: int [R, P, n] from `draw_subsets` (then `num_subsets` and `rng` are unused):
        pass the same draw to every method to compare them paired.

    Returns:
      (mean, std) of the per-repetition accuracies (std with ddof = 0).
    """
    if method not in METHODS:
        raise ValueError(f"unknown re-ranking method {method!r}; known: {METHODS}")
    ids = answer_ids(answers, key)
    num_p, k = ids.shape
    ok = np.asarray(correct, bool).reshape(num_p, -1)
    if ok.shape != ids.shape:
        raise ValueError(f"correct has shape {ok.shape}, answers {ids.shape}")
    sc = None
    if method in ("best_of_n", "weighted"):
        if scores is None:
            raise ValueError(f"method {method!r} needs solution scores")
        sc = np.asarray(scores, np.float64)
        if sc.shape != ids.shape:
            raise ValueError(f"scores have shape {sc.shape}, answers {ids.shape}")
        if np.any(np.isnan(sc) & (ids >= 0)):
            raise ValueError("scores contain NaN")
    if num_p == 0:
        return math.nan, math.nan
    if subsets is None:
        subsets = draw_subsets(num_p, k, n, num_subsets, rng)
    elif subsets.shape[1:] != (num_p, n):
        raise ValueError(f"subsets have shape {subsets.shape}, expected [R, {num_p}, {n}]")
    accs = rerank_correct(ids, ok, sc, method, subsets).mean(axis=-1)
    return float(accs.mean()), float(accs.std())


def paired_bootstrap_diff(a: np.ndarray, b: np.ndarray, num_boot: int = 2000,
                          rng: np.random.Generator | int | None = None, level: float = 0.95
                          ) -> tuple[float, float, float]:
    """Paired difference of accuracies mean(a) - mean(b) with a percentile bootstrap CI.

    `a` and `b` are per-problem correctness of two methods on the SAME samples and subsets, bool
    or float [P] or [R, P] (R subsets, averaged first: d_p = mean_r a[r, p] - b[r, p]). The
    problems are the resampled unit (Efron & Tibshirani 1993, percentile interval): B draws of
    P problems with replacement, the CI is the ((1 - level)/2, (1 + level)/2) quantiles of the
    B resampled means of d_p. Returns (difference, ci_low, ci_high).
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
    d = (a - b).reshape(-1, a.shape[-1]).mean(axis=0)
    if d.size == 0:
        return math.nan, math.nan, math.nan
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(
        0 if rng is None else rng)
    boot = d[gen.integers(0, d.size, (num_boot, d.size))].mean(axis=-1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(lo), float(hi)


# --------------------------------------------------------------------------- ROC-AUC


def roc_auc(labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (Hanley & McNeil 1982):

        AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)

    with R_pos the sum of the positives' ranks among all scores (ties get their average rank,
    so a tied positive/negative pair counts 1/2). = P(score_pos > score_neg) + P(=)/2.
    Returns nan when either class is absent.
    """
    y = np.asarray(labels).astype(bool).reshape(-1)
    s = np.asarray(scores, np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if np.any(np.isnan(s)):
        raise ValueError("roc_auc: scores contain NaN")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # tie groups [start, end) in sorted order; average 1-based rank = (start + 1 + end) / 2
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [s.size]])
    group_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(group_rank, ends - starts)
    r_pos = ranks[y].sum()
    return float((r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
