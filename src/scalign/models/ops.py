"""The one op the model injects: its weight products and its one-token decode attention.

The decoder (`models.transformer`) computes every product with a matmul weight and the
attention of a one-token decode step through an `Ops` object (`forward(..., ops=...)`,
`lm_logits(..., ops=...)`). The default, `XLA_OPS`, is the plain formulation: x @ W as an einsum
in the compute dtype with float32 accumulation, and the model's own XLA attention. Platform
tuning (hand-written CPU custom calls, packed weight layouts, their pickers) implements the same
protocol outside `models/` (the CPU decode ops, `decode_ops.CpuDecodeOps` next to the C++ code);
the model never branches on a platform.

A weight that an op packed into its own layout travels as a `PackedWeight` (a distinct type,
never an array of the raw weight's shape), so raw params handed to an op that expects its
packing, or a packing handed to the plain op, fail loudly instead of computing garbage.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp

Array = jax.Array


class PackedWeight:
    """Base class of a matmul weight held in an op's own layout (e.g. CPU panels). The model
    hands it to its op untouched; only the op that made it can read it."""


class Ops(Protocol):
    """What the model asks of its op. Implementations are hashable (frozen dataclasses), since
    they are static arguments of jitted programs."""

    def project(self, x: Array, w: Any, dtype: Any, *, in_axes: int = 1,
                out_dtype: Any = None) -> Array:
        """x [..., *in] times w [*in, *out] (the last `in_axes` axes of x contracted with the
        first `in_axes` of w) -> [..., *out] in `out_dtype` (default: `dtype`), computed in the
        compute dtype `dtype` with float32 accumulation."""
        ...

    def project_out_in(self, x: Array, w: Array, dtype: Any, *,
                       out_dtype: Any = None) -> Array:
        """x [..., in] times w [out, in]^T -> [..., out] (a tied LM head: w is the embedding)."""
        ...

    def decode_attention(self, q: Array, keys: Array, values: Array, lo: Array, hi: Array, *,
                         softcap: float | None, dtype: Any) -> Array | None:
        """The attention of a one-token step, or None to let the model compute it in XLA.

        q [B, K, G, Dh] (scaled), keys [B, K, Dh, S], values [B, K, S, Dh] (the cache layouts of
        `models.transformer`); row b attends to the slots lo[b] <= s <= hi (hi a scalar).
        Returns [B, K, G, Dh] in `dtype`: softmax_s(cap(q . k_s)) . v_s."""
        ...


def _as_matrix(w: Array, in_axes: int) -> Array:
    """A weight [*in, *out] as the [in, out] matrix of its product."""
    return w.reshape(math.prod(w.shape[:in_axes]), -1)


def plain_matmul(x: Array, w: Array, dtype: Any, out_dtype: Any = None) -> Array:
    """x [..., in] @ w [in, out] in `dtype` with float32 accumulation, result in `out_dtype`."""
    y = jnp.einsum("...i,io->...o", x.astype(dtype), w.astype(dtype),
                   preferred_element_type=jnp.float32)
    return y.astype(out_dtype or dtype)


def unpacked(w: Any, who: str) -> Array:
    """`w` as a raw array, or a clear error if it is another op's packing."""
    if isinstance(w, PackedWeight):
        raise TypeError(f"{who} got a {type(w).__name__}, a weight packed for another op; pass "
                        f"the raw params, or the op that packed them (`forward(..., ops=...)`)")
    return w


@dataclasses.dataclass(frozen=True)
class XlaOps:
    """The plain formulation: einsums, and the model's own XLA attention."""

    def project(self, x: Array, w: Any, dtype: Any, *, in_axes: int = 1,
                out_dtype: Any = None) -> Array:
        w = unpacked(w, "XlaOps.project")
        out_shape = w.shape[in_axes:]
        rows = x.reshape(*x.shape[:x.ndim - in_axes], -1)
        y = plain_matmul(rows, _as_matrix(w, in_axes), dtype, out_dtype)
        return y.reshape(*y.shape[:-1], *out_shape)

    def project_out_in(self, x: Array, w: Array, dtype: Any, *,
                       out_dtype: Any = None) -> Array:
        y = jnp.einsum("...d,vd->...v", x.astype(dtype), w.astype(dtype),
                       preferred_element_type=jnp.float32)
        return y.astype(out_dtype or dtype)

    def decode_attention(self, q, keys, values, lo, hi, *, softcap, dtype):
        return None


XLA_OPS = XlaOps()
