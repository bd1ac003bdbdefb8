"""Metrics sinks: JSON lines (one record per logged step) and TensorBoard events.

Only process 0 writes; other processes get a writer whose methods do nothing, so callers
never branch on the process index.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import jax
import numpy as np
from etils import epath


def to_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Fetch device scalars to host floats (one transfer for the whole dict)."""
    host = jax.device_get(metrics)
    out = {}
    for k, v in host.items():
        arr = np.asarray(v)
        if arr.size == 1:
            out[k] = float(arr.reshape(()))
    return out


class MetricsWriter:
    """Append `{"stage", "step", "time", **scalars}` to `metrics.jsonl` and TensorBoard."""

    def __init__(self, workdir: str | epath.PathLike, *, enabled: bool | None = None,
                 tensorboard: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._tb = None
        self._file = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a")
            if tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))

    def write(self, stage: str, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        scalars = to_scalars(metrics)
        if not self.enabled:
            return scalars
        record = {"stage": stage, "step": int(step), "time": time.time()}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{stage}/{k}", v, int(step))
        return scalars

    def flush(self) -> None:
        if self._file:
            self._file.flush()
        if self._tb:
            self._tb.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
        if self._tb:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | epath.PathLike, stage: str | None = None) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl (optionally one stage's), later steps overriding earlier ones.

    A resumed run re-logs steps after its last checkpoint; keeping the last record per
    (stage, step) gives the curve of the run that finished.
    """
    path = epath.Path(path)
    if not path.exists():
        return []
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if stage is None or rec.get("stage") == stage:
            latest[(rec["stage"], rec["step"])] = rec
    return [latest[k] for k in sorted(latest, key=lambda k: (k[0], k[1]))]
