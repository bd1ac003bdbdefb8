"""Drawing one token per row from its logits: temperature, top-k, top-p, inverse CDF.

`sample_tokens` applies, in the order of HF's logits processors: logits / temperature, then
top-k (the k largest), then top-p (nucleus, Holtzman et al. 2020: the smallest set of the most
likely tokens whose probability mass reaches p; token i of the descending order is kept iff the
mass strictly before it is < p; found without a sort by `nucleus_cutoff`), then a draw by
inverse CDF: with the kept, unnormalised weights w_i = exp(z_i - max z) and one uniform u per
row, the token is the first i with cumsum(w)_i > u * sum(w) (`categorical_inverse_cdf`).
`greedy` is argmax. Temperature and top-p may be traced scalars; top-k and whether top-p is
active are static.

Log-probs returned per token: log pi_sample(token), under the distribution the token was drawn
from (temperature, top-k and top-p applied, renormalised; 0 for greedy, a point mass), and
log softmax(logits)[token] of the unmodified model (temperature 1, no truncation): what PPO's
ratios, KL penalties and DPO's reference terms need.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _first_or_last(cond: Array, valid: Array) -> Array:
    """Per row: the first index where `cond` holds, else the last index where `valid` holds."""
    n = cond.shape[-1]
    last = n - 1 - jnp.argmax(valid[:, ::-1], axis=-1)
    return jnp.where(jnp.any(cond, axis=-1), jnp.argmax(cond, axis=-1), last)


def categorical_inverse_cdf(w: Array, uniforms: Array) -> tuple[Array, Array]:
    """Draw index i with probability w_i / sum(w) from unnormalised weights w [R, C] >= 0 (some
    > 0 per row) and uniforms [R] in [0, 1): the first i with cumsum(w)_i > u * sum(w).

    Two levels, so no length-C prefix sum is needed (XLA lowers `cumsum` to a `reduce_window`
    that costs ~5 ms for [32, 8192] on CPU): C is cut into nb blocks of bs; the block is found
    from the cumulative block sums, then the index inside it from that block's cumulative sum.
    Only indices with w_i > 0 can be returned (rounding at a boundary falls back to the last
    positive weight). Returns (index int32 [R], log(w_i / sum(w)) [R]).
    """
    R, C = w.shape
    bs = min(C, 1 << max(4, (C - 1).bit_length() // 2))
    nb = -(-C // bs)
    wb = jnp.pad(w, ((0, 0), (0, nb * bs - C))).reshape(R, nb, bs)
    block_sum = jnp.sum(wb, axis=-1)  # [R, nb]
    block_cdf = jnp.cumsum(block_sum, axis=-1)
    total = block_cdf[:, -1]
    thr = uniforms.astype(jnp.float32) * total
    j = _first_or_last((block_cdf > thr[:, None]) & (block_sum > 0), block_sum > 0)
    w_j = jnp.take_along_axis(wb, j[:, None, None], axis=1)[:, 0]  # [R, bs]
    rest = thr - (jnp.take_along_axis(block_cdf, j[:, None], axis=-1)[:, 0]
                  - jnp.take_along_axis(block_sum, j[:, None], axis=-1)[:, 0])
    i = _first_or_last((jnp.cumsum(w_j, axis=-1) > rest[:, None]) & (w_j > 0), w_j > 0)
    w_c = jnp.take_along_axis(w_j, i[:, None], axis=-1)[:, 0]
    return (j * bs + i).astype(jnp.int32), jnp.log(w_c) - jnp.log(total)


def nucleus_cutoff(w: Array, top_p: Array | float) -> Array:
    """Per row, the smallest weight x0 such that the mass of the weights strictly above it is
    < top_p * sum(w); the nucleus (Holtzman et al. 2020) is then {i : w_i >= x0}. That is the
    sorted-order rule "keep token k iff the mass before it is < top_p" without a sort (a sort of
    [32, 8192] takes ~80 ms on this CPU): g(x) = sum_{w_j > x} w_j is non-increasing, so x0 is
    found by bisection over the bit patterns of non-negative float32s (monotone as integers);
    30 halvings of [0, bits(1.0)] pin it exactly. Requires max(w) == 1 (w = exp(z - max z)).
    Ties at the boundary are all kept. Returns x0 [R, 1].
    """
    target = jnp.asarray(top_p, jnp.float32) * jnp.sum(w, axis=-1, keepdims=True)
    lo = jnp.zeros(target.shape, jnp.int32)  # g(0) = total >= target: not yet below
    hi = jnp.full(target.shape, 0x3F800000, jnp.int32)  # g(1.0) = 0 < target

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        x = jax.lax.bitcast_convert_type(mid, jnp.float32)
        below = jnp.sum(jnp.where(w > x, w, 0.0), axis=-1, keepdims=True) < target
        return jnp.where(below, lo, mid), jnp.where(below, mid, hi)

    _, hi = jax.lax.fori_loop(0, 30, halve, (lo, hi))
    return jax.lax.bitcast_convert_type(hi, jnp.float32)


def sample_tokens(logits: Array, uniforms: Array, temperature: Array | float,
                  top_p: Array | float, *, greedy: bool, top_k: int, use_top_p: bool
                  ) -> tuple[Array, Array, Array]:
    """One token per row from logits [R, V] (float32) and uniforms [R] in [0, 1).

    Returns (tokens int32 [R], log pi_sample(token) [R], log softmax(logits)[token] [R]); see the
    module docstring for the order temperature -> top-k -> top-p and the inverse-CDF draw.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    if greedy:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        model_lp = jnp.take_along_axis(logits, tok[:, None], axis=-1)[:, 0] - lse
        return tok, jnp.zeros_like(model_lp), model_lp
    z = logits / jnp.asarray(temperature, jnp.float32)
    idx = None
    if top_k:
        z, idx = jax.lax.top_k(z, top_k)  # descending
    w = jnp.exp(z - jnp.max(z, axis=-1, keepdims=True))  # unnormalised, max weight exactly 1
    if use_top_p:
        if top_k:  # already sorted: the mass before position k is an exclusive prefix sum
            keep = (jnp.cumsum(w, axis=-1) - w) < (jnp.asarray(top_p, jnp.float32)
                                                   * jnp.sum(w, axis=-1, keepdims=True))
        else:
            keep = w >= nucleus_cutoff(w, top_p)
        w = jnp.where(keep, w, 0.0)
    choice, sample_lp = categorical_inverse_cdf(w, uniforms)
    tok = choice if idx is None else jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
    tok = tok.astype(jnp.int32)
    model_lp = jnp.take_along_axis(logits, tok[:, None], axis=-1)[:, 0] - lse
    return tok, sample_lp, model_lp

