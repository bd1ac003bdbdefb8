"""A decoder-only transformer in Flax Linen, with an explicit KV cache.

    tokens [B, T] -> embed [B, T, D] -> L x Block -> RMSNorm -> hidden [B, T, D]
    Block:  h = x + PostNorm(Attention(PreNorm(x)))        (PostNorm only with post_norms)
            y = h + PostNorm(MLP(PreNorm(h)))

Shape letters: B batch, T new tokens, S cache slots, D model width, H query heads, K kv heads,
G = H / K query heads per kv head, Dh head width, F MLP width, V vocab.

The KV cache is a plain pytree argument and return value, never a mutable collection:
`cache = {"layer_i": {"k": [B, K, Dh, S], "v": [B, K, S, Dh]}}`. Both are heads-major, so the
decode attention reads each head's block contiguously with no per-step transpose of the cache
(a slots-major cache was ~10x slower on CPU). Keys are stored transposed, slots minor: the
scores q.K^T of one decode step are then a [G, Dh] x [Dh, S] product whose output runs along
the contiguous axis, and the decode attention ran 1.6x faster on CPU than with [B, K, S, Dh]
keys (an attention-only decode loop with the 8 layers and 100 MB cache of
`sample_llama_small`: 12.4 vs 20.5 ms per step).
Tokens are written at slots
`cache_index + arange(T)` (one scalar for the whole batch). Ragged prompts are **left-padded**:
row b's first real token sits at slot `key_start[b]`, keys before it are masked, and its RoPE
positions are `slot - key_start[b]`. One slot index per batch keeps the cache update a single
`dynamic_update_slice` (no scatter) in every decode step.

Attention mask for query slot q and key slot s of row b:
    s <= q  and  s >= key_start[b]  and  (global layer or q - s < sliding_window)

Scanned layers (`ModelConfig.scan_layers`, on by default from 16 layers): the L blocks are one
`nn.scan` over params stacked on a leading "layers" axis, `params["layers"][...]` [L, ...]
instead of `params["layer_i"]`, so a training or scoring program holds one block whatever L is.
Layers that differ (Gemma's local / global layers: window, RoPE base and scaling) get their
window (int32; `_NO_WINDOW` for a global layer) and the index of their RoPE table as per-layer
scan inputs. The per-layer cache above is the same for both layouts: a scanned prefill stacks
it for the scan, a one-token decode step runs the blocks unrolled on layer i of the params
(`forward`). `stack_layers` / `unstack_layers` convert between the layouts
(checkpoint files stay per layer: `convert.hf`, `convert.gguf`).

Every param carries logical axes (`nn.with_logical_partitioning`) and key activations are
constrained by logical axes (`scalign.parallel.constrain`), so one rule table shards the model.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scalign.models.config import ModelConfig
from scalign.models.ops import XLA_OPS, Ops, PackedWeight
from scalign.parallel import constrain

Array = jax.Array
Cache = dict[str, dict[str, Array]]
# logical axes of the cache buffers; the slot axis S is "cache_length"
CACHE_AXES = {"k": ("act_batch", "act_kv_heads", None, "cache_length"),
              "v": ("act_batch", "act_kv_heads", "cache_length", None)}

_INIT_STD = 0.02
# the window of a global layer in a scan, where every layer has one: wider than any cache
_NO_WINDOW = 2**30


# ------------------------------------------------------------------------ helpers
def _matmul(eq: str, x: Array, w: Array, dtype: jnp.dtype) -> Array:
    """einsum in the compute dtype with float32 accumulation; result in the compute dtype."""
    x, w = x.astype(dtype), w.astype(dtype)
    if dtype == jnp.float32:
        return jnp.einsum(eq, x, w)
    return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32).astype(dtype)


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
           init: Any, dtype: jnp.dtype) -> Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _weight(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
            init: Any, dtype: jnp.dtype) -> Any:
    """A matmul weight: the stored array, or the injected op's own packing of it
    (`ops.PackedWeight`), which only that op reads (Flax's shape check does not apply to it)."""
    if module.has_variable("params", name):
        w = module.get_variable("params", name)
        if isinstance(w, PackedWeight):
            return w
    return _param(module, name, shape, axes, init, dtype)


def _softcap(x: Array, cap: float | None) -> Array:
    """cap * tanh(x / cap) (Gemma 2 soft-capping); identity when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def _activation(name: str):
    return {
        "silu": jax.nn.silu,
        "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
        "gelu": functools.partial(jax.nn.gelu, approximate=False),
        "relu": jax.nn.relu,
    }[name]


# --------------------------------------------------------------------------- RoPE
def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> Array:
    """Inverse frequencies theta^(-2i/Dh), i < Dh/2 (Su et al. 2021), with optional scaling.

    linear: inv_freq / factor (position interpolation, Chen et al. 2023).
    llama3: wavelengths 2*pi/f longer than orig/low_freq_factor are divided by `factor`, those
      shorter than orig/high_freq_factor are kept, and the band between is interpolated with
      s = (orig / wavelength - low) / (high - low): f' = (1 - s) f / factor + s f
      (Llama 3.1, Dubey et al. 2024).
    yarn: "NTK-by-parts" (Peng et al. 2023, YaRN): with the correction dims
      d(r) = Dh ln(orig / (2 pi r)) / (2 ln theta) for r = beta_fast (low) and beta_slow (high)
      (floored / ceiled when `truncate`), clipped to [0, Dh - 1], the ramp
      m_i = clip((i - low) / (high - low), 0, 1) over i < Dh/2 blends
      f' = f / factor * m + f * (1 - m). See `rope_attention_factor` for YaRN's cos/sin scale.
    """
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if not scaling:
        return inv
    kind = scaling["type"]
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        orig = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > orig / low, inv / factor, inv)
        smooth = (orig / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= orig / high) & (wavelen <= orig / low)
        return jnp.where(medium, smoothed, scaled)
    if kind == "yarn":
        orig = float(scaling["original_max_position_embeddings"])
        beta_fast = float(scaling.get("beta_fast") or 32.0)
        beta_slow = float(scaling.get("beta_slow") or 1.0)

        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
        return inv / factor * ramp + inv * (1 - ramp)
    raise ValueError(f"unsupported rope scaling type {kind!r}")


def rope_attention_factor(scaling: dict[str, Any] | None) -> float:
    """Scale applied to RoPE's cos and sin (so to q and k): 1 except for YaRN.

    YaRN (Peng et al. 2023): `attention_factor` if given; else with mscale(s, m) =
    0.1 m ln(s) + 1 (1 for s <= 1) it is mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    when both are set, otherwise mscale(factor, 1).
    """
    if not scaling or scaling["type"] != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])

    def mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(float(scaling["mscale"])) / mscale(float(scaling["mscale_all_dim"]))
    return mscale(1.0)


def rope_tables(positions: Array, inv_freq: Array, attention_factor: float = 1.0
                ) -> tuple[Array, Array]:
    """sin, cos of positions * inv_freq, times attention_factor: [B, T, Dh/2] each (float32)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    if attention_factor == 1.0:
        return jnp.sin(angles), jnp.cos(angles)
    return jnp.sin(angles) * attention_factor, jnp.cos(angles) * attention_factor


def apply_rope(x: Array, sin: Array, cos: Array) -> Array:
    """Rotate halves of x [B, T, N, Dh] (the "rotate_half" layout of HF checkpoints)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# ------------------------------------------------------------------------ masking
def attention_mask(q_slots: Array, num_slots: int, key_start: Array,
                   window: int | None) -> Array:
    """Boolean mask [B, T, S]: key slot s is visible from query slot q (see module docstring)."""
    s = jnp.arange(num_slots, dtype=jnp.int32)
    q = q_slots[:, None]
    visible = (s[None, :] <= q)[None] & (s[None, None, :] >= key_start[:, None, None])
    if window is not None:
        visible &= (q - s[None, :] < window)[None]
    return visible


def _fused_attention(c: ModelConfig, q: Array, k: Array, v: Array, q_slots: Array,
                     key_start: Array, window: int | Array | None) -> Array:
    """Uncached attention through `jax.nn.dot_product_attention` (`ModelConfig.attention_impl`
    "dot_product": XLA's implementation; "cudnn": cuDNN's fused flash attention). Same mask as
    the einsum path (`attention_mask`: causal, key_start, window), passed as a boolean
    [B, 1, T, S] mask; `is_causal` is set as well, so cuDNN can skip the tiles above the
    diagonal. q [B, T, H, Dh], k/v [B, T, K, Dh] (grouped-query heads natively) -> [B, T, H, Dh].
    """
    dt = c.compute_dtype
    T = q.shape[1]
    q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
    pad = 0
    if c.attention_impl == "cudnn":
        # cuDNN's flash kernel with a mask needs even lengths in training (an SFT batch feeds
        # T - 1 tokens); pad to a multiple of 64 (its tile). Padded keys come after every real
        # query, so the causal mask hides them; padded query rows are sliced off.
        pad = -T % 64
        if pad:
            q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
            q_slots = jnp.concatenate([q_slots, q_slots[-1] + 1 + jnp.arange(pad, dtype=q_slots.dtype)])
    mask = attention_mask(q_slots, T + pad, key_start, window)[:, None]
    impl = "cudnn" if c.attention_impl == "cudnn" else "xla"
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=c.attention_scale,
                                       is_causal=True, implementation=impl)
    return constrain(out[:, :T].astype(dt), ("act_batch", "act_length", "act_heads", None))


def _splash_attention(c: ModelConfig, q: Array, k: Array, v: Array, q_slots: Array,
                      key_start: Array, window: int | Array | None) -> Array:
    """Uncached attention through the Pallas splash-attention kernel (`attention_impl`
    "splash"): one grouped-query kernel per (example, KV head), its G query heads sharing the
    KV head; causal or local (`window`) block-sparse mask; left padding (`key_start`) as segment
    ids (pad slots are segment 0 and see only each other); the soft-cap inside the kernel. T is
    padded to a multiple of 128 (the kernel's block); padded keys come after every real query.
    On a multi-device mesh (`parallel.active_context`) the kernel runs under `shard_map` with
    the batch and head shardings of the activations (the sequence must not be sharded). Off a
    TPU, Pallas' interpret mode (slow; for tests). q [B, T, H, Dh], k/v [B, T, K, Dh]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    from scalign.parallel import active_context, logical_to_spec

    if window is not None and not isinstance(window, int):
        raise ValueError("attention_impl='splash' needs a static window (an unscanned model)")
    dt = c.compute_dtype
    B, T, H, Dh = q.shape
    K = k.shape[2]
    G = H // K
    pad = -T % 128
    Tp = T + pad
    q = (q.astype(jnp.float32) * c.attention_scale).astype(dt)
    q, k, v = (jnp.pad(a.astype(dt), ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
    segments = (jnp.arange(Tp, dtype=jnp.int32)[None] >= key_start[:, None]).astype(jnp.int32)
    base = (sm.CausalMask((Tp, Tp)) if window is None
            else sm.LocalMask((Tp, Tp), window_size=(window - 1, 0), offset=0))
    kernel = sk.make_splash_mqa_single_device(
        sm.MultiHeadMask([base] * G), attn_logits_soft_cap=c.attn_softcap,
        interpret=jax.default_backend() != "tpu")

    def local(q, k, v, seg):
        b, _, h, _ = q.shape
        kh = k.shape[2]
        qg = q.reshape(b, Tp, kh, h // kh, Dh).transpose(0, 2, 3, 1, 4)  # [b, kh, G, Tp, Dh]
        kk, vv = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)          # [b, kh, Tp, Dh]

        def one(q1, k1, v1, s1):
            return kernel(q1, k1, v1, segment_ids=sk.SegmentIds(s1, s1))

        out = jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)))(qg, kk, vv, seg)
        return out.transpose(0, 3, 1, 2, 4).reshape(b, Tp, h, Dh)

    ctx = active_context()
    if ctx is None:
        out = local(q, k, v, segments)
    else:
        mesh, rules = ctx
        spec_q = logical_to_spec(("act_batch", "act_length", "act_heads", None), q.shape, mesh,
                                 rules)
        spec_kv = logical_to_spec(("act_batch", "act_length", "act_kv_heads", None), k.shape,
                                  mesh, rules)
        if spec_q[1] is not None or spec_kv[1] is not None:
            raise ValueError("attention_impl='splash' needs the whole sequence on each device "
                             "(the activations' length axis is sharded)")
        if spec_q[2] != spec_kv[2]:
            raise ValueError(f"attention_impl='splash': query heads sharded {spec_q[2]} but KV "
                             f"heads {spec_kv[2]} (make both divisible by the tensor axis)")
        out = jax.shard_map(local, mesh=mesh, in_specs=(spec_q, spec_kv, spec_kv,
                                                        jax.sharding.PartitionSpec(spec_q[0])),
                            out_specs=spec_q, check_vma=False)(q, k, v, segments)
    return constrain(out[:, :T].astype(dt), ("act_batch", "act_length", "act_heads", None))


def _blocked_attention(c: ModelConfig, qg: Array, k: Array, v: Array, q_slots: Array,
                       key_start: Array, window: int | Array | None) -> Array:
    """Uncached einsum attention (`attention_impl` "einsum"), in query blocks of
    `c.attention_block` positions (0: one block). Block [lo, hi) attends to keys [0, hi) only:
    no key after its last query is visible (`attention_mask`), so the tiles above the causal
    diagonal are skipped. Within a block the G query heads sharing a KV head are stacked as
    rows, [B, K, G*t, Dh] x [B, K, Dh, hi], one batched GEMM per product (XLA:CPU ran the
    [B, T, K, G, Dh] form with G minor through ~2x slower dots and transposes). Softmax with
    late normalisation: p = exp(s - max s), out = (p v) / sum p (the max is a constant for the
    gradient: softmax is shift-invariant), dividing [.., Dh] outputs instead of [.., S] scores.
    Scores and softmax in float32; p v in the compute dtype with float32 accumulation.
    qg [B, T, K, G, Dh] (scaled queries), k/v [B, T, K, Dh] -> [B, T, H, Dh]."""
    dt = c.compute_dtype
    B, T, K, G, Dh = qg.shape
    step = c.attention_block or T
    keys, values = k.astype(dt).transpose(0, 2, 1, 3), v.astype(dt).transpose(0, 2, 1, 3)
    outs = []
    for lo in range(0, T, step):
        hi = min(T, lo + step)
        t = hi - lo
        rows = qg[:, lo:hi].transpose(0, 2, 3, 1, 4).reshape(B, K, G * t, Dh)
        scores = jax.lax.dot_general(rows, keys[:, :, :hi], (((3,), (3,)), ((0, 1), (0, 1))),
                                     preferred_element_type=jnp.float32)
        scores = _softcap(scores.reshape(B, K, G, t, hi), c.attn_softcap)
        mask = attention_mask(q_slots[lo:hi], hi, key_start, window)  # [B, t, hi]
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        p = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
        total = jnp.sum(p, axis=-1).reshape(B, K, G * t, 1)
        out = jax.lax.dot_general(p.reshape(B, K, G * t, hi).astype(dt), values[:, :, :hi],
                                  (((3,), (2,)), ((0, 1), (0, 1))),
                                  preferred_element_type=jnp.float32)
        out = (out / total).astype(dt).reshape(B, K, G, t, Dh).transpose(0, 3, 1, 2, 4)
        outs.append(out.reshape(B, t, K * G, Dh))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return constrain(out, ("act_batch", "act_length", "act_heads", None))


# ------------------------------------------------------------------------ modules
class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * (offset + w), computed in float32 (Zhang & Sennrich 2019)."""

    eps: float
    offset: float
    param_dtype: Any
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = _param(self, "scale", (x.shape[-1],), (self.axis_name,), init, self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * (self.offset + scale.astype(jnp.float32))).astype(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention with RoPE, optional q/k norms, biases, soft-cap, sliding window."""

    config: ModelConfig
    ops: Ops = XLA_OPS

    @nn.compact
    def __call__(self, x: Array, sin: Array, cos: Array, q_slots: Array, key_start: Array,
                 cache: dict[str, Array] | None, cache_index: Array | None,
                 window: int | Array | None) -> tuple[Array, dict[str, Array] | None]:
        """`window`: this layer's sliding window (None: global; an int32 scalar in a scan)."""
        c = self.config
        D, H, K, Dh = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
        dt, pdt = c.compute_dtype, c.params_dtype
        init = nn.initializers.normal(_INIT_STD)
        out_init = nn.initializers.normal(_INIT_STD / math.sqrt(2 * c.n_layers))
        wq = _weight(self, "q", (D, H, Dh), ("embed", "heads", "head_dim"), init, pdt)
        wk = _weight(self, "k", (D, K, Dh), ("embed", "kv_heads", "head_dim"), init, pdt)
        wv = _weight(self, "v", (D, K, Dh), ("embed", "kv_heads", "head_dim"), init, pdt)
        wo = _weight(self, "o", (H, Dh, D), ("heads", "head_dim", "embed"), out_init, pdt)

        B, T = x.shape[:2]
        q = self.ops.project(x, wq, dt)  # [B, T, H, Dh]
        k = self.ops.project(x, wk, dt)  # [B, T, K, Dh]
        v = self.ops.project(x, wv, dt)
        if c.qkv_bias:
            zeros = nn.initializers.zeros
            q = q + _param(self, "q_bias", (H, Dh), ("heads", "head_dim"), zeros, pdt).astype(dt)
            k = k + _param(self, "k_bias", (K, Dh), ("kv_heads", "head_dim"), zeros, pdt).astype(dt)
            v = v + _param(self, "v_bias", (K, Dh), ("kv_heads", "head_dim"), zeros, pdt).astype(dt)
        if c.qk_norm:
            q = RMSNorm(c.norm_eps, c.norm_offset, pdt, "head_dim", name="q_norm")(q)
            k = RMSNorm(c.norm_eps, c.norm_offset, pdt, "head_dim", name="k_norm")(k)
        q = constrain(apply_rope(q, sin, cos), ("act_batch", "act_length", "act_heads", None))
        k = constrain(apply_rope(k, sin, cos), ("act_batch", "act_length", "act_kv_heads", None))
        v = constrain(v, ("act_batch", "act_length", "act_kv_heads", None))

        G = H // K
        if cache is None and c.attention_impl != "einsum":
            fused = _splash_attention if c.attention_impl == "splash" else _fused_attention
            y = self.ops.project(fused(c, q, k, v, q_slots, key_start, window), wo, dt,
                                 in_axes=2)
            return y, None
        qg = (q.astype(jnp.float32) * c.attention_scale).astype(dt).reshape(B, T, K, G, Dh)
        if cache is None:
            out = _blocked_attention(c, qg, k, v, q_slots, key_start, window)
            return self.ops.project(out, wo, dt, in_axes=2), None
        k_all = jax.lax.dynamic_update_slice(
            cache["k"], k.transpose(0, 2, 3, 1).astype(cache["k"].dtype),
            (0, 0, 0, cache_index))
        v_all = jax.lax.dynamic_update_slice(
            cache["v"], v.swapaxes(1, 2).astype(cache["v"].dtype), (0, 0, cache_index, 0))
        k_all = constrain(k_all, CACHE_AXES["k"])
        v_all = constrain(v_all, CACHE_AXES["v"])
        new_cache = {"k": k_all, "v": v_all}
        if T == 1:  # a decode step: the injected op may have its own one-token attention
            hi = q_slots[0]  # the visible slots of `attention_mask`
            lo = key_start if window is None else jnp.maximum(key_start, hi - window + 1)
            out = self.ops.decode_attention(qg.reshape(B, K, G, Dh), k_all, v_all, lo, hi,
                                            softcap=c.attn_softcap, dtype=dt)
            if out is not None:
                y = self.ops.project(out.reshape(B, T, H, Dh), wo, dt, in_axes=2)
                return y, new_cache
        S = k_all.shape[3]  # keys [B, K, Dh, S], values [B, K, S, Dh]
        # q as the left operand, [B, K, G*T, Dh] x [B, K, Dh, S]: jnp.einsum put the cache on
        # the left, a transposed-A product that ran 1.4x slower than this one
        qk = qg.transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, Dh)
        scores = jax.lax.dot_general(qk, k_all.astype(dt), (((3,), (2,)), ((0, 1), (0, 1))),
                                     preferred_element_type=jnp.float32)
        scores = scores.reshape(B, K, G, T, S)
        scores = _softcap(scores, c.attn_softcap)
        mask = attention_mask(q_slots, S, key_start, window)  # [B, T, S]
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        # batch dims (b, k) leading in the output, so XLA CPU runs one batched GEMM (an output in
        # btkgd order fell back to a ~2x slower generic dot); the transpose is activation-sized
        out = _matmul("bkgts,bksd->bkgtd", probs, v_all, dt)
        out = out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh)
        out = constrain(out, ("act_batch", "act_length", "act_heads", None))
        y = self.ops.project(out, wo, dt, in_axes=2)
        return y, new_cache


class MLP(nn.Module):
    """Gated MLP: down(act(x W_gate) * (x W_up)) (SwiGLU / GeGLU, Shazeer 2020)."""

    config: ModelConfig
    ops: Ops = XLA_OPS

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype
        init = nn.initializers.normal(_INIT_STD)
        out_init = nn.initializers.normal(_INIT_STD / math.sqrt(2 * c.n_layers))
        wg = _weight(self, "gate", (c.d_model, c.mlp_dim), ("embed", "mlp"), init, pdt)
        wu = _weight(self, "up", (c.d_model, c.mlp_dim), ("embed", "mlp"), init, pdt)
        wd = _weight(self, "down", (c.mlp_dim, c.d_model), ("mlp", "embed"), out_init, pdt)
        g = self.ops.project(x, wg, dt)
        u = self.ops.project(x, wu, dt)
        h = (_activation(c.activation)(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(dt)
        h = constrain(h, ("act_batch", "act_length", "act_mlp"))
        return self.ops.project(h, wd, dt)


class Block(nn.Module):
    """One decoder layer. Unrolled (`layer` = its index): sin/cos are its RoPE tables [B, T, Dh/2]
    and its window comes from the config. Scanned (`layer` = -1, `per_layer` given): sin/cos
    stack every distinct table [R, B, T, Dh/2] and `per_layer` holds this layer's scan inputs,
    {"rope": int32 index into them, "window": int32} (each present only when layers differ)."""

    config: ModelConfig
    layer: int
    ops: Ops = XLA_OPS

    @nn.compact
    def __call__(self, x, sin, cos, q_slots, key_start, cache, cache_index, per_layer=None):
        c = self.config
        if per_layer is None:
            window = c.window(self.layer)
        else:
            if "rope" in per_layer:
                sin, cos = sin[per_layer["rope"]], cos[per_layer["rope"]]
            else:
                sin, cos = sin[0], cos[0]
            window = per_layer.get("window", c.window(0))  # else every layer has layer 0's
        norm = functools.partial(RMSNorm, c.norm_eps, c.norm_offset, c.params_dtype)
        h, new_cache = Attention(c, self.ops, name="attn")(
            norm(name="pre_attn_norm")(x), sin, cos, q_slots, key_start, cache, cache_index,
            window)
        if c.post_norms:
            h = norm(name="post_attn_norm")(h)
        x = constrain(x + h, ("act_batch", "act_length", "act_embed"))
        h = MLP(c, self.ops, name="mlp")(norm(name="pre_mlp_norm")(x))
        if c.post_norms:
            h = norm(name="post_mlp_norm")(h)
        x = constrain(x + h, ("act_batch", "act_length", "act_embed"))
        return x, new_cache


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Transformer(nn.Module):
    """The decoder backbone plus its LM head (`logits` method). `ops` computes the weight
    products and may supply a decode step's attention (`models.ops`; default: plain XLA)."""

    config: ModelConfig
    ops: Ops = XLA_OPS

    def setup(self):
        c = self.config
        self.embedding = _param(self, "embedding", (c.vocab_size, c.d_model), ("vocab", "embed"),
                                nn.initializers.normal(_INIT_STD), c.params_dtype)
        block = Block
        if c.scanned:
            if c.remat != "none":  # remat inside the scan: one block's activations live at a time
                block = nn.remat(Block, policy=_REMAT_POLICIES[c.remat], prevent_cse=False)
            # x is the carry; sin, cos, q_slots, key_start, cache_index are shared by every
            # layer; the cache (stacked [L, ...] or None) and per_layer are sliced along their
            # leading L axis, and the new cache comes out stacked
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast,) * 4 + (0, nn.broadcast, 0), length=c.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, -1, self.ops, name="layers")
        else:
            if c.remat != "none":
                block = nn.remat(Block, policy=_REMAT_POLICIES[c.remat])
            self.blocks = [block(c, i, self.ops, name=f"layer_{i}") for i in range(c.n_layers)]
        self.final_norm = RMSNorm(c.norm_eps, c.norm_offset, c.params_dtype)
        if not c.tie_embeddings:
            self.lm_head = _weight(self, "lm_head", (c.d_model, c.vocab_size), ("embed", "vocab"),
                                  nn.initializers.normal(_INIT_STD), c.params_dtype)

    def __call__(self, tokens: Array, positions: Array | None = None, *,
                 cache: Cache | None = None, cache_index: Array | int | None = None,
                 key_start: Array | None = None) -> tuple[Array, Cache | None]:
        """Hidden states after the final norm [B, T, D] and the updated cache (or None).

        Args:
          tokens: int32 [B, T].
          positions: int32 [B, T] RoPE positions; default `slot - key_start`.
          cache: per-layer K/V buffers from `init_cache`; when given, the T tokens are written at
            slots cache_index .. cache_index + T - 1 and attend to every earlier slot.
          cache_index: scalar slot of the first new token (required with a cache).
          key_start: int32 [B] first real slot of each row (left padding); default 0.
        """
        c = self.config
        B, T = tokens.shape
        if cache is not None and cache_index is None:
            raise ValueError("cache_index is required when a cache is given")
        start = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
        q_slots = start + jnp.arange(T, dtype=jnp.int32)
        key_start = (jnp.zeros((B,), jnp.int32) if key_start is None
                     else jnp.asarray(key_start, jnp.int32))
        if positions is None:
            positions = jnp.maximum(q_slots[None, :] - key_start[:, None], 0)

        x = jnp.take(self.embedding, tokens, axis=0).astype(c.compute_dtype)
        if c.embed_scale:
            x = x * jnp.asarray(math.sqrt(c.d_model), c.compute_dtype)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))

        tables: dict[tuple[float, bool], tuple[Array, Array]] = {}
        kinds = []  # the RoPE table of each layer
        for i in range(c.n_layers):
            theta = c.layer_rope_theta(i)
            scaled = c.layer_type(i) != "local" or c.rope_scaling_local
            kinds.append((theta, scaled))
            if (theta, scaled) not in tables:
                scaling = c.rope_scaling_dict if scaled else None
                tables[theta, scaled] = rope_tables(
                    positions, rope_inv_freq(c.head_dim, theta, scaling),
                    rope_attention_factor(scaling))

        if c.scanned:  # a cache here is stacked: {"k": [L, B, K, Dh, S], "v": [L, B, K, S, Dh]}
            keys = list(tables)
            sin = jnp.stack([tables[k][0] for k in keys])  # [R, B, T, Dh/2]
            cos = jnp.stack([tables[k][1] for k in keys])
            per_layer = {}
            if len(keys) > 1:
                per_layer["rope"] = jnp.asarray([keys.index(k) for k in kinds], jnp.int32)
            windows = [c.window(i) for i in range(c.n_layers)]
            if len(set(windows)) > 1:  # a global layer sees every earlier slot
                per_layer["window"] = jnp.asarray(
                    [_NO_WINDOW if w is None else w for w in windows], jnp.int32)
            x, new_cache = self.layers(x, sin, cos, q_slots, key_start, cache, start, per_layer)
            return self.final_norm(x), new_cache

        new_cache: Cache | None = {} if cache is not None else None
        for i, block in enumerate(self.blocks):
            sin, cos = tables[kinds[i]]
            layer_cache = cache[f"layer_{i}"] if cache is not None else None
            x, lc = block(x, sin, cos, q_slots, key_start, layer_cache, start)
            if new_cache is not None:
                new_cache[f"layer_{i}"] = lc
        return self.final_norm(x), new_cache

    def logits(self, hidden: Array) -> Array:
        """LM logits in float32 [..., V], with the final soft-cap."""
        c = self.config
        if c.tie_embeddings:  # the embedding [V, D] read as the head
            out = self.ops.project_out_in(hidden, self.embedding, c.compute_dtype,
                                          out_dtype=jnp.float32)
        else:
            out = self.ops.project(hidden, self.lm_head, c.compute_dtype, out_dtype=jnp.float32)
        if out.ndim == 3:
            out = constrain(out, ("act_batch", "act_length", "act_vocab"))
        return _softcap(out, c.final_softcap)


# --------------------------------------------------------------- functional API
def _module(config: ModelConfig, ops: Ops | None = None) -> Transformer:
    return Transformer(config, XLA_OPS if ops is None else ops)


def _init_all(module: Transformer, tokens: Array) -> tuple[Array, Cache | None]:
    hidden, cache = module(tokens)
    module.logits(hidden)
    return hidden, cache


def init_boxed(config: ModelConfig, key: Array) -> Any:
    """Params with `nn.LogicallyPartitioned` boxes (use `jax.eval_shape` for shapes only)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return _module(config).init(key, tokens, method=_init_all)["params"]


def init_params(config: ModelConfig, key: Array) -> dict[str, Any]:
    """A fresh params pytree (plain arrays)."""
    return nn.unbox(init_boxed(config, key))


def param_logical_axes(config: ModelConfig) -> Any:
    """Tree of PartitionSpecs of logical axis names, matching `init_params`."""
    boxed = jax.eval_shape(functools.partial(init_boxed, config), jax.random.PRNGKey(0))
    return nn.get_partition_spec(boxed)


def _backbone(params: dict[str, Any]) -> dict[str, Any]:
    # params may carry extra heads (e.g. "scalar_head") next to the backbone
    return {k: v for k, v in params.items() if k != "scalar_head"}


def stack_layers(params: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """Per-layer params {"layer_i": tree} -> the scanned layout {"layers": tree of [L, ...]}
    (other entries unchanged). Works on jax or numpy leaves (numpy stays numpy)."""
    out = {k: v for k, v in params.items() if not k.startswith("layer_")}
    layers = [params[f"layer_{i}"] for i in range(n_layers)]
    stack = np.stack if isinstance(jax.tree.leaves(layers[0])[0], np.ndarray) else jnp.stack
    out["layers"] = jax.tree.map(lambda *xs: stack(xs), *layers)
    return out


def unstack_layers(params: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """The scanned layout {"layers": tree of [L, ...]} -> {"layer_i": tree} (other entries
    unchanged). Inside a jitted program the slices are free views of the stacked buffers."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n_layers):
        out[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out


def unrolled(config: ModelConfig, params: dict[str, Any]) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, params) of the same model with unrolled blocks (`scan_layers=False`): stacked
    params are sliced per layer; per-layer params (e.g. an op's packing of them) pass as is."""
    if "layers" in params:
        params = unstack_layers(params, config.n_layers)
    return config.replace(scan_layers=False), params


def forward(config: ModelConfig, params: dict[str, Any], tokens: Array,
            positions: Array | None = None, *, cache: Cache | None = None,
            cache_index: Array | int | None = None, key_start: Array | None = None,
            ops: Ops | None = None) -> tuple[Array, Cache | None]:
    """Hidden states [B, T, D] and updated cache; see `Transformer.__call__`. `ops`: how the
    weight products and a decode step's attention are computed (`models.ops`; default XLA);
    params packed by an op (`ops.PackedWeight` leaves) need that op.

    With a scanned config (`ModelConfig.scanned`) and stacked params, a call without a cache and
    a multi-token call with one (a prefill) run the scan; the per-layer cache is stacked for it
    and split after (copies of the cache: cheap for a prefill's short cache, while slicing the
    weights per call was not: +0.4 s per `sample_gemma3_270m` prefill on CPU). A one-token
    decode step runs the blocks unrolled on layer i of the params (`unrolled`: slices of stacked
    params, or an op's per-layer packing of them), so each layer's cache buffer is updated in
    place exactly as for an unscanned model."""
    if config.scanned and "layers" in params and cache is not None and tokens.shape[1] > 1:
        stacked = {n: jnp.stack([cache[f"layer_{i}"][n] for i in range(config.n_layers)])
                   for n in ("k", "v")}
        hidden, stacked = _module(config, ops).apply(
            {"params": _backbone(params)}, tokens, positions, cache=stacked,
            cache_index=cache_index, key_start=key_start)
        return hidden, {f"layer_{i}": {n: stacked[n][i] for n in ("k", "v")}
                        for i in range(config.n_layers)}
    if config.scanned and (cache is not None or "layers" not in params):
        config, params = unrolled(config, params)
    return _module(config, ops).apply({"params": _backbone(params)}, tokens, positions,
                                      cache=cache, cache_index=cache_index, key_start=key_start)


def lm_logits(config: ModelConfig, params: dict[str, Any], hidden: Array,
              ops: Ops | None = None) -> Array:
    """LM logits (float32) from hidden states of any leading shape."""
    return _module(config, ops).apply({"params": _backbone(params)}, hidden,
                                      method=Transformer.logits)


def logits(config: ModelConfig, params: dict[str, Any], tokens: Array) -> Array:
    """Full causal forward: int32 [B, T] -> float32 logits [B, T, V]."""
    hidden, _ = forward(config, params, tokens)
    return lm_logits(config, params, hidden)


# Matmul weights and how many of their leading axes are inputs (contracted with the
# activations): w.reshape(prod(shape[:n]), -1) is the [in, out] matrix of each. What an op that
# packs weights into its own layout (e.g. the CPU decode ops) packs.
MATMUL_INPUT_AXES = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1,
                     "lm_head": 1}


def init_cache(config: ModelConfig, batch: int, max_len: int,
               dtype: Any | None = None) -> Cache:
    """Zeroed K/V buffers in the compute dtype (see the module docstring for the layouts):
    {"layer_i": {"k": [B, K, Dh, S], "v": [B, K, S, Dh]}}."""
    dtype = jnp.dtype(dtype or config.compute_dtype)
    B, K, S, Dh = batch, config.n_kv_heads, max_len, config.head_dim
    return {f"layer_{i}": {"k": jnp.zeros((B, K, Dh, S), dtype),
                           "v": jnp.zeros((B, K, S, Dh), dtype)} for i in range(config.n_layers)}
