"""Experiment runner: validation names keys, stages plug in, resume skips finished stages."""

import json
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from scalign import experiment
from scalign.experiment import ConfigError, Stage, register_stage

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "experiments" / "configs" / "demo.py"


def _demo():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_cfg", DEMO)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@register_stage
class _CountStage(Stage):
    """A stage defined outside scalign.stages: plugging in needs no launcher change."""

    name = "test_count"
    runs = 0

    def run(self, ctx):
        type(self).runs += 1
        ctx.artifacts["count"] = type(self).runs
        ctx.results.set_rows(self.name, [{"metric": "runs", "value": type(self).runs}])
        ctx.report.set_section(self.name, "## count\n")

    def load(self, ctx):
        ctx.artifacts["count"] = -1


def test_demo_config_validates():
    shape = experiment.validate(_demo(), num_devices=8)
    assert shape == {"data": 8, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("key,value,message", [
    ("sft.batch_size", 30, "config.sft.batch_size=30 must be divisible by data*fsdp"),
    ("mesh.tensor", 3, "config.mesh"),
    ("evaluate.temperature", 0.0, "config.evaluate.temperature"),
    ("reward_models.evaluators", ("orm", "xrm"), "config.reward_models.evaluators"),
    ("rerank.aggregations", ("min", "median"), "config.rerank.aggregations"),
])
def test_validation_errors_name_the_key(key, value, message):
    cfg = _demo()
    block, leaf = key.split(".")
    with cfg.unlocked():
        cfg[block][leaf] = value
    with pytest.raises(ConfigError, match=message.replace("*", r"\*").replace(".", r"\.")):
        experiment.validate(cfg, num_devices=8)


def test_unknown_stage_and_order():
    cfg = _demo()
    cfg.stages = ("data", "sftt")
    with pytest.raises(ConfigError, match="unknown stage"):
        experiment.validate(cfg, num_devices=1)
    cfg.stages = ("sft", "data")
    with pytest.raises(ConfigError, match="stage 'sft' needs 'tokenizer'"):
        experiment.validate(cfg, num_devices=1)


def test_missing_block_is_reported():
    cfg = _demo()
    del cfg["rerank"]
    with pytest.raises(ConfigError, match="config.rerank is missing"):
        experiment.validate(cfg, num_devices=1)


def test_run_resume_and_workdir_guard(tmp_path):
    cfg = ml_collections.ConfigDict({"seed": 0, "stages": ("test_count", "report"),
                                     "mesh": {"data": -1, "fsdp": 1, "tensor": 1}})
    _CountStage.runs = 0
    ctx = experiment.run(cfg, tmp_path / "w")
    assert ctx.artifacts["count"] == 1
    results = json.loads((tmp_path / "w" / "results.json").read_text())
    assert results["test_count"]["rows"] == [{"metric": "runs", "value": 1}]
    assert (tmp_path / "w" / "report.md").exists()
    with pytest.raises(ConfigError, match="--resume"):
        experiment.run(cfg, tmp_path / "w")
    ctx = experiment.run(cfg, tmp_path / "w", resume=True)
    assert _CountStage.runs == 1 and ctx.artifacts["count"] == -1  # loaded, not rerun
    experiment.run(cfg, tmp_path / "w", overwrite=True)
    assert _CountStage.runs == 2


def test_results_rows_must_be_flat(tmp_path):
    r = experiment.Results(tmp_path / "results.json")
    with pytest.raises(TypeError, match="non-scalar"):
        r.set_rows("x", [{"a": [1, 2]}])


def _launch(*args):
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "launch.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_launcher_validate_only_and_errors():
    ok = _launch(f"--config={DEMO}", "--validate_only", "--config.sft.steps=7")
    assert ok.returncode == 0, ok.stderr
    assert "config OK" in ok.stdout
    bad = _launch(f"--config={DEMO}", "--validate_only", "--config.sft.batch_size=0")
    assert bad.returncode == 2
    assert "config.sft.batch_size=0 must be positive" in bad.stderr


# ---------------------------------------------------------------- issue 16: workdir ownership
def _count_cfg(**extra):
    return ml_collections.ConfigDict({"seed": 0, "stages": ("test_count",),
                                      "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
                                      "block": {"n_train": 10, "log_every": 5}, **extra})


def test_resume_refuses_a_changed_config_listing_the_keys(tmp_path):
    experiment.run(_count_cfg(), tmp_path / "w")
    marker = json.loads((tmp_path / "w" / experiment.MARKER).read_text())
    assert marker["config_hash"] == experiment.config_hash(_count_cfg())
    changed = _count_cfg()
    changed.block.n_train = 20
    changed.seed = 1
    with pytest.raises(ConfigError, match=r"block\.n_train: 10 -> 20.*seed: 0 -> 1"
                                          r".*--accept_config_changes"):
        experiment.run(changed, tmp_path / "w", resume=True)
    # the stored config is untouched by the refused resume
    assert json.loads((tmp_path / "w" / "config.json").read_text())["block"]["n_train"] == 10
    # keys that do not change results may differ
    cosmetic = _count_cfg()
    cosmetic.block.log_every = 1
    experiment.run(cosmetic, tmp_path / "w", resume=True)
    # an explicit flag accepts the change and records it
    experiment.run(changed, tmp_path / "w", resume=True, accept_config_changes=True)
    marker = json.loads((tmp_path / "w" / experiment.MARKER).read_text())
    assert marker["config_hash"] == experiment.config_hash(changed)
    assert any("block.n_train" in c for c in marker["accepted_changes"][0]["changes"])


def test_resume_of_an_empty_or_foreign_folder(tmp_path, capsys):
    _CountStage.runs = 0
    experiment.run(_count_cfg(), tmp_path / "new", resume=True)  # nothing to resume: says so
    assert "holds no run yet" in capsys.readouterr().err and _CountStage.runs == 1
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match="not a scalign workdir"):
        experiment.run(_count_cfg(), foreign, resume=True)


def test_overwrite_refuses_a_folder_scalign_did_not_make(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match=r"not a scalign workdir.*--overwrite would delete"):
        experiment.run(_count_cfg(), foreign, overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "years of work"
    experiment.run(_count_cfg(), tmp_path / "w")
    (tmp_path / "w" / "extra.txt").write_text("x")
    experiment.run(_count_cfg(), tmp_path / "w", overwrite=True)  # its own workdir: allowed
    assert not (tmp_path / "w" / "extra.txt").exists()


# ------------------------------------------------- issue 16: --validate_only validates everything
@pytest.mark.parametrize("key,value,message", [
    ("model.preset", "nope", r"config\.model: .*nope"),
    ("evaluate.levels", (9,), r"config\.evaluate\.levels has \[9\]"),
    ("rerank.levels", (1, 6), r"config\.rerank\.levels has \[6\]"),
    ("sft.levels", (0,), r"config\.sft\.levels has \[0\]"),
    ("sft.optimizer.learning_rate", -1.0, r"config\.sft\.optimizer: learning_rate=-1\.0 must be"),
    ("reward_models.train.optimizer.learning_rate", 0.0,
     r"config\.reward_models\.train\.optimizer: learning_rate=0\.0"),
    ("sft.seq_len", 100000, r"config\.sft\.seq_len=100000 is longer than the model supports"),
    ("sft.on_nonfinite", "ignore", r"config\.sft\.on_nonfinite must be one of"),
    ("sft.exclude_goal_span", "all", r"config\.sft\.exclude_goal_span must be one of"),
    ("sft.miss_demos", 1.5, r"config\.sft\.miss_demos=1\.5 must be in \[0, 1\]"),
])
def test_validation_catches_what_used_to_fail_late(key, value, message):
    cfg = _demo()
    *path, leaf = key.split(".")
    node = cfg
    for part in path:
        node = node[part]
    with node.unlocked():
        node[leaf] = value
    with pytest.raises(ConfigError, match=message):
        experiment.validate(cfg, num_devices=1)


# ------------------------------------------------ issue 16: one-line launcher errors, exit code 2
def test_none_default_keys_are_typed_and_overridable():
    """Every key a shipped config leaves None is declared with a type (`placeholder`), so
    `--config.<key>=...` works (absl cannot override an untyped None)."""
    import importlib.util

    untyped = []
    for path in sorted((ROOT / "experiments" / "configs").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)

        def walk(node, prefix, path=path):
            for key in node.keys():
                value = node[key]
                if isinstance(value, ml_collections.ConfigDict):
                    walk(value, f"{prefix}{key}.")
                elif value is None and node.get_type(key) is type(None):
                    untyped.append(f"{path.name}: {prefix}{key}")
        walk(mod.get_config(), "")
    assert not untyped, f"None without a declared type: {untyped}"


@pytest.mark.parametrize("args,code,message", [
    (["--config.data.design=graded99"], 0, "config OK"),
    (["--config.data.design=bogus"], 2, "config error: invalid config: config.data.design: "
                                        "unknown stepmath design 'bogus'"),
    (["--config.sft.stepz=3"], 2, 'config error: no such config key in --config.sft.stepz: '
                                  "'stepz' Did you mean \"steps\""),
    (["--config.evaluate.levels=(9,)"], 2, "config.evaluate.levels has [9]"),
    (["--config=experiments/configs/missing.py"], 2,
     "file not found: config file experiments/configs/missing.py"),
])
def test_launcher_errors_are_one_line_with_exit_code_2(args, code, message):
    if not args[0].startswith("--config="):
        args = [f"--config={DEMO}", *args]
    out = _launch(*args, "--validate_only")
    assert out.returncode == code, out.stderr
    if code:
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], out.stderr
    else:
        assert message in out.stdout


def test_launcher_run_errors_are_one_line(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    out = _launch(f"--config={DEMO}", f"--workdir={work}", "--overwrite")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a scalign workdir" in lines[0], out.stderr
    assert (work / "notes.txt").read_text() == "mine"
    (work / experiment.MARKER).write_text("{}")  # a scalign run: neither flag -> one line
    out = _launch(f"--config={DEMO}", f"--workdir={work}")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "is not empty: pass --resume" in lines[0]


def test_stages_do_not_import_the_experiment_module():
    """Issue 14: no registry cycle: stage modules import `scalign.stages.base`, and the
    names they use stay importable from `scalign.experiment`."""
    stages = ROOT / "src" / "scalign" / "stages"
    offenders = [p.name for p in stages.glob("*.py") if "scalign.experiment" in p.read_text()]
    assert not offenders
    from scalign.stages import base
    assert experiment.Stage is base.Stage and experiment.ConfigError is base.ConfigError
    assert experiment.registered_stages()["sft"].__module__ == "scalign.stages.sft"
