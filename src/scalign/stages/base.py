"""Stage base classes, the stage registry and what a stage sees (`Context`).

A stage is a class registered with `@register_stage`; it reads its own config block
(`config.<stage name>` by default), reads artifacts of earlier stages from the `Context`, and
leaves its own artifacts, result rows and report section there. Stages import this module,
never the experiment runner (which imports the stages to run them).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import jax
import ml_collections
from etils import epath
from jax.sharding import Mesh

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
    #: `experiment.config_hash(config)`: saved in checkpoint metadata
    config_hash: str = ""

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


# ------------------------------------------------------------ validation helpers
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


def check_levels(config: ml_collections.ConfigDict, key: str, errors: list[str]) -> None:
    """`config.<key>` (dotted) must be a non-empty subset of `config.data.levels`: the data
    stage builds only those levels, and a stage asking for another fails only when it runs."""
    cfg: Any = config
    for part in key.split("."):
        if not isinstance(cfg, ml_collections.ConfigDict) or part not in cfg:
            return
        cfg = cfg[part]
    if cfg is None:
        return
    data = config.get("data")
    if data is None or data.get("levels") is None:
        return
    levels = tuple(cfg) if isinstance(cfg, (tuple, list)) else (cfg,)
    if not levels:
        errors.append(f"config.{key} is empty; use some of config.data.levels "
                      f"{tuple(data.levels)}")
        return
    missing = [lv for lv in levels if lv not in tuple(data.levels)]
    if missing:
        errors.append(f"config.{key} has {missing}, which config.data.levels "
                      f"{tuple(data.levels)} does not build; use levels from it (or add them "
                      f"to config.data.levels)")
