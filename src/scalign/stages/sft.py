"""Stage `sft`: supervised fine-tuning of the policy on demonstrations.

In easy-to-hard generalization (Sun et al. 2024) the policy is fine-tuned on demonstrations of
*easy* problems only (levels 1-3 by default: `config.sft.levels`); the hard levels are never
seen in training. Artifacts: reads `tokenizer` and `domain` (stage `data`), writes `policy`
= (ModelConfig, params), also saved under `stages/sft/policy/`.

`config.sft.init`: "scratch" (default) trains a fresh `config.model`; "checkpoint" fine-tunes
the `policy` of stage `checkpoint` (a released model, e.g. Llemma-7B as in Sun et al. 2024),
which must then come before `sft`; `config.model.preset`, if given, must then match the
loaded model's shapes (`check_shapes`). Optional `config.sft.remat` ("none" | "full" | "dots")
sets the model's rematerialisation for training.

`config.sft.exclude_goal` (default False): leave out of the loss the demonstration tokens that
only repeat the question's goal -- on stepmath search designs the last step's result, which
every demonstration writes as the target (`stepmath.Problem.goal_spans`). Trained on them, a
small policy copies the target there instead of computing the step ("7+5=5" for target 5,
`experiments/results/e2h_reach4_evaluators_2026-12-04/`), so its failures are arithmetic
errors only a computing evaluator can see; without them it computes the step from its inputs
like every other, and a chain that misses the target says so in its last line. On the reach4c
study the unmasked recipe keeps every policy off the `wrong_goal` shortcut but turns its
failures into a wrong last result equal to the target, which no easy-trained evaluator learns
to check (3 seeds, OPRM weighted +8.4 / +1.8 / -0.4 over majority; masked +69.4 / +76.8 / +3.8;
`experiments/results/e2h_stepmath_reach4c_nogoal_2026-12-06/`).
`config.sft.exclude_goal_span` (default "result"): "goal" also leaves out the last step's copy
of the goal (`Problem.goal_copy_spans`), which every demonstration writes equal to that step's
result, so the policy would learn that slot from the earlier steps alone (measured on the
reach4c study's shortcut seed 2: it does not; the unsupervised slot gets an arbitrary digit,
every step right on 2.8% of easy greedy solutions, `experiments/results/
e2h_stepmath_reach4c_batch16_2026-12-06/exclude_goal_span_goal_seed2/`); "line" leaves out every
number of the last step from its result on (`Problem.goal_line_spans`): in the reach4c layout also the echo of the
result and the goal's copy in the distance step, which every demonstration writes equal
("7-7=0"); the separators stay in the loss.
`config.sft.miss_demos` (float in [0, 1], default 0.0 = off; stepmath): add a miss
demonstration for about that fraction of the training problems (`stepmath.miss_records`): a
filling that misses the target, every step worked out right, with only its last step from the
result on in the loss ("0+2=2, 2-1=1" for target 1). Only search designs have a target to miss;
chain and path designs get none, and the report says 0. In the gold demonstrations the last
step's result, its copy of the goal and (reach4c) the distance 0 always agree, so copying the
target or the step's own result fits them as well as computing does; the miss demonstrations
are the counterexamples that only computing fits. Its choice of operations is never in the
loss, so the policy is not taught to miss. The report counts them (`miss_demonstrations`).
Measured (reach4c study, 3 seeds, 0.25, the demo's default since 2026-12-06): every hard greedy
failure is `missed_target` (seed 2 without them: 94% `wrong_goal`), the evaluators fit their
easy data (train accuracy >= 0.98) and OPRM weighted voting beats majority on hard by +76.8 /
+80.6 / +84.0 points (without: +69.4 / +76.8 / +3.8;
`experiments/results/e2h_stepmath_reach4c_miss_2026-12-06/`).
"""

from __future__ import annotations

import jax
import ml_collections

from scalign.data.domain import GOAL_SPANS
from scalign.data.pipeline import make_sft_iterator
from scalign.models.config import ModelConfig
from scalign.objectives.sft import make_sft_loss
from scalign.reporting import line_plot, markdown_table
from scalign.stages.base import Context, Stage, check_levels, register_stage
from scalign.stages.common import (
    model_config,
    run_training,
    shardings_for,
    training_model,
    validate_training,
)
from scalign.training.checkpoint import load_model, save_model
from scalign.training.metrics import read_metrics

INITS = ("scratch", "checkpoint")
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "mlp_dim")


def check_shapes(expected: ModelConfig, loaded: ModelConfig) -> None:
    """Raise ValueError if the loaded policy's shapes differ from `config.model`'s preset.

    With `config.sft.init='checkpoint'`, `config.model` is optional and only documents (and
    checks) what the checkpoint should be, e.g. preset "llemma_7b" for an HF Llemma-7B folder.
    """
    diff = {f: (getattr(expected, f), getattr(loaded, f)) for f in SHAPE_FIELDS
            if getattr(expected, f) != getattr(loaded, f)}
    if diff:
        raise ValueError("config.model: the checkpoint's policy does not have the preset's "
                         "shapes (field: preset vs checkpoint): " + ", ".join(
                             f"{k}: {a} vs {b}" for k, (a, b) in diff.items()))


@register_stage
class SFTStage(Stage):
    name = "sft"
    requires = {"tokenizer": ("data",), "domain": ("data",)}

    def validate(self, config: ml_collections.ConfigDict, mesh_shape: dict[str, int],
                 errors: list[str]) -> None:
        validate_training(config, "sft", mesh_shape, errors)
        check_levels(config, "sft.levels", errors)
        check_levels(config, "data.tokenizer_levels", errors)
        if config.get("sft", {}).get("exclude_goal", False) and config.get(
                "data", {}).get("domain", "stepmath") != "stepmath":
            errors.append("config.sft.exclude_goal needs the stepmath domain (its search "
                          "problems' demonstrations repeat the goal in their last step)")
        miss = config.get("sft", {}).get("miss_demos", 0.0) or 0.0
        if miss:
            if config.get("data", {}).get("domain", "stepmath") != "stepmath":
                errors.append("config.sft.miss_demos needs the stepmath domain (its search "
                              "problems have a target to miss)")
            elif not 0.0 < float(miss) <= 1.0:
                errors.append(f"config.sft.miss_demos={miss} must be in [0, 1]")
        span = config.get("sft", {}).get("exclude_goal_span", "result")
        if span not in GOAL_SPANS:
            errors.append(f"config.sft.exclude_goal_span must be one of {GOAL_SPANS}, got "
                          f"{span!r}")
        init = config.get("sft", {}).get("init", "scratch")
        stages = list(config.get("stages", ()))
        if init not in INITS:
            errors.append(f"config.sft.init must be one of {INITS}, got {init!r}")
        elif init == "checkpoint":
            if "checkpoint" not in stages[:stages.index(self.name)]:
                errors.append("config.sft.init='checkpoint' fine-tunes the checkpoint's policy: "
                              "put stage 'checkpoint' before 'sft' in config.stages")
        elif "model" not in config or "preset" not in config.model:
            errors.append("config.model.preset is missing (e.g. 'tiny'), or set "
                          "config.sft.init='checkpoint'")
        else:
            try:
                model_config(config.model)
            except ValueError as e:
                errors.append(str(e))

    def run(self, ctx: Context) -> None:
        cfg = ctx.config.sft
        tokenizer = ctx.need("tokenizer")
        domain = ctx.need("domain")
        levels = tuple(cfg.get("levels", domain.levels))
        kwargs = {}
        if cfg.get("exclude_goal", False):
            kwargs.update(exclude_goal=True, goal_span=cfg.get("exclude_goal_span", "result"))
        if cfg.get("miss_demos", 0.0):
            kwargs["miss_fraction"] = float(cfg.miss_demos)
        records = domain.train_records(levels, **kwargs)
        if not records:
            raise ValueError(f"config.sft.levels={levels}: no training records at these levels")
        init_params = None
        if cfg.get("init", "scratch") == "checkpoint":
            model, init_params = ctx.need("policy")
            if "model" in ctx.config and ctx.config.model.get("preset"):
                check_shapes(model_config(ctx.config.model), model)
            if tokenizer.vocab_size > model.vocab_size:
                raise ValueError(f"config.sft.init='checkpoint': the tokenizer has "
                                 f"{tokenizer.vocab_size} ids but the policy's vocab_size is "
                                 f"{model.vocab_size}")
        else:
            model = model_config(ctx.config.model, tokenizer.vocab_size)
        model = training_model(model, cfg)
        data_iter = make_sft_iterator(records, tokenizer, batch_size=int(cfg.batch_size),
                                      seq_len=int(cfg.seq_len), seed=int(ctx.config.seed),
                                      num_epochs=None, on_too_long=cfg.get("on_too_long", "error"))
        result = run_training(ctx, stage=self.name, cfg=cfg, model=model,
                              loss_fn=make_sft_loss(model), data_iter=data_iter,
                              params=init_params)
        params = result.state.params
        save_model(ctx.stage_dir(self.name) / "policy", model, params,
                   {"levels": list(levels), "steps": int(cfg.steps)})
        ctx.artifacts["policy"] = (model, params)
        self._report(ctx, model, levels, len(records), result,
                     num_miss=sum(r.get("kind") == "miss" for r in records))

    def load(self, ctx: Context) -> None:
        model, params, _ = load_model(ctx.stage_dir(self.name) / "policy")
        ctx.artifacts["policy"] = (model, jax.device_put(params, shardings_for(ctx, model)))

    def _report(self, ctx: Context, model, levels, num_records: int, result,
                num_miss: int = 0) -> None:
        history = read_metrics(ctx.workdir / "metrics.jsonl", self.name)
        steps = [h["step"] for h in history if "loss" in h]
        losses = [h["loss"] for h in history if "loss" in h]
        fig = ctx.report.figure_path("sft_loss.png")
        if steps:
            line_plot(fig, {"train loss": (steps, losses)}, title="SFT loss (response tokens)",
                      xlabel="step", ylabel="cross-entropy (nats/token)", logy=True)
        cfg = ctx.config.sft
        tokens_per_step = int(cfg.batch_size) * int(cfg.seq_len)
        sps = [h["steps_per_s"] for h in history if "steps_per_s" in h]
        steady = sorted(sps)[len(sps) // 2] if sps else float("nan")
        rows = [
            {"metric": "loss_first_logged", "value": losses[0] if losses else float("nan")},
            {"metric": "loss_final", "value": losses[-1] if losses else float("nan")},
            {"metric": "accuracy_final",
             "value": next((h["accuracy"] for h in reversed(history) if "accuracy" in h),
                           float("nan"))},
            {"metric": "steps", "value": int(cfg.steps)},
            {"metric": "train_examples", "value": num_records},
            *([{"metric": "miss_demonstrations", "value": num_miss}]
              if cfg.get("miss_demos", 0.0) else []),
            {"metric": "median_steps_per_s", "value": steady},
            {"metric": "median_tokens_per_s", "value": steady * tokens_per_step},
            {"metric": "seconds", "value": result.seconds},
        ]
        if cfg.get("on_nonfinite", "stop") == "skip":
            rows.append({"metric": "skipped_nonfinite_steps", "value": result.skipped_steps})
        ctx.results.set_rows(self.name, rows)
        resumed = (f" Resumed from step {result.resumed_from}." if result.resumed_from
                   else "")
        if result.checkpoint_fallbacks:
            resumed += (" Skipped bad checkpoint step(s) "
                        f"{[f['step'] for f in result.checkpoint_fallbacks]} (moved aside).")
        init = ("fine-tuned from the checkpoint's policy"
                if cfg.get("init", "scratch") == "checkpoint" else "trained from scratch")
        md = [f"## SFT on levels {list(levels)}", "",
              f"Model: {model.describe()} ({model.num_params():,} params), {init}. "
              f"{int(cfg.steps)} steps of {int(cfg.batch_size)} x {int(cfg.seq_len)} tokens "
              f"on {num_records} demonstrations, {result.seconds:.0f} s.{resumed}", "",
              markdown_table(rows, ["metric", "value"]), ""]
        if steps:
            md += [f"![SFT loss]({ctx.report.rel(fig)})", ""]
        ctx.report.set_section(self.name, "\n".join(md))
