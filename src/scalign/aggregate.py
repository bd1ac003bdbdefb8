"""Aggregate runs of one config over seeds: mean ± std across independent runs.

A study such as `experiments/configs/e2h_stepmath.py` is run once per seed (each run has its
own data draw, SFT policy, evaluators and samples), e.g. with
`python experiments/launch.py --config=... --workdir=runs/x --seeds=0,1,2`, which writes
`runs/x/seed_0/`, `runs/x/seed_1/`, ... and then calls `aggregate_runs` (or, for runs made
separately, `python -m scalign.aggregate RUN_DIR ... --out DIR`). The aggregate
`results.json` holds, for every stage, one row per key of the per-seed rows with

    {<key fields>, "mean": mean over seeds, "std": population std over seeds,
     "seeds": number of runs, "values": "v_0,v_1,..." (per seed, in run order)}

where the per-seed number is the row's `value` (or `mean`, for rows that already average over
sample subsets, such as `rerank`). Key fields are every field except the number, the
bookkeeping counts (`std`, `seeds`, `problems`, `count`) and the per-run side numbers that
travel with a row's number without identifying it -- the measured `wall_s` (RL) and the
bootstrap interval bounds `ci_low` / `ci_high` (eva): the aggregate row has their mean over the
runs that have them and each run's in `<field>_values`. `report.md` shows the rerank
table in the layout of Sun et al. (2024), Table 1, accuracy vs N per split, accuracy by level,
the evaluators' AUCs and the RL table in the layout of Table 2, each as mean ± std over seeds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from scalign.evaluation.rerank import ORACLE_ALL_STEPS, plot_style, table1_methods
from scalign.evaluation.rl_table import table2
from scalign.reporting import markdown_table, panels_plot

_NUMBER_FIELDS = ("value", "mean")
_COUNT_FIELDS = ("std", "seeds", "problems", "count")
#: per-run side numbers of a row (not part of its key): averaged over runs, each run's value
#: kept in "<field>_values"
_AVERAGED_FIELDS = ("wall_s", "ci_low", "ci_high")


def _key(row: dict[str, Any], number: str) -> tuple[tuple[str, Any], ...]:
    return tuple((k, v) for k, v in row.items() if k != number
                 and k not in _COUNT_FIELDS and k not in _AVERAGED_FIELDS)


def aggregate_rows(per_run: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of one stage from several runs -> one row per key with mean/std over runs.

    Rows without a `value`/`mean` number are dropped; a key missing from some runs is
    aggregated over the runs that have it (its `seeds` says how many)."""
    groups: dict[tuple, list[float]] = {}
    side: dict[tuple, dict[str, list[float]]] = {}
    order: list[tuple] = []
    for rows in per_run:
        for row in rows:
            number = next((f for f in _NUMBER_FIELDS if isinstance(row.get(f), (int, float))
                           and not isinstance(row.get(f), bool)), None)
            if number is None:
                continue
            key = _key(row, number)
            if key not in groups:
                groups[key] = []
                order.append(key)
            groups[key].append(float(row[number]))
            for f in _AVERAGED_FIELDS:
                if isinstance(row.get(f), (int, float)) and not isinstance(row.get(f), bool):
                    side.setdefault(key, {}).setdefault(f, []).append(float(row[f]))
    out = []
    for key in order:
        vals = np.asarray(groups[key], np.float64)
        agg = {**dict(key), "mean": float(vals.mean()), "std": float(vals.std()),
               "seeds": int(vals.size), "values": ",".join(f"{v:.6g}" for v in vals)}
        for f, xs in side.get(key, {}).items():
            agg[f] = float(np.mean(xs))
            agg[f"{f}_values"] = ",".join(f"{v:.6g}" for v in xs)
        out.append(agg)
    return out


def _pm(row: dict[str, Any] | None, scale: float = 100.0, digits: int = 1) -> str:
    if row is None:
        return "-"
    return f"{scale * row['mean']:.{digits}f} ± {scale * row['std']:.{digits}f}"


def _index(rows: list[dict[str, Any]], *fields: str) -> dict[tuple, dict[str, Any]]:
    return {tuple(r.get(f) for f in fields): r for r in rows}


def aggregate_runs(run_dirs: Sequence[str | epath.PathLike], out_dir: str | epath.PathLike,
                   *, title: str | None = None, plot_aggregation: str = "prod") -> dict:
    """Read `results.json` of every run dir, write the aggregate `results.json` and `report.md`
    (with figures) into `out_dir`, and return the aggregate results."""
    runs = [epath.Path(d) for d in run_dirs]
    missing = [str(d / "results.json") for d in runs if not (d / "results.json").exists()]
    if missing:
        raise FileNotFoundError(f"runs without results.json (not finished?): {missing}")
    results = [json.loads((d / "results.json").read_text()) for d in runs]
    stages = list(dict.fromkeys(s for r in results for s in r))
    agg = {s: {"rows": aggregate_rows([r.get(s, {}).get("rows", []) for r in results])}
           for s in stages}
    agg["runs"] = {"rows": [{"run": str(d)} for d in runs]}
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(agg, indent=1))
    (out / "report.md").write_text(_report(agg, runs, out, title, plot_aggregation))
    return agg


def _report(agg: dict, runs: list[epath.Path], out: epath.Path, title: str | None,
            plot_aggregation: str) -> str:
    n_runs = len(runs)
    md = [f"# {title or 'Aggregate over seeds'}", "",
          f"{n_runs} independent runs (each: its own data draw, SFT policy, evaluators and "
          f"samples); every number is mean ± std over runs (population std). Per-run reports: "
          + ", ".join(f"`{d.name}/report.md`" for d in runs) + ".", ""]
    ev = agg.get("evaluate", {}).get("rows", [])
    if ev:
        md += _evaluate_table(ev)
    pl = agg.get("evaluate_planning", {}).get("rows", [])
    if pl:
        md += _planning_table(pl)
    rr = agg.get("rerank", {}).get("rows", [])
    if rr:
        md += _rerank_section(rr, out, plot_aggregation)
    rl = agg.get("rl", {}).get("rows", [])
    if rl:
        md += ["## RL from easy-trained evaluators (Sun et al. 2024, Table 2 layout)", "",
               table2(rl), ""]
    au = agg.get("evaluators", {}).get("rows", [])
    if au:
        rows = [{"evaluator": r["evaluator"].upper(), "split": r["split"], "kind": r["kind"],
                 "aggregation": r["aggregation"], "AUC": _pm(r, 1.0, 3), "seeds": r["seeds"]}
                for r in au if r["kind"] == "step_auc"
                or r["aggregation"] in (plot_aggregation, "last")]
        md += ["## Evaluator ROC-AUC on sampled test solutions", "",
               markdown_table(rows, ["evaluator", "split", "kind", "aggregation", "AUC",
                                     "seeds"]), ""]
    return "\n".join(md) + "\n"


def _evaluate_table(rows: list[dict[str, Any]]) -> list[str]:
    idx = _index(rows, "level", "criterion", "decoding", "metric")
    levels = sorted({r["level"] for r in rows}, key=str)
    # the largest pass@k of the runs (config.evaluate.pass_n), at their sampling temperature
    sampled = [r for r in rows if str(r.get("metric", "")).startswith("pass@")]
    top = max(sampled, key=lambda r: int(r["k"]), default=None)
    passk = [] if top is None else [
        (top["metric"], ("answer", top["decoding"], top["metric"])),
        (f"{top['metric']}, all steps", ("all_steps", top["decoding"], top["metric"]))]
    wanted = [(label, key) for label, key in (
        ("greedy", ("answer", "greedy", "accuracy")),
        ("greedy, all steps", ("all_steps", "greedy", "accuracy")), *passk)
        if any((lv, *key) in idx for lv in levels)]
    table = [{"level": lv, **{label: _pm(idx.get((lv, *key))) for label, key in wanted}}
             for lv in levels]
    return ["## SFT policy by level (%)", "",
            markdown_table(table, ["level", *[label for label, _ in wanted]]), ""]


def _planning_table(rows: list[dict[str, Any]]) -> list[str]:
    idx = _index(rows, "level", "horizon", "metric")
    keys = sorted({(r["level"], r["horizon"]) for r in rows})
    table = [{"level": lv, "horizon": h, "greedy": _pm(idx.get((lv, h, "greedy"))),
              "random filling": _pm(idx.get((lv, h, "random_filling")))} for lv, h in keys]
    return ["## SFT policy by planning horizon, greedy (%)", "",
            "Horizon: operations from the first \"?\" to the end (1 = a local choice). "
            "Random filling: the accuracy of a solver that computes every step right and fills "
            "the \"?\"s at random, on the same problems.", "",
            markdown_table(table, ["level", "horizon", "greedy", "random filling"]), ""]


def _rerank_section(rows: list[dict[str, Any]], out: epath.Path, agg_name: str) -> list[str]:
    paired = _index([r for r in rows if "stat" in r], "split", "evaluator", "method",
                    "aggregation", "n", "stat")
    rows = [r for r in rows if "stat" not in r]
    idx = _index(rows, "split", "evaluator", "method", "aggregation", "n")
    splits = list(dict.fromkeys(r["split"] for r in rows))
    ns = sorted({int(r["n"]) for r in rows})
    evaluators = [e for e in ("orm", "prm", "oprm") if any(r["evaluator"] == e for r in rows)]
    show = [n for n in (16, 64) if n in ns] or [ns[-1]]
    methods = table1_methods(evaluators, agg_name,
                             any(r["method"] == ORACLE_ALL_STEPS for r in rows))
    table = []
    for label, e, m, a in methods:
        row = {"method": label}
        for s in splits:
            for n in show:
                row[f"{s} N={n}"] = _pm(idx.get((s, e, m, a, n)))
        table.append(row)
    panels = {}
    for s in splits:
        series = {}
        for label, e, m, a in methods:
            pts = [idx.get((s, e, m, a, n)) for n in ns]
            if all(p is not None for p in pts):
                series[label] = (ns, [p["mean"] for p in pts], [p["std"] for p in pts])
        panels[s] = series
    styles = {label: plot_style(e, m) for label, e, m, _ in methods}
    fig = out / "figures" / "rerank_accuracy_vs_n.png"
    fig.parent.mkdir(parents=True, exist_ok=True)
    panels_plot(fig, panels, title=f"Re-ranking with easy-trained evaluators, mean ± std over "
                f"seeds (aggregation {agg_name})", xlabel="N (samples per problem)",
                ylabel="accuracy", styles=styles)
    diff_table = []
    for label, e, m, a in methods[1:]:
        row = {"method": label}
        for s in splits:
            for n in show:
                d = paired.get((s, e, m, a, n, "diff_to_majority"))
                lo = paired.get((s, e, m, a, n, "diff_ci_low"))
                hi = paired.get((s, e, m, a, n, "diff_ci_high"))
                row[f"{s} N={n}"] = "-" if None in (d, lo, hi) else (
                    f"{_pm(d)} (CI low per seed: {_per_seed(lo)}; high: {_per_seed(hi)})")
        diff_table.append(row)
    cols = ["method", *[f"{s} N={n}" for s in splits for n in show]]
    md = ["## Re-ranking (Sun et al. 2024, Table 1 layout), accuracy %", "",
          markdown_table(table, cols), ""]
    if paired:
        md += ["Paired difference to majority voting (points, mean ± std over seeds; same "
               "samples and subsets per seed), with each seed's 95% bootstrap CI over problems:",
               "", markdown_table(diff_table, cols), ""]
    return md + [f"![accuracy vs N]({fig.relative_to(out)})", ""]


def _per_seed(row: dict[str, Any]) -> str:
    return "/".join(f"{100 * float(v):+.1f}" for v in str(row["values"]).split(","))


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m scalign.aggregate RUN_DIR [RUN_DIR ...] --out DIR`: aggregate finished runs."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m scalign.aggregate",
                                     description=main.__doc__)
    parser.add_argument("runs", nargs="+", help="run directories with results.json")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--title", default=None)
    parser.add_argument("--plot_aggregation", default="prod")
    args = parser.parse_args(argv)
    aggregate_runs(args.runs, args.out, title=args.title, plot_aggregation=args.plot_aggregation)
    print(f"wrote {args.out}/results.json and {args.out}/report.md")


if __name__ == "__main__":
    main()
