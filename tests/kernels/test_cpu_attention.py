"""The CPU decode-attention FFI kernels against a float64 numpy reference, and their fallback."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalign.kernels import cpu_attention

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # skip only without a compiler


def _reference(q, keys, values, lo, hi, softcap):
    """float64 attention over the visible slots lo[b] <= s <= hi; zeros where none."""
    S = keys.shape[3]
    s = np.arange(S)
    visible = (s[None, :] >= lo[:, None]) & (s[None, :] <= hi)  # [B, S]
    scores = np.einsum("bkgd,bkds->bkgs", q.astype(np.float64), keys.astype(np.float64))
    if softcap:
        scores = softcap * np.tanh(scores / softcap)
    scores = np.where(visible[:, None, None], scores, -np.inf)
    m = np.max(scores, -1, keepdims=True)
    e = np.where(visible[:, None, None], np.exp(scores - np.where(np.isfinite(m), m, 0)), 0.0)
    p = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bkgs,bksd->bkgd", p, values.astype(np.float64))


# shapes: G from 1 to 5 (the kernel takes query rows 2 at a time), Dh and S on and off the
# 32-wide register blocks, ragged lo (left padding / sliding windows), a row with nothing
# visible, hi past the buffer; scores spread wide (softmax far from uniform) and soft-capped
@pytest.mark.parametrize("B,K,G,Dh,S,hi,softcap", [
    (3, 2, 2, 64, 96, 70, None), (2, 1, 1, 40, 37, 36, None), (4, 3, 5, 16, 200, 150, 5.0),
    (2, 2, 3, 8, 8, 100, None), (3, 1, 4, 256, 130, 129, 50.0)])
def test_kernel_matches_a_float64_reference(B, K, G, Dh, S, hi, softcap):
    rng = np.random.default_rng(B * 1000 + S)
    q = rng.standard_normal((B, K, G, Dh)).astype(np.float32) * (3.0 / np.sqrt(Dh))
    keys = rng.standard_normal((B, K, Dh, S)).astype(np.float32)
    values = rng.standard_normal((B, K, S, Dh)).astype(np.float32)
    lo = rng.integers(0, min(S, hi) // 2 + 1, size=B).astype(np.int32)
    if B > 2:
        lo[-1] = min(hi, S - 1) + 1  # nothing visible in the last row
    ref = _reference(q, keys, values, lo, min(hi, S - 1), softcap)
    run = jax.jit(cpu_attention.decode_attention, static_argnums=5)
    out = np.asarray(run(q, keys, values, lo, jnp.int32(hi), softcap))
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6)
    if B > 2:
        assert (out[-1] == 0).all()


def test_slots_outside_the_range_are_never_read():
    """NaNs outside [lo, hi] (stale or unwritten cache) do not reach the output."""
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((1, 1, 4, 10)).astype(np.float32)
    values = rng.standard_normal((1, 1, 10, 4)).astype(np.float32)
    keys[..., :3] = keys[..., 6:] = np.nan
    values[..., :3, :] = values[..., 6:, :] = np.nan
    q = rng.standard_normal((1, 1, 2, 4)).astype(np.float32)
    out = cpu_attention.decode_attention(q, keys, values, jnp.array([3]), jnp.int32(5))
    ref = _reference(q, np.nan_to_num(keys), np.nan_to_num(values), np.array([3]), 5, None)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("var", ["SCALIGN_CPU_KERNELS", "SCALIGN_CPU_ATTENTION"])
def test_switched_off_by_the_environment(var):
    code = ("from scalign.kernels import cpu_attention as c, cpu_matmul as m; "
            "print(c.available(), m.available(), c.unavailable_reason())")
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{var: "0"})
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == f"False False RuntimeError: switched off by {var}=0", \
        done.stderr


def test_a_missing_compiler_is_reported_not_raised(tmp_path):
    code = ("from scalign.kernels import cpu_attention as c; "
            "print(c.available()); print(c.unavailable_reason())")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), JAX_PLATFORMS="cpu",
               SCALIGN_KERNEL_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    lines = done.stdout.splitlines()
    assert lines[0] == "False" and "no-such-compiler" in lines[1], done.stdout + done.stderr


def test_a_failed_build_with_a_compiler_fails_the_kernel_tests(tmp_path):
    """With a compiler that exists but fails (`false`), the kernel tests must fail, not skip:
    a broken C++ build may not turn CI green with the kernels silently off."""
    fails = tmp_path / "broken-c++"
    fails.write_text("#!/bin/sh\necho 'error: broken on purpose' >&2\nexit 1\n")
    fails.chmod(0o755)
    env = dict(os.environ, CXX=str(fails), JAX_PLATFORMS="cpu",
               SCALIGN_KERNEL_CACHE=str(tmp_path / "cache"))
    test = os.path.join(os.path.dirname(__file__), "test_cpu_matmul.py")
    done = subprocess.run([sys.executable, "-m", "pytest", test, "-q", "-x", "-p",
                           "no:cacheprovider", "-k", "test_no_rows"], env=env,
                          capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert done.returncode != 0 and "error" in summary and "skipped" not in summary, out[-3000:]
    assert "is present but the CPU kernels are unavailable" in out and "broken on purpose" in out
