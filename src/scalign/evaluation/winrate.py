"""Win rate of a policy against a reference policy, judged per prompt, with a bootstrap CI.

eva (Ye et al. 2024) reports win rates judged by a model other than the one it trained with
(Arena-Hard's GPT-4 judge); in the synthetic domain the judge is the verifier. For prompt p
with judge scores a_{p,j} (policy) and b_{p,j} (reference) of S paired samples:

    o_p = mean_j [ 1{a_pj > b_pj} + 0.5 * 1{|a_pj - b_pj| <= tie_tol} ]   (ties count half)
    win rate = mean_p o_p

The 95% interval is the percentile bootstrap over prompts (Efron & Tibshirani 1993): resample
the P prompts with replacement `n_boot` times, take the 2.5 / 97.5 percentiles of the mean.
"""

from __future__ import annotations

import numpy as np


def bootstrap_mean_ci(values: np.ndarray, *, n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of mean(values) over axis 0 (the resampled unit)."""
    v = np.asarray(values, np.float64)
    if v.shape[0] == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, v.shape[0], (n_boot, v.shape[0]))
    means = v[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def prompt_outcomes(scores: np.ndarray, reference_scores: np.ndarray, *,
                    tie_tol: float = 0.0) -> np.ndarray:
    """o_p in [0, 1] per prompt from paired scores [P] or [P, S] (see the module docstring)."""
    a = np.asarray(scores, np.float64)
    b = np.asarray(reference_scores, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"policy scores {a.shape} and reference scores {b.shape} differ")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("judge scores contain NaN or inf; judge every sample")
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    tie = np.abs(a - b) <= tie_tol
    return np.where(tie, 0.5, (a > b).astype(np.float64)).mean(axis=1)


def win_rate(scores: np.ndarray, reference_scores: np.ndarray, *, tie_tol: float = 0.0,
             n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """{"mean", "ci_low", "ci_high", "wins", "ties", "losses", "prompts"} of the policy
    against the reference (wins/ties/losses count sample pairs)."""
    o = prompt_outcomes(scores, reference_scores, tie_tol=tie_tol)
    a = np.asarray(scores, np.float64).reshape(len(o), -1)
    b = np.asarray(reference_scores, np.float64).reshape(len(o), -1)
    tie = np.abs(a - b) <= tie_tol
    lo, hi = bootstrap_mean_ci(o, n_boot=n_boot, seed=seed)
    return {"mean": float(o.mean()) if o.size else float("nan"), "ci_low": lo, "ci_high": hi,
            "wins": int(((a > b) & ~tie).sum()), "ties": int(tie.sum()),
            "losses": int(((a < b) & ~tie).sum()), "prompts": int(o.size)}
