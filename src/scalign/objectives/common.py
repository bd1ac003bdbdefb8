"""Shared pieces of the objectives: log-probs of targets under given logits, next-token targets.

(`objectives.logprobs.token_log_probs` is the model-side function: per-token log-probs of a
sequence under a model, without materialising [B, T, V] logits.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def target_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets) under softmax(logits): [B, T, V], [B, T] -> float32 [B, T].

    Computed as logit[target] - logsumexp(logits), without materialising log_softmax.
    """
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def shifted(tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Targets and their mask for next-token prediction: position t predicts token t+1."""
    return tokens[:, 1:], mask[:, 1:].astype(jnp.float32)

