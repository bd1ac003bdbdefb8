"""ReST-EM on the online loop (Singh et al. 2023; Sun et al. 2024's easy-to-hard variant).

One iteration (`RestEM.__call__(loop, k, key)`):

    E-step: P problems x K samples from the current policy (`rollout.collect`); keep
        - easy problems (answer supervised): the verified-correct solutions,
        - hard problems (no answer): the solutions whose PRM score (minimum step score) is at
          least `prm_threshold`,
        solutions without an answer line never, duplicates once, at most M per problem
        (highest PRM score first);
    M-step: reset the policy to the base model (`loop.reset_policy()`: the loop's reference is
        the base policy and is never refreshed here) and fine-tune it with SFT on the kept
        solutions for `epochs` passes, `batch_size` rows per step.

Steps have a fixed [batch_size, T] shape (the last one padded with rows whose loss mask is 0),
so the number of kept solutions changes the number of steps, never a compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from scalign import parallel
from scalign.algorithms.loop import OnlineLoop, host_rng
from scalign.algorithms.rollout import RewardFn, RolloutSpec, collect, mean_metrics, record
from scalign.models.config import ModelConfig
from scalign.objectives.sft import make_sft_loss


@dataclasses.dataclass(frozen=True)
class RestEMConfig:
    """prm_threshold: a hard problem's solution is kept when its PRM score is >= this;
    max_per_problem: M; batch_size: rows per SFT step (a multiple of data x fsdp);
    epochs: SFT passes over the kept set; reset_to_base: fine-tune from the base policy each
    iteration (ReST-EM) rather than continuing from the current one."""

    prm_threshold: float = 0.5
    max_per_problem: int = 4
    batch_size: int = 16
    epochs: int = 1
    reset_to_base: bool = True


def select_solutions(correct: np.ndarray, has_answer: np.ndarray, prm_score: np.ndarray, *,
                     threshold: float, max_per_problem: int,
                     completions: np.ndarray | None = None) -> np.ndarray:
    """The E-step's filter: bool [P, N] of kept samples (see the module docstring).

    correct: float [P, N] (NaN where the answer is unknown: a hard problem); has_answer: bool;
    prm_score: float [P, N] (NaN without a PRM); completions: optional [P, N, ...] tokens to
    drop duplicates within a problem.
    """
    correct = np.asarray(correct, np.float64)
    prm = np.asarray(prm_score, np.float64)
    known = ~np.isnan(correct)
    ok = np.where(known, correct == 1.0, np.nan_to_num(prm, nan=-np.inf) >= threshold)
    ok &= np.asarray(has_answer, bool)
    keep = np.zeros_like(ok)
    for p in range(ok.shape[0]):
        order = sorted(np.flatnonzero(ok[p]),
                       key=lambda j: (-np.nan_to_num(prm[p, j], nan=-np.inf), j))
        seen: set[bytes] = set()
        for j in order:
            if completions is not None:
                sig = np.asarray(completions[p, j]).tobytes()
                if sig in seen:
                    continue
                seen.add(sig)
            keep[p, j] = True
            if keep[p].sum() >= max_per_problem:
                break
    return keep


@dataclasses.dataclass
class RestEM:
    """ReST-EM on an `OnlineLoop` built with `create_loop` (SFT loss; reference = base)."""

    rollout: RolloutSpec
    reward_fn: RewardFn
    rest: RestEMConfig = RestEMConfig()

    def create_loop(self, config: ModelConfig, params: Any, **kwargs: Any) -> OnlineLoop:
        """`OnlineLoop.create` with the SFT loss and the base policy kept as the reference."""
        return OnlineLoop.create(config, params, loss_fn=make_sft_loss(config), reference=True,
                                 **kwargs)

    def __call__(self, loop: OnlineLoop, k: int, key: jax.Array) -> dict[str, float]:
        ro = collect(loop, self.rollout, self.reward_fn, key)
        cfg = self.rest
        completions = np.where(np.arange(ro.out.tokens.shape[-1]) < ro.out.lengths[..., None],
                               ro.out.tokens, -1)
        keep = select_solutions(ro.scores.correct, ro.scores.has_answer,
                                ro.scores.prm_score(), threshold=cfg.prm_threshold,
                                max_per_problem=cfg.max_per_problem, completions=completions)
        rows = np.flatnonzero(keep.reshape(-1))
        if cfg.batch_size % parallel.batch_divisor(loop.mesh):
            raise ValueError(f"rest_em.batch_size={cfg.batch_size} must be a multiple of the "
                             f"mesh's data x fsdp ({parallel.batch_divisor(loop.mesh)})")
        if cfg.reset_to_base:
            loop.reset_policy()
        tokens, mask = ro.batch["tokens"], ro.batch["response_mask"]
        rng = host_rng(jax.random.fold_in(key, 3))
        metrics = []
        for _ in range(cfg.epochs if rows.size else 0):
            order = rng.permutation(rows)
            for s in range(0, order.size, cfg.batch_size):
                part = order[s:s + cfg.batch_size]
                pad = cfg.batch_size - part.size
                idx = np.concatenate([part, np.full(pad, part[0])])
                loss_mask = mask[idx].copy()
                loss_mask[part.size:] = 0.0  # padding rows carry no loss
                metrics.append(loop.update({"tokens": tokens[idx], "loss_mask": loss_mask}))
        correct = np.asarray(ro.scores.correct, np.float64)
        easy = ~np.isnan(correct)
        loop.pool.record(ro.ids, "num_kept", keep.sum(1))
        out = record(loop, ro, np.where(keep, 1.0, 0.0))
        out.update({"kept": float(keep.sum()), "kept_easy": float((keep & easy).sum()),
                    "kept_hard": float((keep & ~easy).sum()), "sft_steps": float(len(metrics))})
        out.update(mean_metrics(metrics, "sft/"))
        return out
