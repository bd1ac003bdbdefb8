"""eva's creator: how informative each prompt is, and which prompts to evolve.

Ye et al. (2024), *Evolving Alignment via Asymmetric Self-Play* (arXiv 2411.00062). One eva
iteration: the solver answers each prompt of the current set K times (6 in the paper,
temperature 0.7, top-p 0.9), a reward model scores the answers, the creator turns the K
rewards of a prompt into one *informativeness* number, draws a fraction of the prompts with
probability rising with it, evolves them into new prompts (`algorithms.evolve`), and the
solver trains with a preference loss on pairs (highest vs lowest reward) from the new set.

Informativeness of a prompt with rewards r_1..r_K (`informativeness`, one row per prompt):

    gap       max_i r_i - min_i r_i                         (the paper's default)
    maxmean   max_i r_i - mean(r)
    var       mean((r - mean(r))^2)                         (population variance)
    mean      mean(r)
    mean_inv  1 - (mean(r) - min_p mean) / (max_p mean - min_p mean)   over the prompt set
    loo       mean_i [r_i - (sum_j r_j - r_i) / (K - 1)]    mean leave-one-out advantage
    dts       best - second best                            (r sorted descending)
    uniform   1

`loo` is implemented exactly as that definition, which the authors' code also computes:
algebraically sum_i r_i - (K sum r - sum r)/(K - 1) = 0, so it is identically zero for every
prompt (up to rounding, which `informativeness` removes by computing the closed form) and its
selection is uniform. `loo_abs` (mean |leave-one-out advantage|, ours) is the contrast measure
the name suggests: the advantage is r_i - (S - r_i)/(K - 1) = K (r_i - mean(r)) / (K - 1), so
loo_abs = K / (K - 1) * mean_i |r_i - mean(r)|.

Selection (`select`), over P prompts with metric values v_p, drawing n = round(fraction * P):

    importance_weighted  w_p = u_p / sum(u), u = min-max normalised v; n draws without
                         replacement (the paper's default, fraction 0.25)
    greedy               the n prompts with the largest v (ties by index)
    stratified           10 quantile bins of v; from each bin round(fraction * size) prompts
                         drawn without replacement with the bin's weights w

`mean` is the one metric where *low* values are wanted ("train where the solver is weak"):
the authors' selection weights a prompt's mean reward inverted, which is `mean_inv` here;
`select` takes every metric's values as given (larger = more likely), so `mean` favours
prompts the solver already does well on and `mean_inv` is the authors' "mean" selection.
When all values are equal (e.g. `uniform`, `loo`) min-max normalisation is undefined and
every prompt gets the same weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRICS = ("gap", "maxmean", "var", "mean", "mean_inv", "loo", "loo_abs", "dts", "uniform")
SELECTIONS = ("importance_weighted", "greedy", "stratified")


def informativeness(rewards: np.ndarray, metric: str = "gap") -> np.ndarray:
    """Per-prompt informativeness, float64 [P], from rewards [P, K] (K >= 2 samples each)."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 2 or r.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, samples] with >= 2 samples, got {r.shape}")
    if not np.isfinite(r).all():
        raise ValueError("rewards contain NaN or inf; score every sample before selecting")
    K = r.shape[1]
    if metric == "gap":
        return r.max(1) - r.min(1)
    if metric == "maxmean":
        return r.max(1) - r.mean(1)
    if metric == "var":
        return r.var(1)
    if metric == "mean":
        return r.mean(1)
    if metric == "mean_inv":
        return 1.0 - min_max(r.mean(1))
    if metric == "loo":
        # mean_i [r_i - (S - r_i)/(K-1)] = (S - (K-1)^-1 (K S - S)) / K = 0 in closed form
        return np.zeros(r.shape[0])
    if metric == "loo_abs":
        return np.abs(r - r.mean(1, keepdims=True)).mean(1) * K / (K - 1)
    if metric == "dts":
        top = -np.sort(-r, axis=1)
        return top[:, 0] - top[:, 1]
    if metric == "uniform":
        return np.ones(r.shape[0])
    raise ValueError(f"unknown informativeness metric {metric!r}; known: {METRICS}")


def min_max(v: np.ndarray) -> np.ndarray:
    """(v - min v) / (max v - min v); all ones when v is constant (no preference)."""
    v = np.asarray(v, np.float64)
    if v.size == 0:
        return v
    lo, hi = v.min(), v.max()
    if hi - lo <= 1e-12 * max(1.0, abs(hi), abs(lo)):
        return np.ones_like(v)
    return (v - lo) / (hi - lo)


def selection_weights(values: np.ndarray) -> np.ndarray:
    """w = u / sum(u) with u the min-max normalised values (uniform when u sums to 0)."""
    u = min_max(values)
    s = u.sum()
    return u / s if s > 0 else np.full_like(u, 1.0 / max(u.size, 1))


def select(values: np.ndarray, fraction: float, rng: np.random.Generator,
           method: str = "importance_weighted", bins: int = 10) -> np.ndarray:
    """Indices (int64, in draw order) of the prompts to evolve; see the module docstring.

    With importance weighting, only prompts of positive weight can be drawn: the minimum of
    min-max normalisation has weight 0, so at most P - (#prompts at the minimum) are available
    and n is capped there (a constant metric keeps every prompt available).
    """
    v = np.asarray(values, np.float64).reshape(-1)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"selection fraction must be in (0, 1], got {fraction}")
    P = v.size
    n = max(1, int(round(fraction * P))) if P else 0
    if method == "greedy":
        return np.lexsort((np.arange(P), -v))[:n].astype(np.int64)
    if method == "importance_weighted":
        return _weighted_draw(np.arange(P), selection_weights(v), n, rng)
    if method == "stratified":
        w = selection_weights(v)
        edges = np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1]) if P else np.array([])
        which = np.searchsorted(np.unique(edges), v, side="right")
        out = []
        for b in np.unique(which):
            members = np.flatnonzero(which == b)
            k = int(round(fraction * members.size))
            if k:
                out.append(_weighted_draw(members, w[members], k, rng))
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)
    raise ValueError(f"unknown selection method {method!r}; known: {SELECTIONS}")


def _weighted_draw(ids: np.ndarray, w: np.ndarray, n: int, rng: np.random.Generator
                   ) -> np.ndarray:
    w = np.asarray(w, np.float64)
    if w.sum() <= 0:
        w = np.ones_like(w)
    n = min(n, int((w > 0).sum()))
    return rng.choice(ids, size=n, replace=False, p=w / w.sum()).astype(np.int64)


def preference_pairs(rewards: np.ndarray, min_gap: float = 0.0) -> list[tuple[int, int, int]]:
    """(prompt, chosen sample, rejected sample) per prompt: chosen = highest reward,
    rejected = lowest (eva's pairing; first index on ties). Prompts whose gap is <= min_gap
    (e.g. all samples equally good) give no pair."""
    r = np.asarray(rewards, np.float64)
    hi, lo = r.argmax(1), r.argmin(1)
    return [(p, int(hi[p]), int(lo[p])) for p in range(r.shape[0])
            if r[p, hi[p]] - r[p, lo[p]] > min_gap]


def mix_prompts(evolved: Sequence[int], current: Sequence[int], total: int,
                evolved_share: float, rng: np.random.Generator) -> list[int]:
    """The next iteration's prompt ids: round(evolved_share * total) evolved ones and the rest
    from the current set (the paper's 80% / 20%), each drawn without replacement (fewer when
    a side has too few; the other side fills up to `total` where it can)."""
    if not 0.0 <= evolved_share <= 1.0:
        raise ValueError(f"evolved_share must be in [0, 1], got {evolved_share}")
    n_evo = min(len(evolved), int(round(evolved_share * total)))
    n_cur = min(len(current), total - n_evo)
    n_evo = min(len(evolved), total - n_cur)
    pick_e = rng.choice(np.asarray(evolved, np.int64), n_evo, replace=False) if n_evo else []
    pick_c = rng.choice(np.asarray(current, np.int64), n_cur, replace=False) if n_cur else []
    return [int(i) for i in pick_e] + [int(i) for i in pick_c]
