"""Stage `reward_models`: ORM / PRM / OPRM trained on easy problems only.

Easy-to-hard generalization (Sun et al. 2024): the SFT policy samples K solutions for each easy
*training* problem (`config.reward_models.levels`, default 1-3); the domain verifier labels
steps and outcomes (`algorithms.reward_labels`); each evaluator is the SFT backbone plus a
fresh scalar head, fitted with the shared train step on its own data:

    PRM  step labels at step ends (+ the answer segment)   loss: token BCE
    ORM  outcome label at the final answer token          loss: token BCE
    OPRM the union of both                                loss: token BCE

`config.reward_models.label_source` says where the labels come from:

  "verifier" (default)  policy samples of easy train problems labelled by the domain's
                        verifier (keys `problems_per_level`, `samples_per_problem`,
                        `temperature`, `max_new_tokens`).
  "prm800k"             PRM800K's human step labels (Lightman et al. 2023), as Sun et al. (2024)
                        train their PRMs on real MATH: `config.reward_models.prm800k` (a JSONL
                        path or a list, local or gs://) is read with `data.math.read_prm800k`,
                        problem levels are looked up among the MATH train problems of the
                        `math` domain by problem text, and only `levels` are kept
                        (`reward_labels.prm800k_solutions`). PRM: the human step labels at the
                        step ends (+ the "# Answer" step's label at the last answer token); ORM:
                        is_equiv(final answer, ground truth) at the last answer token, for the
                        solutions that reach an answer; OPRM: the union. Solutions longer than
                        `train.seq_len` tokens are dropped and counted. `prm800k_on_error`
                        ("raise" | "skip") is the reader's bad-record policy.

No label from a level outside the supervised ones reaches training (`assert_levels`). The
optional `train.remat` sets the backbone's rematerialisation for training; the optional
`train.epochs` trains each evaluator for ceil(epochs * its records / batch_size) steps
(`steps` is then not needed).

Options as in the easy-to-hard code (Sun et al. 2024): `prm_label_span` puts each PRM step
label on the delimiter's first token ("end", default), on the 3 positions "around" it, or on
every token of the "step" (their `train_on_every_token`); `backbone` = "policy" (default: the
SFT policy's weights), "init" (the evaluator's own, freshly initialised backbone of the same
shape: an evaluator that shares nothing with the generator), "blind" (the evaluator's own
backbone of the same shape, SFT'd from scratch with the `config.sft` recipe on the same easy
demonstrations, but with the goal hidden in the prompt: `stepmath.Problem.blind_prompt`) or
"goal" (the same, with the goal shown and its copy kept in the SFT loss, whatever
`config.sft.exclude_goal` says: a backbone that must predict the target as the last result, the
hope being that its features carry the comparison the target check needs; measured on the seed
of the 2026-12-05 reach4 study whose PRM missed the check, it did not make the check appear:
experiments/results/e2h_stepmath_2026-12-05/prm_levers_seed0/).

Why "blind": on search designs (`reach4`) every demonstration ends its last step at the
target, and the SFT policy learns to *write* the target there ("7+5=5" for target 5) -- its
greedy failures are nearly all such last steps. A PRM started from that policy inherits the
shortcut: the step looks right to a model that predicts the target, and on the 2026-12-03 run
the easy-trained PRM's solution-level ROC-AUC on hard problems was 0.51 while its step ROC-AUC
(pooled over all steps) was 0.98. A backbone trained with the goal hidden must compute each
step's result from its inputs, so checking the last step is the same local arithmetic as
checking any other. It sees only easy demonstrations, like the policy. (Measured on reach4:
it did not help, 2026-12-04; what did is removing the shortcut from the *policy*:
`config.sft.exclude_goal`, the demo's default since 2026-12-05, with which the policy computes
its last step, fails by missing the target, and the default "policy" backbone's PRM learned
the target check in one diagnosis run (hard outcome ROC-AUC 0.995) and in one study seed of
three: experiments/results/e2h_stepmath_2026-12-05/.)
`augment_failures` (float, default 0.0 = off): with label_source "verifier" on stepmath, add
about that many verifier-labelled *failing* solutions per real PRM record, made from the same
easy problems' correct solutions (gold or verified samples) by changing one step's operation or
operand while its written result is kept, or set to the goal (`algorithms.failure_augment`):
the policy-like last-step failures ("4+4=6" for target 6) the PRM does not learn to catch from
the policy's own samples alone. PRM (and OPRM's PRM part) only; ORM data unchanged.
Artifacts: `reward_models` = {kind: (ModelConfig, params)}, saved under
`stages/reward_models/<kind>/`.
"""

from __future__ import annotations

import collections
import functools
import math

import jax
import ml_collections

from scalign.algorithms.failure_augment import augment_records
from scalign.algorithms.reward_labels import (
    LabelStats,
    assert_levels,
    build_reward_records,
    prm800k_solutions,
)
from scalign.data.math import read_prm800k
from scalign.data.pipeline import make_batch_iterator, make_sft_iterator
from scalign.data.records import ON_ERROR_VALUES
from scalign.evaluation.generation import sample_solutions
from scalign.models.heads import SCALAR_HEAD, add_scalar_head, scalar_head_logical_axes
from scalign.models.transformer import init_params as init_params_fn
from scalign.models.transformer import param_logical_axes
from scalign.objectives.reward import PRM_LABEL_SPANS, RewardFeaturizer, make_reward_loss
from scalign.objectives.sft import make_sft_loss
from scalign.reporting import line_plot, markdown_table
from scalign.sampling import Sampler
from scalign.stages.base import Context, Stage, check_levels, register_stage, require_block
from scalign.stages.common import (
    length_buckets,
    run_training,
    shardings_for,
    training_model,
    validate_training,
)
from scalign.stages.data import check_paths_exist, math_paths
from scalign.training.checkpoint import load_model, save_model
from scalign.training.metrics import read_metrics

KINDS = ("orm", "prm", "oprm")
OWN_BACKBONES = ("blind", "goal")  # SFT'd by this stage (`_own_backbone`)
BACKBONES = ("policy", "init", *OWN_BACKBONES)
LABEL_SOURCES = ("verifier", "prm800k")
SAMPLING_KEYS = ("problems_per_level", "samples_per_problem", "temperature", "max_new_tokens")


def epoch_steps(epochs: float, num_records: int, batch_size: int) -> int:
    """Steps for `epochs` passes over `num_records`: ceil(epochs * num_records / batch_size)."""
    return max(1, math.ceil(epochs * num_records / batch_size))


def train_block(cfg: ml_collections.ConfigDict, num_records: int) -> ml_collections.ConfigDict:
    """`config.reward_models.train` with `steps` from `epochs` when that is set.

    Sun et al. (2024) train each evaluator for 2 epochs; ORM, PRM and OPRM data differ in size
    (OPRM = PRM + ORM), so a fixed step count would give them different numbers of epochs.
    """
    if cfg.get("epochs") is None:
        return cfg
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.steps = epoch_steps(float(cfg.epochs), num_records, int(cfg.batch_size))
    return out


def _reward_axes(model):
    return {**param_logical_axes(model), SCALAR_HEAD: scalar_head_logical_axes()}


@register_stage
class RewardModelsStage(Stage):
    name = "reward_models"
    requires = {"policy": ("sft", "checkpoint"), "tokenizer": ("data", "checkpoint"),
                "domain": ("data",)}

    def validate(self, config: ml_collections.ConfigDict, mesh_shape: dict[str, int],
                 errors: list[str]) -> None:
        cfg = require_block(config, "reward_models", ("levels", "evaluators", "train"), errors)
        if cfg is None:
            return
        source = cfg.get("label_source", "verifier")
        if source not in LABEL_SOURCES:
            errors.append(f"config.reward_models.label_source must be one of {LABEL_SOURCES}, "
                          f"got {source!r}")
        elif source == "verifier":
            errors.extend(f"config.reward_models.{k} is missing" for k in SAMPLING_KEYS
                          if k not in cfg)
            check_levels(config, "reward_models.levels", errors)
        else:
            if not math_paths(cfg, "prm800k"):
                errors.append("config.reward_models.prm800k is missing (PRM800K label JSONL "
                              "path(s), local or gs://) for label_source='prm800k'")
            data = config.get("data", {})
            if data.get("domain") != "math":
                errors.append(f"config.reward_models.label_source='prm800k' needs "
                              f"config.data.domain='math' (levels and answers come from MATH), "
                              f"got {data.get('domain')!r}")
            missing = sorted(set(cfg.get("levels", ())) - set(data.get("levels", ())))
            if missing:
                errors.append(f"config.reward_models.levels {missing} are not in "
                              f"config.data.levels; PRM800K levels are looked up among those "
                              f"MATH train problems")
            if cfg.get("prm800k_on_error", "raise") not in ON_ERROR_VALUES:
                errors.append(f"config.reward_models.prm800k_on_error must be one of "
                              f"{ON_ERROR_VALUES}, got {cfg.get('prm800k_on_error')!r}")
        bad = [k for k in cfg.get("evaluators", ()) if k not in KINDS]
        if bad:
            errors.append(f"config.reward_models.evaluators has unknown kinds {bad}; use {KINDS}")
        if "train" in cfg:
            validate_training(config, "reward_models.train", mesh_shape, errors)
        if cfg.get("prm_label_span", "end") not in PRM_LABEL_SPANS:
            errors.append(f"config.reward_models.prm_label_span must be one of "
                          f"{PRM_LABEL_SPANS}, got {cfg.get('prm_label_span')!r}")
        if cfg.get("backbone", "policy") not in BACKBONES:
            errors.append(f"config.reward_models.backbone must be 'policy' (the SFT policy's "
                          f"weights), 'init' (a fresh backbone of the same shape), 'blind' "
                          f"(a backbone SFT'd with the goal hidden) or 'goal' (SFT'd with the "
                          f"goal in the loss), got "
                          f"{cfg.get('backbone')!r}")
        elif cfg.get("backbone") in OWN_BACKBONES:
            which = cfg.get("backbone")
            if config.get("data", {}).get("domain", "stepmath") != "stepmath":
                errors.append(f"config.reward_models.backbone={which!r} needs the stepmath "
                              f"domain (prompts with a goal)")
            if "sft" not in config:
                errors.append(f"config.reward_models.backbone={which!r} trains with the "
                              f"config.sft recipe: config.sft is missing")
        augment = cfg.get("augment_failures", 0.0)
        if isinstance(augment, bool) or not isinstance(augment, (int, float)) \
                or not math.isfinite(augment) or augment < 0:
            errors.append(f"config.reward_models.augment_failures must be a number >= 0 "
                          f"(corrupted easy solutions per real PRM record; 0 = off), got "
                          f"{augment!r}")
        elif augment > 0:
            if source != "verifier":
                errors.append("config.reward_models.augment_failures > 0 needs "
                              "label_source='verifier' (it corrupts the sampled problems' "
                              "correct solutions and labels them with the verifier)")
            if config.get("data", {}).get("domain", "stepmath") != "stepmath":
                errors.append("config.reward_models.augment_failures > 0 needs the stepmath "
                              "domain (a step verifier to label the corrupted solutions)")
        if cfg.get("after_first_error", "drop") not in ("drop", "keep"):
            errors.append("config.reward_models.after_first_error must be 'drop' or 'keep'")

    def run(self, ctx: Context) -> None:
        cfg = ctx.config.reward_models
        model, policy_params = ctx.need("policy")
        levels = tuple(cfg.levels)
        if cfg.get("label_source", "verifier") == "prm800k":
            records, stats, extra_rows = self._prm800k_records(ctx)
        else:
            records, stats, extra_rows = self._verifier_records(ctx)
        for kind in cfg.evaluators:
            assert_levels(records[kind], levels)  # the premise: no hard-level supervision
        by_level = collections.Counter(int(r["level"]) for r in records["oprm"])
        out = {}
        histories = {}
        backbone = policy_params
        if cfg.get("backbone", "policy") in OWN_BACKBONES:
            backbone = self._own_backbone(ctx, model, cfg.backbone)
            histories["backbone"] = read_metrics(ctx.workdir / "metrics.jsonl",
                                                             "rm_backbone")
        for kind in cfg.evaluators:
            out[kind] = self._train_one(ctx, kind, model, backbone, records[kind],
                                        ctx.need("tokenizer"))
            histories[kind] = read_metrics(ctx.workdir / "metrics.jsonl", f"rm_{kind}")
        ctx.artifacts["reward_models"] = out
        self._report(ctx, levels, stats, histories, {k: len(v) for k, v in records.items()},
                     by_level, extra_rows)

    def _verifier_records(self, ctx: Context) -> tuple[dict, LabelStats, list[dict]]:
        """Label policy samples of easy train problems with the domain's verifier (plus,
        with `augment_failures` > 0, verifier-labelled corruptions of their correct
        solutions: `augment_records`)."""
        cfg = ctx.config.reward_models
        model, policy_params = ctx.need("policy")
        tokenizer = ctx.need("tokenizer")
        domain = ctx.need("domain")
        problems = [p for lv in cfg.levels
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
        fraction = float(cfg.get("augment_failures", 0.0))
        if fraction <= 0:
            return records, stats, []
        records, rows = augment_records(records, solutions, domain, tokenizer, fraction,
                                        after_first_error=cfg.get("after_first_error", "drop"),
                                        seed=int(ctx.config.seed))
        return records, stats, rows

    def _prm800k_records(self, ctx: Context) -> tuple[dict, LabelStats, list[dict]]:
        """PRM800K human labels of easy train problems (see the module docstring)."""
        cfg = ctx.config.reward_models
        domain = ctx.need("domain")
        tokenizer = ctx.need("tokenizer")
        paths = math_paths(cfg, "prm800k")
        check_paths_exist(paths, "config.reward_models.prm800k")
        read, read_stats = read_prm800k(paths, levels=domain.level_index(),
                                        on_error=cfg.get("prm800k_on_error", "raise"))
        labelled, drops = prm800k_solutions(read, domain, tokenizer, levels=tuple(cfg.levels),
                                            max_tokens=int(cfg.train.seq_len))
        records, stats = build_reward_records(
            labelled, domain, tokenizer.token_bytes(), labelled.prompt_ids,
            after_first_error=cfg.get("after_first_error", "drop"),
            max_ratio=float(cfg.get("max_ratio", 3.0)),
            keep_one_class=int(cfg.get("keep_one_class", 2)), seed=int(ctx.config.seed),
            orm_needs_answer=True)
        rows = [{"metric": "prm800k_read", "value": read_stats.read}]
        rows += [{"metric": f"prm800k_skipped_{k}", "value": v}
                 for k, v in sorted(read_stats.reasons.items())]
        rows += [{"metric": f"prm800k_dropped_{k}", "value": v} for k, v in sorted(drops.items())]
        return records, stats, rows

    def _own_backbone(self, ctx: Context, model, which: str):
        """The evaluators' own backbone: `model`'s shape, SFT'd from scratch (`config.sft`'s
        steps, batch, optimizer) on the reward levels' demonstrations, with the goal hidden
        (`which` = "blind") or shown and kept in the loss ("goal")."""
        path = ctx.stage_dir(self.name) / "backbone"
        kind = f"{which}_backbone"
        if (path / "model_config.json").exists() and ctx.resume:
            _, params, meta = load_model(path)
            if meta.get("kind") == kind:  # a resumed run that switched blind <-> goal retrains
                return jax.device_put(params, shardings_for(ctx, model))
        sft = ctx.config.sft
        tokenizer, domain = ctx.need("tokenizer"), ctx.need("domain")
        records = domain.train_records(tuple(ctx.config.reward_models.levels),
                                       blind=which == "blind")
        data_iter = make_sft_iterator(records, tokenizer, batch_size=int(sft.batch_size),
                                      seq_len=int(sft.seq_len), seed=int(ctx.config.seed) + 1,
                                      num_epochs=None, on_too_long=sft.get("on_too_long", "error"))
        result = run_training(ctx, stage="rm_backbone", cfg=sft, model=training_model(model, sft),
                              loss_fn=make_sft_loss(model), data_iter=data_iter)
        save_model(path, model, result.state.params,
                   {"kind": kind, "levels": list(ctx.config.reward_models.levels)})
        return result.state.params

    def _train_one(self, ctx: Context, kind: str, model, policy_params, records, tokenizer):
        cfg = ctx.config.reward_models
        path = ctx.stage_dir(self.name) / kind
        if (path / "model_config.json").exists() and ctx.resume:
            return self._load_one(ctx, path)
        if not records:
            raise ValueError(f"reward_models: no {kind} training records (all samples dropped)")
        data_iter = make_batch_iterator(
            records, RewardFeaturizer(pad_id=tokenizer.pad_id, kind=kind,
                                      prm_label_span=cfg.get("prm_label_span", "end")),
            batch_size=int(cfg.train.batch_size), **length_buckets(cfg.train),
            seed=int(ctx.config.seed), num_epochs=None,
            on_too_long=cfg.train.get("on_too_long", "error"))
        backbone = policy_params
        if cfg.get("backbone", "policy") == "init":  # the evaluator's own (fresh) backbone
            backbone = jax.jit(functools.partial(init_params_fn, model))(
                ctx.key(self.name, kind, "backbone"))
        init_params = add_scalar_head(model, backbone, ctx.key(self.name, kind, "head"))
        model = training_model(model, cfg.train)
        result = run_training(ctx, stage=f"rm_{kind}", cfg=train_block(cfg.train, len(records)),
                              model=model, loss_fn=make_reward_loss(model), data_iter=data_iter,
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

    def _report(self, ctx: Context, levels, stats, histories, sizes, by_level,
                extra_rows) -> None:
        cfg = ctx.config.reward_models
        rows = stats.as_rows() + [{"metric": f"{k}_records", "value": v} for k, v in sizes.items()]
        rows += extra_rows
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
        if cfg.get("label_source", "verifier") == "prm800k":
            source = (f"{stats.samples} PRM800K step-labelled solutions of {stats.problems} easy "
                      f"train problems (human step labels; ORM outcome = final answer graded "
                      f"against the ground truth, for the solutions that reach an answer)")
        else:
            source = (f"{stats.problems} easy training problems x "
                      f"{int(cfg.samples_per_problem)} policy samples "
                      f"(T={float(cfg.temperature):g}), labelled by the verifier")
        md = [f"## Reward models trained on levels {list(levels)} only", "",
              f"{source}; PRM labels "
              f"{cfg.get('after_first_error', 'drop')} after the first wrong step; ORM data "
              f"balanced to at most {float(cfg.get('max_ratio', 3.0)):g}:1 per problem."
              + (f" PRM data augmented with verifier-labelled failing corruptions of the same "
                 f"easy problems' correct solutions ({float(cfg.augment_failures):g} per real "
                 f"record requested; rows augment_*)."
                 if float(cfg.get("augment_failures", 0.0)) > 0 else ""), "",
              markdown_table(rows, ["metric", "value"]), ""]
        if any(xs for xs, _ in series.values()):
            md += [f"![reward model loss]({ctx.report.rel(fig)})", ""]
        ctx.report.set_section(self.name, "\n".join(md))
