"""Shared pieces of the objectives: log-probs of targets under given logits, next-token targets.

(`objectives.logprobs.token_log_probs` is the model-side function: per-token log-probs of a
sequence under a model, without materialising [B, T, V] logits.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def _log_probs_and_max(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(logit[target] - logsumexp(logits), max(logits)) over the last axis; float32 logits.
    The max is for comparisons only: no gradient flows through it."""
    return _log_probs_fwd(logits, targets)[0]


def _log_probs_fwd(logits, targets):
    top = jnp.max(logits, axis=-1)
    lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (picked - lse, top), (logits, targets, lse)


def _log_probs_bwd(res, cotangents):
    # d(logit[y] - lse) / d logits = onehot(y) - softmax(logits): one fused pass over [.., V],
    # where autodiff of the forward ran a softmax pass plus a scatter-add of the picked logit
    # into a zeroed [.., V] buffer
    logits, targets, lse = res
    g = cotangents[0]
    onehot = targets[..., None] == jnp.arange(logits.shape[-1], dtype=targets.dtype)
    grad = g[..., None] * (onehot.astype(jnp.float32) - jnp.exp(logits - lse[..., None]))
    return grad, None


_log_probs_and_max.defvjp(_log_probs_fwd, _log_probs_bwd)


def target_log_probs_and_hits(logits: jax.Array, targets: jax.Array
                              ) -> tuple[jax.Array, jax.Array]:
    """log p(targets) under softmax(logits) and whether each target is a top-1 token:
    [B, T, V], [B, T] -> float32 [B, T], bool [B, T].

    log p = logit[target] - logsumexp(logits) (no log_softmax is materialised); its gradient is
    onehot(target) - softmax(logits), written as one pass (a custom VJP). A hit is
    logit[target] == max(logits): the argmax test without a separate argmax pass over V (a tie
    at the top counts as a hit for every tied token).
    """
    logits = logits.astype(jnp.float32)
    targets = targets.astype(jnp.int32)
    logp, top = _log_probs_and_max(logits, targets)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return logp, jax.lax.stop_gradient(picked >= top)


def target_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets) under softmax(logits): [B, T, V], [B, T] -> float32 [B, T].

    Computed as logit[target] - logsumexp(logits), without materialising log_softmax; see
    `target_log_probs_and_hits`.
    """
    return target_log_probs_and_hits(logits, targets)[0]


def shifted(tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Targets and their mask for next-token prediction: position t predicts token t+1."""
    return tokens[:, 1:], mask[:, 1:].astype(jnp.float32)

