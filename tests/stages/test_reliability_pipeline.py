"""Issue 16 through the launcher: a NaN drill stops the run naming the step (one line, the
last good checkpoint kept); resuming with `on_nonfinite=skip` (a key that may change on
--resume) finishes and counts the skip; resuming with a changed data size is refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "experiments" / "configs" / "demo.py"


def _launch(workdir, *extra):
    args = [sys.executable, str(ROOT / "experiments" / "launch.py"), f"--config={DEMO}",
            f"--workdir={workdir}", "--config.stages=('data','sft')",
            "--config.data.n_train=200", "--config.data.n_test=8", "--config.sft.steps=12",
            "--config.sft.checkpoint_every=4", "--config.sft.log_every=2", *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _checkpoints(workdir):
    folder = Path(workdir) / "stages" / "sft" / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_nan_drill_stop_then_resume_skipping(tmp_path):
    work = tmp_path / "w"
    stopped = _launch(work, "--config.debug.nan_at_step=7")
    assert stopped.returncode == 1, stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("run stopped: sft: non-finite loss or gradient norm at step 7"), last
    assert "the last good checkpoint is step 4" in last
    assert _checkpoints(work) == [4]  # nothing saved after the bad step

    changed = _launch(work, "--resume", "--config.data.n_train=300",
                      "--config.debug.nan_at_step=7")
    assert changed.returncode == 2
    lines = changed.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.n_train: 200 -> 300" in lines[0], changed.stderr

    resumed = _launch(work, "--resume", "--config.sft.on_nonfinite=skip",
                      "--config.debug.nan_at_step=7")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    sft = {r["step"]: r for r in rows if r.get("stage") == "sft"}
    assert sft[8]["skipped_steps"] == 1.0 and sft[12]["skipped_steps"] == 1.0
    assert sft[12]["loss"] == sft[12]["loss"]  # finite after the skipped update
    rows = json.loads((work / "results.json").read_text())["sft"]["rows"]
    assert {"metric": "skipped_nonfinite_steps", "value": 1} in rows
