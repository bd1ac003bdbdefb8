"""Benchmarks run a spec's workloads end to end and print one well-formed JSON line each."""

import json

import pytest

from scalign.bench.__main__ import main

MODEL = {"architecture": "llama", "vocab_size": 64, "hidden_size": 32, "num_layers": 2,
         "num_heads": 2, "num_kv_heads": 1, "head_dim": 16, "intermediate_size": 64,
         "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
         "init_seed": 0}
WORKLOADS = {
    "sample_tiny": {"kind": "sample", "model": "m", "batch": 3, "prompt_len": 8,
                    "prompt_seed": 0, "prompt_token_low": 3, "max_new_tokens": 5,
                    "decoding": "greedy", "stop_on_eos": False, "warmup_calls": 1,
                    "timed_calls": 2, "metric": "generated_tokens_per_s", "unit": "tok/s"},
    "sft_tiny": {"kind": "train", "model": "m", "learning_rate": 1e-3, "weight_decay": 0.0,
                 "batch": 2, "seq_len": 16, "data_seed": 0, "warmup_steps": 1,
                 "timed_steps": 2},
    "dpo_tiny": {"kind": "dpo", "model": "m", "loss": "sigmoid", "beta": 0.1,
                 "label_smoothing": 0.0, "learning_rate": 1e-6, "weight_decay": 0.0,
                 "batch_pairs": 2, "prompt_len": 6, "response_len": 6, "seq_len": 12,
                 "data_seed": 0, "warmup_steps": 1, "timed_steps": 2},
    "grpo_tiny": {"kind": "grpo", "model": "m", "batch": 2, "num_generations": 4,
                  "prompt_len": 8, "prompt_seed": 0, "prompt_token_low": 3,
                  "max_new_tokens": 5, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                  "stop_on_eos": False, "beta": 0.04, "epsilon": 0.2, "advantage_eps": 1e-4,
                  "learning_rate": 1e-6, "weight_decay": 0.0, "grad_clip": None,
                  "num_iterations": 1, "optimizer_steps_per_iteration": 1,
                  "warmup_steps": 1, "timed_steps": 2, "metric": "iterations_per_s",
                  "unit": "it/s"},
}


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "workloads.json"
    path.write_text(json.dumps({"models": {"m": MODEL}, "workloads": WORKLOADS}))
    return path


def _line(capsys) -> dict:
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 1
    return json.loads(lines[0])


def test_sample_bench(spec, capsys):
    main(["sample", "--workload", "sample_tiny", "--spec", str(spec), "--extra", "bon_prompts=2",
          "--extra", "bon_n=2", "--extra", "bon_timed=1"])
    line = _line(capsys)
    assert line["system"] == "scalign" and line["unit"] == "tok/s" and line["value"] > 0
    assert len(line["seconds"]) == 2 and line["bon_tok_s"] > 0 and line["indep_tok_s"] > 0
    assert line["decode_step_ms"] > 0 and line["decode_bytes_per_step"] == 20640 * 4 + 10.5 * 768
    assert line["decode_GBps"] > 0 and 0 < line["decode_bw_util"]


def test_decode_bytes_per_step_counts_weights_and_the_attended_cache():
    import jax

    from scalign.bench.common import model_config_from_spec
    from scalign.bench.sample import decode_bytes_per_step
    from scalign.models import init_params

    config = model_config_from_spec(MODEL)
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    # weights without the [64, 32] input embedding: 2 layers x (q 1024 + k 512 + v 512 + o 1024
    # + gate/up/down 3 x 2048 + 2 norms x 32) + final norm 32 + head 2048 = 20640 floats
    weights = 20640 * 4
    per_slot = 2 * 2 * 3 * 1 * 16 * 4  # K and V, 2 layers, batch 3, 1 kv head, Dh 16, f32
    # M = 5: the 4 decode steps attend to 8 prompt slots + 1, 2, 3, 4: a mean of 10.5 slots
    assert decode_bytes_per_step(config, params, 3, 8, 5, "float32") == int(
        weights + 10.5 * per_slot)
    tied = config.replace(tie_embeddings=True)
    tied_params = jax.eval_shape(lambda: init_params(tied, jax.random.PRNGKey(0)))
    # tied: the embedding table is the head (read once), so the count is unchanged
    assert decode_bytes_per_step(tied, tied_params, 3, 8, 5, "float32") == int(
        weights + 10.5 * per_slot)


def test_copy_bandwidth_is_positive():
    from scalign.bench.common import copy_bandwidth

    assert copy_bandwidth(mib=4, repeats=2) > 1e8  # bytes/s: any machine moves 100 MB/s


def test_train_bench_reports_mfu(spec, capsys):
    main(["train", "--workload", "sft_tiny", "--spec", str(spec)])
    line = _line(capsys)
    assert line["metric"] == "tokens_per_s" and line["value"] > 0
    assert 0 < line["mfu"] < 1 and line["peak_flops"] > 1e8 and len(line["step_seconds"]) == 2


def test_dpo_bench_first_loss_is_log2(spec, capsys):
    main(["dpo", "--workload", "dpo_tiny", "--spec", str(spec)])
    line = _line(capsys)
    assert line["metric"] == "pairs_per_s" and line["unit"] == "pairs/s" and line["value"] > 0
    # lr 1e-6 over 3 steps barely moves the policy away from the reference: loss ~ ln 2
    assert line["loss"] == pytest.approx(0.6931, abs=1e-3)


def test_wrong_kind_is_an_error(spec):
    with pytest.raises((ValueError, SystemExit)):
        main(["dpo", "--workload", "sft_tiny", "--spec", str(spec)])


def test_grpo_bench(spec, capsys):
    main(["grpo", "--workload", "grpo_tiny", "--spec", str(spec)])
    line = _line(capsys)
    assert line["system"] == "scalign" and line["unit"] == "it/s" and line["value"] > 0
    assert len(line["iteration_seconds"]) == 2
    for key in ("rollout_s", "reference_s", "update_s", "generated_tokens_per_s"):
        assert line[key] > 0, key


def test_tune_cpu_xla_flags_adds_once_and_respects_the_user():
    from scalign.utils import CPU_XLA_FLAGS, tune_cpu_xla_flags

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert tune_cpu_xla_flags(env, "0.10.2") == list(CPU_XLA_FLAGS)
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8",
                                        *CPU_XLA_FLAGS]
    assert tune_cpu_xla_flags(env, "0.10.2") == []  # already there: unchanged
    user = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"}
    assert tune_cpu_xla_flags(user, "0.10.2") == [] and "ELTWISE" not in user["XLA_FLAGS"]
    assert tune_cpu_xla_flags({}, "0.11.2") == []  # not measured there: XLA may not know it
    off = {"SCALIGN_XLA_TUNING": "0"}
    assert tune_cpu_xla_flags(off, "0.10.2") == [] and "XLA_FLAGS" not in off


def test_tuned_cpu_flags_run_a_training_step_in_a_fresh_process():
    """The flags are accepted by this jaxlib and give the same SFT loss as without them."""
    import os
    import subprocess
    import sys

    code = ("from scalign.utils import tune_cpu_xla_flags; print(tune_cpu_xla_flags());"
            "import jax, jax.numpy as jnp;"
            "f = jax.jit(jax.value_and_grad(lambda w, x: jnp.sum(jax.nn.silu(x @ w) ** 2)));"
            "v, g = f(jnp.ones((64, 32)) * 0.01, jnp.arange(128 * 64.).reshape(128, 64) / 1e4);"
            "print(float(v))")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    outs = []
    for tuning in ("1", "0"):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**env, "SCALIGN_XLA_TUNING": tuning}, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        outs.append(run.stdout.split("\n"))
    assert outs[1][0] == "[]"
    assert abs(float(outs[0][1]) - float(outs[1][1])) <= 1e-5 * abs(float(outs[1][1]))


def test_malloc_tuning_env_sets_the_hugetlb_tunable_once():
    from scalign.hostenv import HUGETLB_TUNABLE, malloc_tuning_env, reexec_with_malloc_tuning

    thp = "always [madvise] never\n"
    env = malloc_tuning_env({"PATH": "/bin"}, libc=(2, 36), thp=thp)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": HUGETLB_TUNABLE}
    # the restarted process sees the tunable and does not restart again
    assert malloc_tuning_env(env, libc=(2, 36), thp=thp) is None
    kept = malloc_tuning_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, libc=(2, 36),
                             thp=thp)
    assert kept["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGETLB_TUNABLE}"
    assert malloc_tuning_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, libc=(2, 36),
                             thp=thp) is None  # the user's value wins
    assert malloc_tuning_env({"SCALIGN_MALLOC_TUNING": "0"}, libc=(2, 36), thp=thp) is None
    assert malloc_tuning_env({}, libc=(2, 31), thp=thp) is None  # tunable unknown before 2.35
    assert malloc_tuning_env({}, libc=(2, 36), thp="always madvise [never]\n") is None
    calls = []
    import os

    saved = os.environ.get("GLIBC_TUNABLES")
    try:
        os.environ["GLIBC_TUNABLES"] = HUGETLB_TUNABLE  # already tuned: no restart
        assert reexec_with_malloc_tuning(exec_fn=lambda *a: calls.append(a)) is False
    finally:
        if saved is None:
            os.environ.pop("GLIBC_TUNABLES")
        else:
            os.environ["GLIBC_TUNABLES"] = saved
    assert calls == []
