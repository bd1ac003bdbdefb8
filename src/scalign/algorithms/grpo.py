"""GRPO on the online loop (Shao et al. 2024): group-normalised advantages, no critic, KL to the
reference inside the loss, eps-clipped ratios.

One iteration (`GRPO.__call__(loop, k, key)`):

    rollout  = P prompts x N samples (`rollout.collect`); the N samples of a prompt are a group
    ref_logp = loop.log_probs(tokens, "reference")
    outcome supervision (default):  r_i = terminal reward (+ the sum of the PRM's min-shaped
        step rewards with RewardSpec.use_prm); A_i = (r_i - mean_g) / (std_g + eps) on every
        token of completion i
    process supervision (GRPOConfig.process): the step rewards on their delimiters and the
        terminal reward on the last token, normalised over the group's reward positions;
        A_t = the sum of the normalised rewards at or after t
    for each of `minibatches` parts: loop.update(clipped surrogate + kl_coef KL_k3)

With one minibatch (and `GRPOConfig.shared_prompt`, the default) the update runs in the
shared-prompt layout (`loop.shared_prompt_rows`): each prompt's forward once, its N completions
against the prompt's K/V cache. With one minibatch the ratio's denominator is the current policy itself (old_logp is taken as
stop_gradient(logp) inside the loss), so no extra policy forward runs; with several, old
log-probs come from `loop.log_probs` before the first update.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from scalign import parallel
from scalign.algorithms.loop import OnlineLoop, host_rng, shared_prompt_rows
from scalign.algorithms.rollout import (
    RewardFn,
    RewardSpec,
    RolloutSpec,
    collect,
    mean_metrics,
    minibatch_rows,
    record,
)
from scalign.models.config import ModelConfig
from scalign.objectives import policy_gradient as pg


@dataclasses.dataclass
class GRPO:
    """GRPO on an `OnlineLoop` whose policy step runs `loss_fn` (build it with
    `create_loop`). `reward_fn` scores a rollout (`rollout.RewardFn`)."""

    rollout: RolloutSpec
    reward_fn: RewardFn
    reward: RewardSpec = RewardSpec()
    grpo: pg.GRPOConfig = pg.GRPOConfig()

    def loss_fn(self, config: ModelConfig):
        return pg.make_grpo_loss(config, self.grpo)

    def create_loop(self, config: ModelConfig, params: Any, **kwargs: Any) -> OnlineLoop:
        """`OnlineLoop.create` with the GRPO loss and a frozen reference copy of `params`."""
        return OnlineLoop.create(config, params, loss_fn=self.loss_fn(config), reference=True,
                                 logprob_chunk=self.grpo.logprob_chunk, **kwargs)

    def advantages(self, ro) -> tuple[np.ndarray, np.ndarray]:
        """(sequence rewards [P, N], token advantages [R, T])."""
        N = self.rollout.samples_per_prompt
        mask = ro.batch["response_mask"]
        terminal = self.reward.terminal(ro.scores)
        steps = self.reward.step_rewards(ro.scores)
        if not self.grpo.process:
            total = terminal + (steps.sum(-1) if steps is not None else 0.0)
            adv = np.asarray(pg.group_advantages(total.reshape(-1), N, eps=self.grpo.adv_eps,
                                                 ddof=self.grpo.adv_ddof))
            return total, adv[:, None] * mask
        last = np.asarray(pg.place_at_last_token(np.ones(mask.shape[0]), mask))
        tok, at = last * terminal.reshape(-1, 1), last
        if steps is not None:
            # one reward position per step: its last delimiter token
            ends = last_delimiters(ro.token_map(np.asarray(ro.scores.delimiters, np.int32), -1))
            tok = tok + np.asarray(pg.step_rewards_to_tokens(
                steps.reshape(-1, steps.shape[-1]), ends))
            at = np.maximum(at, (ends >= 0).astype(at.dtype))
        total = terminal + (steps.sum(-1) if steps is not None else 0.0)
        adv = np.asarray(pg.group_process_advantages(tok, at, mask, N, eps=self.grpo.adv_eps))
        return total, adv

    def __call__(self, loop: OnlineLoop, k: int, key: jax.Array) -> dict[str, float]:
        t0 = time.perf_counter()
        ro = collect(loop, self.rollout, self.reward_fn, key)
        t1 = time.perf_counter()
        tokens, mask = ro.batch["tokens"], ro.batch["response_mask"]
        several = self.grpo.minibatches > 1
        rewards, adv = self.advantages(ro)
        adv = adv.astype(np.float32)
        ta = time.perf_counter()
        shared = None
        if self.grpo.shared_prompt and not several:  # one update on the whole rollout
            shared = shared_prompt_rows(
                {"tokens": tokens, "response_mask": mask, "advantages": adv,
                 "response_start": ro.batch["response_start"]},
                self.rollout.samples_per_prompt,
                self.rollout.width - self.rollout.max_new_tokens,
                divisor=parallel.batch_divisor(loop.mesh))
        if shared is not None:
            shared.pop("response_start")
            shared["ref_logp"] = loop.log_probs_batch(shared, "reference")
            t2 = time.perf_counter()
            metrics = [loop.update(shared)]
        else:
            ref_logp = loop.log_probs(tokens, "reference")
            t2 = time.perf_counter()
            old_logp = loop.log_probs(tokens) if several else None
            rng = host_rng(jax.random.fold_in(key, 3))
            metrics = []
            for rows in minibatch_rows(ro.num_rows, self.grpo.minibatches, rng,
                                       parallel.batch_divisor(loop.mesh)):
                rows = np.sort(rows)
                batch = {"tokens": tokens[rows], "response_mask": mask[rows],
                         "ref_logp": ref_logp[rows], "advantages": adv[rows]}
                if several:
                    batch["old_logp"] = old_logp[rows]
                metrics.append(loop.update(batch))
        out = mean_metrics(metrics)  # blocks on the last update
        t4 = time.perf_counter()
        out.update(record(loop, ro, rewards))
        out.update({"time/rollout_s": t1 - t0, "time/advantages_s": ta - t1,
                    "time/reference_s": t2 - ta, "time/update_s": t4 - t2,
                    "shared_prompt": float(shared is not None)})
        return out


def last_delimiters(delimiter_step: np.ndarray) -> np.ndarray:
    """Keep only each step's last delimiter token: [R, T] step indices (-1 elsewhere)."""
    out = np.full_like(delimiter_step, -1)
    for r, row in enumerate(delimiter_step):
        for s in np.unique(row[row >= 0]):
            out[r, np.flatnonzero(row == s)[-1]] = s
    return out
