"""Stage `reward_models`: ORM / PRM / OPRM trained on easy problems only.

Easy-to-hard generalization (Sun et al. 2024): the SFT policy samples K solutions for each easy
*training* problem (`config.reward_models.levels`, default 1-3); the domain verifier labels
steps and outcomes (`algorithms.reward_labels`); each evaluator is the SFT backbone plus a
fresh scalar head, fitted with the shared train step on its own data:

    PRM  step labels at step ends (+ the answer segment)   loss: token BCE
    ORM  outcome label at the final answer token          loss: token BCE
    OPRM the union of both                                loss: token BCE

No label from a level outside the supervised ones reaches training (`assert_levels`).
Artifacts: `reward_models` = {kind: (ModelConfig, params)}, saved under
`stages/reward_models/<kind>/`.
"""

from __future__ import annotations

import collections

import jax
import ml_collections

from scalign.algorithms.reward_labels import assert_levels, build_reward_records
from scalign.data.pipeline import make_batch_iterator
from scalign.evaluation.generation import sample_solutions
from scalign.experiment import Context, Stage, register_stage, require_block
from scalign.models.heads import SCALAR_HEAD, add_scalar_head, scalar_head_logical_axes
from scalign.models.transformer import param_logical_axes
from scalign.objectives.reward import RewardFeaturizer, make_reward_loss
from scalign.reporting import line_plot, markdown_table
from scalign.sampling import Sampler
from scalign.stages.common import run_training, validate_training
from scalign.training.checkpoint import load_model, save_model
from scalign.training.metrics import read_metrics

KINDS = ("orm", "prm", "oprm")


def _reward_axes(model):
    return {**param_logical_axes(model), SCALAR_HEAD: scalar_head_logical_axes()}


@register_stage
class RewardModelsStage(Stage):
    name = "reward_models"
    requires = {"policy": ("sft", "checkpoint"), "tokenizer": ("data", "checkpoint"),
                "domain": ("data",)}

    def validate(self, config: ml_collections.ConfigDict, mesh_shape: dict[str, int],
                 errors: list[str]) -> None:
        cfg = require_block(config, "reward_models", (
            "levels", "problems_per_level", "samples_per_problem", "temperature", "evaluators",
            "max_new_tokens", "train"), errors)
        if cfg is None:
            return
        bad = [k for k in cfg.get("evaluators", ()) if k not in KINDS]
        if bad:
            errors.append(f"config.reward_models.evaluators has unknown kinds {bad}; use {KINDS}")
        if "train" in cfg:
            sub = ml_collections.ConfigDict({"reward_models_train": cfg.train})
            validate_training(sub, "reward_models_train", mesh_shape, errors)
        if cfg.get("after_first_error", "drop") not in ("drop", "keep"):
            errors.append("config.reward_models.after_first_error must be 'drop' or 'keep'")

    def run(self, ctx: Context) -> None:
        cfg = ctx.config.reward_models
        model, policy_params = ctx.need("policy")
        tokenizer = ctx.need("tokenizer")
        domain = ctx.need("domain")
        levels = tuple(cfg.levels)
        problems = [p for lv in levels
                    for p in list(domain.train_problems(lv))[:int(cfg.problems_per_level)]]
        sampler = Sampler(model, policy_params, tokenizer, mesh=ctx.mesh,
                          max_new_tokens=int(cfg.max_new_tokens))
        solutions = sample_solutions(
            sampler, domain, problems, n=int(cfg.samples_per_problem),
            key=ctx.key(self.name, "labels"), temperature=float(cfg.temperature),
            max_new_tokens=int(cfg.max_new_tokens), batch_rows=int(cfg.get("batch_size", 256)),
            desc="label samples")
        records, stats = build_reward_records(
            solutions, domain, tokenizer.token_bytes(), solutions.prompt_ids,
            after_first_error=cfg.get("after_first_error", "drop"),
            max_ratio=float(cfg.get("max_ratio", 3.0)),
            keep_one_class=int(cfg.get("keep_one_class", 2)), seed=int(ctx.config.seed))
        for kind in cfg.evaluators:
            assert_levels(records[kind], levels)  # the premise: no hard-level supervision
        by_level = collections.Counter(int(r["level"]) for r in records["oprm"])
        out = {}
        histories = {}
        for kind in cfg.evaluators:
            out[kind] = self._train_one(ctx, kind, model, policy_params, records[kind], tokenizer)
            histories[kind] = read_metrics(ctx.workdir / "metrics.jsonl", f"rm_{kind}")
        ctx.artifacts["reward_models"] = out
        self._report(ctx, levels, stats, histories, {k: len(v) for k, v in records.items()},
                     by_level)

    def _train_one(self, ctx: Context, kind: str, model, policy_params, records, tokenizer):
        cfg = ctx.config.reward_models
        path = ctx.stage_dir(self.name) / kind
        if (path / "model_config.json").exists() and ctx.resume:
            return self._load_one(ctx, path)
        if not records:
            raise ValueError(f"reward_models: no {kind} training records (all samples dropped)")
        data_iter = make_batch_iterator(
            records, RewardFeaturizer(pad_id=tokenizer.pad_id, kind=kind),
            batch_size=int(cfg.train.batch_size), seq_len=int(cfg.train.seq_len),
            seed=int(ctx.config.seed), num_epochs=None,
            on_too_long=cfg.train.get("on_too_long", "error"))
        init_params = add_scalar_head(model, policy_params, ctx.key(self.name, kind, "head"))
        result = run_training(ctx, stage=f"rm_{kind}", cfg=cfg.train, model=model,
                              loss_fn=make_reward_loss(model), data_iter=data_iter,
                              params=init_params, logical_axes=_reward_axes(model))
        save_model(path, model, result.state.params, {"kind": kind, "levels": list(cfg.levels)})
        return model, result.state.params

    def _load_one(self, ctx: Context, path):
        from scalign.evaluation.scoring import scalar_param_shardings

        model, params, _ = load_model(path)
        return model, jax.device_put(params, scalar_param_shardings(model, params, ctx.mesh))

    def load(self, ctx: Context) -> None:
        cfg = ctx.config.reward_models
        ctx.artifacts["reward_models"] = {
            kind: self._load_one(ctx, ctx.stage_dir(self.name) / kind) for kind in cfg.evaluators}

    def _report(self, ctx: Context, levels, stats, histories, sizes, by_level) -> None:
        cfg = ctx.config.reward_models
        rows = stats.as_rows() + [{"metric": f"{k}_records", "value": v} for k, v in sizes.items()]
        rows += [{"metric": "oprm_records_of_level", "level": lv, "value": n}
                 for lv, n in sorted(by_level.items())]
        for kind, hist in histories.items():
            last = next((h for h in reversed(hist) if "loss" in h), None)
            if last:
                rows.append({"metric": f"{kind}_final_loss", "value": last["loss"]})
                if "accuracy" in last:
                    rows.append({"metric": f"{kind}_final_train_accuracy",
                                 "value": last["accuracy"]})
        ctx.results.set_rows(self.name, rows)
        fig = ctx.report.figure_path("reward_models_loss.png")
        series = {k: ([h["step"] for h in hist if "loss" in h], [h["loss"] for h in hist
                                                                   if "loss" in h])
                  for k, hist in histories.items()}
        if any(xs for xs, _ in series.values()):
            line_plot(fig, series, title="Reward-model training loss (easy levels only)",
                      xlabel="step", ylabel="BCE")
        md = [f"## Reward models trained on levels {list(levels)} only", "",
              f"{stats.problems} easy training problems x {int(cfg.samples_per_problem)} policy "
              f"samples (T={float(cfg.temperature):g}), labelled by the verifier; PRM labels "
              f"{cfg.get('after_first_error', 'drop')} after the first wrong step; ORM data "
              f"balanced to at most {float(cfg.get('max_ratio', 3.0)):g}:1 per problem.", "",
              markdown_table(rows, ["metric", "value"]), ""]
        if any(xs for xs, _ in series.values()):
            md += [f"![reward model loss]({ctx.report.rel(fig)})", ""]
        ctx.report.set_section(self.name, "\n".join(md))
