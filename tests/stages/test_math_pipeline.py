"""The real-model easy-to-hard pipeline at toy size: a tiny random Llama-family HF checkpoint,
MATH / MATH500 / PRM800K fixture files, and the stages of `e2h_llemma7b_prm800k.py`
(checkpoint -> data(math) -> sft(init=checkpoint) -> reward_models(prm800k) -> rerank -> report)
through `experiment.run`, then a resume that reloads each finished stage.

The fast tests run checkpoint -> data; the runs that compile training steps on the 8-device
CPU mesh take 45-70 s cold on 2 cores and are marked slow."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from scalign import experiment
from scalign.data.domain import MathDomain
from scalign.data.tokenizer import Tokenizer
from scalign.models import presets, save_hf
from scalign.models.transformer import init_params

LEVEL_PROBLEMS = {
    1: [("What is $2+3$?", r"We add: $2+3=5$. So the answer is $\boxed{5}$.", "5"),
        ("What is $4+4$?", r"Adding gives $\boxed{8}$.", "8")],
    2: [(r"Simplify $\frac{6}{8}$.", r"Divide both by 2. We get $\boxed{\frac34}$.", r"\frac34")],
    3: [("Solve $2x+1=7$.", "Subtract 1: $2x=6$.\n\nSo $x=\\boxed{3}$.", "3")],
    4: [(r"Compute $\sqrt{144}$.", r"Since $12^2=144$, it is $\boxed{12}$.", "12")],
    5: [("Sum the roots of $x^2-5x+6=0$.", r"By Vieta, $\boxed{5}$.", "5")],
}
TEST = [
    {"problem": "What is $1+1$?", "solution": r"It is $\boxed{2}$.", "answer": "2",
     "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"},
    {"problem": "What is $3+3$?", "solution": r"It is $\boxed{6}$.", "answer": "6",
     "subject": "Prealgebra", "level": 2, "unique_id": "test/prealgebra/2.json"},
    {"problem": r"Compute $\sqrt{169}$.", "solution": r"It is $\boxed{13}$.", "answer": "13",
     "subject": "Algebra", "level": 4, "unique_id": "test/algebra/3.json"},
    {"problem": "Sum the roots of $x^2-7x+12=0$.", "solution": r"It is $\boxed{7}$.",
     "answer": "7", "subject": "Algebra", "level": 5, "unique_id": "test/algebra/4.json"},
]


def _prm(problem, steps, answer):
    return {"question": {"problem": problem, "ground_truth_answer": answer},
            "label": {"finish_reason": "solution", "steps": [
                {"completions": [{"text": t, "rating": r, "flagged": False}],
                 "human_completion": None, "chosen_completion": 0 if r >= 0 else None}
                for t, r in steps]}}


PRM800K = [
    _prm("What is $2+3$?", [("I add 2 and 3.", 1), ("That is $5$.", 1), ("# Answer\n\n5", 1)],
         "5"),
    _prm("What is $2+3$?", [("I add 2 and 3.", 1), ("That is $6$.", -1)], "5"),
    _prm("What is $2+3$?", [("I add them.", 0), ("# Answer\n\n6", -1)], "5"),
    _prm("What is $4+4$?", [("Double 4.", 1), ("# Answer\n\n8", 1)], "8"),
    _prm("What is $4+4$?", [("Add 4 and 4 to get 9.", -1)], "8"),
    _prm("What is $4+4$?", [("It is 7.", 1), ("# Answer\n\n7", -1)], "8"),
    _prm("Solve $2x+1=7$.", [("Subtract 1.", 1), ("Then $x=3$.", 1), ("# Answer\n\n3", 1)], "3"),
    _prm(r"Compute $\sqrt{144}$.", [("It is 12.", 1), ("# Answer\n\n12", 1)], "12"),  # hard
]


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("math_data")
    train = [{"problem": p, "solution": s, "answer": a, "level": f"Level {lv}",
              "type": "Algebra"} for lv, items in LEVEL_PROBLEMS.items() for p, s, a in items]
    return {"train": _write_jsonl(d / "train.jsonl", train),
            "test": _write_jsonl(d / "test.jsonl", TEST),
            "prm800k": _write_jsonl(d / "phase2_train.jsonl", PRM800K)}


TINY = dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16, mlp_dim=64,
            max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny_hf(files, tmp_path_factory) -> Path:
    """A random Llemma-shaped (Llama family, RoPE 1e6) 2-layer HF folder + tokenizer.model."""
    folder = tmp_path_factory.mktemp("tiny_llemma") / "hf"
    folder.mkdir()
    domain = MathDomain.build(str(files["train"]), str(files["test"]), (1, 2, 3, 4, 5))
    corpus = [domain.prompt(p) + domain.demonstration(p) for lv in domain.levels
              for p in (*domain.train_problems(lv), *domain.test_problems(lv))]
    corpus += [s["completions"][0]["text"] for r in PRM800K for s in r["label"]["steps"]]
    tok = Tokenizer.train(corpus + ["one\nnewline"], folder / "tokenizer.model",
                          vocab_size=300, user_defined_symbols=("\n\n",))
    config = presets.get("llemma_7b", vocab_size=tok.vocab_size, **TINY)
    rng = np.random.default_rng(0)  # host-side random weights: no compile in the fixture
    shapes = jax.eval_shape(functools.partial(init_params, config), jax.random.PRNGKey(0))
    params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype),
                          shapes)
    save_hf(config, params, folder)
    return folder


def _train_block(**kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "batch_size": 8, "seq_len": 96, "grad_accum_steps": 1, "remat": "none", "clip_norm": 1.0,
        "log_every": 1, "checkpoint_every": 100, "keep_checkpoints": 1, "on_too_long": "drop",
        "optimizer": {"learning_rate": 1e-3, "warmup_steps": 0, "weight_decay": 0.0}, **kw})


def _config(files, tiny_hf, vocab_size: int) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = ("checkpoint", "data", "sft", "reward_models", "rerank", "report")
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.checkpoint = ml_collections.ConfigDict({
        "source": "hf", "path": str(tiny_hf), "tokenizer": None, "cache_dir": None,
        "dtype": "float32", "compute_dtype": None})
    c.model = ml_collections.ConfigDict({"preset": "llemma_7b", "overrides": {
        "vocab_size": vocab_size, **TINY}})
    c.data = ml_collections.ConfigDict({
        "domain": "math", "math_train": str(files["train"]), "math_test": [str(files["test"])],
        "levels": (1, 2, 3, 4, 5), "n_train": None, "n_test": None, "on_error": "raise",
        "tokenizer": "checkpoint"})
    c.sft = _train_block(init="checkpoint", levels=(1, 2, 3), steps=2)
    c.reward_models = ml_collections.ConfigDict({
        "label_source": "prm800k", "prm800k": (str(files["prm800k"]),), "levels": (1, 2, 3),
        "evaluators": ("orm", "prm", "oprm"), "after_first_error": "drop", "max_ratio": 3.0,
        "keep_one_class": 2, "train": _train_block(epochs=2)})
    c.rerank = ml_collections.ConfigDict({
        "levels": (1, 2, 4, 5), "problems_per_level": 1, "max_n": 4, "temperature": 1.0,
        "max_new_tokens": 16, "seeds": 1, "num_subsets": 2, "batch_size": 16,
        # "last" must be listed: the ORM's outcome AUC is read under it
        "score_batch_size": 8, "aggregations": ("min", "last"), "plot_aggregation": "min"})
    return c


def _rm_steps(workdir: Path, kind: str) -> list[int]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [m["step"] for m in map(json.loads, lines)
            if m.get("stage") == f"rm_{kind}" and "loss" in m]


def test_data_stage_reads_math_with_the_checkpoints_tokenizer(files, tiny_hf, tmp_path):
    vocab = Tokenizer.load(tiny_hf / "tokenizer.model").vocab_size
    config = _config(files, tiny_hf, vocab)
    config.stages = ("checkpoint", "data", "report")
    workdir = tmp_path / "run"
    ctx = experiment.run(config, workdir)
    domain = ctx.artifacts["domain"]
    assert isinstance(domain, MathDomain) and domain.levels == (1, 2, 3, 4, 5)
    assert ctx.artifacts["tokenizer"].serialized == Tokenizer.load(
        tiny_hf / "tokenizer.model").serialized
    assert not (workdir / "stages" / "data" / "tokenizer.model").exists()
    rows = json.loads((workdir / "results.json").read_text())["data"]["rows"]
    assert {(r["level"], r["train"], r["test"]) for r in rows if "level" in r} == {
        (1, 2, 1), (2, 1, 1), (3, 1, 0), (4, 1, 1), (5, 1, 1)}
    stats = {(r["split"], r["metric"]): r["value"] for r in rows if "split" in r}
    assert stats[("train", "read")] == 6 and stats[("train", "dropped_test_overlap")] == 0
    assert stats[("test", "read")] == len(TEST)
    report = (workdir / "report.md").read_text()
    assert "## Data: MATH (PRM800K layout)" in report
    assert "Tokenizer: the checkpoint's" in report and "# Answer" in report
    resumed = experiment.run(config, workdir, resume=True)
    assert resumed.artifacts["domain"].train == domain.train
    assert resumed.artifacts["tokenizer"].serialized == ctx.artifacts["tokenizer"].serialized


@pytest.mark.slow
def test_math_pipeline_through_reward_models_and_resume(files, tiny_hf, tmp_path):
    """checkpoint -> data(math) -> sft(init=checkpoint) -> reward_models(prm800k, OPRM)
    (~45 s of CPU cold: compiling the SFT and reward-model steps on the 8-device mesh)."""
    vocab = Tokenizer.load(tiny_hf / "tokenizer.model").vocab_size
    config = _config(files, tiny_hf, vocab)
    config.stages = ("checkpoint", "data", "sft", "reward_models", "report")
    config.reward_models.evaluators = ("oprm",)
    config.sft.remat = "full"  # the training copy of the model rematerialises its blocks
    assert experiment.validate(config) == {"data": 1, "fsdp": 8, "tensor": 1}
    workdir = tmp_path / "run"
    t0 = time.perf_counter()
    ctx = experiment.run(config, workdir)
    seconds = time.perf_counter() - t0
    results = json.loads((workdir / "results.json").read_text())

    data = {r["level"]: r for r in results["data"]["rows"] if "level" in r}
    assert {lv: (r["train"], r["test"]) for lv, r in data.items()} == {
        1: (2, 1), 2: (1, 1), 3: (1, 0), 4: (1, 1), 5: (1, 1)}
    sft = {r["metric"]: r["value"] for r in results["sft"]["rows"]}
    assert sft["steps"] == 2 and sft["train_examples"] == 4  # levels 1-3 only
    model, _ = ctx.artifacts["policy"]
    assert model.remat == "full" and model.n_layers == 2  # the checkpoint's model, fine-tuned

    rm = {r["metric"]: r["value"] for r in results["reward_models"]["rows"] if "level" not in r}
    assert rm["prm800k_read"] == len(PRM800K)
    assert rm["prm800k_dropped_level_not_supervised"] == 1  # the level-4 solution
    assert rm["prm_records"] == 7 and rm["orm_no_answer"] == 2
    assert rm["orm_records"] + rm["prm_records"] == rm["oprm_records"]
    levels = {r["level"] for r in results["reward_models"]["rows"] if "level" in r}
    assert levels == {1, 3}
    # 2 epochs at batch 8: ceil(2 * records / 8) steps
    assert max(_rm_steps(workdir, "oprm")) == -(-2 * rm["oprm_records"] // 8)
    report = (workdir / "report.md").read_text()
    assert "## Data: MATH (PRM800K layout)" in report and "PRM800K step-labelled" in report
    assert "fine-tuned from the checkpoint's policy" in report

    resumed = experiment.run(config, workdir, resume=True)
    assert isinstance(resumed.artifacts["domain"], MathDomain)
    assert resumed.artifacts["domain"].train == ctx.artifacts["domain"].train
    assert set(resumed.artifacts["reward_models"]) == {"oprm"}
    print(f"\ntiny math pipeline to reward models: {seconds:.1f}s; stages {ctx.timings}")


@pytest.mark.slow
def test_math_pipeline_end_to_end_with_rerank(files, tiny_hf, tmp_path):
    """Every stage of the real-scale config at toy size (~70 s cold on 2 CPU cores)."""
    vocab = Tokenizer.load(tiny_hf / "tokenizer.model").vocab_size
    config = _config(files, tiny_hf, vocab)
    workdir = tmp_path / "run"
    ctx = experiment.run(config, workdir)
    results = json.loads((workdir / "results.json").read_text())
    rm = {r["metric"]: r["value"] for r in results["reward_models"]["rows"] if "level" not in r}
    for kind in ("orm", "prm", "oprm"):
        assert max(_rm_steps(workdir, kind)) == -(-2 * rm[f"{kind}_records"] // 8), kind
    rerank = results["rerank"]["rows"]
    assert {r["split"] for r in rerank} == {"easy", "hard", "all"}
    assert {r["evaluator"] for r in rerank} == {"none", "orm", "prm", "oprm"}
    accuracy = [r for r in rerank if "stat" not in r]  # paired rows: difference to majority
    assert accuracy and all(0.0 <= r["mean"] <= 1.0 for r in accuracy)
    assert all(-1.0 <= r["value"] <= 1.0 for r in rerank if "stat" in r)
    assert {r["kind"] for r in results["evaluators"]["rows"]} == {"step_auc", "outcome_auc"}
    assert "## Re-ranking (easy-to-hard)" in (workdir / "report.md").read_text()
    print(f"\ntiny math pipeline: stages {ctx.timings}")


def test_missing_files_are_named_at_run_time(files, tiny_hf, tmp_path):
    config = _config(files, tiny_hf, 300)
    config.stages = ("checkpoint", "data")
    config.data.math_test = [str(files["test"]), str(tmp_path / "MATH500.jsonl")]
    experiment.validate(config)  # paths are not checked before the run (gs:// on the TPU VM)
    with pytest.raises(FileNotFoundError, match=r"config\.data\.math_test: .*MATH500\.jsonl"):
        experiment.run(config, tmp_path / "run")
