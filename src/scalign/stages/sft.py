"""Stage `sft`: supervised fine-tuning of the policy on demonstrations.

In easy-to-hard generalization (Sun et al. 2024) the policy is fine-tuned on demonstrations of
*easy* problems only (levels 1-3 by default: `config.sft.levels`); the hard levels are never
seen in training. Artifacts: reads `tokenizer` and `domain` (stage `data`), writes `policy`
= (ModelConfig, params), also saved under `stages/sft/policy/`.
"""

from __future__ import annotations

import jax
import ml_collections

from scalign.data.pipeline import make_sft_iterator
from scalign.experiment import Context, Stage, register_stage
from scalign.objectives.sft import make_sft_loss
from scalign.reporting import line_plot, markdown_table
from scalign.stages.common import model_config, run_training, shardings_for, validate_training
from scalign.training.checkpoint import load_model, save_model
from scalign.training.metrics import read_metrics


@register_stage
class SFTStage(Stage):
    name = "sft"
    requires = {"tokenizer": ("data",), "domain": ("data",)}

    def validate(self, config: ml_collections.ConfigDict, mesh_shape: dict[str, int],
                 errors: list[str]) -> None:
        validate_training(config, "sft", mesh_shape, errors)
        if "model" not in config or "preset" not in config.model:
            errors.append("config.model.preset is missing (e.g. 'tiny')")

    def run(self, ctx: Context) -> None:
        cfg = ctx.config.sft
        tokenizer = ctx.need("tokenizer")
        domain = ctx.need("domain")
        levels = tuple(cfg.get("levels", domain.levels))
        records = domain.train_records(levels)
        if not records:
            raise ValueError(f"config.sft.levels={levels}: no training records at these levels")
        model = model_config(ctx.config.model, tokenizer.vocab_size)
        data_iter = make_sft_iterator(records, tokenizer, batch_size=int(cfg.batch_size),
                                      seq_len=int(cfg.seq_len), seed=int(ctx.config.seed),
                                      num_epochs=None, on_too_long=cfg.get("on_too_long", "error"))
        result = run_training(ctx, stage=self.name, cfg=cfg, model=model,
                              loss_fn=make_sft_loss(model), data_iter=data_iter)
        params = result.state.params
        save_model(ctx.stage_dir(self.name) / "policy", model, params,
                   {"levels": list(levels), "steps": int(cfg.steps)})
        ctx.artifacts["policy"] = (model, params)
        self._report(ctx, model, levels, len(records), result)

    def load(self, ctx: Context) -> None:
        model, params, _ = load_model(ctx.stage_dir(self.name) / "policy")
        ctx.artifacts["policy"] = (model, jax.device_put(params, shardings_for(ctx, model)))

    def _report(self, ctx: Context, model, levels, num_records: int, result) -> None:
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
            {"metric": "median_steps_per_s", "value": steady},
            {"metric": "median_tokens_per_s", "value": steady * tokens_per_step},
            {"metric": "seconds", "value": result.seconds},
        ]
        ctx.results.set_rows(self.name, rows)
        resumed = (f" Resumed from step {result.resumed_from}." if result.resumed_from
                   else "")
        md = [f"## SFT on levels {list(levels)}", "",
              f"Model: {model.describe()} ({model.num_params():,} params). "
              f"{int(cfg.steps)} steps of {int(cfg.batch_size)} x {int(cfg.seq_len)} tokens "
              f"on {num_records} demonstrations, {result.seconds:.0f} s.{resumed}", "",
              markdown_table(rows, ["metric", "value"]), ""]
        if steps:
            md += [f"![SFT loss]({ctx.report.rel(fig)})", ""]
        ctx.report.set_section(self.name, "\n".join(md))
