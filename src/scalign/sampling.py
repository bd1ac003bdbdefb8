"""Batched generation: prefill + decode over an explicit KV cache, N samples per prompt,
greedy / temperature / top-k / top-p sampling, stops (EOS, length, stop strings), log-probs.

    sampler = Sampler(config, params, tokenizer, mesh=mesh)
    out = sampler.generate(["Q: 1+1?\\n", ...], n=16, max_new_tokens=256, key=jax.random.key(0),
                           temperature=0.8, top_p=0.95, stop_strings=("\\n\\n",))
    out.tokens [P, N, M], out.logprobs / out.model_logprobs [P, N, M], out.lengths [P, N],
    out.stop_reason [P, N], out.texts [P][N]

How one call runs (P prompts, N samples each, M = max_new_tokens, R = P * N rows):

1. Host: prompts are **left-padded** to a bucketed length Tp (the next power of two >= the
   longest prompt, at least `min_prompt_bucket`, or the smallest of `prompt_buckets` that fits),
   so varied prompt lengths reuse a few compiled programs. Row p's first real token sits at slot
   key_start[p] = Tp - len_p; the model masks the slots before it and gives RoPE positions
   `slot - key_start` (see `models.transformer`).
2. Jitted prefill (`_prefill`): one forward pass over [P, Tp] with a Tp-slot cache, LM logits at
   the last position only ([P, V], not [P, Tp, V]); then the K/V buffers are padded with the
   first decode phase's empty slots and each prompt's row is repeated N times (`jnp.repeat`,
   row r = p * N + j), so N samples cost one prefill.
3. Jitted decode (`_decode`): `lax.while_loop`s over steps t = 0 .. M-2 whose body samples token
   t from the current logits, records it, then runs the decoder on that one token
   (cache slot Tp + t, one `dynamic_update_slice` per buffer) for the next logits; the last token is
   sampled after the loop, so no forward pass is wasted. The loop exits early once every row has
   stopped. On CPU (unsharded, float32 cache) each step's attention is one FFI kernel call per
   layer (`scalign.kernels.cpu_attention`, `Sampler(attention=...)`) that reads only the slots
   each row attends to. With XLA's attention, which reads every slot of the buffer, the steps
   run in up to 4 phases for M >= 64 (`cache_phases`): the prefill leaves room for the first
   phase only and the cache grows by a copy before each later phase, so early steps read a
   shorter cache. With one phase (the kernel's default) the cache is donated into the decode
   call and returned by it, so XLA updates the K/V buffers in place, with no copy per call or
   per step. On CPU the loop reads the matmul weights packed once per `Sampler`
   (`Sampler(weight_layout=...)`, `models.transformer.DecodeKernels`): unsharded and float32,
   in 16-column panels that a second FFI kernel streams through FMA register tiles
   (`scalign.kernels.cpu_matmul`, `to_panels`); otherwise as [out, in] matrices, each product
   computed as W x^T, which XLA:CPU runs faster than x W for few rows.

Sampling (`sample_tokens`), in the order of HF's logits processors: logits / temperature, then
top-k (the k largest), then top-p (nucleus, Holtzman et al. 2020: the smallest set of the most
likely tokens whose probability mass reaches p; token i of the descending order is kept iff the
mass strictly before it is < p; found without a sort by `nucleus_cutoff`), then a draw by
inverse CDF: with the kept, unnormalised weights w_i = exp(z_i - max z) and one uniform u per
row, the token is the first i with cumsum(w)_i > u * sum(w) (`categorical_inverse_cdf`).
`temperature == 0` is greedy (argmax, a separately compiled program).
Temperature and top-p are traced scalars (changing them does not recompile); top-k and whether
top-p is active are static.

Randomness (explicit keys, same key => same samples): row r = p * N + j draws its step-t uniform
from `fold_in(fold_in(key, r), t)`. So sample j of prompt p with `n=N` equals row p * N + j of a
call with every prompt repeated N times and `n=1`, and adding prompts at the end of a batch does
not change the samples of the earlier rows.

Log-probs (both [P, N, M] float32, 0 after a row stops):
  `logprobs`        log pi_sample(token): under the distribution the token was drawn from
                    (temperature, top-k and top-p applied, renormalised); 0 for greedy, whose
                    distribution is a point mass.
  `model_logprobs`  log softmax(logits)[token] of the unmodified model (temperature 1, no
                    truncation): what PPO's ratios, KL penalties and DPO's reference terms need.

Stops. A row stops after the token that (a) is an EOS id (if `stop_on_eos`), or (b) completes
one of the stop strings in the generated text, or (c) is the M-th token. The stopping token is
the row's last token and is counted in `lengths`; later positions hold `pad_id`. Stop strings
are matched on the bytes the tokens decode to (`Tokenizer.token_bytes`) by an Aho-Corasick
automaton (Aho & Corasick 1975) over bytes, lifted to whole tokens on the host: table[q, v] is
the state after feeding token v's bytes from state q, or -1 if a stop string is completed
inside them (`stop_string_table`, vectorised numpy, cached per stop-string set). The loop
carries one automaton state per row, so a stop string spanning several tokens or lying inside
one longer token is found at the exact token that completes its first occurrence. Only the
generated text is searched (not the prompt). The decoded `texts` are cut right after the first
occurrence of a stop string (or right before it with `include_stop_string=False`); a token can
carry text past the stop string, which is cut from `texts` but kept in `tokens`. (A SentencePiece
model with add_dummy_prefix drops one leading space when decoding a completion; the automaton
still sees that space, so a stop string that starts with it can match at the very start.)

Sharding: with a `mesh`, params are placed by the logical-axis rule table
(`parallel.tree_shardings(param_logical_axes(config), ...)`), rows are sharded over
data x fsdp (the prompt batch is padded to a multiple of data * fsdp with rows that start
stopped), heads over tensor; the model's `constrain` calls shard activations and the cache.
On several hosts every process passes the same prompts and receives every row.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scalign import parallel
from scalign.kernels import cpu_attention, cpu_matmul
from scalign.models.config import ModelConfig
from scalign.models.heads import SCALAR_HEAD
from scalign.models.transformer import (
    CACHE_AXES,
    DecodeKernels,
    decode_kernels,
    forward,
    from_output_major,
    init_cache,
    init_params,
    lm_logits,
    param_logical_axes,
    to_output_major,
    to_panels,
)

Array = jax.Array

# stop_reason codes (int8 on device, names on the host)
MAX_LENGTH, EOS, STOP_STRING = 0, 1, 2
STOP_REASONS = ("max_length", "eos", "stop_string")


# ============================================================================ stop strings
def aho_corasick(patterns: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Byte-level Aho-Corasick automaton (Aho & Corasick 1975) as a complete DFA.

    Returns (delta int32 [Q, 256], accept bool [Q]): state 0 is the root (nothing matched);
    delta[q, b] is the state after reading byte b in state q (the longest suffix of the text
    read so far that is a prefix of some pattern); accept[q] is True iff some pattern is a suffix
    of that text, i.e. a pattern occurrence ends at the byte just read.
    """
    if not patterns or any(len(p) == 0 for p in patterns):
        raise ValueError("stop strings must be non-empty")
    children: list[dict[int, int]] = [{}]
    accept = [False]
    for pat in patterns:
        q = 0
        for b in pat:
            if b not in children[q]:
                children.append({})
                accept.append(False)
                children[q][b] = len(children) - 1
            q = children[q][b]
        accept[q] = True
    n = len(children)
    delta = np.zeros((n, 256), np.int32)
    fail = [0] * n
    order = []  # BFS order, so a state's failure target is complete before the state
    for b, child in children[0].items():
        delta[0, b] = child
        order.append(child)
    head = 0
    while head < len(order):
        q = order[head]
        head += 1
        accept[q] = accept[q] or accept[fail[q]]
        delta[q] = delta[fail[q]]
        for b, child in children[q].items():
            delta[q, b] = child
            fail[child] = int(delta[fail[q], b]) if q else 0
            order.append(child)
    return delta, np.asarray(accept)


def stop_string_table(token_bytes: Sequence[bytes], stop_strings: Sequence[str]) -> np.ndarray:
    """The token-level stop automaton: int32 [Q, V].

    table[q, v] = the automaton state after reading token v's bytes from state q, or -1 if a
    stop string occurrence ends inside those bytes. Computed for all (q, v) at once: tokens are
    sorted by byte length and byte position j only updates the tokens longer than j, so the
    work is Q * sum_v len(v) byte steps in numpy.
    """
    delta, accept = aho_corasick([s.encode("utf-8") for s in stop_strings])
    V, Q = len(token_bytes), delta.shape[0]
    lengths = np.fromiter((len(b) for b in token_bytes), np.int64, count=V)
    order = np.argsort(-lengths, kind="stable")
    max_len = int(lengths.max()) if V else 0
    padded = np.zeros((V, max(max_len, 1)), np.uint8)
    for row, v in enumerate(order):
        b = token_bytes[v]
        padded[row, :len(b)] = np.frombuffer(b, np.uint8)
    sorted_len = lengths[order]
    state = np.repeat(np.arange(Q, dtype=np.int32)[:, None], V, axis=1)  # [Q, V] sorted order
    hit = np.zeros((Q, V), bool)
    for j in range(max_len):
        n = int(np.searchsorted(-sorted_len, -j, side="left"))  # tokens with len > j
        live = ~hit[:, :n]
        nxt = delta[state[:, :n], padded[None, :n, j]]
        state[:, :n] = np.where(live, nxt, state[:, :n])
        hit[:, :n] |= live & accept[nxt]
    table = np.empty((Q, V), np.int32)
    table[:, order] = np.where(hit, -1, state)
    return table


def first_stop_end(text: str, stop_strings: Sequence[str]) -> tuple[int, int] | None:
    """(start, end) of the stop-string occurrence that ends first in `text` (ties: the longest),
    or None. Used to cut decoded texts; the device automaton stops at the same occurrence."""
    best: tuple[int, int] | None = None
    for s in stop_strings:
        i = text.find(s)
        if i < 0:
            continue
        cand = (i, i + len(s))
        if best is None or cand[1] < best[1] or (cand[1] == best[1] and cand[0] < best[0]):
            best = cand
    return best


# =============================================================================== sampling
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


# ========================================================================== device programs
def _constrain_rows(x: Array) -> Array:
    return parallel.constrain(x, ("act_batch",) + (None,) * (x.ndim - 1))


def _prefill(params: Any, tokens: Array, key_start: Array, *, config: ModelConfig,
             mesh: jax.sharding.Mesh | None, rules: parallel.Rules, n: int,
             extra_slots: int, cache_dtype: Any) -> tuple[Array, Any]:
    """Prompts [P, Tp] -> (last-position logits [P*n, V], cache with Tp + extra_slots slots,
    P*n rows)."""
    with parallel.sharding_context(mesh, rules):
        return _prefill_body(config, params, tokens, key_start, n, extra_slots, cache_dtype)


def _prefill_body(config: ModelConfig, params: Any, tokens: Array, key_start: Array, n: int,
                  extra_slots: int, cache_dtype: Any) -> tuple[Array, Any]:
    P, Tp = tokens.shape
    cache = init_cache(config, P, Tp, cache_dtype)  # Tp slots per layer
    hidden, cache = forward(config, params, tokens, cache=cache, cache_index=0,
                            key_start=key_start)
    logits = lm_logits(config, params, hidden[:, -1])  # [P, V]: last position only
    cache = _grow_cache(cache, extra_slots, n)
    logits = _constrain_rows(jnp.repeat(logits, n, axis=0) if n > 1 else logits)
    return logits, cache


def _grow_cache(cache: Any, extra_slots: int, n: int = 1) -> Any:
    """Append `extra_slots` empty slots to every K/V buffer and repeat each row n times."""
    def grow(x, axes):
        if extra_slots:
            slots = axes.index("cache_length")
            x = jnp.pad(x, [(0, extra_slots if a == slots else 0) for a in range(x.ndim)])
        x = jnp.repeat(x, n, axis=0) if n > 1 else x
        return parallel.constrain(x, axes)

    return {layer: {name: grow(x, CACHE_AXES[name]) for name, x in bufs.items()}
            for layer, bufs in cache.items()}


def cache_phases(max_new_tokens: int, phases: int | None = None) -> tuple[int, ...]:
    """Decode slots reserved in the cache by the end of each phase of the decode loop.

    The loop runs in phases: phase i sees a cache of Tp + b_i slots (b = this tuple, ending at
    M) and is its own `while_loop`; between phases the cache grows by a copy. Each step's
    attention reads the whole cache it sees, slots not yet written included (masked), so
    phases cut the bytes read per step: with Tp = 64, M = 128 and 4 phases the mean cache a
    step reads is 144 slots instead of 192. The price: one compiled loop body per phase and a
    copy of the cache between phases. `phases=None`: min(4, M // 32) phases (one below M = 64).
    """
    M = int(max_new_tokens)
    k = max(1, min(4, M // 32)) if phases is None else int(phases)
    if k < 1:
        raise ValueError(f"cache phases must be >= 1, got {phases}")
    k = min(k, M)
    return tuple(-(-M * (i + 1) // k) for i in range(k))


def _decode(weights: Any, cache: Any, logits: Array, key_start: Array, done: Array,
            row_ids: Array, key: Array, temperature: Array, top_p: Array,
            stop_table: Array | None, eos_ids: Array | None, *, config: ModelConfig,
            mesh: jax.sharding.Mesh | None, rules: parallel.Rules, prompt_len: int,
            phases: tuple[int, ...], greedy: bool, top_k: int, use_top_p: bool, pad_id: int,
            kernels: DecodeKernels) -> tuple[dict[str, Array], Any]:
    """The decode loop (see the module docstring). Returns (outputs, final cache). `weights`:
    the backbone params, or with `kernels.weight_left` their `to_output_major` packing."""
    with parallel.sharding_context(mesh, rules), decode_kernels(kernels):
        return _decode_body(config, weights, cache, logits, key_start, done, row_ids, key,
                            temperature, top_p, stop_table, eos_ids, prompt_len, phases,
                            greedy, top_k, use_top_p, pad_id, kernels.weight_left)


def _decode_body(config: ModelConfig, weights: Any, cache: Any, logits: Array, key_start: Array,
                 done: Array, row_ids: Array, key: Array, temperature: Array, top_p: Array,
                 stop_table: Array | None, eos_ids: Array | None, prompt_len: int,
                 phases: tuple[int, ...], greedy: bool, top_k: int, use_top_p: bool,
                 pad_id: int, output_major: bool) -> tuple[dict[str, Array], Any]:
    """`_decode` without its contexts. The loop state per row: the next-token logits,
    done flag, length, stop reason and stop-automaton state, plus the [R, M] output buffers.
    With `output_major`, `weights` are the [out, in] packing of the params (see `Sampler`'s
    weight_layout) and the loop body reads them through transposed views.
    `phases` (`cache_phases`): the cache arrives with prompt_len + phases[0] slots and grows
    before each later phase; M = phases[-1]."""
    R, M = logits.shape[0], phases[-1]
    if output_major:
        weights = from_output_major(weights, _backbone_shapes(config))
    row_keys = None if greedy else jax.vmap(jax.random.fold_in, (None, 0))(key, row_ids)

    def emit(s: dict[str, Any]) -> tuple[dict[str, Any], Array]:
        t = s["t"]
        if greedy:
            u = jnp.zeros((R,), jnp.float32)
        else:
            u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, t)))(row_keys)
        tok, lp, lpm = sample_tokens(s["logits"], u, temperature, top_p, greedy=greedy,
                                     top_k=top_k, use_top_p=use_top_p)
        live = ~s["done"]
        s = dict(s)
        s["tokens"] = jax.lax.dynamic_update_slice(
            s["tokens"], jnp.where(live, tok, pad_id)[:, None], (0, t))
        s["logprobs"] = jax.lax.dynamic_update_slice(
            s["logprobs"], jnp.where(live, lp, 0.0)[:, None], (0, t))
        s["model_logprobs"] = jax.lax.dynamic_update_slice(
            s["model_logprobs"], jnp.where(live, lpm, 0.0)[:, None], (0, t))
        s["lengths"] = s["lengths"] + live.astype(jnp.int32)
        stop = jnp.zeros((R,), bool)
        if eos_ids is not None:
            is_eos = live & jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)
            s["reason"] = jnp.where(is_eos, jnp.int8(EOS), s["reason"])
            stop = is_eos
        if stop_table is not None:
            nxt = stop_table[s["state"], tok]
            hit = live & ~stop & (nxt < 0)
            s["reason"] = jnp.where(hit, jnp.int8(STOP_STRING), s["reason"])
            s["state"] = jnp.where(live, jnp.maximum(nxt, 0), s["state"])
            stop = stop | hit
        s["done"] = s["done"] | stop
        return s, tok

    def body(s):
        s, tok = emit(s)
        hidden, s["cache"] = forward(config, weights, tok[:, None], cache=s["cache"],
                                     cache_index=prompt_len + s["t"], key_start=key_start)
        s["logits"] = _constrain_rows(lm_logits(config, weights, hidden[:, 0]))
        s["t"] = s["t"] + 1
        return s

    def cond(end):
        return lambda s: (s["t"] < min(end, M - 1)) & ~jnp.all(s["done"])

    state = {
        "t": jnp.int32(0), "logits": logits, "cache": cache, "done": done,
        "tokens": _constrain_rows(jnp.full((R, M), pad_id, jnp.int32)),
        "logprobs": _constrain_rows(jnp.zeros((R, M), jnp.float32)),
        "model_logprobs": _constrain_rows(jnp.zeros((R, M), jnp.float32)),
        "lengths": jnp.zeros((R,), jnp.int32), "reason": jnp.zeros((R,), jnp.int8),
        "state": jnp.zeros((R,), jnp.int32),
    }
    for i, end in enumerate(phases):
        if i:
            state["cache"] = _grow_cache(state["cache"], end - phases[i - 1])
        state = jax.lax.while_loop(cond(end), body, state)
    state, _ = emit(state)  # token M-1 (a no-op if every row stopped earlier)
    outputs = {k: state[k] for k in ("tokens", "logprobs", "model_logprobs", "lengths",
                                     "reason")}
    return outputs, state["cache"]


@functools.cache
def _backbone_shapes(config: ModelConfig) -> Any:
    return jax.eval_shape(functools.partial(init_params, config), jax.random.PRNGKey(0))


# One jit per program for the whole process: samplers of the same config, mesh and shapes share
# compiled code. With one cache phase the cache (argument 1) is donated into the decode loop and
# returned by it, so it is updated in place; with several, each phase's loop makes its own.
_PREFILL = jax.jit(_prefill, static_argnames=("config", "mesh", "rules", "n", "extra_slots",
                                              "cache_dtype"))
_DECODE_STATIC = ("config", "mesh", "rules", "prompt_len", "phases", "greedy", "top_k",
                  "use_top_p", "pad_id", "kernels")
_DECODE = jax.jit(_decode, donate_argnums=(1,), static_argnames=_DECODE_STATIC)
_DECODE_PHASED = jax.jit(_decode, static_argnames=_DECODE_STATIC)
_PACK = jax.jit(to_output_major)
_PACK_PANELS = jax.jit(to_panels)


# ================================================================================= host API
@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """The result of one `Sampler` call (numpy arrays on the host).

    tokens: int32 [P, N, M], `pad_id` after each row's last token.
    logprobs: float32 [P, N, M], log-prob of each token under the *sampling* distribution
      (temperature / top-k / top-p applied; 0 for greedy); 0 after the last token.
    model_logprobs: float32 [P, N, M], log-prob under the unmodified model (temperature 1, full
      vocabulary); 0 after the last token.
    lengths: int32 [P, N], number of generated tokens, the stopping token (EOS or the token that
      completes a stop string) included.
    stop_reason: str [P, N], one of "eos", "stop_string", "max_length".
    texts: [P][N] decoded completions cut at the first stop string, or None without a tokenizer.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    model_logprobs: np.ndarray
    lengths: np.ndarray
    stop_reason: np.ndarray
    texts: list[list[str]] | None


def _next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(x, 1))))


class Sampler:
    """Batched sampler for one model (see the module docstring).

    Args:
      config, params: the model (params may carry a scalar head; it is ignored).
      tokenizer: a `Tokenizer`, needed for text prompts, stop strings and decoded texts; None
        for the id-only API (`generate_ids` without stop strings).
      mesh: a (data, fsdp, tensor) mesh to shard over, or None for the default device.
      rules: the logical-axis rule table.
      max_new_tokens: default number of new tokens M (static: each value compiles once).
      prompt_buckets: allowed padded prompt lengths (ascending); None means powers of two
        >= `min_prompt_bucket`.
      eos_ids: token ids that stop a row; default the tokenizer's eos id (none without one).
      pad_id: the id written after a row stops and used for left padding; default the
        tokenizer's pad id, else 0.
      cache_dtype: K/V cache dtype; default the config's compute dtype.
      weight_layout: how the decode loop reads the matmul weights: "output_major" transposes
        them once, when the sampler is made, into [out, in] matrices (the sampler keeps this
        second copy) and computes each decode product as W x^T
        (`models.transformer.DecodeKernels`), which XLA:CPU runs faster; "panels" packs them
        once into 16-column panels (`models.transformer.to_panels`, also a second copy) that
        the FFI kernel of `scalign.kernels.cpu_matmul` streams through FMA register tiles
        (CPU, unsharded, float32 params; built with the attention kernel); "native" reads the
        params as stored; "auto" (default) is "panels" for an unsharded float32 CPU sampler
        whose kernels build, else "output_major" on CPU and "native" elsewhere (TPU and GPU
        compilers pick their own layouts, and the copy would cost HBM).
      cache_phases: how many phases the decode loop runs in, the cache growing between them
        (`cache_phases`); None (default) picks min(4, M // 32), so short generations use one,
        and one phase with the CPU attention kernel (it reads only the attended slots, so
        phases would only add copies: 5.64 vs 5.86 s per `sample_llama_small` call).
      attention: how a decode step computes its attention: "cpu_kernel" with the FFI kernel of
        `scalign.kernels.cpu_attention` (CPU, float32 cache; built with g++ on first use; under
        a mesh each device runs it on its own rows and heads), "xla" with XLA's own products;
        "auto" (default) is "cpu_kernel" for an unsharded CPU sampler whose kernel builds, else
        "xla".
    """

    def __init__(self, config: ModelConfig, params: Any, tokenizer: Any = None, *,
                 mesh: jax.sharding.Mesh | None = None,
                 rules: parallel.Rules = parallel.DEFAULT_RULES, max_new_tokens: int = 256,
                 prompt_buckets: Sequence[int] | None = None, min_prompt_bucket: int = 16,
                 eos_ids: Sequence[int] | None = None, pad_id: int | None = None,
                 cache_dtype: Any = None, weight_layout: str = "auto",
                 cache_phases: int | None = None, attention: str = "auto"):
        self.config = config
        self.tokenizer = tokenizer
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        self.rules = rules
        self.max_new_tokens = int(max_new_tokens)
        if prompt_buckets is not None:
            buckets = sorted(int(b) for b in prompt_buckets)
            if not buckets or buckets[0] <= 0:
                raise ValueError(f"prompt_buckets must be positive lengths, got {prompt_buckets}")
            self.prompt_buckets: tuple[int, ...] | None = tuple(buckets)
        else:
            self.prompt_buckets = None
        self.min_prompt_bucket = int(min_prompt_bucket)
        if eos_ids is None:
            eos_ids = (tokenizer.eos_id,) if tokenizer is not None else ()
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.pad_id = int(pad_id if pad_id is not None
                          else tokenizer.pad_id if tokenizer is not None else 0)
        self.cache_dtype = jnp.dtype(cache_dtype or config.compute_dtype)
        if cache_phases is not None and cache_phases < 1:
            raise ValueError(f"cache_phases must be >= 1 (or None), got {cache_phases}")
        platform = (self.mesh.devices.flat[0] if self.mesh is not None
                    else jax.devices()[0]).platform
        self.weight_layout = weight_layout = self._pick_layout(weight_layout, platform)
        self.attention = self._pick_attention(attention, platform)
        self.cache_phases = (1 if cache_phases is None and self.attention == "cpu_kernel"
                             else cache_phases)
        # the decode step's formulation of its products (`models.transformer.DecodeKernels`)
        self.decode_kernels = DecodeKernels(weight_left=weight_layout == "output_major",
                                            cpu_attention=self.attention == "cpu_kernel",
                                            cpu_matmul=weight_layout == "panels")
        backbone = {k: v for k, v in params.items() if k != SCALAR_HEAD}
        if self.mesh is not None:
            shardings = parallel.tree_shardings(param_logical_axes(config), backbone, self.mesh,
                                                rules)
            backbone = parallel.put_tree(backbone, shardings)
        self.params = backbone
        # what the decode loop reads: with output_major / panels, a packing made once here
        # (a second copy of the matmul weights for the sampler's life; packing per call cost
        # ~0.1 s of a 6 s sample_llama_small call)
        pack = {"output_major": _PACK, "panels": _PACK_PANELS}.get(weight_layout)
        self._decode_weights = pack(backbone) if pack else backbone
        self._stop_tables: dict[tuple[str, ...], Array] = {}
        self._prefill = _PREFILL
        self._decode, self._decode_phased = _DECODE, _DECODE_PHASED

    def _pick_layout(self, layout: str, platform: str) -> str:
        if layout not in ("auto", "panels", "output_major", "native"):
            raise ValueError(f"weight_layout must be 'auto', 'panels', 'output_major' or "
                             f"'native', got {layout!r}")
        if layout in ("output_major", "native"):
            return layout
        c = self.config
        if platform != "cpu":
            why = f"the platform is {platform}"
        elif self.mesh is not None:
            why = "the sampler is sharded (the kernel has no partitioning rule)"
        elif jnp.dtype(c.params_dtype) != jnp.float32 or jnp.dtype(c.compute_dtype) != jnp.float32:
            why = (f"params / compute dtypes are {jnp.dtype(c.params_dtype).name} / "
                   f"{jnp.dtype(c.compute_dtype).name}, not float32")
        elif not cpu_matmul.available():
            why = f"the kernel is unavailable ({cpu_matmul.unavailable_reason()})"
        else:
            return "panels"
        if layout == "panels":
            raise ValueError(f"weight_layout='panels' cannot be used: {why}")
        return "output_major" if platform == "cpu" else "native"

    def _pick_attention(self, attention: str, platform: str) -> str:
        if attention not in ("auto", "cpu_kernel", "xla"):
            raise ValueError(f"attention must be 'auto', 'cpu_kernel' or 'xla', got {attention!r}")
        if attention == "xla":
            return "xla"
        if platform != "cpu":
            why = f"the platform is {platform}"
        elif self.cache_dtype != jnp.float32:
            why = f"the cache dtype is {self.cache_dtype.name}, not float32"
        elif attention == "auto" and self.mesh is not None:
            return "xla"  # measured: on 2 cores, 2 devices x kernel were no faster than XLA
        elif not cpu_attention.available():
            why = f"the kernel is unavailable ({cpu_attention.unavailable_reason()})"
        else:
            return "cpu_kernel"
        if attention == "cpu_kernel":
            raise ValueError(f"attention='cpu_kernel' cannot be used: {why}")
        return "xla"

    # ------------------------------------------------------------------ helpers
    def prompt_bucket(self, length: int) -> int:
        """The padded prompt length used for a longest prompt of `length` tokens."""
        if self.prompt_buckets is None:
            return max(self.min_prompt_bucket, _next_pow2(length))
        for b in self.prompt_buckets:
            if b >= length:
                return b
        raise ValueError(f"prompt of {length} tokens is longer than the largest prompt bucket "
                         f"{self.prompt_buckets[-1]}; add a larger bucket to prompt_buckets")

    def stop_table(self, stop_strings: Sequence[str]) -> Array:
        """The [Q, V] token-level stop automaton for these stop strings, on device.

        Cached per stop-string tuple. Q is padded to a power of two (at least 8) with unreachable
        states, so similar stop sets share a compiled program; ids past the tokenizer's
        vocabulary (a model vocabulary padded for sharding) add no text.
        """
        key = tuple(stop_strings)
        if key not in self._stop_tables:
            if self.tokenizer is None:
                raise ValueError("stop_strings need a tokenizer: pass one to Sampler(...)")
            table = stop_string_table(self.tokenizer.token_bytes(), key)
            Q, V = table.shape
            if V > self.config.vocab_size:
                raise ValueError(f"tokenizer has {V} ids but the model's vocab_size is "
                                 f"{self.config.vocab_size}")
            full = np.zeros((max(8, _next_pow2(Q)), self.config.vocab_size), np.int32)
            full[:Q, :V] = table
            full[:Q, V:] = np.arange(Q, dtype=np.int32)[:, None]  # no text: state unchanged
            self._stop_tables[key] = self._put_replicated(jnp.asarray(full))
        return self._stop_tables[key]

    def _put_rows(self, x: np.ndarray) -> Array:
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, parallel.batch_sharding(self.mesh))

    def _put_replicated(self, x: Any) -> Any:
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, parallel.replicated(self.mesh))

    # ------------------------------------------------------------------ API
    def generate_ids(self, prompts: Sequence[Sequence[int]] | np.ndarray, n: int = 1, *,
                     max_new_tokens: int | None = None, key: Array | int | None = None,
                     temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                     stop_strings: Sequence[str] = (), stop_on_eos: bool = True,
                     include_stop_string: bool = True, decode_texts: bool = True
                     ) -> SampleOutput:
        """Sample `n` completions for each tokenized prompt.

        Args:
          prompts: P token-id sequences (ragged) or an int array [P, T] of full-length rows.
          n: samples per prompt N (one prefill per prompt).
          max_new_tokens: M (default: the sampler's).
          key: a PRNG key (or an int seed); required unless greedy.
          temperature: 0 for greedy, else > 0.
          top_k: keep the k most likely tokens (0: off). top_p: nucleus mass (1: off).
          stop_strings: stop after the first occurrence of any of these in the generated text.
          stop_on_eos: stop after an EOS id (`eos_ids`).
          include_stop_string: keep the stop string at the end of `texts`.
          decode_texts: fill `texts` (needs a tokenizer).
        """
        rows = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
        if not rows:
            raise ValueError("generate_ids: no prompts")
        for i, r in enumerate(rows):
            if r.size == 0:
                raise ValueError(f"prompt {i} is empty; give at least one token (e.g. bos)")
            if r.min() < 0 or r.max() >= self.config.vocab_size:
                raise ValueError(f"prompt {i} has ids outside [0, {self.config.vocab_size})")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        M = int(max_new_tokens if max_new_tokens is not None else self.max_new_tokens)
        if M < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {M}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
        greedy = temperature == 0.0
        if not greedy and key is None:
            raise ValueError("sampling with temperature > 0 needs key=jax.random.key(seed)")
        top_k = 0 if (greedy or top_k >= self.config.vocab_size) else int(top_k)
        use_top_p = (not greedy) and top_p < 1.0
        if isinstance(key, int):
            key = jax.random.key(key)
        if key is None:
            key = jax.random.key(0)  # unused by greedy decoding

        P = len(rows)
        div = parallel.batch_divisor(self.mesh) if self.mesh is not None else 1
        P_pad = -(-P // div) * div
        Tp = self.prompt_bucket(max(r.size for r in rows))
        tokens = np.full((P_pad, Tp), self.pad_id, np.int32)
        key_start = np.full((P_pad,), Tp - 1, np.int32)
        for i, r in enumerate(rows):
            tokens[i, Tp - r.size:] = r
            key_start[i] = Tp - r.size
        R = P_pad * n
        done = np.zeros((R,), bool)
        done[P * n:] = True  # batch-padding rows start stopped

        stop_table = self.stop_table(stop_strings) if stop_strings else None
        eos = (self._put_replicated(jnp.asarray(self.eos_ids, jnp.int32))
               if stop_on_eos and self.eos_ids else None)
        static = dict(config=self.config, mesh=self.mesh, rules=self.rules)
        phases = cache_phases(M, self.cache_phases)
        logits, cache = self._prefill(self.params, self._put_rows(tokens),
                                      self._put_rows(key_start), n=n, extra_slots=phases[0],
                                      cache_dtype=self.cache_dtype, **static)
        decode = self._decode if len(phases) == 1 else self._decode_phased
        out, _ = decode(
            self._decode_weights, cache, logits, self._put_rows(np.repeat(key_start, n)),
            self._put_rows(done), self._put_rows(np.arange(R, dtype=np.int32)),
            self._put_replicated(key), self._put_replicated(jnp.float32(temperature)),
            self._put_replicated(jnp.float32(top_p)), stop_table, eos, prompt_len=Tp,
            phases=phases, greedy=greedy, top_k=top_k, use_top_p=use_top_p,
            pad_id=self.pad_id, kernels=self.decode_kernels, **static)
        if jax.process_count() > 1:  # rows live on every host: gather them everywhere
            from jax.experimental import multihost_utils
            out = multihost_utils.process_allgather(out, tiled=True)
        out = jax.device_get(out)

        def shape(x):
            return np.asarray(x)[:P * n].reshape(P, n, *np.shape(x)[1:])

        reasons = np.asarray(STOP_REASONS)[shape(out["reason"]).astype(np.int64)]
        result = SampleOutput(tokens=shape(out["tokens"]), logprobs=shape(out["logprobs"]),
                              model_logprobs=shape(out["model_logprobs"]),
                              lengths=shape(out["lengths"]), stop_reason=reasons, texts=None)
        if decode_texts and self.tokenizer is not None:
            result = dataclasses.replace(result, texts=self._texts(result, stop_strings,
                                                                   include_stop_string))
        return result

    def generate(self, texts: Sequence[str], n: int = 1, *, add_bos: bool = True,
                 **kwargs: Any) -> SampleOutput:
        """Encode `texts` (with bos unless add_bos=False) and call `generate_ids`."""
        if self.tokenizer is None:
            raise ValueError("Sampler.generate needs a tokenizer; use generate_ids for ids")
        if isinstance(texts, str):
            raise TypeError("generate takes a sequence of prompts, got one str; wrap it in a "
                            "list")
        prompts = [self.tokenizer.encode(t, add_bos=add_bos) for t in texts]
        return self.generate_ids(prompts, n, **kwargs)

    def _texts(self, out: SampleOutput, stop_strings: Sequence[str],
               include_stop_string: bool) -> list[list[str]]:
        texts = []
        for p in range(out.tokens.shape[0]):
            row = []
            for j in range(out.tokens.shape[1]):
                text = self.tokenizer.decode(out.tokens[p, j, :out.lengths[p, j]])
                if out.stop_reason[p, j] == "stop_string":
                    span = first_stop_end(text, stop_strings)
                    if span is not None:
                        text = text[:span[1] if include_stop_string else span[0]]
                row.append(text)
            texts.append(row)
        return texts
