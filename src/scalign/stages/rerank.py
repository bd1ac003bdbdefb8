"""Stage `rerank`: easy-trained evaluators re-rank N policy samples on easy and hard problems.

Sun et al. (2024), Sec. 4 / Figures 4-5 / Table 1: for N in {1, 2, 4, ..., max_n} the accuracy
of majority voting, best-of-N and weighted voting with each evaluator (ORM, PRM, OPRM) and each
step-score aggregation (min, prod, mean, max, last), on the easy levels, the hard levels and
all. For every seed, `max_n` solutions are sampled per test problem once; accuracy at N is the
mean over `num_subsets` random N-subsets. The subsets are drawn ONCE per (split, seed, N) and
shared by every method (`evaluation.rerank.draw_subsets` / `rerank_correct`), so methods are
compared paired. Where the domain's verifier checks steps (stepmath), the pass@N oracle also
has an every-step-verified variant (method `oracle_all_steps`: some solution of the subset has
every step and the answer right), the policy's pass@N in the sense of issue 15's targets; the
answer-only oracle also counts right answers under wrong steps. Across seeds (independent
sample sets) rows report mean and std of the per-seed means; with one seed, std is over
subsets.

Besides the accuracy rows (`mean`), every non-majority method gets three rows with a `stat`
field and a `value`: `diff_to_majority` (paired accuracy difference to majority voting on the
same samples and subsets), `diff_ci_low` / `diff_ci_high` (95% percentile bootstrap CI over
problems, `config.rerank.bootstrap_samples` resamples, default 2000; problems of all in-run
seeds pooled).

A PRM/OPRM step score is read at the step delimiter's first token (`step_read="end"`, default)
or, as in the easy-to-hard code, as the minimum of the probabilities at the three positions
around it (`"around_min"`: sigma is monotone, so this is sigma of the min logit); the answer
segment is read at its last token.

`problems_per_level` is one count for every level or a tuple with one count per entry of
`levels` (e.g. fewer easy and more hard problems, where the effect is measured).

Also the evaluators' ROC-AUCs on the sampled test solutions (`results.json["evaluators"]`):
step AUC over steps up to and including the first wrong one (the PRM800K labelling), and
outcome AUC of each aggregated solution score against final-answer correctness.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from scalign.algorithms.reward_labels import score_positions
from scalign.evaluation.generation import sample_solutions
from scalign.evaluation.metrics import powers_of_two_upto
from scalign.evaluation.rerank import (
    AGGREGATIONS,
    ORACLE_ALL_STEPS,
    aggregate,
    answer_ids,
    draw_subsets,
    pad_steps,
    paired_bootstrap_diff,
    plot_style,
    rerank_correct,
    roc_auc,
    table1_methods,
)
from scalign.evaluation.scoring import SequenceScorer
from scalign.reporting import markdown_table, panels_plot
from scalign.sampling import Sampler
from scalign.stages.base import Context, Stage, check_levels, register_stage, require_block


@dataclasses.dataclass
class LevelSamples:
    """One seed's samples of one level, graded and scored."""

    answers: list[list[object]]        # [P][K] canonical answer keys (None = missing)
    correct: np.ndarray                # [P, K] bool
    verified: np.ndarray               # [P, K] bool: every step and the answer right
    step_labels: list[list[list[int]]]  # [P][K][steps] verifier labels
    step_scores: dict[str, list[list[list[float]]]]  # kind -> [P][K][reads] probabilities
    step_verified: bool = False        # the domain's verifier checks steps (stepmath)


def _solution_scores(step_scores: list[list[list[float]]], agg: str) -> np.ndarray:
    P = len(step_scores)
    K = len(step_scores[0]) if P else 0
    flat = [s for row in step_scores for s in row]
    padded, mask = pad_steps(flat)
    return np.asarray(aggregate(padded, agg, mask)).reshape(P, K)


def per_level_counts(cfg: ml_collections.ConfigDict) -> list[int]:
    """`problems_per_level` as one count per entry of `levels`."""
    counts = cfg.problems_per_level
    if isinstance(counts, (tuple, list)):
        return [int(c) for c in counts]
    return [int(counts)] * len(tuple(cfg.levels))


@register_stage
class RerankStage(Stage):
    name = "rerank"
    requires = {"policy": ("sft", "checkpoint"), "reward_models": ("reward_models",),
                "tokenizer": ("data", "checkpoint"), "domain": ("data",)}

    def validate(self, config: ml_collections.ConfigDict, mesh_shape: dict[str, int],
                 errors: list[str]) -> None:
        cfg = require_block(config, "rerank", (
            "levels", "problems_per_level", "max_n", "temperature", "seeds", "num_subsets",
            "max_new_tokens"), errors)
        if cfg is None:
            return
        check_levels(config, "rerank.levels", errors)
        counts = cfg.get("problems_per_level")
        if isinstance(counts, (tuple, list)) and len(counts) != len(tuple(cfg.get("levels", ()))):
            errors.append(f"config.rerank.problems_per_level has {len(counts)} counts for "
                          f"{len(tuple(cfg.levels))} levels: give one count, or one per level")
        if cfg.get("max_n", 1) < 1:
            errors.append(f"config.rerank.max_n={cfg.max_n} must be >= 1")
        if cfg.get("step_read", "end") not in ("end", "around_min"):
            errors.append(f"config.rerank.step_read must be 'end' or 'around_min', got "
                          f"{cfg.get('step_read')!r}")
        bad = [a for a in cfg.get("aggregations", AGGREGATIONS) if a not in AGGREGATIONS]
        if bad:
            errors.append(f"config.rerank.aggregations has unknown entries {bad}; "
                          f"use {AGGREGATIONS}")

    # ----------------------------------------------------------------- sampling
    def _collect(self, ctx: Context, seed: int) -> dict[int, LevelSamples]:
        cfg = ctx.config.rerank
        model, params = ctx.need("policy")
        tokenizer = ctx.need("tokenizer")
        domain = ctx.need("domain")
        rms = ctx.need("reward_models")
        sampler = Sampler(model, params, tokenizer, mesh=ctx.mesh,
                          max_new_tokens=int(cfg.max_new_tokens))
        scorers = {k: SequenceScorer(m, p, ctx.mesh, pad_id=tokenizer.pad_id,
                                     batch_size=int(cfg.get("score_batch_size", 128)))
                   for k, (m, p) in rms.items()}
        token_bytes = tokenizer.token_bytes()
        around = cfg.get("step_read", "end") == "around_min"
        out = {}
        for lv, count in zip(cfg.levels, per_level_counts(cfg), strict=True):
            problems = list(domain.test_problems(lv))[:count]
            sols = sample_solutions(sampler, domain, problems, n=int(cfg.max_n),
                                    key=ctx.key(self.name, "samples", seed, lv),
                                    temperature=float(cfg.temperature),
                                    max_new_tokens=int(cfg.max_new_tokens),
                                    batch_rows=int(cfg.get("batch_size", 512)),
                                    desc=f"seed {seed} L{lv} x{int(cfg.max_n)}")
            P, K = len(problems), int(cfg.max_n)
            positions = [[score_positions(token_bytes, sols.prompt_ids[i], sols.response_ids(i, j),
                                          sols.texts[i][j], domain.parse(sols.texts[i][j]))
                          for j in range(K)] for i in range(P)]
            seqs = [positions[i][j].tokens for i in range(P) for j in range(K)]
            scores: dict[str, list[list[list[float]]]] = {}
            for kind, scorer in scorers.items():
                probs = scorer.score(seqs, desc=f"{kind} L{lv}")
                table = []
                for i in range(P):
                    row = []
                    for j in range(K):
                        pos, pr = positions[i][j], probs[i * K + j]
                        if kind == "orm":
                            row.append([float(pr[pos.final_position])])
                            continue
                        if around:  # min of the probabilities at p-1, p, p+1 = sigma(min logit)
                            steps = [float(pr[max(r - 1, 0): r + 2].min())
                                     for r in pos.step_positions]
                        else:
                            steps = [float(pr[r]) for r in pos.step_positions]
                        if pos.answer_position is not None:
                            steps.append(float(pr[pos.answer_position]))
                        row.append(steps)
                    table.append(row)
                scores[kind] = table
            out[lv] = LevelSamples(
                answers=[[domain.answer_key(v.answer) for v in row] for row in sols.verdicts],
                correct=np.asarray(sols.correct(), bool).reshape(P, K),
                verified=np.asarray(sols.verified(), bool).reshape(P, K),
                step_verified=sols.step_verified(),
                step_labels=[[list(v.step_labels) for v in row] for row in sols.verdicts],
                step_scores=scores)
        return out

    # ----------------------------------------------------------------- numbers
    def run(self, ctx: Context) -> None:
        cfg = ctx.config.rerank
        levels = tuple(cfg.levels)
        easy = tuple(ctx.config.reward_models.levels)
        splits = {"easy": tuple(lv for lv in levels if lv in easy),
                  "hard": tuple(lv for lv in levels if lv not in easy), "all": levels}
        splits = {k: v for k, v in splits.items() if v}
        seeds = int(cfg.seeds)
        samples = [self._collect(ctx, s) for s in range(seeds)]
        kinds = list(ctx.need("reward_models"))
        aggs = tuple(cfg.get("aggregations", AGGREGATIONS))
        ns = [n for n in powers_of_two_upto(int(cfg.max_n))]
        # pass@N with every step verified, where the domain's verifier checks steps: the answer
        # oracle counts guessed answers and right answers under wrong steps
        all_steps = any(ls.step_verified for per in samples for ls in per.values())
        rows = []
        num_subsets = int(cfg.num_subsets)
        num_boot = int(cfg.get("bootstrap_samples", 2000))
        for si, (split, lvs) in enumerate(splits.items()):
            per_seed = []
            for s in range(seeds):
                lv_samples = [samples[s][lv] for lv in lvs]
                answers = [a for ls in lv_samples for a in ls.answers]
                correct = np.concatenate([ls.correct for ls in lv_samples])
                verified = np.concatenate([ls.verified for ls in lv_samples])
                sol_scores = {(k, a): np.concatenate([_solution_scores(ls.step_scores[k], a)
                                                      for ls in lv_samples])
                              for k in kinds for a in (("last",) if k == "orm" else aggs)}
                per_seed.append((answer_ids(answers), correct, sol_scores, verified))
            configs = [("none", "majority", "none", None), ("none", "oracle", "none", None)]
            if all_steps:
                configs.append(("none", ORACLE_ALL_STEPS, "none", None))
            configs += [(k, m, a, (k, a)) for (k, a) in per_seed[0][2]
                        for m in ("best_of_n", "weighted")]
            for n in ns:
                # ONE subset draw per (problem set, seed, N), shared by every method: the
                # methods are compared paired (same samples, same subsets).
                subsets = [draw_subsets(ids.shape[0], ids.shape[1], n, num_subsets,
                                        np.random.default_rng(
                                            [int(ctx.config.seed), si, s, n]))
                           for s, (ids, *_) in enumerate(per_seed)]
                hits = {}
                for evaluator, method, agg, score_key in configs:
                    every_step = method == ORACLE_ALL_STEPS
                    hits[evaluator, method, agg] = [
                        rerank_correct(ids, verified if every_step else correct,
                                       None if score_key is None else sol_scores[score_key],
                                       "oracle" if every_step else method, sub)
                        for (ids, correct, sol_scores, verified), sub in zip(per_seed, subsets,
                                                                             strict=True)]
                for evaluator, method, agg, _ in configs:
                    accs = [h.mean(axis=-1) for h in hits[evaluator, method, agg]]
                    means = [float(acc.mean()) for acc in accs]
                    key = {"split": split, "evaluator": evaluator, "method": method,
                           "aggregation": agg, "n": n}
                    rows.append({**key, "mean": float(np.mean(means)),
                                 "std": float(np.std(means)) if seeds > 1
                                 else float(accs[0].std()),
                                 "seeds": seeds, "problems": int(per_seed[0][1].shape[0])})
                    if method == "majority":
                        continue
                    # paired difference to majority voting, problems of all seeds pooled
                    diff, lo, hi = paired_bootstrap_diff(
                        np.concatenate(hits[evaluator, method, agg], axis=-1),
                        np.concatenate(hits["none", "majority", "none"], axis=-1),
                        num_boot=num_boot,
                        rng=np.random.default_rng([int(ctx.config.seed), si, n, 7]))
                    for stat, value in (("diff_to_majority", diff), ("diff_ci_low", lo),
                                        ("diff_ci_high", hi)):
                        rows.append({**key, "stat": stat, "value": value,
                                     "problems": int(per_seed[0][1].shape[0]) * seeds})
        ctx.results.set_rows(self.name, rows)
        auc_rows = self._aucs(samples, splits, kinds, aggs)
        ctx.results.set_rows("evaluators", auc_rows)
        self._report(ctx, rows, auc_rows, splits, kinds, ns)

    @staticmethod
    def _aucs(samples, splits, kinds, aggs) -> list[dict]:
        rows = []
        for split, lvs in splits.items():
            for kind in kinds:
                labels, scores, outcome = [], [], []
                sol_scores = {a: [] for a in (*aggs, "last")}
                for per in samples:
                    for lv in lvs:
                        ls = per[lv]
                        outcome.append(ls.correct.reshape(-1))
                        reads = [r for row in ls.step_scores[kind] for r in row]
                        padded, mask = pad_steps(reads)
                        for a in sol_scores:
                            sol_scores[a].append(np.asarray(aggregate(padded, a, mask)))
                        if kind == "orm":
                            continue
                        # step AUC over the steps up to and including the first wrong one
                        steps = [y for row in ls.step_labels for y in row]
                        lab, lmask = pad_steps(steps)
                        width = padded.shape[1]
                        lab = np.pad(lab, ((0, 0), (0, max(width - lab.shape[1], 0))))[:, :width]
                        lmask = np.pad(lmask, ((0, 0), (0, max(width - lmask.shape[1], 0))))[
                            :, :width]
                        valid = mask & lmask
                        ok = np.where(valid, lab, 0.0) > 0.5
                        before_ok = np.cumprod(np.concatenate(
                            [np.ones((len(ok), 1), bool), ok[:, :-1]], axis=1), axis=1) > 0
                        use = valid & before_ok
                        labels.append(ok[use])
                        scores.append(padded[use])
                outcome_arr = np.concatenate(outcome)
                if kind != "orm":
                    lab_arr = np.concatenate(labels)
                    rows.append({"evaluator": kind, "split": split, "kind": "step_auc",
                                 "aggregation": "none",
                                 "value": roc_auc(lab_arr, np.concatenate(scores)),
                                 "count": int(lab_arr.size)})
                for a in (("last",) if kind == "orm" else aggs):
                    rows.append({"evaluator": kind, "split": split, "kind": "outcome_auc",
                                 "aggregation": a,
                                 "value": roc_auc(outcome_arr, np.concatenate(sol_scores[a])),
                                 "count": int(outcome_arr.size)})
        return rows

    def load(self, ctx: Context) -> None:
        pass

    # ----------------------------------------------------------------- report
    def _report(self, ctx: Context, rows, auc_rows, splits, kinds, ns) -> None:
        cfg = ctx.config.rerank
        agg = cfg.get("plot_aggregation", "prod")
        idx = {(r["split"], r["evaluator"], r["method"], r["aggregation"], r["n"]): r
               for r in rows if "stat" not in r}
        paired = {(r["split"], r["evaluator"], r["method"], r["aggregation"], r["n"],
                   r["stat"]): r["value"] for r in rows if "stat" in r}

        def series(split, evaluator, method, a):
            pts = [idx[(split, evaluator, method, a, n)] for n in ns]
            return ns, [p["mean"] for p in pts], [p["std"] for p in pts]

        all_steps = any(r["method"] == ORACLE_ALL_STEPS for r in rows)
        styles = {"majority": plot_style("none", "majority"),
                  "pass@N (oracle)": plot_style("none", "oracle"),
                  "pass@N (every step verified)": plot_style("none", ORACLE_ALL_STEPS)}
        panels = {}
        for split in splits:
            ps = {"majority": series(split, "none", "majority", "none"),
                  "pass@N (oracle)": series(split, "none", "oracle", "none")}
            if all_steps:
                ps["pass@N (every step verified)"] = series(split, "none", ORACLE_ALL_STEPS,
                                                            "none")
            for k in kinds:
                a = "last" if k == "orm" else agg
                ps[f"{k.upper()} weighted"] = series(split, k, "weighted", a)
                ps[f"{k.upper()} best-of-N"] = series(split, k, "best_of_n", a)
                styles[f"{k.upper()} weighted"] = plot_style(k, "weighted")
                styles[f"{k.upper()} best-of-N"] = plot_style(k, "best_of_n")
            panels[f"{split} levels {list(splits[split])}"] = ps
        fig = ctx.report.figure_path("rerank_accuracy_vs_n.png")
        panels_plot(fig, panels, title=f"Re-ranking with evaluators trained on easy levels "
                    f"(PRM/OPRM aggregation: {agg})", xlabel="N (samples per problem)",
                    ylabel="accuracy", styles=styles)

        show_ns = [n for n in (16, 64) if n in ns] or [ns[-1]]
        table = []
        methods = table1_methods(kinds, agg, all_steps)
        for label, ev, method, a in methods:
            row = {"method": label}
            for split in splits:
                for n in show_ns:
                    r = idx[(split, ev, method, a, n)]
                    row[f"{split} N={n}"] = f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}"
            table.append(row)
        cols = ["method"] + [f"{s} N={n}" for s in splits for n in show_ns]

        hard = "hard" if "hard" in splits else "all"
        nmax = ns[-1]
        agg_rows = []
        for k in kinds:
            if k == "orm":
                continue
            for method in ("best_of_n", "weighted"):
                row = {"evaluator": k.upper(), "method": method}
                for a in cfg.get("aggregations", AGGREGATIONS):
                    r = idx.get((hard, k, method, a, nmax))
                    if r:
                        row[a] = f"{100 * r['mean']:.1f}"
                agg_rows.append(row)
        paired_rows = []
        for label, ev, method, a in methods[1:]:
            row = {"method": label}
            for split in splits:
                for n in show_ns:
                    d = [paired.get((split, ev, method, a, n, st)) for st in
                         ("diff_to_majority", "diff_ci_low", "diff_ci_high")]
                    row[f"{split} N={n}"] = ("-" if None in d else
                                             f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, "
                                             f"{100 * d[2]:+.1f}]")
            paired_rows.append(row)
        auc_table = [{"evaluator": r["evaluator"].upper(), "split": r["split"],
                      "kind": r["kind"], "aggregation": r["aggregation"],
                      "AUC": r["value"], "count": r["count"]}
                     for r in auc_rows if r["kind"] == "step_auc"
                     or r["aggregation"] in (agg, "last")]
        counts = per_level_counts(cfg)
        count = (f"{counts[0]}" if len(set(counts)) == 1 else
                 "/".join(str(c) for c in counts) + f" (levels {list(cfg.levels)})")
        md = [f"## Re-ranking (easy-to-hard): {count} test problems per "
              f"level, up to N={nmax} samples (T={float(cfg.temperature):g}), "
              f"{int(cfg.seeds)} seed(s), {int(cfg.num_subsets)} subsets per N", "",
              "Accuracy (%) in the layout of Sun et al. (2024), Table 1 (mean ± std):", "",
              markdown_table(table, cols), "",
              "Paired difference to majority voting (points; same samples and subsets), with a "
              "95% bootstrap CI over problems:", "",
              markdown_table(paired_rows, cols), "",
              f"![accuracy vs N]({ctx.report.rel(fig)})", "",
              f"Aggregation comparison on {hard} levels at N={nmax} (accuracy %):", "",
              markdown_table(agg_rows, ["evaluator", "method",
                                        *cfg.get("aggregations", AGGREGATIONS)]), "",
              "Evaluator ROC-AUC on the sampled test solutions (step AUC over steps up to the "
              "first wrong one):", "",
              markdown_table(auc_table, ["evaluator", "split", "kind", "aggregation", "AUC",
                                         "count"]), ""]
        ctx.report.set_section(self.name, "\n".join(md))
