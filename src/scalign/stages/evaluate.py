"""Stage `evaluate`: accuracy of the policy by difficulty level, greedy and pass@k.

For each level in `config.evaluate.levels`: greedy accuracy on the first `greedy_problems`
test problems, and `pass_n` samples at `temperature` on the first `pass_problems` test
problems, reported as pass@k for k = 1, 2, 4, ..., pass_n (unbiased estimator of Chen et al.
2021). Also the first-error categories of the greedy failures, which say *how* the policy fails
on hard problems. Rows: {"level", "criterion", "decoding", "metric", "k", "value",
"problems"} with level "1".."5", "easy", "hard" or "all" and criterion "answer" (final answer
right), "all_steps" (every step verified right) or "steps" (mean correct step prefix).

For search problems (stepmath "reach" designs) also `results["evaluate_planning"]`: greedy
accuracy by level and planning horizon (`Problem.horizon`: operations from the first "?" to the
end) beside the random-filling rate of the same problems (`Problem.random_fill_rate`), the
accuracy of a solver that computes every step right and picks the "?"s at random. A policy
near that rate has learned the steps, not the search.
"""

from __future__ import annotations

import collections
import json

import ml_collections
import numpy as np

from scalign.evaluation.generation import Solutions, sample_solutions
from scalign.evaluation.metrics import mean_pass_at_k, powers_of_two_upto
from scalign.reporting import bar_plot, markdown_table
from scalign.sampling import Sampler
from scalign.stages.base import Context, Stage, check_levels, register_stage, require_block


def _groups(levels: tuple[int, ...], easy: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    groups = {str(lv): (lv,) for lv in levels}
    e = tuple(lv for lv in levels if lv in easy)
    h = tuple(lv for lv in levels if lv not in easy)
    if e:
        groups["easy"] = e
    if h:
        groups["hard"] = h
    groups["all"] = levels
    return groups


@register_stage
class EvaluateStage(Stage):
    name = "evaluate"
    requires = {"policy": ("sft", "checkpoint"), "tokenizer": ("data", "checkpoint"),
                "domain": ("data",)}

    def validate(self, config: ml_collections.ConfigDict, mesh_shape: dict[str, int],
                 errors: list[str]) -> None:
        cfg = require_block(config, "evaluate", (
            "levels", "greedy_problems", "pass_problems", "pass_n", "temperature",
            "max_new_tokens", "batch_size"), errors)
        if cfg is None:
            return
        check_levels(config, "evaluate.levels", errors)
        if "pass_n" in cfg and cfg.pass_n < 1:
            errors.append(f"config.evaluate.pass_n={cfg.pass_n} must be >= 1")
        if "temperature" in cfg and cfg.temperature <= 0:
            errors.append(f"config.evaluate.temperature={cfg.temperature} must be > 0 "
                          f"(greedy is always evaluated)")

    def run(self, ctx: Context) -> None:
        cfg = ctx.config.evaluate
        model, params = ctx.need("policy")
        tokenizer = ctx.need("tokenizer")
        domain = ctx.need("domain")
        sampler = Sampler(model, params, tokenizer, mesh=ctx.mesh,
                          max_new_tokens=int(cfg.max_new_tokens))
        levels = tuple(cfg.levels)
        easy = tuple(ctx.config.get("sft", {}).get("levels", ()))
        greedy: dict[int, Solutions] = {}
        sampled: dict[int, Solutions] = {}
        for lv in levels:
            test = list(domain.test_problems(lv))
            greedy[lv] = sample_solutions(
                sampler, domain, test[:int(cfg.greedy_problems)], n=1, key=None,
                temperature=0.0, max_new_tokens=int(cfg.max_new_tokens),
                batch_rows=int(cfg.batch_size), desc=f"greedy L{lv}")
            sampled[lv] = sample_solutions(
                sampler, domain, test[:int(cfg.pass_problems)], n=int(cfg.pass_n),
                key=ctx.key(self.name, "pass", lv), temperature=float(cfg.temperature),
                max_new_tokens=int(cfg.max_new_tokens), batch_rows=int(cfg.batch_size),
                desc=f"pass@{int(cfg.pass_n)} L{lv}")
        rows = self._rows(levels, easy, greedy, sampled, int(cfg.pass_n),
                          float(cfg.temperature))
        ctx.results.set_rows(self.name, rows)
        planning = self._planning_rows(levels, greedy)
        if planning:
            ctx.results.set_rows("evaluate_planning", planning)
        self._save_samples(ctx, greedy, sampled)
        self._report(ctx, levels, easy, rows, greedy, int(cfg.pass_n), float(cfg.temperature),
                     int(cfg.get("show_samples", 2)), planning)

    def load(self, ctx: Context) -> None:
        pass  # results and report section are on disk

    # ------------------------------------------------------------------ numbers
    @staticmethod
    def _rows(levels, easy, greedy, sampled, pass_n, temperature) -> list[dict]:
        """Rows per level group and criterion: "answer" (final answer right) and, for domains
        with a step verifier, "all_steps" (every step and the answer right). With few possible
        answers (stepmath has 7) guessing alone gives a high answer pass@N; all_steps does not.
        """
        rows = []
        decoding = f"temperature={temperature:g}"
        step_verified = any(s.step_verified() for s in greedy.values())
        criteria = {"answer": lambda v: bool(v.outcome_correct)}
        if step_verified:
            criteria["all_steps"] = lambda v: bool(v.answer_label)
        for name, lvs in _groups(levels, easy).items():
            for criterion, ok in criteria.items():
                g = [ok(row[0]) for lv in lvs for row in greedy[lv].verdicts]
                rows.append({"level": name, "criterion": criterion, "decoding": "greedy",
                             "metric": "accuracy", "k": 1,
                             "value": float(np.mean(g)) if g else float("nan"),
                             "problems": len(g)})
                s = [[ok(v) for v in row] for lv in lvs for row in sampled[lv].verdicts]
                for k in powers_of_two_upto(pass_n):
                    rows.append({"level": name, "criterion": criterion, "decoding": decoding,
                                 "metric": f"pass@{k}", "k": k, "value": mean_pass_at_k(s, k),
                                 "problems": len(s)})
            if step_verified:
                step_ok = [float(sum(v.step_labels) / v.num_expected_steps)
                           for lv in lvs for row in sampled[lv].verdicts for v in row
                           if v.num_expected_steps]
                rows.append({"level": name, "criterion": "steps", "decoding": decoding,
                             "metric": "correct_step_prefix", "k": 1,
                             "value": float(np.mean(step_ok)) if step_ok else float("nan"),
                             "problems": len(step_ok)})
        return rows

    @staticmethod
    def _planning_rows(levels, greedy) -> list[dict]:
        """For search problems (stepmath "reach" designs): greedy accuracy by level and planning
        horizon (`Problem.horizon`, how far the first choice must look ahead) beside the
        accuracy of random fillings (`Problem.random_fill_rate`) on the same problems -- a
        policy that computes its steps right but does not plan scores the latter."""
        if not all(getattr(p, "search", False) for lv in levels for p in greedy[lv].problems):
            return []
        rows = []
        for lv in levels:
            by_h: dict[int, list[tuple[bool, float]]] = collections.defaultdict(list)
            for p, row in zip(greedy[lv].problems, greedy[lv].verdicts, strict=True):
                by_h[p.horizon].append((bool(row[0].outcome_correct), p.random_fill_rate()))
            for h in sorted(by_h):
                ok, rate = zip(*by_h[h], strict=True)
                for metric, value in (("greedy", float(np.mean(ok))),
                                      ("random_filling", float(np.mean(rate)))):
                    rows.append({"level": lv, "horizon": h, "metric": metric, "value": value,
                                 "problems": len(ok)})
        return rows

    @staticmethod
    def _save_samples(ctx: Context, greedy, sampled) -> None:
        out = ctx.stage_dir("evaluate") / "samples.jsonl"
        with out.open("w") as f:
            for kind, sols in (("greedy", greedy), ("sampled", sampled)):
                for lv, s in sols.items():
                    for p, texts, verdicts in zip(s.problems, s.texts, s.verdicts, strict=True):
                        for t, v in zip(texts, verdicts, strict=True):
                            f.write(json.dumps({
                                "kind": kind, "level": lv, "uid": getattr(p, "uid", None),
                                "text": t, "correct": bool(v.outcome_correct),
                                "step_labels": list(v.step_labels), "error": v.error}) + "\n")

    # ------------------------------------------------------------------ report
    def _report(self, ctx, levels, easy, rows, greedy, pass_n, temperature, show,
                planning=()) -> None:
        domain = ctx.need("domain")
        table: dict[str, dict] = {}
        for r in rows:
            t = table.setdefault(r["level"], {"level": r["level"]})
            tag = "" if r["criterion"] in ("answer", "steps") else " (all steps)"
            if r["decoding"] == "greedy":
                t[f"greedy{tag}"] = r["value"]
                t["problems"] = r["problems"]
            elif r["metric"] in ("pass@1", f"pass@{pass_n}"):
                t[f"{r['metric']}{tag}"] = r["value"]
            elif r["metric"] == "correct_step_prefix":
                t["correct step prefix"] = r["value"]
        has_steps = any(r["criterion"] == "all_steps" for r in rows)
        cols = ["level", "problems", "greedy", "pass@1", f"pass@{pass_n}"]
        if has_steps:
            cols += ["greedy (all steps)", "pass@1 (all steps)", f"pass@{pass_n} (all steps)",
                     "correct step prefix"]
        fig = ctx.report.figure_path("accuracy_by_level.png")
        per_level = [table[str(lv)] for lv in levels]
        tag = " (all steps)" if has_steps else ""
        bar_plot(fig, [f"L{lv}" for lv in levels],
                 {f"greedy{tag}": [t[f"greedy{tag}"] for t in per_level],
                  f"pass@1{tag}": [t[f"pass@1{tag}"] for t in per_level],
                  f"pass@{pass_n}{tag}": [t[f"pass@{pass_n}{tag}"] for t in per_level]},
                 title="SFT policy accuracy by level", ylabel="accuracy", ylim=(0, 1))
        errors = collections.Counter(v.error for lv in levels if lv not in easy
                                     for row in greedy[lv].verdicts for v in row if v.error)
        md = [f"## Evaluation by level (greedy; {pass_n} samples at T={temperature:g})", "",
              f"SFT levels (easy): {list(easy)}. pass@k uses the unbiased estimator of "
              f"Chen et al. (2021) over {pass_n} samples per problem. \"all steps\" counts a "
              f"solution only if the verifier accepts every step and the answer (with few "
              f"possible answers, guessing inflates the answer-only pass@k).", "",
              markdown_table([table[k] for k in table], cols), "",
              f"![accuracy by level]({ctx.report.rel(fig)})", ""]
        if errors:
            total = sum(errors.values())
            md += ["First error of greedy failures on hard levels: " + ", ".join(
                f"{k} {v / total:.0%}" for k, v in errors.most_common()), ""]
        if planning:
            md += _planning_section(planning)
        for lv in (levels[0], levels[-1]):
            s = greedy[lv]
            for p, texts, verdicts in list(zip(s.problems, s.texts, s.verdicts,
                                               strict=True))[:show]:
                v = verdicts[0]
                md += [f"Level {lv} greedy sample ({'correct' if v.outcome_correct else 'wrong'}"
                       f", step labels {list(v.step_labels)}):", "", "```",
                       (domain.prompt(p) + texts[0]).rstrip(), "```", ""]
        ctx.report.set_section(self.name, "\n".join(md))


def _planning_section(rows: list[dict]) -> list[str]:
    """The report table of `EvaluateStage._planning_rows`."""
    table: dict[tuple[int, int], dict] = {}
    for r in rows:
        t = table.setdefault((r["level"], r["horizon"]),
                             {"level": r["level"], "horizon": r["horizon"],
                              "problems": r["problems"]})
        t[r["metric"].replace("_", " ")] = r["value"]
    return ["Greedy accuracy by planning horizon (operations from the first \"?\" to the end; "
            "1 = a local choice) beside the accuracy of a random filling of the \"?\"s with "
            "every step right (a solver that does not plan):", "",
            markdown_table(list(table.values()),
                           ["level", "horizon", "problems", "greedy", "random filling"]), ""]
