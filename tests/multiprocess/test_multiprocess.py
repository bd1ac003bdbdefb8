"""Multi-process JAX on one machine: 2 processes x 4 virtual CPU devices on loopback (gloo)
run an SFT step, a checkpoint save + restore, a PRM step, a DPO step and two online-loop
iterations (sample -> score -> update, checkpointed and restored), and end with the same
params as one process with 8 devices. A peer killed mid-run makes the other fail with a clear
error within a bound: never a hang.

The workers are subprocesses (`worker.py`): a process can join only one JAX cluster, and the
test session's own JAX already runs 8 devices in one process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
WORKER = HERE / "worker.py"
SRC = HERE.parent.parent / "src"
RUN_TIMEOUT_S = 600  # a loaded 2-core CI machine compiles everything in ~4 min


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    env["JAX_PLATFORMS"] = "cpu"
    # the test session forces 8 host devices; the workers choose their own count
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def _start(tmp: Path, name: str, *extra: str) -> subprocess.Popen:
    log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, str(WORKER), "--out", str(tmp / "out"),
                             "--workdir", str(tmp / "work"), *extra], env=_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Exit codes, or None for a process still running after `timeout` (then killed)."""
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            codes.append(None)
    return codes


def _cluster(tmp: Path, port: int, *extra: str) -> list[subprocess.Popen]:
    return [_start(tmp, f"process_{i}", "--process_id", str(i), "--num_processes", "2",
                   "--port", str(port), "--devices", "4", *extra) for i in range(2)]


def _tail(path: Path, n: int = 40) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines()
             if not line.startswith("[Gloo]")]
    return "\n".join(lines[-n:])


def test_two_processes_match_one_process(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    multi.mkdir()
    single.mkdir()
    procs = [*_cluster(multi, _port()), _start(single, "single", "--devices", "8")]
    codes = _wait(procs, RUN_TIMEOUT_S)
    logs = [multi / "process_0.log", multi / "process_1.log", single / "single.log"]
    for code, log in zip(codes, logs, strict=True):
        assert code == 0, f"{log.name}: exit {code}\n{_tail(log)}"
    a = np.load(multi / "out" / "params.npz")
    b = np.load(single / "out" / "params.npz")
    assert sorted(a.files) == sorted(b.files)
    assert {k.split("/")[0] for k in a.files} == {"sft", "prm", "dpo", "loop"}
    for k in a.files:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # only process 0 wrote outputs; both processes finished every stage
    for log in logs[:2]:
        assert "loop checkpoint restored" in log.read_text()


def test_killed_peer_fails_fast_with_a_clear_error(tmp_path):
    t0 = time.monotonic()
    procs = _cluster(tmp_path, _port(), "--die_at", "prm", "--heartbeat_s", "5")
    codes = _wait(procs, 240)
    took = time.monotonic() - t0
    survivor = _tail(tmp_path / "process_0.log")
    assert codes[1] == -signal.SIGKILL, codes
    assert codes[0] is not None, f"process 0 hung after its peer died\n{survivor}"
    assert codes[0] != 0, survivor
    assert "] done" not in survivor
    # JAX's coordination service names the lost task ("stopped sending heartbeats: 1")
    text = (tmp_path / "process_0.log").read_text(errors="replace")
    assert "stopped sending heartbeats" in text or "another task died" in text, survivor
    assert took < 240
