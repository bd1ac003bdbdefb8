"""PPO with a critic and process-reward shaping, on the online loop (Sun et al. 2024's recipe).

One iteration (`PPO.__call__(loop, k, key)`, the loop's `iterate`):

    rollout   = P prompts x N samples at temperature 0.7 (`rollout.collect`, current params)
    old_logp  = loop.log_probs(tokens)               ref_logp = loop.log_probs(tokens, "reference")
    old_v     = loop.values(tokens)                  (critic initialised from the reward model)
    r_t       = -kl_coef max(old_logp_t - ref_logp_t, 0)       per response token (k1 clamped)
              + terminal reward on the last token   (easy 1/0, hard 0.25, stop penalty -1)
              + min-shaped PRM step rewards on the step delimiters   (RewardSpec.use_prm)
    r         = whiten(r, shift_mean=False)          A, R = GAE(r, old_v; gamma, lam)
    A         = whiten(A)
    for each of `minibatches` random parts:  loop.update(clipped surrogate)
                                             loop.update_value(clipped value loss)

Every array has a fixed shape ([P N, T]), so nothing recompiles after the first iteration.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scalign import parallel
from scalign.algorithms.loop import OnlineLoop, host_rng
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


@functools.partial(jax.jit, static_argnames=("ppo",))
def ppo_advantages(ppo: pg.PPOConfig, logp: jax.Array, ref_logp: jax.Array, values: jax.Array,
                   score_rewards: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Token rewards (KL penalty + `score_rewards`), whitening and GAE, all [R, T]."""
    kl = pg.kl_penalty(logp, ref_logp, ppo.kl_estimator) * mask
    rewards = score_rewards * mask - ppo.kl_coef * kl
    if ppo.whiten_rewards:
        rewards = pg.whiten(rewards, mask, shift_mean=False)
    adv, ret = pg.gae(rewards, values, mask, gamma=ppo.gamma, lam=ppo.lam)
    if ppo.whiten_advantages:
        adv = pg.whiten(adv, mask)
    return {"advantages": adv, "returns": ret, "kl": kl}


@dataclasses.dataclass
class PPO:
    """PPO on an `OnlineLoop` whose policy step runs `loss_fn` and value step `value_loss_fn`
    (build it with `create_loop`). `reward_fn` scores a rollout (`rollout.RewardFn`)."""

    rollout: RolloutSpec
    reward_fn: RewardFn
    reward: RewardSpec = RewardSpec()
    ppo: pg.PPOConfig = pg.PPOConfig()

    def loss_fn(self, config: ModelConfig):
        return pg.make_ppo_loss(config, self.ppo)

    def value_loss_fn(self, value_config: ModelConfig):
        return pg.make_value_loss(value_config, self.ppo)

    def create_loop(self, config: ModelConfig, params: Any, *, value_params: Any,
                    value_logical_axes: Any, value_config: ModelConfig | None = None,
                    **kwargs: Any) -> OnlineLoop:
        """`OnlineLoop.create` with the PPO losses, a frozen reference copy of `params`, and
        the critic `value_params` (the reward model's params: scalar head included)."""
        value_config = value_config or config
        return OnlineLoop.create(config, params, loss_fn=self.loss_fn(config), reference=True,
                                 value_params=value_params,
                                 value_logical_axes=value_logical_axes,
                                 value_loss_fn=self.value_loss_fn(value_config),
                                 value_config=value_config,
                                 logprob_chunk=self.ppo.logprob_chunk, **kwargs)

    def score_rewards(self, ro) -> tuple[np.ndarray, np.ndarray]:
        """Terminal [P, N] and token score rewards [R, T] (terminal + shaped steps)."""
        terminal = self.reward.terminal(ro.scores)
        tok = np.asarray(pg.place_at_last_token(terminal.reshape(-1),
                                                ro.batch["response_mask"]))
        steps = self.reward.step_rewards(ro.scores)
        if steps is not None:
            delim = ro.token_map(np.asarray(ro.scores.delimiters, np.int32), -1)
            S = steps.shape[-1]
            tok = tok + np.asarray(pg.step_rewards_to_tokens(steps.reshape(-1, S), delim))
        return terminal, tok

    def __call__(self, loop: OnlineLoop, k: int, key: jax.Array) -> dict[str, float]:
        ro = collect(loop, self.rollout, self.reward_fn, key)
        tokens, mask = ro.batch["tokens"], ro.batch["response_mask"]
        old_logp = loop.log_probs(tokens)
        ref_logp = loop.log_probs(tokens, "reference")
        old_values = loop.values(tokens) * mask
        terminal, score_tok = self.score_rewards(ro)
        est = jax.device_get(ppo_advantages(self.ppo, old_logp, ref_logp, old_values,
                                            jnp.asarray(score_tok, jnp.float32), mask))
        rng = host_rng(jax.random.fold_in(key, 3))
        policy_metrics, value_metrics = [], []
        for rows in minibatch_rows(ro.num_rows, self.ppo.minibatches, rng,
                                   parallel.batch_divisor(loop.mesh)):
            rows = np.sort(rows)
            policy_metrics.append(loop.update({
                "tokens": tokens[rows], "response_mask": mask[rows],
                "old_logp": old_logp[rows], "advantages": est["advantages"][rows]}))
            value_metrics.append(loop.update_value({
                "tokens": tokens[rows], "response_mask": mask[rows],
                "old_values": old_values[rows], "returns": est["returns"][rows]}))
        out = record(loop, ro, terminal)
        out.update(mean_metrics(policy_metrics))
        out.update(mean_metrics(value_metrics, "value/"))
        out["kl_ref"] = float((est["kl"] * mask).sum() / max(mask.sum(), 1.0))
        return out
