"""Preemption: SIGTERM (how spot TPU VMs are reclaimed) makes training and the online loop
save at the next step / iteration boundary and stop; the launcher exits 0 with a "preempted,
resume with ..." line, and the resumed run reproduces the uninterrupted one bitwise (CPU)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from scalign.training import preemption
from scalign.training.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "experiments" / "configs" / "demo.py"
sys.path.insert(0, str(ROOT / "tests" / "algorithms"))

from test_loop import _iterate, _make_loop, _prompts  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_preemption():
    preemption.uninstall()
    yield
    preemption.uninstall()


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.fixture(scope="module")
def model():
    from test_loop import _config

    from scalign.models import init_params
    config = _config()
    params = jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x,
                          init_params(config, jax.random.PRNGKey(0)))
    return config, params


def test_online_loop_preempted_saves_at_the_boundary_and_resumes_bitwise(model, tmp_path):
    config, params = model
    straight = _make_loop(config, params, tmp_path / "a")
    straight.run(4, _iterate(_prompts(), []))

    inner = _iterate(_prompts(), [])

    def iterate(loop, k, key):  # the notice arrives in the middle of iteration 2
        out = inner(loop, k, key)
        if k == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    preemption.install()
    loop = _make_loop(config, params, tmp_path / "b")
    with pytest.raises(preemption.Preempted, match="saved at iteration 2 of 4") as info:
        loop.run(4, iterate)
    assert info.value.step == 2 and loop.checkpointer.latest_step() == 2
    loop.checkpointer.close()
    preemption.uninstall()

    resumed = _make_loop(config, params, tmp_path / "b")
    resumed.run(4, _iterate(_prompts(), []))
    for a, b in zip(_leaves(straight.state), _leaves(resumed.state), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b), "not bitwise equal"
    assert resumed.pool.state_dict() == straight.pool.state_dict()


def test_without_install_nothing_is_watched():
    assert not preemption.reached(1)
    preemption.request()
    assert preemption.reached(2)



@pytest.mark.slow
def test_sigterm_launcher_saves_exits_0_and_resumes_bitwise(tmp_path, demo_sft):
    straight = demo_sft.launch(tmp_path / "a", checkpoint_every=10)
    run = demo_sft.launch(tmp_path / "b", checkpoint_every=10)
    deadline = time.time() + 400
    while (demo_sft.sft_steps(tmp_path / "b") < 3 and run.poll() is None
           and time.time() < deadline):
        time.sleep(0.2)
    assert run.poll() is None, run.stderr.read()
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("preempted:"))
    assert "resume with: python" in line and "--resume" in line, line
    stopped = int(line.split("saved at step ")[1].split()[0])
    assert 3 <= stopped < 40, line
    ckpts = tmp_path / "b" / "stages" / "sft"
    assert not (ckpts / "policy").exists()  # the stage did not finish
    assert straight.wait(timeout=600) == 0, straight.stderr.read()
    resumed = demo_sft.launch(tmp_path / "b", "--resume", checkpoint_every=10)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    _, a, _ = load_model(tmp_path / "a" / "stages" / "sft" / "policy")
    _, b, _ = load_model(tmp_path / "b" / "stages" / "sft" / "policy")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
