"""Meshes, logical axes and shardings.

Model code names *logical* axes (`embed`, `heads`, `mlp`, ... for params; `act_batch`,
`act_heads`, ... for activations). One rule table maps them onto the three mesh axes:

  data    pure data parallelism (params replicated)
  fsdp    data parallelism with params, grads and optimizer state sharded (ZeRO-3 style)
  tensor  Megatron-style tensor parallelism over heads / MLP hidden / vocab

The same model and step code therefore runs on 1 CPU, 8 virtual CPU devices, a GPU or a TPU
pod slice; only the mesh shape in the config changes. The step is compiled by `jax.jit` with
explicit in/out shardings (GSPMD, what `pjit` became), so meshes use *Auto* axis types.

A logical axis maps to a mesh axis only when the dimension divides evenly by that mesh axis'
size; otherwise that dimension is replicated (e.g. Gemma-3-270M's single KV head on an 8-way
tensor axis). `explain_shardings` lists such fallbacks.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (a str, a tuple of str, or None = replicated)
Rules = tuple[tuple[str, Any], ...]
DEFAULT_RULES: Rules = (
    # params
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),  # the stacked axis of scanned blocks (`ModelConfig.scan_layers`)
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_length", None),
)

BATCH_AXES = ("data", "fsdp")


# ----------------------------------------------------------------------------- meshes
def make_mesh(shape: Sequence[int] | Mapping[str, int], devices: Sequence[Any] | None = None,
              *, key: str = "mesh") -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (GSPMD semantics).

    `shape` is a 3-sequence or a mapping with keys data/fsdp/tensor; one entry may be -1 (fill
    with the remaining devices). `key` names the config entry in error messages.
    """
    devices = list(devices if devices is not None else jax.devices())
    if isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"config.{key}: unknown mesh axes {sorted(unknown)}; "
                             f"use {MESH_AXES}")
        dims = [int(shape.get(a, 1)) for a in MESH_AXES]
    else:
        dims = [int(d) for d in shape]
        if len(dims) != 3:
            raise ValueError(f"config.{key} must have 3 entries (data, fsdp, tensor), got {dims}")
    if dims.count(-1) > 1:
        raise ValueError(f"config.{key}: at most one axis may be -1, got {dims}")
    if -1 in dims:
        rest = int(np.prod([d for d in dims if d != -1]))
        if len(devices) % rest:
            raise ValueError(f"config.{key}={dims}: {len(devices)} devices are not divisible by "
                             f"{rest}")
        dims[dims.index(-1)] = len(devices) // rest
    if any(d <= 0 for d in dims):
        raise ValueError(f"config.{key}={dims}: sizes must be positive")
    if int(np.prod(dims)) != len(devices):
        raise ValueError(
            f"config.{key}={dict(zip(MESH_AXES, dims, strict=True))} needs {int(np.prod(dims))} "
            f"devices but {len(devices)} are available ({jax.default_backend()}); set "
            f"config.{key} so the product of its sizes is {len(devices)}, or use -1 for one axis")
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh(tuple(dims), MESH_AXES, axis_types=auto, devices=devices)


def single_device_mesh() -> Mesh:
    return make_mesh((1, 1, 1), jax.devices()[:1])


# ------------------------------------------------------------- logical -> mesh axes
def _mesh_axes_for(name: str | None, rules: Rules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise KeyError(f"logical axis {name!r} has no rule; add it to the sharding rules")


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for an array with these logical axes and this shape on `mesh`.

    A mesh axis is used at most once per array, mesh axes of size 1 are dropped, and a dimension
    that its mesh axes do not divide falls back to fewer axes (finally to replication).
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(logical_axes, shape, strict=True):
        axes = [a for a in _mesh_axes_for(name, rules) if a not in used and mesh.shape[a] > 1]
        # drop trailing axes until the product divides the dimension
        while axes and dim % int(np.prod([mesh.shape[a] for a in axes])):
            axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def tree_shardings(logical_tree: Any, abstract_tree: Any, mesh: Mesh,
                   rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for `abstract_tree` given a matching tree of logical-axis tuples."""
    def one(axes, leaf):
        axes = tuple(axes) if axes is not None else (None,) * len(leaf.shape)
        return NamedSharding(mesh, logical_to_spec(axes, leaf.shape, mesh, rules))
    return jax.tree.map(one, logical_tree, abstract_tree,
                        is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp; other dimensions replicated."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    if not axes:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, PartitionSpec(axes if len(axes) > 1 else axes[0]))


def batch_divisor(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def process_rows(mesh: Mesh, global_batch: int) -> slice:
    """The rows of a global batch of `global_batch` rows that *this* process' devices hold
    under `batch_sharding(mesh)`: what a per-process data pipeline must read and hand to
    `shard_batch` (all rows with one process)."""
    sharding = batch_sharding(mesh)
    index_map = sharding.addressable_devices_indices_map((global_batch,))
    starts = sorted({(idx[0].start or 0) for idx in index_map.values()})
    stops = sorted({(idx[0].stop if idx[0].stop is not None else global_batch)
                    for idx in index_map.values()})
    lo, hi = starts[0], stops[-1]
    covered = sum(b - a for a, b in zip(starts, stops, strict=True))
    if covered != hi - lo:
        raise ValueError(f"process {jax.process_index()}'s batch rows are not contiguous on "
                         f"this mesh ({mesh.shape}); order the mesh devices by process")
    return slice(lo, hi)


def shard_batch(batch: Any, mesh: Mesh, *, global_batch: bool = False) -> Any:
    """Place a host batch (pytree of numpy arrays) on the mesh, leading dim over data x fsdp.

    Each process passes its *local* rows (the pipeline shards by process); the global array is
    assembled with `jax.make_array_from_process_local_data`. With `global_batch=True` every
    process holds the full batch and only its slice is kept.
    """
    sharding = batch_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError("batch leaves must have a leading batch dimension")
        if global_batch or jax.process_count() == 1:
            div = batch_divisor(mesh)
            if x.shape[0] % div:
                raise ValueError(f"batch size {x.shape[0]} is not divisible by data*fsdp={div}")
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def state_shardings(optimizer: Any, abstract_state: Any, param_shardings: Any,
                    mesh: Mesh) -> Any:
    """Shardings for a `TrainState`: optimizer moments sharded like their params.

    Uses `optax.tree_map_params` so every params-shaped subtree of the optax state (Adam mu, nu,
    ...) takes the params' shardings; scalars (counts) are replicated.
    """
    import optax  # local: parallel.py stays importable without optax for inference users

    rep = replicated(mesh)
    opt = optax.tree_map_params(
        optimizer, lambda _, s: s, abstract_state.opt_state, param_shardings,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, NamedSharding))
    return abstract_state.replace(step=rep, params=param_shardings, opt_state=opt, rng=rep)


def explain_shardings(abstract_tree: Any, shardings: Any) -> list[str]:
    """Human-readable `path shape -> spec` lines (for logs and reports)."""
    lines = []
    flat = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
    flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), s in zip(flat, flat_s, strict=True):
        name = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        lines.append(f"{name} {tuple(leaf.shape)} -> {s.spec}")
    return lines


# ------------------------------------------------------- activation constraints
_CTX = threading.local()


@contextlib.contextmanager
def sharding_context(mesh: Mesh | None, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Enable `constrain` while tracing a function that runs on `mesh`."""
    prev = getattr(_CTX, "value", None)
    _CTX.value = (mesh, rules) if mesh is not None else None
    try:
        yield
    finally:
        _CTX.value = prev


def active_context() -> tuple[Mesh, Rules] | None:
    """(mesh, rules) of the enclosing `sharding_context` when it spans several devices, else
    None: what code that must split work by hand (`jax.shard_map` around a custom call) asks."""
    ctx = getattr(_CTX, "value", None)
    return ctx if ctx is not None and ctx[0].size > 1 else None


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical axes; a no-op outside `sharding_context`."""
    ctx = getattr(_CTX, "value", None)
    if ctx is None:
        return x
    mesh, rules = ctx
    if mesh.size == 1:
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def put_tree(tree: Any, shardings: Any) -> Any:
    """device_put a host/device tree onto the given shardings (leaf by leaf, no full copy)."""
    return jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x) if not hasattr(x, "shape")
                                                    else x, s), tree, shardings)
