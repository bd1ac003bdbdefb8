"""Few-row float32 products on XLA:CPU against weights packed once (`decode_matmul.cc`).

A decode step multiplies a few rows (the batch) by every weight matrix once. XLA:CPU hands
each product to Eigen, which re-packs the weight on every call; here the weight is packed once,
into panels of `PANEL` = 16 output columns with the reduction axis major inside a panel
(`pack_panels`), and `panel_matmul` streams each panel once per call through a register tile of
4 rows x 16 columns (FMA on 8-wide vectors), the panels split over XLA's intra-op threads.
The packing is a permutation of the weight's elements, so a packed weight can travel in its
parameter's place in the params tree as a `kernels.decode_ops.PanelWeight` (its own type).

The kernel is built and registered with the package's others (`scalign.kernels.library`);
where it cannot be, `available()` is False and the model keeps XLA's dots.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from scalign.kernels.library import available, require, unavailable_reason

__all__ = ["PANEL", "available", "pack_panels", "packable", "panel_matmul",
           "unavailable_reason"]

PANEL = 16  # output columns per panel (kPanel in decode_matmul.cc)
_TARGET = "scalign_panel_matmul"


def packable(shape: Sequence[int]) -> bool:
    """Whether a weight of 2-D shape [in, out] has a panel packing (out a multiple of PANEL)."""
    return len(shape) == 2 and shape[1] % PANEL == 0 and shape[0] > 0 and shape[1] > 0


def pack_panels(w: jax.Array) -> jax.Array:
    """[in, out] -> [out / 16, in, 16]: wp[p, k, j] = w[k, p * 16 + j]."""
    if not packable(w.shape):
        raise ValueError(f"pack_panels wants [in, out] with out % {PANEL} == 0, got {w.shape}")
    k, n = w.shape
    return w.reshape(k, n // PANEL, PANEL).transpose(1, 0, 2)


def unpack_panels(wp: jax.Array) -> jax.Array:
    """The inverse of `pack_panels`: [P, in, 16] -> [in, P * 16]."""
    p, k, _ = wp.shape
    return wp.transpose(1, 0, 2).reshape(k, p * PANEL)


def panel_matmul(x: jax.Array, wp: jax.Array) -> jax.Array:
    """float32 x [R, in] @ W [in, out] -> [R, out], with W given as `pack_panels(W)`
    [out / 16, in, 16]. Sums run over `in` in order, in float32."""
    if x.ndim != 2 or wp.ndim != 3 or wp.shape[1] != x.shape[1] or wp.shape[2] != PANEL:
        raise ValueError(f"panel_matmul wants x [R, K] and wp [P, K, {PANEL}], got {x.shape} "
                         f"and {wp.shape}")
    require("panel_matmul")
    out = jax.ShapeDtypeStruct((x.shape[0], wp.shape[0] * PANEL), jnp.float32)
    return jax.ffi.ffi_call(_TARGET, out)(x.astype(jnp.float32), wp.astype(jnp.float32))
