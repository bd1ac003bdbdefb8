"""Preference losses: the DPO family (DPO, IPO, hinge/SLiC, SimPO, ORPO, SPPO).

Every loss is a pure function of per-sequence log-probabilities, [B] arrays:

    pi_c = log pi_theta(y_c | x)  = sum over the chosen response's tokens of log p
    pi_r = log pi_theta(y_r | x)  (rejected), and ref_c / ref_r under the reference model,

plus hyperparameters, and returns `(loss_scalar, metrics)`. Common metrics (means over the
batch): `rewards/chosen`, `rewards/rejected` (each method's implicit reward, stated in its
docstring), `margins` = mean(reward_c - reward_r), `accuracy` = mean[reward_c > reward_r].
An optional `weights` [B] (1 for real pairs, 0 for padding rows of an eval batch) turns every
mean into sum(w x) / sum(w).

`make_preference_loss(config, kind, **hparams)` wraps any of them into the train-step loss
signature `(params, batch, rng, frozen) -> (loss, metrics)` for batches

    chosen_tokens, rejected_tokens  int32[B, T]    bos + prompt + response (+ eos), padded
    chosen_mask,   rejected_mask    float32[B, T]  1 on the response targets (as SFT's loss_mask)

or, when the pairs share their prompt, the shared-prompt layout

    prompt_tokens                     int32[B, P]    bos + prompt, left-padded
    prompt_start                      int32[B]       first real slot of each prompt (optional)
    chosen_response, rejected_response int32[B, R]   response (+ eos), right-padded
    chosen_response_mask, rejected_response_mask  float32[B, R]  1 on response tokens

The first layout computes pi_c and pi_r with ONE policy forward over the concatenated
[2B, T] batch; the second with one forward over the prompts and one over the 2B responses
against their K/V cache (B(P + 2R) positions instead of 2B(P + R), the LM head on responses
only; `logprobs.shared_prompt_log_probs`): 1.44x the pairs/s of the first on
`dpo_llama_small` (P = R = 128), the same loss. The reference log-probs come from `frozen` (reference params, one more [2B] forward) or from
precomputed batch keys `ref_chosen_logps` / `ref_rejected_logps` [B] when present.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from scalign.models.config import ModelConfig
from scalign.objectives import logprobs
from scalign.objectives.reward import concat_pair

Metrics = dict[str, jax.Array]

# ORPO's odds need log(1 - p) with p = exp(mean log-prob); the mean log-prob is capped here so
# that a response the model predicts with probability 1 (in float32) keeps finite odds.
_ORPO_MAX_MEAN_LOGP = -1e-6


# --------------------------------------------------------------------------- helpers


def _f32(x: Any) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _mean(x: jax.Array, weights: jax.Array | None) -> jax.Array:
    """mean(x), or sum(w x) / sum(w) (0 when sum(w) = 0)."""
    if weights is None:
        return jnp.mean(x)
    w = _f32(weights)
    total = jnp.sum(w)
    return jnp.where(total > 0, jnp.sum(w * x) / jnp.where(total > 0, total, 1.0), 0.0)


def _reward_metrics(reward_c: jax.Array, reward_r: jax.Array,
                    weights: jax.Array | None) -> Metrics:
    return {
        "rewards/chosen": _mean(reward_c, weights),
        "rewards/rejected": _mean(reward_r, weights),
        "margins": _mean(reward_c - reward_r, weights),
        "accuracy": _mean((reward_c > reward_r).astype(jnp.float32), weights),
    }


def _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                ref_rejected_logps) -> tuple[jax.Array, jax.Array]:
    return (_f32(policy_chosen_logps) - _f32(ref_chosen_logps),
            _f32(policy_rejected_logps) - _f32(ref_rejected_logps))


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012)."""
    return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


# --------------------------------------------------------------------------- losses


def dpo_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
             ref_chosen_logps: jax.Array, ref_rejected_logps: jax.Array, beta: float = 0.1,
             label_smoothing: float = 0.0, weights: jax.Array | None = None
             ) -> tuple[jax.Array, Metrics]:
    """Direct Preference Optimization (Rafailov et al. 2023, eq. 7), with label smoothing.

        h = (pi_c - ref_c) - (pi_r - ref_r)
        L = mean_b [ -(1 - eps) log sigma(beta h) - eps log sigma(-beta h) ]

    eps = `label_smoothing` is the assumed probability that a pair's label is flipped
    (conservative DPO, Mitchell 2023); eps = 0 is plain DPO. At h = 0 the loss is log 2.
    Implicit rewards: beta (pi - ref). Extra metric `logits` = mean(beta h).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    lr_c, lr_r = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps)
    z = beta * (lr_c - lr_r)
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z)
              - label_smoothing * jax.nn.log_sigmoid(-z))
    metrics = _reward_metrics(beta * lr_c, beta * lr_r, weights)
    metrics["logits"] = _mean(z, weights)
    return _mean(losses, weights), metrics


def ipo_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
             ref_chosen_logps: jax.Array, ref_rejected_logps: jax.Array, beta: float = 0.1,
             chosen_lengths: jax.Array | None = None, rejected_lengths: jax.Array | None = None,
             weights: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
    """Identity Preference Optimization (Azar et al. 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences", eq. 17):

        h = (pi_c - ref_c) - (pi_r - ref_r)
        L = mean_b (h - 1 / (2 beta))^2

    beta (the paper's tau) is the regularisation strength: h is regressed to 1/(2 beta).
    "IPO" in scalign means this, the paper's loss on *summed* sequence log-probs -- here and
    in `make_preference_loss("ipo")` alike. The length-normalised variant (TRL's IPO
    convention: log-probs averaged over completion tokens, h = (pi_c - ref_c) / |y_c| -
    (pi_r - ref_r) / |y_r|) is an explicit opt-in: pass `chosen_lengths` / `rejected_lengths`
    (response token counts, [B]) here, or `length_normalize=True` to `make_preference_loss`;
    beta then targets a per-token gap, so it needs retuning. Implicit rewards: beta (pi - ref),
    divided by |y| in the length-normalised variant.
    """
    if beta <= 0:
        raise ValueError(f"ipo_loss: beta must be positive, got {beta}")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("ipo_loss: pass both chosen_lengths and rejected_lengths, or neither")
    lr_c, lr_r = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps)
    if chosen_lengths is not None:
        lr_c = lr_c / jnp.maximum(_f32(chosen_lengths), 1.0)
        lr_r = lr_r / jnp.maximum(_f32(rejected_lengths), 1.0)
    h = lr_c - lr_r
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return _mean(losses, weights), _reward_metrics(beta * lr_c, beta * lr_r, weights)


def hinge_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
               ref_chosen_logps: jax.Array, ref_rejected_logps: jax.Array, beta: float = 0.1,
               weights: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
    """Hinge (SLiC) preference loss (Zhao et al. 2023, "SLiC-HF"; with a reference as in
    Liu et al. 2024, RSO):

        h = (pi_c - ref_c) - (pi_r - ref_r)
        L = mean_b max(0, 1 - beta h)

    i.e. a margin of 1/beta on the log-ratio difference. Implicit rewards: beta (pi - ref).
    """
    lr_c, lr_r = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps)
    losses = jax.nn.relu(1.0 - beta * (lr_c - lr_r))
    return _mean(losses, weights), _reward_metrics(beta * lr_c, beta * lr_r, weights)


def simpo_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
               chosen_lengths: jax.Array, rejected_lengths: jax.Array, beta: float = 2.0,
               gamma: float = 1.0, weights: jax.Array | None = None
               ) -> tuple[jax.Array, Metrics]:
    """Simple Preference Optimization (Meng et al. 2024), reference-free:

        L = mean_b -log sigma( beta/|y_c| pi_c - beta/|y_r| pi_r - gamma )

    with |y| the response token counts ([B]) and gamma the target reward margin. The defaults
    (beta = 2, gamma = 1, i.e. gamma/beta = 0.5) are within the paper's tuned ranges.
    Implicit rewards: beta pi / |y| (length-normalised log-likelihood).
    """
    reward_c = beta * _f32(policy_chosen_logps) / jnp.maximum(_f32(chosen_lengths), 1.0)
    reward_r = beta * _f32(policy_rejected_logps) / jnp.maximum(_f32(rejected_lengths), 1.0)
    losses = -jax.nn.log_sigmoid(reward_c - reward_r - gamma)
    return _mean(losses, weights), _reward_metrics(reward_c, reward_r, weights)


def orpo_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
              chosen_lengths: jax.Array, rejected_lengths: jax.Array, lam: float = 0.1,
              weights: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
    """Odds-Ratio Preference Optimization (Hong et al. 2024), reference-free:

        l(y)     = pi(y) / |y|                     (mean token log-prob; P(y|x) = exp l)
        log odds = log( P / (1 - P) ) = l - log(1 - exp l)
        L_OR     = -log sigma( log odds(y_c) - log odds(y_r) )
        L_SFT    = -l(y_c)                         (the chosen response's token-mean NLL)
        L        = mean_b [ L_SFT + lam * L_OR ]

    as the paper's eq. 6, L_ORPO = E_(x, y_w, y_l)[L_SFT + lam L_OR], with L_SFT its eq. 1
    (the NLL averaged over the response's tokens): every term is a mean over *pairs*. (The
    authors' code and TRL instead average the NLL over all chosen tokens of the batch, which
    weights long responses more and is not a per-pair mean, so a train step that accumulates
    micro-batches weighted by their pair counts could not reproduce it; this form it
    reproduces exactly.) With `weights` every mean is sum_b w x / sum_b w. lam = 0.1 is the
    paper's default. l is capped at -1e-6 so that the odds stay finite. Implicit rewards: l
    (mean token log-prob). Extra metrics: `nll` (= mean_b L_SFT), `or_loss`, `log_odds_ratio`.
    """
    pc, pr = _f32(policy_chosen_logps), _f32(policy_rejected_logps)
    len_c = jnp.maximum(_f32(chosen_lengths), 1.0)
    len_r = jnp.maximum(_f32(rejected_lengths), 1.0)
    mean_c = jnp.minimum(pc / len_c, _ORPO_MAX_MEAN_LOGP)
    mean_r = jnp.minimum(pr / len_r, _ORPO_MAX_MEAN_LOGP)
    log_odds = (mean_c - _log1mexp(mean_c)) - (mean_r - _log1mexp(mean_r))
    or_losses = -jax.nn.log_sigmoid(log_odds)
    nll = _mean(-pc / len_c, weights)
    or_loss = _mean(or_losses, weights)
    metrics = _reward_metrics(pc / len_c, pr / len_r, weights)
    metrics.update(nll=nll, or_loss=or_loss, log_odds_ratio=_mean(log_odds, weights))
    return nll + lam * or_loss, metrics


def sppo_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
              ref_chosen_logps: jax.Array, ref_rejected_logps: jax.Array, eta: float = 1e3,
              chosen_win_rate: jax.Array | float = 1.0,
              rejected_win_rate: jax.Array | float = 0.0,
              weights: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
    """Self-Play Preference Optimization (Wu et al. 2024, Algorithm 1):

        L = mean_b [ (pi_c - ref_c - eta (P_c - 1/2))^2 + (pi_r - ref_r - eta (P_r - 1/2))^2 ]

    where ref is the previous iterate pi_t, and P_y = P-hat(y > pi_t | x) is the estimated
    probability that y beats a response drawn from pi_t (e.g. its mean preference over the K
    samples of its prompt). The defaults P_c = 1, P_r = 0 give the hard-label variant
    (targets +eta/2 and -eta/2 for the log-ratios: TRL's `sppo_hard`, which writes eta as
    1/beta). eta is the paper's step size of the underlying multiplicative-weights update; the
    default eta = 1e3 is the value used in practice (the authors' released SPPO code runs
    beta = 1/eta = 1e-3), so the log-ratio targets are +-500 nats for hard labels. Implicit
    rewards: the log-ratios pi - ref.
    """
    lr_c, lr_r = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps)
    target_c = eta * (_f32(chosen_win_rate) - 0.5)
    target_r = eta * (_f32(rejected_win_rate) - 0.5)
    losses = (lr_c - target_c) ** 2 + (lr_r - target_r) ** 2
    return _mean(losses, weights), _reward_metrics(lr_c, lr_r, weights)


LOSSES: dict[str, Callable[..., tuple[jax.Array, Metrics]]] = {
    "dpo": dpo_loss, "ipo": ipo_loss, "hinge": hinge_loss, "simpo": simpo_loss,
    "orpo": orpo_loss, "sppo": sppo_loss,
}
REFERENCE_FREE = ("simpo", "orpo")


# --------------------------------------------------------------------------- model side


def sequence_log_probs(config: ModelConfig, params: Any, tokens: jax.Array,
                       response_mask: jax.Array) -> jax.Array:
    """Summed response-token log-probs, float32 [B]:

        logp[b] = sum_{t >= 1} m[b, t] log p(tokens[b, t] | tokens[b, < t])

    with m = `response_mask` aligned with `tokens` (1 on the response targets and eos, as
    SFT's `loss_mask`): position t is scored by the logits at t - 1. The per-token terms are
    `objectives.logprobs.token_log_probs` (one causal forward on tokens[:, :-1], the LM head
    applied in chunks, so [B, T, V] logits are never materialised); see `response_lengths`
    for the counts.
    """
    lp = logprobs.token_log_probs(config, params, tokens)  # [B, T], column 0 = 0
    return jnp.sum(lp * response_mask.astype(jnp.float32), axis=-1)


def response_lengths(response_mask: jax.Array) -> jax.Array:
    """Response token counts |y|, float32 [B]: sum_{t >= 1} m[b, t] (the targets scored by
    `sequence_log_probs`)."""
    return jnp.sum(response_mask[:, 1:].astype(jnp.float32), axis=-1)


SHARED_PROMPT_KEYS = ("prompt_tokens", "chosen_response", "rejected_response",
                      "chosen_response_mask", "rejected_response_mask")


def _pair_lengths(batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Response token counts (chosen [B], rejected [B]) of either pair layout."""
    if "prompt_tokens" in batch:
        return tuple(jnp.sum(batch[f"{s}_response_mask"].astype(jnp.float32), axis=-1)
                     for s in ("chosen", "rejected"))
    return response_lengths(batch["chosen_mask"]), response_lengths(batch["rejected_mask"])


def pair_log_probs(config: ModelConfig, params: Any, batch: dict[str, jax.Array]
                    ) -> tuple[jax.Array, jax.Array]:
    """(chosen logps [B], rejected logps [B]): one [2B] forward over prompt + response, or, in
    the shared-prompt layout (`SHARED_PROMPT_KEYS`), one forward over the prompts and one over
    the 2B responses against their cache (`logprobs.shared_prompt_log_probs`)."""
    b = batch[SHARED_PROMPT_KEYS[0] if "prompt_tokens" in batch else "chosen_tokens"].shape[0]
    if "prompt_tokens" in batch:
        missing = [k for k in SHARED_PROMPT_KEYS if k not in batch]
        if missing:
            raise ValueError(f"shared-prompt pair batch is missing {missing}")
        responses = concat_pair(batch["chosen_response"], batch["rejected_response"])
        mask = concat_pair(batch["chosen_response_mask"], batch["rejected_response_mask"])
        lp = logprobs.shared_prompt_log_probs(config, params, batch["prompt_tokens"], responses,
                                              prompt_start=batch.get("prompt_start"))
        logps = jnp.sum(lp * mask.astype(jnp.float32), axis=-1)
        return logps[:b], logps[b:]
    tokens = concat_pair(batch["chosen_tokens"], batch["rejected_tokens"])
    mask = concat_pair(batch["chosen_mask"], batch["rejected_mask"])
    logps = sequence_log_probs(config, params, tokens, mask)
    return logps[:b], logps[b:]


def make_preference_loss(config: ModelConfig, kind: str, **hparams: Any):
    """A DPO-family loss for `make_train_step`: (params, batch, rng, frozen) -> (loss, metrics).

    Args:
      config: the policy's ModelConfig (the reference model has the same architecture).
      kind: "dpo" | "ipo" | "hinge" | "simpo" | "orpo" | "sppo".
      **hparams: that loss's hyperparameters (e.g. beta=0.1, label_smoothing=0.1 for DPO;
        beta, gamma for SimPO; lam for ORPO; eta for SPPO). For IPO, `length_normalize=True`
        averages log-probs over response tokens (TRL's convention); the default False is the
        paper's summed form, as `ipo_loss` without lengths (see `ipo_loss`).

    The batch holds `chosen_tokens`, `chosen_mask`, `rejected_tokens`, `rejected_mask`
    (see the module docstring) and optionally: `ref_chosen_logps` / `ref_rejected_logps` [B]
    (precomputed reference log-probs, used instead of `frozen`), `chosen_win_rate` /
    `rejected_win_rate` [B] (SPPO's P-hat), and `weight` [B] (0 for padding rows). Methods
    with a reference need either those keys or `frozen` = reference params
    (`make_train_step(..., use_frozen=True)`).

    Metrics: the loss's metrics, `logps/chosen`, `logps/rejected` (mean policy log-probs),
    `num_pairs` and `weight` (= number of real pairs). Every loss here is a (weighted) mean
    over pairs, so the train step's gradient accumulation, which weights micro-batches by
    `weight`, reproduces the full-batch gradient exactly.
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown preference loss {kind!r}; known: {sorted(LOSSES)}")
    loss = LOSSES[kind]
    length_normalize = bool(hparams.pop("length_normalize", False)) if kind == "ipo" else False
    allowed = {name for name, p in inspect.signature(loss).parameters.items()
               if p.default is not inspect.Parameter.empty
               and not name.endswith(("_lengths", "_win_rate")) and name != "weights"}
    unknown = sorted(set(hparams) - allowed)
    if unknown:
        raise ValueError(f"make_preference_loss({kind!r}): unknown hyperparameter(s) {unknown}; "
                         f"known: {sorted(allowed)}")
    uses_reference = kind not in REFERENCE_FREE

    def loss_fn(params, batch, rng=None, frozen=None):
        del rng
        pc, pr = pair_log_probs(config, params, batch)
        weights = batch.get("weight")
        kwargs = dict(hparams, weights=weights)
        lengths = _pair_lengths(batch)
        if uses_reference:
            if "ref_chosen_logps" in batch and "ref_rejected_logps" in batch:
                rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
            elif frozen is not None:
                rc, rr = pair_log_probs(config, frozen, batch)
            else:
                raise ValueError(
                    f"preference loss {kind!r} needs reference log-probs: pass the reference "
                    f"params as `frozen` (make_train_step(..., use_frozen=True)) or batch keys "
                    f"'ref_chosen_logps' and 'ref_rejected_logps'")
            rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
            args = (pc, pr, rc, rr)
            if kind == "ipo" and length_normalize:
                kwargs.update(chosen_lengths=lengths[0], rejected_lengths=lengths[1])
            if kind == "sppo":
                for key in ("chosen_win_rate", "rejected_win_rate"):
                    if key in batch:
                        kwargs[key] = batch[key]
        else:
            args = (pc, pr, *lengths)
        value, metrics = loss(*args, **kwargs)
        n = (jnp.asarray(pc.shape[0], jnp.float32) if weights is None
             else jnp.sum(_f32(weights)))
        metrics = dict(metrics)
        metrics.update({"logps/chosen": _mean(pc, weights), "logps/rejected": _mean(pr, weights),
                        "num_pairs": n, "weight": n})
        return value, metrics
    return loss_fn
