"""Policy-gradient objectives: PPO with a critic, GRPO, KL penalties and reward shaping.

Every per-token array is [B, T] and *aligned with the tokens* (as `objectives.logprobs`): entry
t belongs to token t, `mask` (the rollout's `response_mask`) is 1 on completion tokens. The
value of the state before token t is read from the hidden state at t - 1 (`token_values`), the
same shift that gives token t its log-prob.

Pieces (pure `jnp`, each docstring states its formula and source):

- rewards: `kl_penalty` (k1 / clamped k1 / k2 / k3), `terminal_rewards` (easy 1/0 by answer,
  hard a constant, a stop penalty without an answer line), `min_shaping` (Sun et al. 2024's
  process-reward scheme `min`), `step_rewards_to_tokens` (a step's reward split over its
  delimiter tokens), `place_at_last_token`;
- estimators: `gae` (Schulman et al. 2016), `whiten` (masked), `group_advantages` (GRPO's
  outcome supervision) and `group_process_advantages` (its process supervision; Shao et al.
  2024, sec. 4.1.2-4.1.3);
- losses: `ppo_policy_loss` (clipped surrogate; Schulman et al. 2017), `ppo_value_loss` (clipped
  value loss), `grpo_loss` (clipped surrogate + KL to the reference), and the builders
  `make_ppo_loss`, `make_value_loss`, `make_grpo_loss` in the train-step convention
  `(params, batch, rng, frozen) -> (loss, metrics)` of `training.step`.

All losses are token means over the batch, sum(x m) / sum(m), and report `weight` = sum(m), so
`make_train_step`'s gradient accumulation (micro-batch gradients weighted by `weight`) equals the
full-batch gradient exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from scalign.models.config import ModelConfig
from scalign.models.heads import scalar_from_hidden
from scalign.models.transformer import forward
from scalign.objectives.logprobs import batch_token_log_probs, token_log_probs

Metrics = dict[str, jax.Array]
KL_ESTIMATORS = ("k1", "k1_clamped", "k2", "k3")


def _f32(x: Any) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(_f32(x) * _f32(mask))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """sum(x m) / max(sum(m), 1)."""
    return masked_sum(x, mask) / jnp.maximum(jnp.sum(_f32(mask)), 1.0)


# ============================================================================ model side
def token_values(config: ModelConfig, params: Any, tokens: jax.Array) -> jax.Array:
    """Critic values aligned with `tokens`, float32 [B, T]: v[b, t] = V(tokens[b, < t]), the
    scalar head (`models.heads`) on the hidden state at t - 1 (column 0 is 0), i.e. the value of
    the state in which token t is chosen."""
    hidden, _ = forward(config, params, tokens[:, :-1])
    return jnp.pad(scalar_from_hidden(params, hidden), ((0, 0), (1, 0)))


# ============================================================================ rewards
def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k1_clamped"
               ) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from a sample y_t ~ pi, with d = logp - ref_logp:

        k1          d                          (unbiased, can be negative)
        k1_clamped  max(d, 0)                  (the e2h code's PPO penalty, Sun et al. 2024)
        k2          d^2 / 2
        k3          exp(-d) - 1 + d            (unbiased and >= 0; DeepSeekMath's GRPO,
                                                Shao et al. 2024, eq. 4; Schulman 2020)
    """
    d = _f32(logp) - _f32(ref_logp)
    if estimator == "k1":
        return d
    if estimator == "k1_clamped":
        return jnp.maximum(d, 0.0)
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return jnp.exp(-d) - 1.0 + d
    raise ValueError(f"unknown KL estimator {estimator!r}; known: {KL_ESTIMATORS}")


def terminal_rewards(correct: jax.Array, has_answer: jax.Array, easy: jax.Array, *,
                     hard_reward: float = 0.25, stop_penalty: float = -1.0) -> jax.Array:
    """Sequence rewards [B] of the e2h PPO recipe (Sun et al. 2024, sec. 4.2):

        r = (correct if easy else hard_reward) + (stop_penalty if no answer line else 0)

    Easy problems (answers supervised) earn 1 / 0 by their final answer; problems outside the
    supervised levels have no answer and earn the constant `hard_reward` [0.25]; a completion
    without an answer line is penalised by `stop_penalty` [-1].
    """
    base = jnp.where(jnp.asarray(easy, bool), _f32(correct), hard_reward)
    return base + jnp.where(jnp.asarray(has_answer, bool), 0.0, stop_penalty)


def min_shaping(step_scores: jax.Array, step_mask: jax.Array, *, upper: float = 0.5,
                bonus: float = 0.25) -> jax.Array:
    """Process-reward shaping, scheme `min` (Sun et al. 2024's PPO with a PRM), [B, S] -> [B, S].

    With step scores s_i in (0, 1) (the PRM's sigmoid) and a running minimum m_{-1} = `upper`,
    m_i = min(m_{i-1}, s_i), step i earns

        r_i = m_i - m_{i-1}  (= s_i - m_{i-1} when s_i lowers the minimum, else 0)
              + bonus / n    (n = number of steps of the solution)

    so the shaped rewards of a solution sum to min(upper, min_i s_i) - upper + bonus.
    Steps with step_mask = 0 (padding) earn 0 and do not move the minimum.
    """
    valid = jnp.asarray(step_mask, bool)
    s = jnp.where(valid, _f32(step_scores), jnp.inf)
    m = jnp.minimum(jax.lax.cummin(s, axis=s.ndim - 1), upper)
    prev = jnp.concatenate([jnp.full_like(m[..., :1], upper), m[..., :-1]], axis=-1)
    n = jnp.maximum(jnp.sum(valid, axis=-1, keepdims=True), 1).astype(jnp.float32)
    return jnp.where(valid, m - prev + bonus / n, 0.0)


def step_rewards_to_tokens(step_rewards: jax.Array, delimiter_step: jax.Array) -> jax.Array:
    """Per-token rewards [B, T] from per-step rewards [B, S]: `delimiter_step` [B, T] holds, for
    each token that is (part of) step s's delimiter, the index s (else -1); step s's reward is
    split evenly over its delimiter tokens: r[b, t] = R[b, s] / #{t' : delimiter_step[b, t'] = s}.
    A step with no delimiter token places nothing."""
    S = step_rewards.shape[-1]
    onehot = (jnp.asarray(delimiter_step)[..., None] == jnp.arange(S)).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(onehot, axis=-2), 1.0)  # [B, S]
    return jnp.einsum("bts,bs->bt", onehot, _f32(step_rewards) / count)


def place_at_last_token(values: jax.Array, mask: jax.Array) -> jax.Array:
    """[B] sequence values -> [B, T], each on its row's last masked token (0 elsewhere; rows
    without a masked token get nothing)."""
    mask = jnp.asarray(mask) > 0
    T = mask.shape[-1]
    last = T - 1 - jnp.argmax(mask[:, ::-1], axis=-1)
    onehot = (jnp.arange(T)[None, :] == last[:, None]) & mask.any(-1, keepdims=True)
    return jnp.where(onehot, _f32(values)[:, None], 0.0)


# ============================================================================ estimators
def whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8
           ) -> jax.Array:
    """Masked whitening over all masked entries of the batch:

        mu = sum(x m) / sum(m),  var = sum((x - mu)^2 m) / sum(m)   (population variance)
        w  = (x - mu) / sqrt(var + eps)  [+ mu again if not shift_mean]

    `shift_mean=False` only rescales (PPO's reward whitening keeps the rewards' sign);
    unmasked entries are returned as 0.
    """
    x, m = _f32(x), _f32(mask)
    mu = masked_mean(x, m)
    var = masked_mean((x - mu) ** 2, m)
    out = (x - mu) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mu
    return out * m


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float = 1.0,
        lam: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16) over the masked tokens.

        delta_t = r_t + gamma V_{t+1} m_{t+1} - V_t
        A_t     = delta_t + gamma lam A_{t+1} m_{t+1}        (A = 0 where m = 0)
        R_t     = A_t + V_t                                  (the value targets)

    rewards / values / mask: [B, T] aligned with the tokens (the completion is one contiguous
    block of each row; the state after the last completion token is terminal, V = 0).
    Returns (advantages, returns), both 0 outside the mask.
    """
    r, v, m = _f32(rewards), _f32(values), _f32(mask)
    v_next = jnp.pad(v[:, 1:] * m[:, 1:], ((0, 0), (0, 1)))
    m_next = jnp.pad(m[:, 1:], ((0, 0), (0, 1)))
    delta = (r + gamma * v_next - v) * m

    def body(carry, xs):
        d, mn = xs
        a = d + gamma * lam * carry * mn
        return a, a

    _, adv = jax.lax.scan(body, jnp.zeros_like(r[:, 0]), (delta.T, m_next.T), reverse=True)
    adv = adv.T * m
    return adv, (adv + v) * m


def group_advantages(rewards: jax.Array, group_size: int, *, eps: float = 1e-6, ddof: int = 0
                     ) -> jax.Array:
    """GRPO's outcome-supervised advantages (Shao et al. 2024, sec. 4.1.2), [B] -> [B]:

        A_i = (r_i - mean_group(r)) / (std_group(r) + eps)

    over consecutive groups of `group_size` rows (the N samples of one prompt; row
    p * N + j as `algorithms.loop.pack_rollout` lays them out); std with `ddof` (0: population;
    TRL and Tunix use the sample std, ddof = 1).
    """
    r = _f32(rewards).reshape(-1, group_size)
    a = (r - r.mean(-1, keepdims=True)) / (r.std(-1, keepdims=True, ddof=ddof) + eps)
    return a.reshape(-1)


def group_process_advantages(token_rewards: jax.Array, reward_mask: jax.Array,
                             response_mask: jax.Array, group_size: int, *, eps: float = 1e-6
                             ) -> jax.Array:
    """GRPO's process-supervised advantages (Shao et al. 2024, sec. 4.1.3), [B, T] -> [B, T].

    The rewards of a group (the `group_size` rows of one prompt) sit on the tokens where
    `reward_mask` = 1 (each step's end, the final answer's token). They are normalised over all
    of the group's reward positions, r~ = (r - mean_group) / (std_group + eps), and a token's
    advantage is the sum of the normalised rewards at or after it:

        A_t = sum_{t' >= t} r~_{t'} reward_mask_{t'}          (0 outside response_mask)
    """
    B, T = token_rewards.shape
    r = _f32(token_rewards).reshape(-1, group_size * T)
    w = _f32(reward_mask).reshape(-1, group_size * T)
    n = jnp.maximum(w.sum(-1, keepdims=True), 1.0)
    mu = (r * w).sum(-1, keepdims=True) / n
    std = jnp.sqrt(((r - mu) ** 2 * w).sum(-1, keepdims=True) / n)
    norm = ((r - mu) / (std + eps) * w).reshape(B, T)
    to_go = jnp.flip(jnp.cumsum(jnp.flip(norm, -1), -1), -1)
    return to_go * _f32(response_mask)


# ============================================================================ losses
def ppo_policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array,
                    mask: jax.Array, *, clip_eps: float = 0.2) -> tuple[jax.Array, Metrics]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) as a token-mean loss:

        rho_t = exp(logp_t - old_logp_t)
        L     = sum_t m_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)) / sum_t m_t

    Metrics: `clipfrac` (share of tokens where the clipped term is active), `approx_kl`
    (mean (logp - old)^2 / 2), `ratio` (mean rho), `weight` = sum(m).
    """
    logp, old, adv, m = _f32(logp), _f32(old_logp), _f32(advantages), _f32(mask)
    d = logp - old
    ratio = jnp.exp(d)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(jnp.maximum(unclipped, clipped), m)
    return loss, {"clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), m),
                  "approx_kl": masked_mean(0.5 * d * d, m), "ratio": masked_mean(ratio, m),
                  "weight": jnp.sum(m)}


def ppo_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array,
                   mask: jax.Array, *, value_clip: float = 0.2, vf_coef: float = 0.1
                   ) -> tuple[jax.Array, Metrics]:
    """PPO's clipped value loss (Schulman et al. 2017; the e2h defaults clip 0.2, coef 0.1):

        V~_t = old_V_t + clip(V_t - old_V_t, -c, c)
        L    = vf_coef * 0.5 * sum_t m_t max((V_t - R_t)^2, (V~_t - R_t)^2) / sum_t m_t

    Metrics: `vf_clipfrac`, `value_error` (mean (V - R)^2), `weight` = sum(m).
    """
    v, old, ret, m = _f32(values), _f32(old_values), _f32(returns), _f32(mask)
    v_clip = old + jnp.clip(v - old, -value_clip, value_clip)
    err, err_clip = (v - ret) ** 2, (v_clip - ret) ** 2
    loss = vf_coef * 0.5 * masked_mean(jnp.maximum(err, err_clip), m)
    return loss, {"vf_clipfrac": masked_mean((err_clip > err).astype(jnp.float32), m),
                  "value_error": masked_mean(err, m), "weight": jnp.sum(m)}


def grpo_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array,
              advantages: jax.Array, mask: jax.Array, *, clip_eps: float = 0.2,
              kl_coef: float = 0.04, kl_estimator: str = "k3") -> tuple[jax.Array, Metrics]:
    """GRPO (Shao et al. 2024, eq. 3): the clipped surrogate plus a KL penalty to the reference
    inside the loss, as a token mean over the batch:

        L = sum_t m_t [ max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))
                        + kl_coef KL_t(logp, ref_logp) ] / sum_t m_t

    KL_t by `kl_penalty(estimator)` (DeepSeekMath's k3 by default). The paper averages per
    sequence first; the token mean keeps micro-batch accumulation exact (`weight` = sum(m)).
    """
    pg, metrics = ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps=clip_eps)
    kl = masked_mean(kl_penalty(logp, ref_logp, kl_estimator), mask)
    return pg + kl_coef * kl, {**metrics, "pg_loss": pg, "kl": kl}


# ============================================================================ builders
@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO hyperparameters; defaults are the e2h code's (Sun et al. 2024)."""

    clip_eps: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    kl_coef: float = 0.01
    kl_estimator: str = "k1_clamped"
    gamma: float = 1.0
    lam: float = 1.0
    whiten_rewards: bool = True
    whiten_advantages: bool = True
    temperature: float = 0.7
    minibatches: int = 8          # steps per rollout batch, one epoch (e2h: 512 / 64)
    logprob_chunk: int | None = None


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO hyperparameters (Shao et al. 2024: eps 0.2, KL coefficient 0.04, k3)."""

    clip_eps: float = 0.2
    kl_coef: float = 0.04
    kl_estimator: str = "k3"
    adv_eps: float = 1e-6
    adv_ddof: int = 0             # std of the group: 0 population, 1 sample (TRL, Tunix)
    temperature: float = 0.7
    minibatches: int = 1
    process: bool = False         # process supervision (step rewards) instead of outcomes
    logprob_chunk: int | None = None
    # one forward per prompt, its N completions against the prompt's K/V cache
    # (`algorithms.loop.shared_prompt_rows`; with one minibatch, when the prompts fit)
    shared_prompt: bool = True


def make_ppo_loss(config: ModelConfig, ppo: PPOConfig = PPOConfig()):
    """PPO policy loss for `make_train_step`: batch keys `tokens` int32 [B, T],
    `response_mask`, `old_logp` (training-forward log-probs at rollout) and `advantages`
    (float32 [B, T]); log-probs by `objectives.logprobs.token_log_probs`."""
    def loss_fn(params, batch, rng=None, frozen=None):
        del rng, frozen
        lp = token_log_probs(config, params, batch["tokens"], chunk=ppo.logprob_chunk)
        return ppo_policy_loss(lp, batch["old_logp"], batch["advantages"],
                               batch["response_mask"], clip_eps=ppo.clip_eps)
    return loss_fn


def make_value_loss(config: ModelConfig, ppo: PPOConfig = PPOConfig()):
    """PPO value loss for `make_train_step` on a scalar-head model (`models.heads`): batch keys
    `tokens`, `response_mask`, `old_values` and `returns` (float32 [B, T], aligned with the
    tokens as `token_values`)."""
    def loss_fn(params, batch, rng=None, frozen=None):
        del rng, frozen
        v = token_values(config, params, batch["tokens"])
        return ppo_value_loss(v, batch["old_values"], batch["returns"], batch["response_mask"],
                              value_clip=ppo.value_clip, vf_coef=ppo.vf_coef)
    return loss_fn


def make_grpo_loss(config: ModelConfig, grpo: GRPOConfig = GRPOConfig()):
    """GRPO loss for `make_train_step`: batch keys `tokens`, `response_mask`, `old_logp`
    (optional: without it the ratio's denominator is stop_gradient(logp), i.e. one update per
    rollout, and no extra forward runs),
    `ref_logp` (reference log-probs precomputed by `OnlineLoop.log_probs(..., "reference")`)
    and `advantages` (float32 [B, T]; a sequence advantage broadcast over its tokens, or
    `group_process_advantages`). Or the shared-prompt layout (`prompt_tokens`,
    `prompt_start`, `response_tokens` and every per-token array cut to the response columns;
    `algorithms.loop.shared_prompt_rows`): the same loss, each prompt computed once."""
    def loss_fn(params, batch, rng=None, frozen=None):
        del rng, frozen
        lp = batch_token_log_probs(config, params, batch, chunk=grpo.logprob_chunk)
        old = batch["old_logp"] if "old_logp" in batch else jax.lax.stop_gradient(lp)
        return grpo_loss(lp, old, batch["ref_logp"], batch["advantages"],
                         batch["response_mask"], clip_eps=grpo.clip_eps, kl_coef=grpo.kl_coef,
                         kl_estimator=grpo.kl_estimator)
    return loss_fn
