"""Experiments: a config names stages; this module validates the config and runs them.

    config.stages = ("data", "sft", "evaluate", "report")
    run(config, workdir, resume=False)

A stage is a class registered with `@register_stage`; it reads its own config block
(`config.<stage name>` by default), reads artifacts of earlier stages from the `Context`, and
leaves its own artifacts, result rows and report section there. Adding a stage (reward models,
re-ranking, RL, eva) means adding a module under `scalign.stages`; the launcher never changes.

Workdir layout:
    scalign_workdir.json the marker: this folder is a scalign run (its flat config and hash);
                         `--overwrite` deletes only folders with it, `--resume` compares configs
    config.json          the resolved config
    metrics.jsonl        every logged training metric ({"stage", "step", ...})
    tensorboard/         the same metrics as TensorBoard events
    results.json         {stage: {"rows": [flat records, one measured number each]}}
    report.md            the human report, assembled from each stage's section
    figures/*.png        plots referenced by report.md
    stages/<name>/       a stage's artifacts, checkpoints and `done.json`

Resume: with `resume=True`, finished stages (those with `done.json`) are not rerun; their
`load()` rehydrates the artifacts later stages need. An unfinished training stage resumes from
its newest good checkpoint (verified on restore; see `scalign.training.checkpoint`). A resume
with a config that differs in a key that changes results is refused, listing the keys, unless
`accept_config_changes=True`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from etils import epath

from scalign import parallel
from scalign.stages.base import (  # noqa: F401  (re-exported: the public names stay here)
    _REGISTRY,
    ConfigError,
    Context,
    Report,
    Results,
    Stage,
    check_batch,
    register_stage,
    require_block,
)
from scalign.training.metrics import MetricsWriter
from scalign.utils import is_main_process


def load_config_file(path: str | os.PathLike, arg: str | None = None
                     ) -> ml_collections.ConfigDict:
    """`get_config()` (or `get_config(arg)`) of a config file, as the launcher reads it.

    Configs that build on another config (`e2h_stepmath.py` on `demo.py`) and tests load
    config files through this one function.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} not found")
    name = "scalign_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def registered_stages() -> dict[str, type[Stage]]:
    importlib.import_module("scalign.stages")  # built-in stages register on import
    return dict(_REGISTRY)


def _plugins(config: ml_collections.ConfigDict) -> None:
    for module in config.get("plugins", ()) or ():
        importlib.import_module(module)


# -------------------------------------------------------------------- validation
def mesh_shape_of(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    mesh_cfg = dict(config.get("mesh", {"data": -1, "fsdp": 1, "tensor": 1}))
    unknown = set(mesh_cfg) - set(parallel.MESH_AXES)
    if unknown:
        raise ConfigError(f"config.mesh has unknown axes {sorted(unknown)}; "
                          f"use {parallel.MESH_AXES}")
    dims = {a: int(mesh_cfg.get(a, 1)) for a in parallel.MESH_AXES}
    free = [a for a, d in dims.items() if d == -1]
    if len(free) > 1:
        raise ConfigError(f"config.mesh: at most one axis may be -1, got {dims}")
    fixed = 1
    for a, d in dims.items():
        if d != -1:
            if d <= 0:
                raise ConfigError(f"config.mesh.{a}={d} must be positive (or -1)")
            fixed *= d
    if free:
        if num_devices % fixed:
            raise ConfigError(f"config.mesh={dims}: {num_devices} devices are not divisible by "
                              f"{fixed}")
        dims[free[0]] = num_devices // fixed
    total = dims["data"] * dims["fsdp"] * dims["tensor"]
    if total != num_devices:
        raise ConfigError(
            f"config.mesh={dims} needs {total} devices but {num_devices} are available; set "
            f"config.mesh so data*fsdp*tensor == {num_devices} (or use -1 for one axis)")
    return dims


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None
             ) -> dict[str, int]:
    """Check the whole config before anything compiles; raise ConfigError listing all problems."""
    num_devices = num_devices or jax.device_count()
    errors: list[str] = []
    for key in ("seed", "stages"):
        if key not in config:
            errors.append(f"config.{key} is missing")
    if errors:
        raise ConfigError("; ".join(errors))
    _plugins(config)
    stages = registered_stages()
    unknown = [s for s in config.stages if s not in stages]
    if unknown:
        raise ConfigError(f"config.stages has unknown stage(s) {unknown}; known: {sorted(stages)}")
    mesh_shape = mesh_shape_of(config, num_devices)
    order = list(config.stages)
    for i, name in enumerate(order):
        stage = stages[name]()
        for artifact, producers in stage.requires.items():
            if not any(p in order[:i] for p in producers):
                errors.append(f"config.stages: stage {name!r} needs {artifact!r}, made by "
                              f"{' or '.join(map(repr, producers))}; put one before {name!r}")
        stage.validate(config, mesh_shape, errors)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return mesh_shape


# --------------------------------------------------------------------------- run
MARKER = "scalign_workdir.json"

#: config keys that do not change a run's numbers: they may differ on --resume. A key matches
#: when it equals an entry or its last part does (e.g. "sft.log_every" matches "log_every").
NON_RESULT_KEYS = ("name", "debug", "plugins", "log_every", "checkpoint_every",
                   "keep_checkpoints", "on_nonfinite", "max_consecutive_skips", "show_samples")


def flat_config(config: ml_collections.ConfigDict | dict[str, Any]) -> dict[str, Any]:
    """{"a.b.c": value} of a config, values as JSON gives them back (tuples -> lists)."""
    data = (json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort")
            else config)
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = node
    walk("", data)
    return out


def _result_keys(flat: dict[str, Any]) -> dict[str, Any]:
    def free(key: str) -> bool:
        parts = key.split(".")
        return key in NON_RESULT_KEYS or parts[0] in NON_RESULT_KEYS or parts[-1] in NON_RESULT_KEYS
    return {k: v for k, v in flat.items() if not free(k)}


def config_hash(config: ml_collections.ConfigDict | dict[str, Any]) -> str:
    """sha256 (16 hex digits) of the config keys that change results (`NON_RESULT_KEYS` out)."""
    relevant = _result_keys(flat_config(config))
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every result-changing key that differs (flat configs)."""
    old, new = _result_keys(old), _result_keys(new)
    missing = object()
    return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
            for k in sorted(set(old) | set(new)) if old.get(k, missing) != new.get(k, missing)]


def is_scalign_workdir(workdir: epath.Path) -> bool:
    """Made by scalign: it has the marker (or, from before markers, config.json + stages/)."""
    return (workdir / MARKER).exists() or (
        (workdir / "config.json").exists() and (workdir / "stages").is_dir())


def _stored_config(workdir: epath.Path) -> dict[str, Any] | None:
    marker = workdir / MARKER
    try:
        if marker.exists():
            return json.loads(marker.read_text())["config"]
        if (workdir / "config.json").exists():
            return flat_config(json.loads((workdir / "config.json").read_text()))
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{marker} cannot be read ({e}); this workdir's config is unknown: "
                          f"use --overwrite to start over") from e
    return None


def _prepare_workdir(workdir: epath.Path, config: ml_collections.ConfigDict, resume: bool,
                     overwrite: bool, accept_config_changes: bool = False) -> list[str]:
    """Check the workdir against the flags and the config; returns accepted config changes."""
    if overwrite and resume:
        raise ConfigError("--resume and --overwrite contradict each other; pass one")
    nonempty = workdir.exists() and any(workdir.iterdir())
    if nonempty and not is_scalign_workdir(workdir):
        what = "--overwrite would delete" if overwrite else "it holds"
        raise ConfigError(f"workdir {workdir} is not empty and is not a scalign workdir (no "
                          f"{MARKER}); {what} files scalign did not write: choose another "
                          f"--workdir or empty it yourself")
    changes: list[str] = []
    if nonempty and overwrite:
        if is_main_process():
            workdir.rmtree()
    elif nonempty and not resume:
        raise ConfigError(f"workdir {workdir} is not empty: pass --resume to continue that "
                          f"run or --overwrite to start over")
    elif nonempty:  # resume: the config must be the one the run was started with
        stored = _stored_config(workdir)
        if stored is not None:
            changes = config_diff(stored, flat_config(config))
            if changes and not accept_config_changes:
                raise ConfigError(
                    f"--resume in {workdir}: the config differs from the run's in keys that "
                    f"change results: {'; '.join(changes)}. Resume with the run's config, or "
                    f"pass --accept_config_changes to continue with the new values")
            if changes:
                logging.warning("resume in %s with accepted config changes: %s", workdir,
                                "; ".join(changes))
    elif resume:
        logging.warning("--resume: %s holds no run yet; starting a fresh one", workdir)
        print(f"note: --resume: {workdir} holds no run yet; starting a fresh one",
              file=sys.stderr)
    workdir.mkdir(parents=True, exist_ok=True)
    return changes


def _write_marker(workdir: epath.Path, config: ml_collections.ConfigDict,
                  changes: list[str]) -> None:
    if not is_main_process():
        return
    marker = workdir / MARKER
    history: list[dict[str, Any]] = []
    if marker.exists():
        try:
            history = json.loads(marker.read_text()).get("accepted_changes", [])
        except ValueError:
            history = []
    if changes:
        history.append({"time": time.time(), "changes": changes})
    data = {"scalign_workdir": 1, "config_hash": config_hash(config),
            "accepted_changes": history, "config": flat_config(config)}
    tmp = workdir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(marker)


def _absolute(workdir: str | epath.PathLike) -> epath.Path:
    """Local paths made absolute (orbax requires it); URIs such as gs://... kept as they are."""
    text = os.fspath(workdir)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def run(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, *,
        resume: bool = False, overwrite: bool = False, accept_config_changes: bool = False,
        on_stage_done: Callable[[str, Context], None] | None = None) -> Context:
    """Validate, then run `config.stages` in order in `workdir`. Returns the final Context.

    The workdir is owned through `scalign_workdir.json` (the marker, with the config and its
    hash): `overwrite` deletes only a folder with it; `resume` refuses a config that differs
    from the run's in a key that changes results (listing them) unless
    `accept_config_changes`; `resume` of an empty or missing folder starts a fresh run (and
    says so).
    """
    workdir = _absolute(workdir)
    mesh_shape = validate(config)
    changes = _prepare_workdir(workdir, config, resume, overwrite, accept_config_changes)
    if is_main_process():
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
    _write_marker(workdir, config, changes)
    mesh = parallel.make_mesh(mesh_shape)
    ctx = Context(config=config, workdir=workdir, mesh=mesh, resume=resume,
                  metrics=MetricsWriter(workdir), results=Results(workdir / "results.json"),
                  report=Report(workdir), config_hash=config_hash(config))
    stages = registered_stages()
    try:
        for name in config.stages:
            stage = stages[name]()
            done = ctx.stage_dir(name) / "done.json"
            if resume and done.exists():
                stage.load(ctx)
                ctx.timings[name] = json.loads(done.read_text()).get("seconds", 0.0)
                continue
            t0 = time.perf_counter()
            stage.run(ctx)
            seconds = time.perf_counter() - t0
            ctx.timings[name] = seconds
            if is_main_process():
                done.write_text(json.dumps({"seconds": seconds, "finished": time.time()}))
            if on_stage_done is not None:
                on_stage_done(name, ctx)
    finally:
        ctx.metrics.close()
    return ctx
