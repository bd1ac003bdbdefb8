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

import dataclasses
import importlib
import json
import os
import time
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import ml_collections
from etils import epath
from jax.sharding import Mesh

from scalign import parallel
from scalign.training.metrics import MetricsWriter
from scalign.utils import is_main_process, stage_key


class ConfigError(ValueError):
    """A config problem; the message names the key and the fix."""


# ----------------------------------------------------------------------- results
class Results:
    """`results.json`: {stage: {"rows": [...]}}, rewritten atomically after each change."""

    def __init__(self, path: epath.Path):
        self.path = path
        self.data: dict[str, dict[str, list[dict[str, Any]]]] = {}
        if path.exists():
            self.data = json.loads(path.read_text())

    def set_rows(self, stage: str, rows: list[dict[str, Any]]) -> None:
        for i, row in enumerate(rows):
            bad = {k: type(v).__name__ for k, v in row.items()
                   if not isinstance(v, (str, int, float, bool, type(None)))}
            if bad:
                raise TypeError(f"results row {i} of stage {stage!r} has non-scalar fields {bad}; "
                                f"rows must be flat records")
        self.data[stage] = {"rows": list(rows)}
        self.save()

    def rows(self, stage: str) -> list[dict[str, Any]]:
        return list(self.data.get(stage, {}).get("rows", []))

    def save(self) -> None:
        if not is_main_process():
            return
        tmp = self.path.parent / (self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=False))
        tmp.replace(self.path)


# ------------------------------------------------------------------------ report
class Report:
    """Report sections (markdown) per stage, stored on disk so a resumed run keeps them."""

    def __init__(self, workdir: epath.Path):
        self.workdir = workdir
        self.figures = workdir / "figures"

    def section_path(self, stage: str) -> epath.Path:
        return self.workdir / "stages" / stage / "report.md"

    def set_section(self, stage: str, markdown: str) -> None:
        if is_main_process():
            path = self.section_path(stage)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(markdown.rstrip() + "\n")

    def section(self, stage: str) -> str | None:
        path = self.section_path(stage)
        return path.read_text() if path.exists() else None

    def figure_path(self, name: str) -> epath.Path:
        self.figures.mkdir(parents=True, exist_ok=True)
        return self.figures / name

    def rel(self, path: epath.Path) -> str:
        return str(path.relative_to(self.workdir))


# ----------------------------------------------------------------------- context
@dataclasses.dataclass
class Context:
    """What a stage sees: config, workdir, mesh, sinks and the artifacts of earlier stages."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    mesh: Mesh
    resume: bool
    metrics: MetricsWriter
    results: Results
    report: Report
    artifacts: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def stage_dir(self, stage: str) -> epath.Path:
        path = self.workdir / "stages" / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def key(self, *names: str | int) -> jax.Array:
        """A PRNG key from the root seed and names: same config + seed => same key."""
        return stage_key(int(self.config.seed), *names)

    def need(self, name: str) -> Any:
        """An artifact of an earlier stage (validation guarantees a producer ran)."""
        if name not in self.artifacts:
            raise ConfigError(f"artifact {name!r} is missing; available: {sorted(self.artifacts)}")
        return self.artifacts[name]


# ------------------------------------------------------------------------ stages
class Stage:
    """Base class of a stage. Subclasses set `name` and implement `run` (and `load`)."""

    name: ClassVar[str] = ""
    #: artifacts this stage reads -> the stages that can produce them (checked up front)
    requires: ClassVar[dict[str, tuple[str, ...]]] = {}

    def validate(self, config: ml_collections.ConfigDict, mesh_shape: dict[str, int],
                 errors: list[str]) -> None:
        """Append config problems to `errors` (each naming its key). Runs before compiling."""

    def run(self, ctx: Context) -> None:
        raise NotImplementedError

    def load(self, ctx: Context) -> None:
        """Rehydrate this stage's artifacts from its directory (resume of a finished stage)."""


_REGISTRY: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a stage name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"stage {cls.name!r} is registered twice ({_REGISTRY[cls.name]}, {cls})")
    _REGISTRY[cls.name] = cls
    return cls


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


def check_batch(errors: list[str], key: str, batch: int, mesh_shape: dict[str, int],
                *, accum: int = 1) -> None:
    """Global batch must split over data*fsdp, processes and gradient-accumulation steps."""
    div = mesh_shape["data"] * mesh_shape["fsdp"]
    if batch <= 0:
        errors.append(f"config.{key}={batch} must be positive")
        return
    if batch % (div * accum):
        errors.append(f"config.{key}={batch} must be divisible by data*fsdp*grad_accum_steps="
                      f"{div}*{accum}; use a multiple of {div * accum}")
    if batch % jax.process_count():
        errors.append(f"config.{key}={batch} must be divisible by the process count "
                      f"{jax.process_count()}")


def require_block(config: ml_collections.ConfigDict, block: str, keys: tuple[str, ...],
                  errors: list[str]) -> ml_collections.ConfigDict | None:
    """`config.<block>` if present, appending an error for it or each missing key otherwise."""
    cfg = config.get(block)
    if cfg is None:
        errors.append(f"config.{block} is missing")
        return None
    errors.extend(f"config.{block}.{k} is missing" for k in keys if k not in cfg)
    return cfg


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
