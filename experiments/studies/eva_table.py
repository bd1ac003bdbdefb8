"""Collect eva_stepmath runs into eva's headline table, the informativeness ablation and eva x e2h.

    python experiments/studies/eva_table.py runs/eva_stepmath \
        --out experiments/results/eva_stepmath_2026-12-04

reads every `STUDY/<name>/seed_<s>/results.json` whose `<name>` is an
`experiments/configs/eva_stepmath.py` argument (`dpo_fixed`, `dpo_eva`, `dpo_eva_var`,
`dpo_eva_prm`, ...; `sft` is skipped) and writes into `--out`:

  results.json  {"eva": {"rows": [...]}, "eva_pool": {"rows": [...]}, "runs": {"rows": [...]}}:
                the eva stage's rows aggregated over seeds (`scalign.aggregate.aggregate_rows`:
                mean, population std over seeds, per-seed values; ci_low / ci_high = the mean
                of the per-seed bootstrap bounds, each seed's in ci_*_values); the starting
                policy's rows ("variant": "sft") once per seed; pool level shares per
                (loss, variant, informativeness, iteration, level);
  report.md     the headline table in the layout of eva's (loss -> fixed prompts -> + eva),
                the DPO informativeness ablation, eva x easy-to-hard (PRM reward), the level
                shares of the prompt set per iteration (table + PNG) and what ran;
  runs/<name>/seed_<s>/  each run's report.md, results.json and figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np

from scalign.aggregate import aggregate_rows
from scalign.reporting import line_plot, markdown_table

ROOT = Path(__file__).resolve().parents[2]
LOSS_ORDER = ("dpo", "simpo", "orpo", "sppo", "ipo", "hinge")
ABLATION = ("gap", "maxmean", "var", "loo", "uniform", "loo_abs", "dts", "mean", "mean_inv")
METRIC_LABEL = {"winrate": "win rate vs SFT", "hard_acc": "hard acc (L4-5)",
                "all_acc": "all acc (L1-5)"}


def _parse():
    spec = importlib.util.spec_from_file_location(
        "eva_stepmath_cfg", ROOT / "experiments" / "configs" / "eva_stepmath.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.parse


def collect(study: Path, suffix: str = "") -> dict[str, dict[int, dict]]:
    """{run name: {seed: results.json}} of the finished eva runs under `study` whose directory
    is `<config arg><suffix>` (suffix "": the main study; e.g. "_lr3e-4": a sensitivity run
    made with --config.eva.optimizer.learning_rate=3e-4)."""
    parse = _parse()
    runs: dict[str, dict[int, dict]] = {}
    for d in sorted(study.iterdir()):
        if not d.is_dir() or d.name == "sft":
            continue
        base = d.name
        if suffix:
            if not base.endswith(suffix):
                continue
            base = base[:-len(suffix)]
        try:
            parse(base)
        except ValueError:
            continue
        for s in sorted(d.glob("seed_*")):
            f = s / "results.json"
            if f.exists() and (s / "report.md").exists():  # finished (the report is last)
                res = json.loads(f.read_text())
                if res.get("eva", {}).get("rows"):
                    runs.setdefault(d.name, {})[int(s.name.split("_")[1])] = res
    return runs


def aggregate(runs: dict[str, dict[int, dict]]) -> tuple[list[dict], list[dict]]:
    """(eva rows, pool rows) aggregated over seeds."""
    by_key: dict[tuple, list[list[dict]]] = {}
    sft_by_seed: dict[int, list[dict]] = {}
    pool_runs: dict[tuple, list[list[dict]]] = {}
    for seeds in runs.values():
        for seed, res in seeds.items():
            rows = res["eva"]["rows"]
            trained = [r for r in rows if r["variant"] != "sft"]
            key = (trained[0]["loss"], trained[0]["variant"], trained[0]["informativeness"])
            by_key.setdefault(key, []).append(trained)
            sft_by_seed.setdefault(seed, [{**r, "loss": "none"} for r in rows
                                          if r["variant"] == "sft"])
            pool = [{"loss": key[0], "variant": key[1], "informativeness": key[2],
                     "iteration": r["iteration"], "level": r["level"], "value": r["share"]}
                    for r in res.get("eva_pool", {}).get("rows", [])]
            pool_runs.setdefault(key, []).append(pool)
    rows = aggregate_rows([sft_by_seed[s] for s in sorted(sft_by_seed)])
    for key in sorted(by_key, key=_order):
        rows += aggregate_rows(by_key[key])
    pool_rows = []
    for key in sorted(pool_runs, key=_order):
        pool_rows += aggregate_rows(pool_runs[key])
    return rows, pool_rows


def _order(key: tuple) -> tuple:
    loss, variant, info = key
    return (LOSS_ORDER.index(loss) if loss in LOSS_ORDER else 99,
            ("fixed", "eva", "fixed_prm", "eva_prm").index(variant),
            ABLATION.index(info) if info in ABLATION else -1)


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    ci = f" [{row['ci_low']:.3f}, {row['ci_high']:.3f}]" if "ci_low" in row else ""
    return f"{row['mean']:.3f} ± {row['std']:.3f} (n={row['seeds']}){ci}"


def paired_diffs(runs: dict[str, dict[int, dict]], a: str, b: str, metric: str
                 ) -> list[float]:
    """Per-seed difference (run a - run b) of `metric` over the seeds both ran."""
    def value(res: dict) -> float | None:
        return next((r["mean"] for r in res["eva"]["rows"]
                     if r["metric"] == metric and r["variant"] != "sft"), None)
    common = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
    pairs = [(value(runs[a][s]), value(runs[b][s])) for s in common]
    return [x - y for x, y in pairs if x is not None and y is not None]


def _diff_cell(d: list[float]) -> str:
    if not d:
        return "-"
    return (f"{np.mean(d):+.3f} ± {np.std(d):.3f} (n={len(d)}; per seed "
            + ", ".join(f"{x:+.3f}" for x in d) + ")")


def report(rows: list[dict], pool_rows: list[dict], runs: dict, out: Path,
           sensitivity: dict[str, tuple[list[dict], dict]] | None = None) -> str:
    idx = {(r["loss"], r["variant"], r["informativeness"], r["metric"]): r for r in rows}
    seeds = {name: sorted(s) for name, s in runs.items()}
    md = ["# eva on stepmath: fixed prompts vs evolved prompts (Ye et al. 2024 layout)", "",
          "Every number: mean ± population std over seeds (n = seeds), then in brackets the mean "
          "over seeds of each run's bootstrap 95% CI over held-out problems (per-seed bounds in "
          "results.json). Win rate: trained policy vs the SFT policy it started from, judged by "
          "the verifier reward (0.5 answer + 0.5 valid-prefix share), 4 samples per problem, "
          "ties half, 500 test problems (100 per level 1-5). Accuracies: greedy.", ""]
    losses = [lo for lo in LOSS_ORDER if any(k[0] == lo for k in idx)]
    for metric in ("winrate", "hard_acc", "all_acc"):
        table = []
        for loss in losses:
            table.append({"loss": loss,
                          "SFT": "0.500 (by definition)" if metric == "winrate" else
                          _cell(idx.get(("none", "sft", "none", metric))),
                          "fixed prompts": _cell(idx.get((loss, "fixed", "none", metric))),
                          "+ eva (gap)": _cell(idx.get((loss, "eva", "gap", metric))),
                          "eva - fixed (paired by seed)": _diff_cell(paired_diffs(
                              runs, f"{loss}_eva", f"{loss}_fixed", metric))})
        md += [f"## Headline: {METRIC_LABEL[metric]}", "",
               markdown_table(table, ["loss", "SFT", "fixed prompts", "+ eva (gap)",
                                      "eva - fixed (paired by seed)"]), ""]
    abl = [{"informativeness": info, **{METRIC_LABEL[m]: _cell(idx.get(("dpo", "eva", info, m)))
                                         for m in METRIC_LABEL}}
           for info in ABLATION if any(k[:3] == ("dpo", "eva", info) for k in idx)]
    if abl:
        md += ["## Informativeness ablation (DPO, eva)", "",
               markdown_table(abl, ["informativeness", *METRIC_LABEL.values()]), ""]
    e2h = [{"variant": v, "reward": "PRM (easy-trained)" if v.endswith("prm") else "verifier",
            **{METRIC_LABEL[m]: _cell(idx.get((lo, v, "none" if v.startswith("fixed")
                                               else "gap", m))) for m in METRIC_LABEL}}
           for lo in ("dpo",) for v in ("fixed", "eva", "fixed_prm", "eva_prm")
           if any(k[:2] == (lo, v) for k in idx)]
    if any(r["variant"].endswith("prm") for r in e2h):
        md += ["## eva x easy-to-hard (DPO; the creator and the pairs use the easy-trained PRM, "
               "min step score; no gold answer read)", "",
               markdown_table(e2h, ["variant", "reward", *METRIC_LABEL.values()]), ""]
    # level shares per iteration
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    groups = sorted({(r["loss"], r["variant"], r["informativeness"]) for r in pool_rows
                     if r["variant"].startswith("eva")}, key=_order)
    for g in groups:
        pr = [r for r in pool_rows if (r["loss"], r["variant"], r["informativeness"]) == g]
        its = sorted({r["iteration"] for r in pr})
        levels = sorted({r["level"] for r in pr})
        v = {(r["iteration"], r["level"]): r for r in pr}
        table = [{"iteration": k, **{f"L{lv}": f"{v[(k, lv)]['mean']:.2f} ± "
                                      f"{v[(k, lv)]['std']:.2f}" if (k, lv) in v else "-"
                                      for lv in levels}} for k in its]
        name = "_".join(g)
        fig = fig_dir / f"pool_levels_{name}.png"
        line_plot(fig, {f"L{lv}": (its, [v[(k, lv)]["mean"] if (k, lv) in v else np.nan
                                          for k in its]) for lv in levels},
                  errors={f"L{lv}": [v[(k, lv)]["std"] if (k, lv) in v else 0.0 for k in its]
                          for lv in levels},
                  title=f"level shares of the active prompts: {g[0]} {g[1]} ({g[2]})",
                  xlabel="iteration", ylabel="share (mean ± std over seeds)")
        md += [f"## Prompt-set levels per iteration: {g[0]} {g[1]} ({g[2]})", "",
               "Iteration 0 is the initial set (20 problems of each easy level 1-3).", "",
               markdown_table(table, ["iteration", *[f"L{lv}" for lv in levels]]), "",
               f"![levels]({fig.relative_to(out)})", ""]
    for tag, (srows, sruns) in (sensitivity or {}).items():
        sidx = {(r["loss"], r["variant"], r["informativeness"], r["metric"]): r for r in srows}
        table = [{"run": f"{lo}_{v}{tag}", **{METRIC_LABEL[m]: _cell(sidx.get((lo, v, i, m)))
                                              for m in METRIC_LABEL}}
                 for lo, v, i in sorted({k[:3] for k in sidx if k[1] != "sft"}, key=_order)]
        md += [f"## Sensitivity: runs with suffix {tag} (same SFT policies, one change)", "",
               markdown_table(table, ["run", *METRIC_LABEL.values()]), ""]
        seeds.update({n: sorted(x) for n, x in sruns.items()})
    md += ["## Runs", "", markdown_table([{"run": n, "seeds": ",".join(map(str, s))}
                                          for n, s in sorted(seeds.items())],
                                         ["run", "seeds"]), ""]
    return "\n".join(md) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sensitivity", nargs="*", default=[],
                        help="directory suffixes of sensitivity runs, e.g. _lr3e-4")
    args = parser.parse_args(argv)
    runs = collect(args.study)
    if not runs:
        raise SystemExit(f"no finished eva runs under {args.study}")
    rows, pool_rows = aggregate(runs)
    sens = {}
    for tag in args.sensitivity:
        sruns = collect(args.study, tag)
        if sruns:
            sens[tag] = (aggregate(sruns)[0], sruns)
    args.out.mkdir(parents=True, exist_ok=True)
    copies = dict(runs)
    copies.update({n: r for _, sr in sens.values() for n, r in sr.items()})
    for name, seeds in copies.items():
        for seed in seeds:
            src = args.study / name / f"seed_{seed}"
            dst = args.out / "runs" / name / f"seed_{seed}"
            dst.mkdir(parents=True, exist_ok=True)
            for f in ("report.md", "results.json"):
                shutil.copy(src / f, dst / f)
            if (src / "figures").is_dir():
                shutil.copytree(src / "figures", dst / "figures", dirs_exist_ok=True)
    run_rows = [{"run": n, "seed": s} for n, ss in sorted(copies.items()) for s in sorted(ss)]
    out = {"eva": {"rows": rows}, "eva_pool": {"rows": pool_rows}, "runs": {"rows": run_rows}}
    for tag, (srows, _) in sens.items():
        out[f"eva{tag}"] = {"rows": srows}
    (args.out / "results.json").write_text(json.dumps(out, indent=1))
    (args.out / "report.md").write_text(report(rows, pool_rows, runs, args.out, sens))
    print(f"wrote {args.out}/report.md and results.json ({len(run_rows)} runs)")


if __name__ == "__main__":
    main()
