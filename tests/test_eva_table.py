"""experiments/studies/eva_table.py on a hand-made study folder: per-seed rows aggregate into
the headline table (mean/std over seeds, paired eva - fixed differences), the SFT rows count
once per seed, sensitivity runs stay apart."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location(
        "eva_table", ROOT / "experiments" / "studies" / "eva_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(study, name, seed, variant, info, win, hard, sft_hard):
    def row(v, i, metric, mean):
        return {"loss": "dpo", "variant": v, "informativeness": i, "metric": metric,
                "mean": mean, "std": 0.0, "ci_low": mean - 0.1, "ci_high": mean + 0.1,
                "seeds": 1}
    rows = [row(variant, info, "winrate", win), row("sft", "none", "hard_acc", sft_hard),
            row(variant, info, "hard_acc", hard)]
    pool = [{"iteration": k, "level": lv, "share": 0.5} for k in (0, 1) for lv in (1, 4)]
    d = study / name / f"seed_{seed}"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"eva": {"rows": rows},
                                                "eva_pool": {"rows": pool}}))
    (d / "report.md").write_text(f"# {name} {seed}\n")


def test_table_aggregates_seeds_and_pairs_differences(tmp_path):
    study = tmp_path / "study"
    for seed, (wf, we, hf, he, sh) in enumerate([(0.50, 0.54, 0.10, 0.20, 0.08),
                                                  (0.52, 0.52, 0.12, 0.12, 0.10)]):
        _write(study, "dpo_fixed", seed, "fixed", "none", wf, hf, sh)
        _write(study, "dpo_eva", seed, "eva", "gap", we, he, sh)
    _write(study, "dpo_eva_lr3e-4", 0, "eva", "gap", 0.9, 0.9, 0.08)
    (study / "sft" / "seed_0").mkdir(parents=True)  # the SFT runs are not eva runs
    out = tmp_path / "out"
    _module().main([str(study), "--out", str(out), "--sensitivity", "_lr3e-4"])
    res = json.loads((out / "results.json").read_text())
    idx = {(r["variant"], r["metric"]): r for r in res["eva"]["rows"]}
    assert idx[("eva", "winrate")]["mean"] == pytest.approx(0.53)
    assert idx[("eva", "winrate")]["seeds"] == 2
    assert idx[("fixed", "hard_acc")]["mean"] == pytest.approx(0.11)
    assert idx[("sft", "hard_acc")]["seeds"] == 2  # once per seed, not once per run
    assert idx[("sft", "hard_acc")]["mean"] == pytest.approx(0.09)
    assert idx[("eva", "winrate")]["ci_low"] == pytest.approx(0.43)
    assert res["eva_lr3e-4"]["rows"]  # kept apart from the main rows
    assert all(r["mean"] < 0.9 for r in res["eva"]["rows"])
    report = (out / "report.md").read_text()
    assert "+0.020 ± 0.020 (n=2; per seed +0.040, +0.000)" in report  # win rate eva - fixed
    assert "Sensitivity: runs with suffix _lr3e-4" in report
    assert (out / "runs" / "dpo_eva" / "seed_1" / "report.md").exists()
    assert (out / "figures" / "pool_levels_dpo_eva_gap.png").exists()
