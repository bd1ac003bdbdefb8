"""Aggregation over seeds: mean ± std per key, hand-computed; report and figure written."""

import json

import numpy as np
import pytest

from scalign.aggregate import aggregate_rows, aggregate_runs, main


def _rerank(split, evaluator, method, n, mean, std=0.05):
    return {"split": split, "evaluator": evaluator, "method": method,
            "aggregation": "none" if evaluator == "none" else "prod", "n": n, "mean": mean,
            "std": std, "seeds": 1, "problems": 40}


def test_aggregate_rows_mean_std_per_key():
    run_a = [_rerank("hard", "none", "majority", 16, 0.30), _rerank("hard", "prm", "weighted", 16, 0.50),
             {"level": 1, "train": 10}]  # no number: dropped
    run_b = [_rerank("hard", "none", "majority", 16, 0.40, std=0.9),
             _rerank("hard", "prm", "weighted", 16, 0.70)]
    rows = aggregate_rows([run_a, run_b])
    assert len(rows) == 2
    maj, prm = rows
    # per-run std / problems are bookkeeping, not part of the key: the two runs' rows match
    assert maj["method"] == "majority" and maj["seeds"] == 2
    assert maj["mean"] == pytest.approx(0.35) and maj["std"] == pytest.approx(0.05)
    assert prm["mean"] == pytest.approx(0.60) and prm["std"] == pytest.approx(0.10)
    assert prm["values"] == "0.5,0.7"


def test_aggregate_rows_value_field_and_partial_keys():
    a = [{"evaluator": "prm", "split": "hard", "kind": "step_auc", "value": 0.6, "count": 5}]
    b = [{"evaluator": "prm", "split": "hard", "kind": "step_auc", "value": 0.8, "count": 7},
         {"evaluator": "orm", "split": "hard", "kind": "step_auc", "value": 0.9, "count": 7}]
    rows = aggregate_rows([a, b])
    assert rows[0]["mean"] == pytest.approx(0.7) and rows[0]["seeds"] == 2
    assert rows[1]["evaluator"] == "orm" and rows[1]["seeds"] == 1 and rows[1]["std"] == 0.0


def test_aggregate_runs_writes_results_and_report(tmp_path):
    runs = []
    for s, (maj, prm) in enumerate([(0.3, 0.5), (0.4, 0.7), (0.2, 0.3)]):
        d = tmp_path / f"seed_{s}"
        d.mkdir()
        rows = []
        for n in (1, 2, 4, 8, 16):
            rows += [_rerank(sp, "none", m, n, maj) for sp in ("easy", "hard")
                     for m in ("majority", "oracle")]
            rows += [_rerank(sp, "prm", m, n, prm) for sp in ("easy", "hard")
                     for m in ("weighted", "best_of_n")]
        evaluate = [{"level": "4", "criterion": "answer", "decoding": "greedy",
                     "metric": "accuracy", "k": 1, "value": maj, "problems": 200}]
        (d / "results.json").write_text(json.dumps({"rerank": {"rows": rows},
                                                    "evaluate": {"rows": evaluate}}))
        runs.append(d)
    out = tmp_path / "agg"
    agg = aggregate_runs(runs, out, title="t")
    row = next(r for r in agg["rerank"]["rows"] if r["split"] == "hard"
               and r["evaluator"] == "prm" and r["method"] == "weighted" and r["n"] == 16)
    assert row["mean"] == pytest.approx(0.5)
    assert row["std"] == pytest.approx(np.std([0.5, 0.7, 0.3]))
    report = (out / "report.md").read_text()
    assert "50.0 ± 16.3" in report and "| 4 | 30.0 ± 8.2 |" in report
    assert (out / "figures" / "rerank_accuracy_vs_n.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["runs"]["rows"][0]["run"] == str(runs[0])
    assert "every step verified" not in report  # runs without the row do not get one
    main([str(d) for d in runs] + ["--out", str(tmp_path / "cli"), "--title", "t"])
    assert (tmp_path / "cli" / "results.json").read_text() == (out / "results.json").read_text()


def test_aggregate_runs_names_unfinished_runs(tmp_path):
    (tmp_path / "seed_0").mkdir()
    with pytest.raises(FileNotFoundError, match="seed_0"):
        aggregate_runs([tmp_path / "seed_0"], tmp_path / "agg")


def test_rl_rows_average_wall_s_over_seeds_and_report_table2(tmp_path):
    """`wall_s` differs per run: it is averaged, not part of the key (else 3 rows per key)."""
    runs = []
    for s, (acc, wall) in enumerate([(0.2, 60.0), (0.3, 70.0), (0.4, 110.0)]):
        d = tmp_path / f"seed_{s}"
        d.mkdir()
        rows = [{"method": m, "split": sp, "mean": a, "std": 0.0, "seeds": 1, "problems": 400,
                 "wall_s": w}
                for m, a, w in (("sft", 0.25, 0.0), ("grpo_prm", acc, wall))
                for sp in ("easy", "hard", "all")]
        (d / "results.json").write_text(json.dumps({"rl": {"rows": rows}}))
        runs.append(d)
    agg = aggregate_runs(runs, tmp_path / "agg")
    rows = agg["rl"]["rows"]
    assert len(rows) == 6
    hard = next(r for r in rows if r["method"] == "grpo_prm" and r["split"] == "hard")
    assert set(hard) == {"method", "split", "mean", "std", "seeds", "values", "wall_s",
                         "wall_s_values"}
    assert hard["seeds"] == 3 and hard["wall_s"] == pytest.approx(80.0)
    assert hard["mean"] == pytest.approx(0.3) and hard["std"] == pytest.approx(np.std([.2, .3, .4]))
    report = (tmp_path / "agg" / "report.md").read_text()
    assert "Table 2 layout" in report
    assert "| GRPO, all problems + PRM | easy | all | 30.0 ± 8.2 | 30.0 ± 8.2 | 30.0 ± 8.2 | 80 |" \
        in report


def test_ci_bounds_are_values_not_keys():
    """The eva stage's rows carry a per-run bootstrap interval: runs of one key still group."""
    def row(mean, lo, hi):
        return {"loss": "dpo", "variant": "eva", "informativeness": "gap", "metric": "winrate",
                "mean": mean, "std": 0.0, "ci_low": lo, "ci_high": hi, "seeds": 1}
    rows = aggregate_rows([[row(0.5, 0.4, 0.6)], [row(0.7, 0.6, 0.8)]])
    assert len(rows) == 1
    (r,) = rows
    assert r["seeds"] == 2 and r["mean"] == pytest.approx(0.6) and r["std"] == pytest.approx(0.1)
    assert r["ci_low"] == pytest.approx(0.5) and r["ci_high"] == pytest.approx(0.7)
    assert r["ci_low_values"] == "0.4,0.6" and r["ci_high_values"] == "0.6,0.8"


def test_aggregate_reports_every_step_oracle_where_runs_have_it(tmp_path):
    runs = []
    for s, every in enumerate((0.25, 0.35)):
        d = tmp_path / f"seed_{s}"
        d.mkdir()
        rows = [_rerank("hard", "none", m, n, v) for n in (1, 2)
                for m, v in (("majority", 0.2), ("oracle", 0.5), ("oracle_all_steps", every))]
        (d / "results.json").write_text(json.dumps({"rerank": {"rows": rows}}))
        runs.append(d)
    aggregate_runs(runs, tmp_path / "agg", title="t")
    report = (tmp_path / "agg" / "report.md").read_text()
    line = next(x for x in report.splitlines() if "every step verified" in x)
    assert "30.0 ± 5.0" in line


def test_aggregate_report_shows_largest_pass_k_and_planning_table(tmp_path):
    runs = []
    for s, (greedy, p64) in enumerate(((0.40, 0.90), (0.50, 0.70))):
        d = tmp_path / f"seed_{s}"
        d.mkdir()
        evaluate = [{"level": "hard", "criterion": c, "decoding": "temperature=1",
                     "metric": f"pass@{k}", "k": k, "value": p64 - (64 - k) / 100, "problems": 9}
                    for c in ("answer", "all_steps") for k in (16, 64)]
        evaluate.append({"level": "hard", "criterion": "answer", "decoding": "greedy",
                         "metric": "accuracy", "k": 1, "value": greedy, "problems": 9})
        planning = [{"level": 1, "horizon": 1, "metric": "greedy", "value": greedy,
                     "problems": 5},
                    {"level": 1, "horizon": 1, "metric": "random_filling", "value": 0.3,
                     "problems": 5}]
        (d / "results.json").write_text(json.dumps({"evaluate": {"rows": evaluate},
                                                    "evaluate_planning": {"rows": planning}}))
        runs.append(d)
    aggregate_runs(runs, tmp_path / "agg", title="t")
    report = (tmp_path / "agg" / "report.md").read_text()
    assert "| level | greedy | pass@64 | pass@64, all steps |" in report
    assert "| hard | 45.0 ± 5.0 | 80.0 ± 10.0 | 80.0 ± 10.0 |" in report
    assert "| 1 | 1 | 45.0 ± 5.0 | 30.0 ± 0.0 |" in report
