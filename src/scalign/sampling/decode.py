"""The device programs of one sampling call: the jitted prefill and the jitted decode loop.

With P prompts left-padded to Tp slots, N samples each, M = max_new_tokens and R = P * N rows:

1. Prefill (`_prefill`): one forward pass over [P, Tp] with a Tp-slot cache, LM logits at the
   last position only ([P, V], not [P, Tp, V]); then the K/V buffers are padded with the first
   decode phase's empty slots and each prompt's row is repeated N times (`jnp.repeat`, row
   r = p * N + j), so N samples cost one prefill. It reads the params as stored.
2. Decode (`_decode`): `lax.while_loop`s over steps t = 0 .. M-2 whose body samples token t
   from the current logits (`tokens.sample_tokens`), records it, then runs the decoder on that
   one token (cache slot Tp + t, one `dynamic_update_slice` per buffer) for the next logits; the
   last token is sampled after the loop, so no forward pass is wasted. The loop exits early once
   every row has stopped (EOS, a stop string through the `stops` automaton, or length).
   The model computes the step's products and attention through the injected `ops`
   (`models.ops`; on CPU `kernels.decode_ops.CpuDecodeOps`), reading the weights in the
   sampler's layout (`weight_layout`: the params, their [out, in] copies, or `PanelWeight`s).
   With XLA's attention, which reads every slot of the buffer, the steps run in up to 4 phases
   for M >= 64 (`cache_phases`): the prefill leaves room for the first phase only and the cache
   grows by a copy before each later phase, so early steps read a shorter cache. With one phase
   (the CPU attention kernel's default: it reads only the attended slots) the cache is donated
   into the decode call and returned by it, so XLA updates the K/V buffers in place, with no
   copy per call or per step.

Randomness: row r draws its step-t uniform from `fold_in(fold_in(key, r), t)`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from scalign import parallel
from scalign.kernels.decode_ops import decode_view
from scalign.models.config import ModelConfig
from scalign.models.ops import Ops
from scalign.models.transformer import CACHE_AXES, forward, init_cache, lm_logits
from scalign.sampling.tokens import sample_tokens

Array = jax.Array

# stop_reason codes (int8 on device, names on the host)
MAX_LENGTH, EOS, STOP_STRING = 0, 1, 2
STOP_REASONS = ("max_length", "eos", "stop_string")


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
            ops: Ops, weight_layout: str) -> tuple[dict[str, Array], Any]:
    """The decode loop (see the module docstring). Returns (outputs, final cache). `weights`:
    the backbone params packed for `weight_layout` (`kernels.decode_ops.pack_params`), which the
    model reads through `ops`."""
    with parallel.sharding_context(mesh, rules):
        weights = decode_view(weights, weight_layout, config)
        return _decode_body(config, weights, cache, logits, key_start, done, row_ids, key,
                            temperature, top_p, stop_table, eos_ids, prompt_len, phases,
                            greedy, top_k, use_top_p, pad_id, ops)


def _decode_body(config: ModelConfig, weights: Any, cache: Any, logits: Array, key_start: Array,
                 done: Array, row_ids: Array, key: Array, temperature: Array, top_p: Array,
                 stop_table: Array | None, eos_ids: Array | None, prompt_len: int,
                 phases: tuple[int, ...], greedy: bool, top_k: int, use_top_p: bool,
                 pad_id: int, ops: Ops) -> tuple[dict[str, Array], Any]:
    """`_decode` without its contexts. The loop state per row: the next-token logits,
    done flag, length, stop reason and stop-automaton state, plus the [R, M] output buffers.
    `weights` are what the model reads through `ops` (see `_decode`).
    `phases` (`cache_phases`): the cache arrives with prompt_len + phases[0] slots and grows
    before each later phase; M = phases[-1]."""
    R, M = logits.shape[0], phases[-1]
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
                                     cache_index=prompt_len + s["t"], key_start=key_start,
                                     ops=ops)
        s["logits"] = _constrain_rows(lm_logits(config, weights, hidden[:, 0], ops))
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


# One jit per program for the whole process: samplers of the same config, mesh and shapes share
# compiled code. With one cache phase the cache (argument 1) is donated into the decode loop and
# returned by it, so it is updated in place; with several, each phase's loop makes its own.
_PREFILL = jax.jit(_prefill, static_argnames=("config", "mesh", "rules", "n", "extra_slots",
                                              "cache_dtype"))
_DECODE_STATIC = ("config", "mesh", "rules", "prompt_len", "phases", "greedy", "top_k",
                  "use_top_p", "pad_id", "ops", "weight_layout")
_DECODE = jax.jit(_decode, donate_argnums=(1,), static_argnames=_DECODE_STATIC)
_DECODE_PHASED = jax.jit(_decode, static_argnames=_DECODE_STATIC)
