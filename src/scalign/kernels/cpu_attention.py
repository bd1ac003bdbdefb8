"""Decode-step attention on XLA:CPU as one FFI custom call per layer (`decode_attention.cc`).

`decode_attention(q, keys, values, lo, hi, softcap)` is the whole attention of one decode step
(one new token per row) with the cache layouts of `models.transformer` (keys [B, K, Dh, S],
values [B, K, S, Dh]): scores, optional soft-cap, softmax and the weighted sum of values, over
the visible slots lo[b] <= s <= hi of each row only. float32 only. The kernel is built and
registered with the package's others (`scalign.kernels.library`): where it cannot be,
`available()` is False, says why in `unavailable_reason()`, and the model keeps its XLA
attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from scalign.kernels.library import available, library_path, require, unavailable_reason

__all__ = ["available", "decode_attention", "library_path", "unavailable_reason"]

_TARGET = "scalign_decode_attention"


def decode_attention(q: jax.Array, keys: jax.Array, values: jax.Array, lo: jax.Array,
                     hi: jax.Array, softcap: float | None = None) -> jax.Array:
    """float32 [B, K, G, Dh]: softmax_s(cap(q . keys[..., s])) . values[..., s, :] over the
    slots lo[b] <= s <= hi (clipped to the buffer) of each row b; zeros for a row with none.

    q: [B, K, G, Dh], already scaled; keys [B, K, Dh, S]; values [B, K, S, Dh]; lo int [B];
    hi a scalar (one query slot for the whole batch); softcap: cap * tanh(x / cap) on the
    scores (Gemma 2), None for none."""
    require("decode_attention")
    B, K, G, Dh = q.shape
    out = jax.ShapeDtypeStruct((B, K, G, Dh), jnp.float32)
    return jax.ffi.ffi_call(_TARGET, out)(
        q.astype(jnp.float32), keys, values, lo.astype(jnp.int32),
        jnp.reshape(hi, (1,)).astype(jnp.int32), softcap=np.float32(softcap or 0.0))
