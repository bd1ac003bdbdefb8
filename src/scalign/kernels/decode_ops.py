"""The CPU decode ops: the model's `models.ops.Ops` protocol tuned for XLA:CPU decode steps.

A decode step multiplies a few rows (the batch) by every weight matrix once and attends from one
new token per row. `CpuDecodeOps` computes those with the same math as the plain `XLA_OPS`, in
one of these formulations (the sampler picks them: `pick_weight_layout`, `pick_attention`):

weight_left ("output_major" layout): each projection as W[out, in] x^T -> [out, rows],
  transposed back (a small activation copy). XLA:CPU runs this GEMM, with the weights as the M
  side, faster than x W for few rows: the 56 projections of a `sample_llama_small` step (32
  rows, 100 MB of f32 weights) took 19-22 ms against 25-31 ms as x W^T and 34-41 ms as x W (an
  8-layer projection-only loop, alternating runs). It wants the weights as [out, in] buffers:
  the sampler packs them once (`to_output_major`) and the decode loop hands in views
  (`from_output_major`), so `w.T` here is that buffer. With the stored [in, out] layout the same
  product is a transposed-A GEMM, 2-3x slower on CPU (still the same numbers). The LM head
  follows it too ([V, D] x hidden^T): for the 8 rows of `sample_gemma3_270m` (262k x 640 head)
  as fast as the multiply-reduce fusion it replaces (49-50 tok/s).
panels ("panels" layout): every float32 matmul weight whose output width is a multiple of 16
  arrives as a `PanelWeight` (`pack_params`, made once per sampler or per call by a
  jitted pack) and its product runs through `cpu_matmul.panel_matmul`: the weight streams once
  per step through a 4-row x 16-column FMA register tile, with no per-call re-packing. The 57
  products of a `sample_llama_small` step took 16-21 ms against 18-32 ms for XLA's W x^T
  (alternating, one process); whole calls 5-10% faster. Unsharded programs only (a custom call
  has no partitioning rule); other weights keep XLA's dot, a tied LM head the W x^T form. A raw
  packable weight reaching these ops is an error (it would be misread as panels otherwise).
attention: a one-token step with a float32 cache computes its attention (scores, soft-cap,
  softmax, weighted values) with the FFI kernel of `cpu_attention` instead of XLA's batched
  GEMMs and reductions: one pass over each row's visible slots, the (row, kv head) pairs split
  over XLA's intra-op threads. Under a mesh each device runs it on its own rows and kv heads
  (`jax.shard_map`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from scalign import parallel
from scalign.kernels import cpu_attention, cpu_matmul
from scalign.models.config import ModelConfig
from scalign.models.ops import XLA_OPS, Ops, PackedWeight, plain_matmul, unpacked
from scalign.models.transformer import CACHE_AXES, MATMUL_INPUT_AXES, init_params, unstack_layers

Array = jax.Array

WEIGHT_LAYOUTS = ("auto", "panels", "output_major", "native")
ATTENTIONS = ("auto", "cpu_kernel", "xla")


# ------------------------------------------------------------------------ packed weights
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PanelWeight(PackedWeight):
    """A float32 matmul weight packed for `cpu_matmul.panel_matmul`.

    data: [out / 16, in, 16] (`cpu_matmul.pack_panels` of the [in, out] matrix);
    raw_shape: the stored weight's shape [*in, *out]; in_axes: how many of its leading axes are
    inputs. Only `CpuDecodeOps(panels=True)` reads it; the plain ops refuse it."""

    data: Array
    raw_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    in_axes: int = dataclasses.field(metadata=dict(static=True))

    def unpack(self) -> Array:
        """The raw weight (a copy in the stored layout)."""
        return cpu_matmul.unpack_panels(self.data).reshape(self.raw_shape)


def _leaf_name(path: tuple[Any, ...]) -> str:
    return str(getattr(path[-1], "key", path[-1]))  # params are nested dicts: DictKey


def _matrix(w: Array, in_axes: int) -> Array:
    return w.reshape(math.prod(w.shape[:in_axes]), -1)


def _panel_packable(w: Any, in_axes: int) -> bool:
    """Whether `pack_panel_params` packs this raw weight (float32, out % 16 == 0)."""
    return (hasattr(w, "shape") and hasattr(w, "dtype") and w.dtype == jnp.float32
            and cpu_matmul.packable((math.prod(w.shape[:in_axes]),
                                     math.prod(w.shape[in_axes:]))))


def pack_panel_params(params: dict[str, Any]) -> dict[str, Any]:
    """Each float32 matmul weight (`models.transformer.MATMUL_INPUT_AXES`) whose output width is
    a multiple of 16 as a `PanelWeight`; other params unchanged. Run it jitted (`pack_params`
    does); the result is read only by `CpuDecodeOps(panels=True)`."""
    def f(path, w):
        n = MATMUL_INPUT_AXES.get(_leaf_name(path))
        if n is None or not _panel_packable(w, n):
            return w
        return PanelWeight(cpu_matmul.pack_panels(_matrix(w, n)), tuple(w.shape), n)
    return jax.tree_util.tree_map_with_path(f, params)


def to_output_major(params: dict[str, Any]) -> dict[str, Any]:
    """Each matmul weight as an [out, in] matrix (the input axis minor, as in a PyTorch Linear);
    other params unchanged. Use inside a jitted program behind `jax.lax.optimization_barrier`
    (else XLA cancels the transposes), then hand `from_output_major(packed, params)` to
    `forward` / `lm_logits` with `CpuDecodeOps(weight_left=True)`: the dots read the [out, in]
    buffers directly, while the stored layout stays the one every converter, sharding rule and
    optimizer state expects. (These are raw arrays: the plain ops read the views correctly.)"""
    def f(path, w):
        n = MATMUL_INPUT_AXES.get(_leaf_name(path))
        return w if n is None else _matrix(w, n).T
    return jax.tree_util.tree_map_with_path(f, params)


def from_output_major(packed: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `to_output_major`: views of the [out, in] matrices in the shapes of `like`
    (a params tree or its shapes). Under jit the transposes fold into the model's dots."""
    def f(path, p, ref):
        return p if MATMUL_INPUT_AXES.get(_leaf_name(path)) is None else p.T.reshape(ref.shape)
    return jax.tree_util.tree_map_with_path(f, packed, like)


@functools.cache
def _backbone_shapes(config: ModelConfig) -> Any:
    return jax.eval_shape(functools.partial(init_params, config), jax.random.PRNGKey(0))


# ----------------------------------------------------------------------------- the ops
def _w_x_t(x: Array, w_out_in: Array, dtype: Any, out_dtype: Any = None) -> Array:
    """x [..., in] @ w_out_in[out, in]^T as W x^T -> [out, rows], transposed back."""
    rows = x.reshape(-1, x.shape[-1]).astype(dtype)
    y = jax.lax.dot_general(w_out_in.astype(dtype), rows, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)  # [out, rows]
    # the barrier keeps XLA from folding the transpose back into a rows-major dot
    y = jax.lax.optimization_barrier(y).T.astype(out_dtype or dtype)
    return y.reshape(*x.shape[:-1], w_out_in.shape[0])


@dataclasses.dataclass(frozen=True)
class CpuDecodeOps:
    """`models.ops.Ops` for XLA:CPU decode steps (see the module docstring). Same math as
    `XLA_OPS`; only the speed differs."""

    weight_left: bool = False
    panels: bool = False
    attention: bool = False

    def project(self, x: Array, w: Any, dtype: Any, *, in_axes: int = 1,
                out_dtype: Any = None) -> Array:
        if isinstance(w, PanelWeight):
            if not self.panels:
                raise TypeError("a PanelWeight reached CpuDecodeOps without panels=True")
            rows = x.reshape(-1, math.prod(x.shape[x.ndim - in_axes:]))
            y = cpu_matmul.panel_matmul(rows, w.data).astype(out_dtype or dtype)
            return y.reshape(*x.shape[:x.ndim - in_axes], *w.raw_shape[w.in_axes:])
        w = unpacked(w, "CpuDecodeOps.project")
        if self.panels and _panel_packable(w, in_axes):
            raise TypeError(
                f"CpuDecodeOps(panels=True) got a raw float32 weight of shape {tuple(w.shape)}: "
                f"this decode reads panel-packed weights; pack the params with "
                f"`pack_panel_params` (the Sampler does) or use a layout without panels")
        out_shape = w.shape[in_axes:]
        rows = x.reshape(*x.shape[:x.ndim - in_axes], -1)
        w2 = _matrix(w, in_axes)
        if self.weight_left:
            y = _w_x_t(rows, w2.T, dtype, out_dtype)
        else:
            y = plain_matmul(rows, w2, dtype, out_dtype)
        return y.reshape(*y.shape[:-1], *out_shape)

    def project_out_in(self, x: Array, w: Array, dtype: Any, *,
                       out_dtype: Any = None) -> Array:
        if self.weight_left or self.panels:  # the embedding [V, D] is never packed
            return _w_x_t(x, w, dtype, out_dtype)
        return XLA_OPS.project_out_in(x, w, dtype, out_dtype=out_dtype)

    def decode_attention(self, q: Array, keys: Array, values: Array, lo: Array, hi: Array, *,
                         softcap: float | None, dtype: Any) -> Array | None:
        if not (self.attention and keys.dtype == jnp.float32 and values.dtype == jnp.float32):
            return None
        def attend(q, keys, values, lo, hi):
            return cpu_attention.decode_attention(q, keys, values, lo, hi, softcap)
        ctx = parallel.active_context()
        if ctx is not None:  # a custom call has no sharding rule: run it on each device's block
            mesh, rules = ctx
            q_axes = ("act_batch", "act_kv_heads", None, None)
            specs = [parallel.logical_to_spec(axes, x.shape, mesh, rules) for axes, x in
                     ((q_axes, q), (CACHE_AXES["k"], keys), (CACHE_AXES["v"], values),
                      (("act_batch",), lo))]
            attend = jax.shard_map(attend, mesh=mesh, in_specs=(*specs, P()),
                                   out_specs=specs[0], check_vma=False)
        return attend(q, keys, values, lo, hi).astype(dtype)


# --------------------------------------------------------------------------- pickers
def pick_weight_layout(layout: str, config: ModelConfig, platform: str, sharded: bool) -> str:
    """How a decode loop reads the matmul weights: "panels" (`PanelWeight`s, the panel kernel),
    "output_major" ([out, in] copies, W x^T products), "native" (the stored params). "auto":
    "panels" for an unsharded float32 CPU program whose kernels build, else "output_major" on
    CPU and "native" elsewhere (TPU and GPU compilers pick their own layouts, and a copy would
    cost HBM). An explicit "panels" that cannot run raises ValueError saying why."""
    if layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layout must be 'auto', 'panels', 'output_major' or "
                         f"'native', got {layout!r}")
    if layout in ("output_major", "native"):
        return layout
    if platform != "cpu":
        why = f"the platform is {platform}"
    elif sharded:
        why = "the sampler is sharded (the kernel has no partitioning rule)"
    elif (jnp.dtype(config.params_dtype) != jnp.float32
          or jnp.dtype(config.compute_dtype) != jnp.float32):
        why = (f"params / compute dtypes are {jnp.dtype(config.params_dtype).name} / "
               f"{jnp.dtype(config.compute_dtype).name}, not float32")
    elif not cpu_matmul.available():
        why = f"the kernel is unavailable ({cpu_matmul.unavailable_reason()})"
    else:
        return "panels"
    if layout == "panels":
        raise ValueError(f"weight_layout='panels' cannot be used: {why}")
    return "output_major" if platform == "cpu" else "native"


def pick_attention(attention: str, platform: str, cache_dtype: Any, sharded: bool) -> str:
    """How a decode step attends: "cpu_kernel" (the FFI kernel) or "xla". "auto": "cpu_kernel"
    for an unsharded CPU program with a float32 cache whose kernel builds, else "xla"."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be 'auto', 'cpu_kernel' or 'xla', got {attention!r}")
    if attention == "xla":
        return "xla"
    cache_dtype = jnp.dtype(cache_dtype)
    if platform != "cpu":
        why = f"the platform is {platform}"
    elif cache_dtype != jnp.float32:
        why = f"the cache dtype is {cache_dtype.name}, not float32"
    elif attention == "auto" and sharded:
        return "xla"  # measured: on 2 cores, 2 devices x kernel were no faster than XLA
    elif not cpu_attention.available():
        why = f"the kernel is unavailable ({cpu_attention.unavailable_reason()})"
    else:
        return "cpu_kernel"
    if attention == "cpu_kernel":
        raise ValueError(f"attention='cpu_kernel' cannot be used: {why}")
    return "xla"


def decode_ops(weight_layout: str, attention: str) -> Ops:
    """The ops of a decode loop with this (picked) layout and attention."""
    if weight_layout == "native" and attention == "xla":
        return XLA_OPS
    return CpuDecodeOps(weight_left=weight_layout == "output_major",
                        panels=weight_layout == "panels", attention=attention == "cpu_kernel")


def _pack_panel_leaves(ws: list[Array], in_axes: tuple[int, ...]) -> list[Any]:
    return [PanelWeight(cpu_matmul.pack_panels(_matrix(w, n)), tuple(w.shape), n)
            for w, n in zip(ws, in_axes, strict=True)]


def _pack_output_major_leaves(ws: list[Array], in_axes: tuple[int, ...]) -> list[Array]:
    return [_matrix(w, n).T for w, n in zip(ws, in_axes, strict=True)]


# one jit per process: params of the same shapes, dtypes and shardings never recompile
_LEAF_PACKERS = {"panels": jax.jit(_pack_panel_leaves, static_argnames="in_axes"),
                 "output_major": jax.jit(_pack_output_major_leaves, static_argnames="in_axes")}


def packer(weight_layout: str) -> Any:
    """The jitted pack of a layout (None for "native", which reads the params as stored)."""
    return _LEAF_PACKERS.get(weight_layout)


def pack_params(weight_layout: str, params: dict[str, Any]) -> dict[str, Any]:
    """What a decode loop with this layout reads: `params` with each matmul weight packed by a
    jitted pack ("panels": `pack_panel_params`, "output_major": `to_output_major`), every other
    leaf the caller's own array (no copy); "native": `params` itself. The packed leaves are the
    only new buffers: one copy of the matmul weights."""
    if weight_layout == "native":
        return params
    if "layers" in params:  # a scanned model's stacked params: packed layer by layer (the
        # slices are transient copies; the decode loop runs the layers unrolled on the packing)
        n_layers = jax.tree.leaves(params["layers"])[0].shape[0]
        params = unstack_layers(params, n_layers)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    picked = []
    for i, (path, w) in enumerate(flat):
        n = MATMUL_INPUT_AXES.get(_leaf_name(path))
        if n is not None and (weight_layout != "panels" or _panel_packable(w, n)):
            picked.append((i, n))
    leaves = [w for _, w in flat]
    packed = _LEAF_PACKERS[weight_layout]([leaves[i] for i, _ in picked],
                                          in_axes=tuple(n for _, n in picked))
    for (i, _), w in zip(picked, packed, strict=True):
        leaves[i] = w
    return jax.tree_util.tree_unflatten(treedef, leaves)


def decode_view(weights: Any, weight_layout: str, config: ModelConfig) -> Any:
    """Inside the decode program: what the model reads from the packed `weights` (for
    "output_major", [out, in] buffers seen through views in the params' shapes)."""
    if weight_layout == "output_major":
        return from_output_major(weights, _backbone_shapes(config.replace(scan_layers=False)))
    if "layers" in weights:  # "native" with a scanned model: slice each layer once, before the
        # loop (the decode steps run the layers unrolled; `transformer.forward` with a cache)
        weights = unstack_layers(weights, config.n_layers)
    return weights
