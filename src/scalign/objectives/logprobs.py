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
from scalign.objectives.common import target_log_probs_and_hits

DEFAULT_LOGITS_BUDGET = 1 << 24  # float32 elements of one [B, chunk, V] logits block (64 MiB)


def auto_chunk(batch: int, length: int, vocab: int, budget: int = DEFAULT_LOGITS_BUDGET) -> int:
    """The largest chunk of positions whose [batch, chunk, vocab] float32 logits fit `budget`
    elements (at least 1, at most `length`)."""
    return int(max(1, min(length, budget // max(batch * vocab, 1))))


def _target_log_probs_and_hits(config: ModelConfig, params: Any, hidden: jax.Array,
                               targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log softmax(lm_logits(hidden))[targets] and top-1 hits: hidden [B, C, D], targets [B, C]
    -> float32 [B, C], bool [B, C] (via one [B, C, V] logits block)."""
    return target_log_probs_and_hits(lm_logits(config, params, hidden), targets)


def log_probs_and_hits_from_hidden(config: ModelConfig, params: Any, hidden: jax.Array,
                                   targets: jax.Array, *, chunk: int | None = None
                                   ) -> tuple[jax.Array, jax.Array]:
    """log p(targets[b, t]) from the hidden state that predicts it, and whether the target is
    a top-1 token there: hidden [B, T, D] and targets [B, T] -> float32 [B, T], bool [B, T],
    chunked over T (see the module docstring)."""
    B, T = targets.shape
    C = chunk or auto_chunk(B, T, config.vocab_size)
    if C >= T:
        return _target_log_probs_and_hits(config, params, hidden, targets)
    n = -(-T // C)
    pad = n * C - T
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, n, C, hidden.shape[-1])
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n, C)

    @jax.checkpoint
    def one(h_c, y_c):
        return _target_log_probs_and_hits(config, params, h_c, y_c)

    def body(_, xs):
        return None, one(*xs)

    _, (lp, hits) = jax.lax.scan(body, None, (h.swapaxes(0, 1), y.swapaxes(0, 1)))  # [n, B, C]
    unchunk = lambda x: x.swapaxes(0, 1).reshape(B, n * C)[:, :T]  # noqa: E731
    return unchunk(lp), unchunk(hits)


def log_probs_from_hidden(config: ModelConfig, params: Any, hidden: jax.Array,
                          targets: jax.Array, *, chunk: int | None = None) -> jax.Array:
    """log p(targets[b, t]) from the hidden state that predicts it: hidden [B, T, D] and
    targets [B, T] -> float32 [B, T], chunked over T (see the module docstring)."""
    return log_probs_and_hits_from_hidden(config, params, hidden, targets, chunk=chunk)[0]


def next_token_log_probs_and_hits(config: ModelConfig, params: Any, tokens: jax.Array, *,
                                  chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """One causal forward over tokens[:, :-1] and the chunked LM head on its targets
    tokens[:, 1:]: log p(tokens[b, t + 1] | tokens[b, <= t]) and top-1 hits, float32 and bool
    [B, T - 1] (SFT's loss and accuracy; `token_log_probs` pads it to [B, T])."""
    hidden, _ = forward(config, params, tokens[:, :-1])
    return log_probs_and_hits_from_hidden(config, params, hidden, tokens[:, 1:], chunk=chunk)


def token_log_probs(config: ModelConfig, params: Any, tokens: jax.Array, *,
                    chunk: int | None = None) -> jax.Array:
    """Per-token log-probs of `tokens` [B, T] under the model, float32 [B, T], column 0 = 0.

    One causal forward over tokens[:, :-1]; the LM head runs `chunk` positions at a time
    (default: `auto_chunk`, a 64 MiB logits block).
    """
    lp, _ = next_token_log_probs_and_hits(config, params, tokens, chunk=chunk)
    return jnp.pad(lp, ((0, 0), (1, 0)))


def shared_prompt_log_probs(config: ModelConfig, params: Any, prompt: jax.Array,
                            responses: jax.Array, *, prompt_start: jax.Array | None = None,
                            chunk: int | None = None, group: str = "tile") -> jax.Array:
    """Per-token log-probs of n responses to each prompt, the prompt computed once.

    prompt int32 [B, P] (left-padded: row b's first real slot is `prompt_start[b]`, default 0),
    responses int32 [n*B, R] -> float32 [n*B, R] with
    lp[i, j] = log p(responses[i, j] | prompt, responses[i, <j]). `group`: "tile" (row i answers
    prompt i % B, as `concat_pair` stacks chosen then rejected) or "repeat" (row i answers
    prompt i // n, as `algorithms.loop.pack_rollout` orders a rollout's groups).

    One forward over the prompts fills a K/V cache of P + R slots (the same cached forward the
    sampler uses, `models.transformer.forward(cache=...)`, differentiable); the n*B responses
    then run as one forward over R tokens against that cache repeated n times. Response token 0
    is scored by the prompt's last hidden state, token j by the response's hidden j - 1. For a
    DPO pair batch (n = 2) of prompt P and responses R this runs B*(P + 2R) token positions
    instead of 2B*(P + R), and the LM head only on the 2B*R response positions.
    """
    from scalign.models.transformer import init_cache

    B, P = prompt.shape
    nB, R = responses.shape
    if nB % B:
        raise ValueError(f"shared_prompt_log_probs: {nB} response rows is not a multiple of "
                         f"{B} prompts")
    n = nB // B
    start = (jnp.zeros((B,), jnp.int32) if prompt_start is None
             else jnp.asarray(prompt_start, jnp.int32))
    cache = init_cache(config, B, P + R)
    hidden_p, cache = forward(config, params, prompt, cache=cache, cache_index=0,
                              key_start=start)
    if group not in ("tile", "repeat"):
        raise ValueError(f"shared_prompt_log_probs: group must be 'tile' or 'repeat', got {group!r}")
    if group == "tile":
        tile = lambda x: jnp.concatenate([x] * n, axis=0)  # noqa: E731
    else:
        tile = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731
    hidden_r, _ = forward(config, params, responses, cache=jax.tree.map(tile, cache),
                          cache_index=P, key_start=tile(start))
    hidden = jnp.concatenate([tile(hidden_p[:, -1:]), hidden_r[:, :-1]], axis=1)
    return log_probs_from_hidden(config, params, hidden, responses, chunk=chunk)


def batch_token_log_probs(config: ModelConfig, params: Any, batch: dict[str, jax.Array], *,
                          chunk: int | None = None) -> jax.Array:
    """Per-token log-probs aligned with a policy-gradient batch's per-token arrays: packed rows
    (`tokens` [R, T] -> `token_log_probs`) or the shared-prompt rollout layout of
    `algorithms.loop.shared_prompt_rows` (`prompt_tokens` [P, W], `prompt_start` [P],
    `response_tokens` [R, M], R = P * n, rows grouped by prompt -> [R, M])."""
    if "prompt_tokens" in batch:
        return shared_prompt_log_probs(config, params, batch["prompt_tokens"],
                                       batch["response_tokens"],
                                       prompt_start=batch.get("prompt_start"), chunk=chunk,
                                       group="repeat")
    return token_log_probs(config, params, batch["tokens"], chunk=chunk)
