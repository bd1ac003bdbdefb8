"""Supervised fine-tuning: next-token cross-entropy on response tokens only.

    L = - sum_{b,t} m[b,t+1] log p(x[b,t+1] | x[b,<=t]) / sum m

where m is the batch's `loss_mask` (1 on response tokens and EOS, 0 on prompt, BOS, padding).
The batch is `{"tokens": int32[B, T], "loss_mask": float32[B, T]}` (see `scalign.data.pipeline`).

The forward, LM head and cross-entropy run through `objectives.logprobs.next_token_log_probs_and_hits`:
one [B, T, V] logits block when it fits the 64 MiB default budget (B*T*V float32 elements
<= 2^24), otherwise `chunk` positions at a time in a rematerialised scan, so a 262k-vocab model
(Gemma) never materialises its full logits in the forward or the backward pass.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from scalign.models.config import ModelConfig
from scalign.objectives.common import shifted
from scalign.objectives.logprobs import next_token_log_probs_and_hits


def sft_loss(config: ModelConfig, params: Any, batch: dict[str, jax.Array],
             rng: jax.Array | None = None, frozen: Any = None, *, chunk: int | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean token NLL over masked targets, and metrics (the loss signature of `make_train_step`).

    Metrics: `loss`, `accuracy` (argmax = target on masked tokens), `num_tokens` (count) and
    `weight` (= tokens; the train step weights micro-batches by it, so gradient accumulation
    equals the full-batch loss exactly). `chunk`: positions per LM-head block (default
    `objectives.logprobs.auto_chunk`).
    """
    del rng, frozen
    tokens = batch["tokens"]
    _, mask = shifted(tokens, batch["loss_mask"])
    logp, hits = next_token_log_probs_and_hits(config, params, tokens, chunk=chunk)
    count = jnp.sum(mask)
    denom = jnp.maximum(count, 1.0)
    loss = -jnp.sum(logp * mask) / denom
    correct = hits.astype(jnp.float32)
    metrics = {"loss": loss, "accuracy": jnp.sum(correct * mask) / denom, "num_tokens": count,
               "weight": count}
    return loss, metrics


def make_sft_loss(config: ModelConfig, chunk: int | None = None):
    """`sft_loss` with the config (and LM-head chunk) bound: (params, batch, rng, frozen) ->
    (loss, metrics)."""
    def loss_fn(params, batch, rng=None, frozen=None):
        return sft_loss(config, params, batch, rng, frozen, chunk=chunk)
    return loss_fn
