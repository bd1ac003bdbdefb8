"""Shared benchmark plumbing: the workload spec, its inputs, timing and the JSON line.

The spec is `shared/peers/workloads.json` (found beside the checkout by default, or `--spec`).
Inputs follow the spec's notes exactly: prompts/batches are
`numpy.random.default_rng(seed).integers(low, high, size=...)` with high = vocab_size unless the
workload names `prompt_token_high`.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from scalign.models.config import ModelConfig


def default_spec_path() -> Path:
    env = os.environ.get("SCALIGN_WORKLOADS")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent.parent / "shared" / "peers" / "workloads.json"
        if cand.exists():
            return cand
        cand = parent / "shared" / "peers" / "workloads.json"
        if cand.exists():
            return cand
    raise FileNotFoundError("workloads.json not found beside the checkout; pass --spec PATH or "
                            "set SCALIGN_WORKLOADS")


def load_workload(name: str, spec_path: str | Path | None = None) -> tuple[dict, dict]:
    """(workload dict, model dict) from the spec; errors list the known workloads."""
    path = Path(spec_path) if spec_path else default_spec_path()
    spec = json.loads(path.read_text())
    workloads = spec["workloads"]
    if name not in workloads:
        raise KeyError(f"workload {name!r} not in {path}; known: {sorted(workloads)}")
    wl = workloads[name]
    return wl, spec["models"][wl["model"]]


def model_config_from_spec(m: dict[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig for a llama-architecture model entry of the spec."""
    if m["architecture"] != "llama":
        raise ValueError(f"model_config_from_spec handles llama entries; got {m['architecture']}")
    cfg = ModelConfig(
        vocab_size=m["vocab_size"], d_model=m["hidden_size"], n_layers=m["num_layers"],
        n_heads=m["num_heads"], n_kv_heads=m["num_kv_heads"], head_dim=m["head_dim"],
        mlp_dim=m["intermediate_size"], norm_eps=m["rms_norm_eps"], rope_theta=m["rope_theta"],
        tie_embeddings=m["tie_word_embeddings"], dtype=m.get("dtype", "float32"), family="llama")
    return cfg.replace(**overrides) if overrides else cfg


MODEL_OVERRIDES = ("dtype", "param_dtype", "remat", "attention_impl", "attention_block")
_INT_OVERRIDES = ("attention_block",)


def bench_model_config(m: dict[str, Any], extra: dict[str, Any]) -> ModelConfig:
    """The workload's model, or `--extra model=PRESET` (a `models.presets` name: NOT the spec's
    workload, for scale checks such as the GPU MFU of `llama3_2_1b`), with `--extra` overrides of
    `MODEL_OVERRIDES` (dtype, param_dtype, remat, attention_impl, attention_block)."""
    overrides = {k: int(extra[k]) if k in _INT_OVERRIDES else extra[k]
                 for k in MODEL_OVERRIDES if k in extra}
    if "model" in extra:
        from scalign.models import presets

        return presets.get(str(extra["model"]), **overrides)
    return model_config_from_spec(m, **overrides)


def workload_overrides(wl: dict, extra: dict[str, Any]) -> dict:
    """The workload with `--extra batch=/seq_len=/warmup_steps=/timed_steps=` applied (ints)."""
    keys = ("batch", "seq_len", "warmup_steps", "timed_steps", "batch_pairs")
    return {**wl, **{k: int(extra[k]) for k in keys if k in extra}}


def nondefault_notes(extra: dict[str, Any]) -> list[str]:
    """The `--extra` keys that make a run differ from the spec's workload (for the line's notes)."""
    keys = ("model",) + MODEL_OVERRIDES + ("batch", "seq_len", "batch_pairs")
    changed = {k: extra[k] for k in keys if k in extra}
    return [f"NOT the spec's workload: {changed}"] if changed else []


def random_ids(seed: int, low: int, high: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, size=shape).astype(np.int32)


def time_calls(fn: Callable[[], Any], *, warmup: int, timed: int) -> list[float]:
    """Wall-clock seconds of `timed` calls after `warmup` calls; fn must block until done."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(timed):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def train_setup(workload: str, spec_path: str | Path | None, kind: str,
                extra: dict[str, Any]) -> tuple[dict, ModelConfig, Any, Any, Any, Any]:
    """Shared set-up of the training benchmarks: (workload, config, mesh, optimizer,
    TrainState, its shardings) on one device, AdamW with a constant learning rate
    and weight decay from the spec, params from the spec's init seed. `extra` may override
    `dtype` and `remat`."""
    import functools

    import jax

    from scalign import parallel
    from scalign.models import init_params, param_logical_axes
    from scalign.training.state import OptimizerConfig, make_optimizer
    from scalign.training.step import init_train_state

    wl, m = load_workload(workload, spec_path)
    if wl["kind"] != kind:
        raise ValueError(f"workload {workload!r} is a {wl['kind']!r} workload, not {kind!r}")
    wl = workload_overrides(wl, extra)
    config = bench_model_config(m, extra)
    mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    opt = make_optimizer(OptimizerConfig(learning_rate=wl["learning_rate"],
                                         weight_decay=wl["weight_decay"], schedule="constant"))
    state, st_sh = init_train_state(functools.partial(init_params, config),
                                    param_logical_axes(config), opt, mesh, seed=m["init_seed"])
    return wl, config, mesh, opt, state, st_sh


def time_steps(step: Callable[..., Any], state: Any, batch: Any, wl: dict, *args: Any
               ) -> tuple[list[float], dict[str, float]]:
    """Run a train step `wl["warmup_steps"]` times untimed, then `wl["timed_steps"]` timed
    (each blocked on its loss); returns (seconds per timed step, last metrics as floats)."""
    import jax

    box: dict[str, Any] = {"state": state}

    def one():
        box["state"], metrics = step(box["state"], batch, *args)
        jax.block_until_ready(metrics["loss"])
        box["metrics"] = metrics

    times = time_calls(one, warmup=wl["warmup_steps"], timed=wl["timed_steps"])
    metrics = {k: float(v) for k, v in jax.device_get(box["metrics"]).items()
               if np.ndim(v) == 0}
    return times, metrics


def peak_matmul_flops(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """Best of `repeats` jitted n x n @ n x n matmuls, in FLOP/s (2 n^3 per matmul); a bf16 or
    fp16 product accumulates in float32 (the compute dtype's convention in the model)."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), dtype)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    mm(a, b).block_until_ready()
    best = min(time_calls(lambda: mm(a, b).block_until_ready(), warmup=1, timed=repeats))
    return 2 * n**3 / best


def emit(workload: str, metric: str, value: float, unit: str, **extra: Any) -> dict:
    """Print the one JSON line of the benchmark protocol and return it."""
    import jax

    line = {"system": "scalign", "workload": workload, "metric": metric, "value": value,
            "unit": unit, "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__, **extra}
    for var in ("GLIBC_TUNABLES", "XLA_FLAGS"):  # host settings the numbers depend on
        if os.environ.get(var):
            line.setdefault("host_env", {})[var] = os.environ[var]
    print(json.dumps(line), flush=True)
    return line


def copy_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a `mib` MiB float32 `x + 1` on the default device, reads plus writes
    (median of `repeats` after a warm-up): the memory-bandwidth ceiling decode is held against.
    The buffer is donated, so the update is in place (no fresh pages to fault in on a CPU)."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    box = [jnp.ones((mib * 2 ** 20 // 4,), jnp.float32)]
    nbytes = box[0].nbytes

    def step():
        box[0] = f(box[0])
        box[0].block_until_ready()

    return 2 * nbytes / median(time_calls(step, warmup=1, timed=repeats))


def median(xs: list[float]) -> float:
    return statistics.median(xs)
