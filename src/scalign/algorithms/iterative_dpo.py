"""Iterative DPO on the online loop (Sun et al. 2024's easy-to-hard variant; Xu et al. 2023).

One iteration (`IterativeDPO.__call__(loop, k, key)`):

    reference <- current policy                       (`loop.refresh_reference()`)
    P problems x K samples (`rollout.collect`); score_j = PRM score (minimum step score, 0
        without a PRM) + correctness_weight x answer correctness where known (easy problems)
    pairs per problem: best vs worst, 2nd best vs 2nd worst, ... while the score gap exceeds
        `gap_threshold`, at most `max_pairs_per_problem` (3), never two identical completions
    reference log-probs of every sample precomputed once, one forward over the rollout
        (`loop.sequence_log_probs`, TRL #2421's memory saving), handed to the loss as
        `ref_chosen_logps` / `ref_rejected_logps` by the shared `loop.pair_batches`
    DPO steps (`objectives.preference.make_preference_loss("dpo")`), `batch_size` pairs per step
        (the last one padded with weight-0 pairs), for `epochs` passes
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from scalign import parallel
from scalign.algorithms.loop import OnlineLoop, host_rng, pair_batches, sequence_log_probs
from scalign.algorithms.rollout import RewardFn, RolloutSpec, collect, mean_metrics, record
from scalign.models.config import ModelConfig
from scalign.objectives.preference import make_preference_loss


@dataclasses.dataclass(frozen=True)
class IterativeDPOConfig:
    beta: float = 0.1
    gap_threshold: float = 0.5
    max_pairs_per_problem: int = 3
    correctness_weight: float = 1.0
    batch_size: int = 8           # pairs per step (a multiple of data x fsdp)
    epochs: int = 1
    refresh_reference: bool = True


def sample_scores(correct: np.ndarray, prm_score: np.ndarray, correctness_weight: float = 1.0
                  ) -> np.ndarray:
    """score = PRM score (0 where NaN) + w x correct (0 where unknown), [P, N]."""
    return (np.nan_to_num(np.asarray(prm_score, np.float64), nan=0.0)
            + correctness_weight * np.nan_to_num(np.asarray(correct, np.float64), nan=0.0))


def select_pairs(scores: np.ndarray, *, gap_threshold: float, max_pairs: int,
                 completions: np.ndarray | None = None) -> list[tuple[int, int]]:
    """(chosen, rejected) sample indices of one problem: the i-th best against the i-th worst
    (i = 0, 1, ...) while score gap > `gap_threshold`, at most `max_pairs`; identical
    completions (by `completions[j]`) are never paired. Ties break by index."""
    scores = np.asarray(scores, np.float64)
    order = sorted(range(scores.size), key=lambda j: (-scores[j], j))
    pairs: list[tuple[int, int]] = []
    for i in range(min(max_pairs, scores.size // 2)):
        c, r = order[i], order[-1 - i]
        if not scores[c] - scores[r] > gap_threshold:
            break
        if completions is not None and np.array_equal(completions[c], completions[r]):
            continue
        pairs.append((c, r))
    return pairs


@dataclasses.dataclass
class IterativeDPO:
    """Iterative DPO on an `OnlineLoop` built with `create_loop` (DPO loss; a reference)."""

    rollout: RolloutSpec
    reward_fn: RewardFn
    dpo: IterativeDPOConfig = IterativeDPOConfig()

    def create_loop(self, config: ModelConfig, params: Any, **kwargs: Any) -> OnlineLoop:
        return OnlineLoop.create(config, params,
                                 loss_fn=make_preference_loss(config, "dpo", beta=self.dpo.beta),
                                 reference=True, **kwargs)

    def __call__(self, loop: OnlineLoop, k: int, key: jax.Array) -> dict[str, float]:
        cfg = self.dpo
        if cfg.batch_size % parallel.batch_divisor(loop.mesh):
            raise ValueError(f"iterative_dpo.batch_size={cfg.batch_size} must be a multiple of "
                             f"the mesh's data x fsdp ({parallel.batch_divisor(loop.mesh)})")
        if cfg.refresh_reference:  # at k = 0 a copy of the initial policy: a no-op
            loop.refresh_reference()
        ro = collect(loop, self.rollout, self.reward_fn, key)
        P, N = ro.out.lengths.shape
        scores = sample_scores(ro.scores.correct, ro.scores.prm_score(), cfg.correctness_weight)
        completions = np.where(np.arange(ro.out.tokens.shape[-1]) < ro.out.lengths[..., None],
                               ro.out.tokens, -1)
        pairs = [(p * N + c, p * N + r) for p in range(P)
                 for c, r in select_pairs(scores[p], gap_threshold=cfg.gap_threshold,
                                          max_pairs=cfg.max_pairs_per_problem,
                                          completions=completions[p])]
        tokens, mask = ro.batch["tokens"], ro.batch["response_mask"]
        metrics = []
        if pairs:
            ref = sequence_log_probs(loop, tokens, mask, "reference")
            rng = host_rng(jax.random.fold_in(key, 3))
            for _ in range(cfg.epochs):
                for batch in pair_batches(
                        tokens, mask, pairs, rows=cfg.batch_size,
                        order=rng.permutation(len(pairs)), ref_logps=ref,
                        response_start=ro.batch["response_start"],
                        prompt_width=self.rollout.width - self.rollout.max_new_tokens):
                    batch.pop("pair_index")
                    metrics.append(loop.update(batch))
        loop.pool.record(ro.ids, "num_pairs",
                         np.bincount(np.asarray([c // N for c, _ in pairs], np.int64),
                                     minlength=P))
        out = record(loop, ro, scores)
        out.update({"pairs": float(len(pairs)), "dpo_steps": float(len(metrics))})
        out.update(mean_metrics(metrics, "dpo/"))
        return out
