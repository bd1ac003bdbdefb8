"""Test session setup: 8 virtual CPU devices for the sharding tests.

The flag must be set before jax initialises its backend, so it is set here, before any test
module imports jax. Single-device tests simply use the first device.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Persistent XLA compilation cache: many tests compile identical programs (same model, new
# closures); the cache turns those recompiles into lookups. Safe under pytest-xdist.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(__file__)), ".pytest_cache",
                                   "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def cpu_kernels() -> None:
    """Tests of the CPU FFI kernels: skipped where they cannot exist (no C++ compiler, or
    switched off by SCALIGN_CPU_KERNELS=0), but FAILED where a compiler exists and the build or
    load failed, so a broken kernel build never turns CI green with the kernels silently off."""
    from scalign.kernels import library

    if library.available():
        return
    reason = library.unavailable_reason()
    if library.switched_off() is not None or library.compiler() is None:
        pytest.skip(f"CPU kernels unavailable: {reason}")
    pytest.fail(f"a C++ compiler ({library.compiler()}) is present but the CPU kernels are "
                f"unavailable: {reason}")


def _flip_bytes(step_dir, n: int = 64) -> None:
    """Flip `n` bytes in the middle of the largest file of a checkpoint step's state: the array
    data (so values change and the file still parses; only the checksums can tell)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    mid = len(data) // 2 - n // 2
    for i in range(mid, mid + n):
        data[i] ^= 0xFF
    target.write_bytes(bytes(data))


import pytest  # noqa: E402


@pytest.fixture
def flip_bytes():
    """The checkpoint-corruption helper of the integrity tests (`_flip_bytes`)."""
    return _flip_bytes


class DemoSftLauncher:
    """`experiments/launch.py` on the demo config's data + SFT stages (40 tiny steps) as a
    subprocess, for the kill / preemption drills; `sft_steps` reads how far a run logged."""

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def launch(self, workdir, *extra, checkpoint_every: int, stdout=None):
        import subprocess
        import sys

        args = [sys.executable, os.path.join(self.root, "experiments", "launch.py"),
                f"--config={os.path.join(self.root, 'experiments', 'configs', 'demo.py')}",
                f"--workdir={workdir}", "--config.stages=('data','sft')",
                "--config.data.n_train=300", "--config.data.n_test=10", "--config.sft.steps=40",
                f"--config.sft.checkpoint_every={checkpoint_every}",
                "--config.sft.log_every=1", *extra]
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "PYTHONPATH": os.pathsep.join(filter(None, [os.path.join(self.root, "src"),
                                                           os.environ.get("PYTHONPATH")]))}
        return subprocess.Popen(args, cwd=self.root, env=env,
                                stdout=subprocess.PIPE if stdout is None else stdout,
                                stderr=subprocess.PIPE, text=True)

    @staticmethod
    def sft_steps(workdir) -> int:
        import json

        path = os.path.join(str(workdir), "metrics.jsonl")
        if not os.path.exists(path):
            return 0
        with open(path) as f:
            steps = [json.loads(line)["step"] for line in f.read().splitlines() if line]
        return max(steps, default=0)


@pytest.fixture
def demo_sft():
    return DemoSftLauncher()


@pytest.fixture(scope="session")
def hf_folder_of(tmp_path_factory):
    """`hf_folder_of(preset)`: what config validation reads of an HF checkpoint folder of a
    named preset (its config.json, a tokenizer file), for real-scale configs whose weights are
    never loaded in a test."""
    import json

    from scalign.models import presets
    from scalign.models.convert.hf import config_to_hf

    def make(preset: str):
        folder = tmp_path_factory.mktemp(preset)
        (folder / "config.json").write_text(json.dumps(config_to_hf(presets.get(preset))))
        (folder / "tokenizer.model").write_bytes(b"validation only checks that it exists")
        return folder
    return make
