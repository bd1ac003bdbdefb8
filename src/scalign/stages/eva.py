"""Stage `eva`: the solver trained by asymmetric self-play (Ye et al. 2024) or on fixed prompts.

From the `policy` (stage `sft`, or `checkpoint` — e.g. source "saved": an earlier run's SFT
policy, so every loss and variant of a study starts from the same one), T iterations of
`algorithms.eva.EvaIteration` on an `algorithms.loop.OnlineLoop` on stepmath:

  variant     prompts each iteration                        reward (creator and pairs)
  fixed       the initial prompt set, every iteration        verifier (`VerifierReward`)
  eva         creator: informativeness -> select -> evolve   verifier
  eva_prm     as eva                                         easy-trained PRM (`PRMReward`)
  fixed_prm   as fixed                                       easy-trained PRM

The initial prompt set is `prompts_per_level` training problems of each of `config.eva.levels`
(the easy levels by default: eva x easy-to-hard asks whether the creator moves the prompts
toward hard levels). Every iteration: K = `samples` responses per prompt; pairs = highest vs
lowest reward (`preference_pairs`); exactly `updates` preference steps of `batch_size` pairs
(`EvaConfig.updates`: the same number of updates for every variant) with the loss `loss`
(`objectives.preference`: dpo | ipo | hinge | simpo | orpo | sppo; its hyperparameters in
`config.eva.hparams`). With a reference (all but SimPO / ORPO) the reference is the policy at
the start of each iteration (`refresh_reference`, default True: iterative DPO's and eva's
per-iteration reset) and its log-probs come from one forward over the rollout. Pairs whose
prompt fits `seq_len - max_new_tokens` train in the shared-prompt layout (`loop.pair_batches`:
the prompt's forward once per pair). Optional `grad_accum_steps` (default 1: micro-batches of
`batch_size / grad_accum_steps` pairs, the same gradient) and `clip_norm` (default 1.0).

Judging (held-out test problems of `eval_levels`, `eval_problems` each):
  winrate  `evaluation.winrate.win_rate` of the trained policy against the starting (SFT)
           policy, `eval_samples` samples per problem each at `eval_temperature` with the same
           key, judged by the verifier reward above (ties half), bootstrap 95% CI over problems;
  hard_acc / all_acc  greedy answer accuracy on `hard_levels` / all eval levels, bootstrap CI.
Rows (`results.json["eva"]`): {"loss", "variant", "informativeness", "metric", "mean", "std",
"ci_low", "ci_high", "seeds"} (one run: std 0, seeds 1; the starting policy's accuracies as
variant "sft"). `results.json["eva_pool"]`: the active prompt set's level shares per iteration
({"iteration", "level", "share"}); the report has them as a table and a PNG. The pool (with
informativeness and lineage) is checkpointed with the loop every iteration (restored on resume)
and also written to `stages/eva/pool/iteration_<k>.json`. `config.debug.stop_after_iterations`
(test drill) stops the stage with `training.loop.Interrupted` after that many iterations.

Artifact: `eva_policy` <- the trained policy (saved under `stages/eva/policy/`); `policy` is
left as it was, so stages after this one (rerank, rl) still see the SFT policy.

Real-scale configs (`experiments/configs/eva_gemma2_9b_dpo.py`) validate with the same keys;
running them needs a prompt set and a scalar reward model that this stage does not load yet
(`prompt_source` other than "stepmath" stops with that message before anything compiles).
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from scalign.algorithms.eva import METRICS, SELECTIONS, EvaConfig, EvaIteration
from scalign.algorithms.evolve import StepMathEvolver
from scalign.algorithms.loop import OnlineLoop, PromptPool
from scalign.algorithms.rewards import PRMReward, VerifierReward
from scalign.evaluation.generation import sample_solutions
from scalign.evaluation.scoring import SequenceScorer
from scalign.evaluation.winrate import bootstrap_mean_ci, win_rate
from scalign.models.config import REMAT_POLICIES
from scalign.objectives.preference import LOSSES, REFERENCE_FREE, make_preference_loss
from scalign.reporting import line_plot, markdown_table
from scalign.sampling import Sampler
from scalign.stages.base import Context, Stage, check_batch, register_stage, require_block
from scalign.stages.common import preset_length_limit, shardings_for, training_model
from scalign.training.checkpoint import Checkpointer, load_model, save_model
from scalign.training.state import OptimizerConfig, make_optimizer

VARIANTS = ("fixed", "eva", "eva_prm", "fixed_prm")
PROMPT_SOURCES = ("stepmath", "jsonl")
KEYS = ("loss", "variant", "iterations", "samples", "max_new_tokens", "batch_size", "updates",
        "seq_len", "optimizer")
STEPMATH_KEYS = ("levels", "prompts_per_level", "eval_levels", "eval_problems")
ROW_FIELDS = ("loss", "variant", "informativeness", "metric", "mean", "std", "ci_low", "ci_high",
              "seeds")


def uses_prm(variant: str) -> bool:
    return variant.endswith("_prm")


def evolves(variant: str) -> bool:
    return variant.startswith("eva")


def informativeness_label(cfg: ml_collections.ConfigDict) -> str:
    return str(cfg.get("informativeness", "gap")) if evolves(cfg.variant) else "none"


def eva_config(cfg: ml_collections.ConfigDict, pad_id: int = 0) -> EvaConfig:
    """`config.eva` -> `algorithms.eva.EvaConfig` (raises ValueError on bad values)."""
    return EvaConfig(samples=int(cfg.samples), temperature=float(cfg.get("temperature", 0.7)),
                     top_p=float(cfg.get("top_p", 0.9)), max_new_tokens=int(cfg.max_new_tokens),
                     metric=str(cfg.get("informativeness", "gap")),
                     selection=str(cfg.get("selection", "importance_weighted")),
                     fraction=float(cfg.get("fraction", 0.25)),
                     evolutions=int(cfg.get("evolutions", 4)),
                     evolved_share=float(cfg.get("evolved_share", 0.8)),
                     evolve=evolves(str(cfg.variant)), min_gap=float(cfg.get("min_gap", 0.0)),
                     rows=int(cfg.batch_size), width=int(cfg.seq_len), pad_id=pad_id,
                     updates=int(cfg.updates))


def optimizer_config(cfg: ml_collections.ConfigDict) -> OptimizerConfig:
    """`config.eva.optimizer` over iterations x updates steps; an optional `warmup_ratio`
    (the paper's 0.1) sets warmup_steps = round(ratio x total steps)."""
    opt = dict(cfg.optimizer.to_dict())
    total = int(cfg.iterations) * int(cfg.updates)
    ratio = opt.pop("warmup_ratio", None)
    if ratio is not None:
        if not 0.0 <= float(ratio) < 1.0:
            raise ValueError(f"optimizer.warmup_ratio={ratio} must be in [0, 1)")
        opt["warmup_steps"] = int(round(float(ratio) * total))
    return OptimizerConfig.from_config({**opt, "total_steps": total})


def level_shares(pool: PromptPool, ids: list[int], levels: tuple[int, ...]) -> dict[int, float]:
    lv = [int(pool[i].data.get("level", -1)) for i in ids]
    return {int(x): (lv.count(int(x)) / len(lv) if lv else 0.0) for x in levels}


@register_stage
class EvaStage(Stage):
    name = "eva"
    requires = {"policy": ("sft", "checkpoint"), "tokenizer": ("data", "checkpoint")}

    # ------------------------------------------------------------------ validation
    def validate(self, config: ml_collections.ConfigDict, mesh_shape: dict[str, int],
                 errors: list[str]) -> None:
        cfg = require_block(config, "eva", KEYS, errors)
        if cfg is None or any(k not in cfg for k in KEYS):
            return
        if cfg.loss not in LOSSES:
            errors.append(f"config.eva.loss must be one of {sorted(LOSSES)}, got {cfg.loss!r}")
            return
        if cfg.variant not in VARIANTS:
            errors.append(f"config.eva.variant must be one of {VARIANTS}, got {cfg.variant!r}")
            return
        metric = cfg.get("informativeness", "gap")
        if metric not in METRICS:
            errors.append(f"config.eva.informativeness must be one of {METRICS}, got {metric!r}")
        selection = cfg.get("selection", "importance_weighted")
        if selection not in SELECTIONS:
            errors.append(f"config.eva.selection must be one of {SELECTIONS}, got "
                          f"{selection!r}")
        try:
            make_preference_loss_check(cfg)
            eva_config(cfg)
            optimizer_config(cfg)
        except (TypeError, ValueError) as e:
            errors.append(f"config.eva (loss {cfg.loss!r}, hparams, optimizer): {e}")
        for key in ("iterations", "updates", "samples", "max_new_tokens"):
            if int(cfg[key]) < 1:
                errors.append(f"config.eva.{key}={cfg[key]} must be >= 1")
        accum = int(cfg.get("grad_accum_steps") or 1)
        if accum < 1:
            errors.append(f"config.eva.grad_accum_steps={accum} must be >= 1")
            accum = 1
        check_batch(errors, "eva.batch_size", int(cfg.batch_size), mesh_shape, accum=accum)
        if int(cfg.seq_len) <= int(cfg.max_new_tokens):
            errors.append(f"config.eva.seq_len={cfg.seq_len} must exceed max_new_tokens="
                          f"{cfg.max_new_tokens} (it holds prompt + response)")
        limit = preset_length_limit(config)
        if limit is not None and int(cfg.seq_len) > limit[0]:
            errors.append(f"config.eva.seq_len={cfg.seq_len} is longer than the model supports "
                          f"({limit[1]})")
        if cfg.get("remat") is not None and cfg.remat not in REMAT_POLICIES:
            errors.append(f"config.eva.remat must be one of {REMAT_POLICIES}, got {cfg.remat!r}")
        source = cfg.get("prompt_source", "stepmath")
        if source not in PROMPT_SOURCES:
            errors.append(f"config.eva.prompt_source must be one of {PROMPT_SOURCES}, got "
                          f"{source!r}")
            return
        stages = list(config.get("stages", ()))
        before = stages[:stages.index(self.name)] if self.name in stages else stages
        if source == "stepmath":
            errors.extend(f"config.eva.{k} is missing" for k in STEPMATH_KEYS if k not in cfg)
            if "data" not in before:
                errors.append("config.eva: prompt_source='stepmath' reads the domain of stage "
                              "'data': put 'data' before 'eva'")
            elif config.data.get("domain") != "stepmath":
                errors.append(f"config.eva: prompt_source='stepmath' needs config.data.domain="
                              f"'stepmath', got {config.data.get('domain')!r}")
            data_levels = tuple(config.get("data", {}).get("levels", ()) or ())
            for key in ("levels", "eval_levels", "hard_levels"):
                bad = [lv for lv in tuple(cfg.get(key, ()) or ()) if lv not in data_levels]
                if bad and data_levels:
                    errors.append(f"config.eva.{key} has {bad}, which config.data.levels "
                                  f"{data_levels} does not build")
        else:
            for key in ("prompts", "reward_model"):
                if not cfg.get(key):
                    errors.append(f"config.eva.{key} is missing (prompt_source='jsonl': a "
                                  f"JSONL prompt set and a scalar reward model)")
        if uses_prm(cfg.variant):
            rm = config.get("reward_models", {})
            if "reward_models" not in before:
                errors.append(f"config.eva.variant={cfg.variant!r} rewards with the easy-"
                              f"trained PRM: put stage 'reward_models' before 'eva'")
            elif cfg.get("prm", "prm") not in tuple(rm.get("evaluators", ())):
                errors.append(f"config.eva.prm={cfg.get('prm', 'prm')!r} is not among "
                              f"config.reward_models.evaluators {tuple(rm.get('evaluators', ()))}")

    # ------------------------------------------------------------------ run
    def run(self, ctx: Context) -> None:
        cfg = ctx.config.eva
        if cfg.get("prompt_source", "stepmath") != "stepmath":
            raise NotImplementedError(
                "config.eva.prompt_source='jsonl': this stage runs the stepmath domain; a JSONL "
                "prompt set with a scalar reward model (and LLMEvolver as the creator) is not "
                "wired into the stage yet. The config validates and its step lowers "
                "(tests/stages/test_eva_gemma_config.py).")
        model, params = ctx.need("policy")
        model = training_model(model, cfg)
        tokenizer = ctx.need("tokenizer")
        domain = ctx.need("domain")
        sft_params = jax.device_get(params)  # the judge's reference policy (host copy)

        entries = [dict(stepmath_record(p)) for lv in cfg.levels
                   for p in list(domain.train_problems(int(lv)))[:int(cfg.prompts_per_level)]]
        pool = PromptPool.from_prompts(entries)
        levels = tuple(sorted(set(domain.levels)))

        def encode(item: dict[str, Any]) -> list[int]:
            return tokenizer.encode(item["prompt"], add_bos=True)

        if uses_prm(cfg.variant):
            m, p = ctx.artifacts["reward_models"][cfg.get("prm", "prm")]
            reward = PRMReward(SequenceScorer(m, p, ctx.mesh, pad_id=tokenizer.pad_id,
                                              batch_size=int(cfg.get("score_batch_size", 256))),
                               tokenizer, encode)
        else:
            reward = VerifierReward(tokenizer)
        ecfg = eva_config(cfg, pad_id=tokenizer.pad_id)
        evolver = (StepMathEvolver(design=getattr(domain, "design", None),
                                   mutations=tuple(cfg.get("mutations", ()) or ()) or None)
                   if ecfg.evolve else None)
        iteration = EvaIteration(ecfg, encode=encode, reward=reward, evolver=evolver,
                                 loss_kind=str(cfg.loss))
        sampler = Sampler(model, params, tokenizer, mesh=ctx.mesh,
                          max_new_tokens=int(cfg.max_new_tokens))
        reference = cfg.loss not in REFERENCE_FREE
        ckpt = Checkpointer(ctx.stage_dir(self.name) / "loop",
                            save_every=int(cfg.get("checkpoint_every", 1)), keep=2)
        loop = OnlineLoop.create(
            model, params, mesh=ctx.mesh, sampler=sampler,
            optimizer=make_optimizer(optimizer_config(cfg)),
            loss_fn=make_preference_loss(model, str(cfg.loss), **dict(cfg.get("hparams", {})
                                                                       or {})),
            seed=int(jax.random.randint(ctx.key(self.name, "loop"), (), 0, 2**31 - 1)),
            reference=reference, pool=pool, checkpointer=ckpt, metrics=ctx.metrics,
            stage=self.name, progress=bool(cfg.get("progress", True)),
            clip_norm=cfg.get("clip_norm", 1.0),
            grad_accum_steps=int(cfg.get("grad_accum_steps") or 1))
        pool_dir = ctx.stage_dir(self.name) / "pool"
        pool_dir.mkdir(parents=True, exist_ok=True)
        initial = level_shares(pool, list(pool.active), levels)
        refresh = reference and bool(cfg.get("refresh_reference", True))

        def iterate(lp: OnlineLoop, k: int, key: jax.Array) -> dict[str, float]:
            if refresh:
                lp.refresh_reference()
            out = iteration(lp, k, key)
            shares = level_shares(lp.pool, list(lp.pool.active), levels)
            out.update({f"level_share/L{lv}": s for lv, s in shares.items()})
            out["pool_size"] = float(len(lp.pool))
            if jax.process_index() == 0:
                (pool_dir / f"iteration_{k + 1}.json").write_text(
                    json.dumps(lp.pool.state_dict()))
            return out

        iterate.state_dict = iteration.state_dict            # the evolver's host state
        iterate.load_state_dict = iteration.load_state_dict  # travels with the checkpoint
        t0 = time.perf_counter()
        try:
            debug = ctx.config.get("debug", {}) or {}
            history = loop.run(int(cfg.iterations), iterate,
                               stop_after=debug.get("stop_after_iterations"))
        finally:
            ckpt.close()
        wall = time.perf_counter() - t0
        trained = jax.device_get(loop.params)
        save_model(ctx.stage_dir(self.name) / "policy", model, trained,
                   {"loss": str(cfg.loss), "variant": str(cfg.variant),
                    "iterations": int(cfg.iterations)})
        ctx.artifacts["eva_policy"] = (model, jax.device_put(trained, shardings_for(ctx, model)))

        t1 = time.perf_counter()
        judged = self._judge(ctx, model, sft_params, trained)
        judge_s = time.perf_counter() - t1
        label = informativeness_label(cfg)
        rows = [{"loss": str(cfg.loss), "variant": v, "informativeness": label if v != "sft"
                 else "none", "metric": metric, "mean": m, "std": 0.0, "ci_low": lo,
                 "ci_high": hi, "seeds": 1} for v, metric, m, lo, hi in judged["rows"]]
        ctx.results.set_rows(self.name, rows)
        pool_rows = [{"iteration": 0, "level": lv, "share": s} for lv, s in initial.items()]
        pool_rows += [{"iteration": int(h["iteration"]), "level": lv,
                       "share": float(h[f"level_share/L{lv}"])}
                      for h in history for lv in levels if f"level_share/L{lv}" in h]
        ctx.results.set_rows("eva_pool", pool_rows)
        self._report(ctx, rows, pool_rows, history, levels, judged, wall, judge_s,
                     iteration, loop)

    def load(self, ctx: Context) -> None:
        model, params, _ = load_model(ctx.stage_dir(self.name) / "policy")
        ctx.artifacts["eva_policy"] = (model, jax.device_put(params, shardings_for(ctx, model)))

    # ------------------------------------------------------------------ judging
    def _judge(self, ctx: Context, model: Any, sft_params: Any, trained: Any) -> dict[str, Any]:
        """Win rate vs the starting policy (verifier-judged) and greedy accuracies, with CIs."""
        cfg = ctx.config.eva
        domain, tokenizer = ctx.need("domain"), ctx.need("tokenizer")
        eval_levels = tuple(int(lv) for lv in cfg.eval_levels)
        hard = set(int(lv) for lv in cfg.get("hard_levels", (4, 5)))
        problems = [(lv, p) for lv in eval_levels
                    for p in list(domain.test_problems(lv))[:int(cfg.eval_problems)]]
        probs = [p for _, p in problems]
        lvls = np.asarray([lv for lv, _ in problems])
        shard = shardings_for(ctx, model)
        sampler = Sampler(model, jax.device_put(sft_params, shard), tokenizer, mesh=ctx.mesh,
                          max_new_tokens=int(cfg.max_new_tokens))
        S = int(cfg.get("eval_samples", 4))
        key = ctx.key(self.name, "judge")
        batch_rows = int(cfg.get("eval_batch_size", 256))
        n_boot = int(cfg.get("n_boot", 2000))

        def evaluate(tag: str) -> tuple[np.ndarray, np.ndarray]:
            greedy = sample_solutions(sampler, domain, probs, n=1, key=None, temperature=0.0,
                                      max_new_tokens=int(cfg.max_new_tokens),
                                      batch_rows=batch_rows, desc=f"eva greedy {tag}",
                                      progress=False)
            correct = np.asarray([bool(r[0].outcome_correct) for r in greedy.verdicts], float)
            sampled = sample_solutions(sampler, domain, probs, n=S, key=key,
                                       temperature=float(cfg.get("eval_temperature", 0.7)),
                                       max_new_tokens=int(cfg.max_new_tokens),
                                       batch_rows=batch_rows, desc=f"eva judge {tag}",
                                       progress=False)
            scores = np.asarray([[VerifierReward.score_text(p, t) for t in row]
                                 for p, row in zip(probs, sampled.texts, strict=True)])
            return correct, scores

        sft_correct, sft_scores = evaluate("sft")
        sampler.update_params(jax.device_put(trained, shard))
        correct, scores = evaluate("trained")
        wr = win_rate(scores, sft_scores, n_boot=n_boot, seed=int(ctx.config.seed))
        rows = [(str(cfg.variant), "winrate", wr["mean"], wr["ci_low"], wr["ci_high"])]
        hard_mask = np.isin(lvls, sorted(hard))
        for variant, c in (("sft", sft_correct), (str(cfg.variant), correct)):
            for metric, mask in (("hard_acc", hard_mask), ("all_acc", np.ones_like(hard_mask))):
                if mask.any():
                    lo, hi = bootstrap_mean_ci(c[mask], n_boot=n_boot, seed=int(ctx.config.seed))
                    rows.append((variant, metric, float(c[mask].mean()), lo, hi))
        by_level = [{"level": int(lv), "sft": float(sft_correct[lvls == lv].mean()),
                     "trained": float(correct[lvls == lv].mean()),
                     "sft_reward": float(sft_scores[lvls == lv].mean()),
                     "trained_reward": float(scores[lvls == lv].mean()),
                     "problems": int((lvls == lv).sum())} for lv in eval_levels]
        return {"rows": rows, "winrate": wr, "by_level": by_level, "samples": S}

    # ------------------------------------------------------------------ report
    def _report(self, ctx: Context, rows: list[dict], pool_rows: list[dict],
                history: list[dict], levels: tuple[int, ...], judged: dict[str, Any],
                wall: float, judge_s: float, iteration: EvaIteration, loop: OnlineLoop) -> None:
        cfg = ctx.config.eva
        wr = judged["winrate"]
        its = sorted({r["iteration"] for r in pool_rows})
        share = {(r["iteration"], r["level"]): r["share"] for r in pool_rows}
        hist = [{"iteration": k, **{f"L{lv}": round(share.get((k, lv), 0.0), 3)
                                    for lv in levels}} for k in its]
        fig = ctx.report.figure_path("eva_pool_levels.png")
        line_plot(fig, {f"L{lv}": (its, [share.get((k, lv), 0.0) for k in its])
                        for lv in levels},
                  title=f"eva ({cfg.variant}, {cfg.loss}): level shares of the active prompts",
                  xlabel="iteration", ylabel="share of prompts")
        keys = [k for k in ("reward_mean", "train_reward_mean", "pairs", "updates", "loss",
                            f"info_{iteration.config.metric}", "selected", "evolved",
                            "pool_size", "iteration_s") if history and k in history[-1]]
        curve = [{"iteration": h["iteration"], **{k: round(float(h.get(k, float("nan"))), 4)
                                                  for k in keys}} for h in history]
        counts = dict(getattr(iteration.evolver, "counts", {}) or {})
        md = [f"## eva: {cfg.variant}, loss {cfg.loss}", "",
              f"{int(cfg.iterations)} iterations from the starting policy on "
              f"{len(loop.pool.active)} prompts (initial: {int(cfg.prompts_per_level)} per level "
              f"of {list(cfg.levels)}), {int(cfg.samples)} samples each, {int(cfg.updates)} "
              f"updates of {int(cfg.batch_size)} pairs per iteration; reward: "
              f"{'easy-trained PRM (min step score)' if uses_prm(cfg.variant) else 'verifier'}"
              f"; informativeness {informativeness_label(cfg)}. Training {wall:.0f} s, judging "
              f"{judge_s:.0f} s.", "",
              f"Win rate vs the starting policy (verifier-judged, {judged['samples']} samples "
              f"per problem, ties half): {wr['mean']:.3f} [{wr['ci_low']:.3f}, "
              f"{wr['ci_high']:.3f}] over {wr['prompts']} problems (sample pairs: {wr['wins']} "
              f"wins, {wr['ties']} ties, {wr['losses']} losses).", "",
              markdown_table(rows, list(ROW_FIELDS)), "",
              "Greedy accuracy and mean verifier reward of samples by level:", "",
              markdown_table(judged["by_level"], ["level", "sft", "trained", "sft_reward",
                                                   "trained_reward", "problems"]), "",
              "Level shares of the active prompt set (iteration 0: the initial set):", "",
              markdown_table(hist, ["iteration", *[f"L{lv}" for lv in levels]]), "",
              f"![level shares]({ctx.report.rel(fig)})", ""]
        if counts:
            md += [f"Evolver proposals: {counts}.", ""]
        if curve:
            md += ["Per iteration:", "", markdown_table(curve, ["iteration", *keys]), ""]
        ctx.report.set_section(self.name, "\n".join(md))


def stepmath_record(problem: Any) -> dict[str, Any]:
    from scalign.data import stepmath

    return stepmath.to_record(problem)


def make_preference_loss_check(cfg: ml_collections.ConfigDict) -> None:
    """Raise ValueError/TypeError if `config.eva.hparams` do not fit `config.eva.loss`."""
    from scalign.models import presets

    make_preference_loss(presets.get("tiny"), str(cfg.loss), **dict(cfg.get("hparams", {})
                                                                     or {}))
