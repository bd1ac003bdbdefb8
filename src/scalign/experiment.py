"""Experiments: a config names stages; this module validates the config and runs them.

    config.stages = ("data", "sft", "evaluate", "report")
    run(config, workdir, resume=False)

A stage is a class registered with `@register_stage`; it reads its own config block
(`config.<stage name>` by default), reads artifacts of earlier stages from the `Context`, and
leaves its own artifacts, result rows and report section there. Adding a stage (reward models,
re-ranking, RL, eva) means adding a module under `scalign.stages`; the launcher never changes.

Workdir layout:
    config.json          the resolved config
    metrics.jsonl        every logged training metric ({"stage", "step", ...})
    tensorboard/         the same metrics as TensorBoard events
    results.json         {stage: {"rows": [flat records, one measured number each]}}
    report.md            the human report, assembled from each stage's section
    figures/*.png        plots referenced by report.md
    stages/<name>/       a stage's artifacts, checkpoints and `done.json`

Resume: with `resume=True`, finished stages (those with `done.json`) are not rerun; their
`load()` rehydrates the artifacts later stages need. An unfinished training stage resumes from
its newest checkpoint.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable

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
def _prepare_workdir(workdir: epath.Path, resume: bool, overwrite: bool) -> None:
    if workdir.exists() and any(workdir.iterdir()):
        if overwrite:
            if is_main_process():
                workdir.rmtree()
        elif not resume:
            raise ConfigError(f"workdir {workdir} is not empty: pass --resume to continue that "
                              f"run or --overwrite to start over")
    workdir.mkdir(parents=True, exist_ok=True)


def _absolute(workdir: str | epath.PathLike) -> epath.Path:
    """Local paths made absolute (orbax requires it); URIs such as gs://... kept as they are."""
    text = os.fspath(workdir)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def run(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, *,
        resume: bool = False, overwrite: bool = False,
        on_stage_done: Callable[[str, Context], None] | None = None) -> Context:
    """Validate, then run `config.stages` in order in `workdir`. Returns the final Context."""
    workdir = _absolute(workdir)
    mesh_shape = validate(config)
    _prepare_workdir(workdir, resume, overwrite)
    if is_main_process():
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
    mesh = parallel.make_mesh(mesh_shape)
    ctx = Context(config=config, workdir=workdir, mesh=mesh, resume=resume,
                  metrics=MetricsWriter(workdir), results=Results(workdir / "results.json"),
                  report=Report(workdir))
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
