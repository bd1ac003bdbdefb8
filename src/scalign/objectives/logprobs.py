"""Per-token log-probs of given tokens under the training forward, without [B, T, V] logits.

    lp = token_log_probs(config, params, tokens)          # float32 [B, T]
    lp[b, t] = log p(tokens[b, t] | tokens[b, < t])  for t >= 1,   lp[b, 0] = 0

Position t is scored by the logits at t - 1, so `lp` is aligned with `tokens` and with any
mask aligned with them (a response mask as in SFT's `loss_mask`): the summed response
log-prob of DPO is `sum(lp * mask)` (`objectives.preference.sequence_log_probs`), PPO's ratio
of token t is `exp(lp_new[b, t] - lp_old[b, t])` (Schulman et al. 2017).

The LM head is applied to `chunk` positions at a time inside a `lax.scan` whose body is
rematerialised (`jax.checkpoint`): the largest live logits block is [B, chunk, V] float32 in
the forward *and* the backward pass, never [B, T, V]. For Gemma's 262k vocabulary and T = 2048
that is 2 GiB per row of the batch for the full block against 64 MiB per row for chunk = 64.
Each chunk computes `logit[target] - logsumexp(logits)`, which is exactly the log-softmax at
the target (no normalised distribution is materialised).

These are the values an online loop uses for importance ratios and KL terms: they come from
the same forward the loss differentiates, so a sampler that decodes in another precision or
formulation (bf16 decode, packed weights) cannot bias them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from scalign.models.config import ModelConfig
from scalign.models.transformer import forward, lm_logits
from scalign.objectives.common import target_log_probs

DEFAULT_LOGITS_BUDGET = 1 << 24  # float32 elements of one [B, chunk, V] logits block (64 MiB)


def auto_chunk(batch: int, length: int, vocab: int, budget: int = DEFAULT_LOGITS_BUDGET) -> int:
    """The largest chunk of positions whose [batch, chunk, vocab] float32 logits fit `budget`
    elements (at least 1, at most `length`)."""
    return int(max(1, min(length, budget // max(batch * vocab, 1))))


def _target_log_probs(config: ModelConfig, params: Any, hidden: jax.Array,
                      targets: jax.Array) -> jax.Array:
    """log softmax(lm_logits(hidden))[targets]: hidden [B, C, D], targets [B, C] -> [B, C]."""
    return target_log_probs(lm_logits(config, params, hidden), targets)  # via [B, C, V]


def log_probs_from_hidden(config: ModelConfig, params: Any, hidden: jax.Array,
                          targets: jax.Array, *, chunk: int | None = None) -> jax.Array:
    """log p(targets[b, t]) from the hidden state that predicts it: hidden [B, T, D] and
    targets [B, T] -> float32 [B, T], chunked over T (see the module docstring)."""
    B, T = targets.shape
    C = chunk or auto_chunk(B, T, config.vocab_size)
    if C >= T:
        return _target_log_probs(config, params, hidden, targets)
    n = -(-T // C)
    pad = n * C - T
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, n, C, hidden.shape[-1])
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n, C)

    @jax.checkpoint
    def one(h_c, y_c):
        return _target_log_probs(config, params, h_c, y_c)

    def body(_, xs):
        return None, one(*xs)

    _, out = jax.lax.scan(body, None, (h.swapaxes(0, 1), y.swapaxes(0, 1)))  # [n, B, C]
    return out.swapaxes(0, 1).reshape(B, n * C)[:, :T]


def token_log_probs(config: ModelConfig, params: Any, tokens: jax.Array, *,
                    chunk: int | None = None) -> jax.Array:
    """Per-token log-probs of `tokens` [B, T] under the model, float32 [B, T], column 0 = 0.

    One causal forward over tokens[:, :-1]; the LM head runs `chunk` positions at a time
    (default: `auto_chunk`, a 64 MiB logits block).
    """
    hidden, _ = forward(config, params, tokens[:, :-1])
    lp = log_probs_from_hidden(config, params, hidden, tokens[:, 1:], chunk=chunk)
    return jnp.pad(lp, ((0, 0), (1, 0)))
