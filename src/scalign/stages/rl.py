"""Stage `rl`: improve the policy with RL from easy-trained evaluators (Sun et al. 2024, sec. 4).

Every method in `config.rl.methods` starts from the same `policy` (of stage `sft` or
`checkpoint`) and the same easy-trained reward models, each on its own
`algorithms.loop.OnlineLoop`, so one run gives every row of the paper's Table 2:

    sft            the starting policy itself (evaluated, not trained)
    rest_em        ReST-EM on all levels: verified easy solutions + PRM-accepted hard ones
    iterative_dpo  iterative DPO on all levels: pairs scored by PRM + known correctness
    ppo_answers    PPO on the supervised levels, the verifier's final answers only
    ppo_prm        PPO on all levels: answers where supervised, the constant `hard_reward`
                   elsewhere, plus the PRM's `min`-shaped step rewards
    grpo_answers   GRPO, as ppo_answers       grpo_prm   GRPO, as ppo_prm

- prompts: `problems_per_level` train problems of each level in `config.rl.levels` ("all") or,
  for "*_answers", of the supervised levels (`config.reward_models.levels`, else
  `config.sft.levels`); prompts longer than `seq_len - max_new_tokens` (when `seq_len` is
  set) are left out and counted;
- reward: `algorithms.rewards.DomainReward` (answers of supervised levels only, the stop
  penalty, the PRM `config.rl.prm` when the method uses it); PPO's critic starts from the
  reward model `config.rl.value_from` (default "prm");
- shared keys in `config.rl`: iterations, prompts_per_iteration, samples_per_prompt,
  max_new_tokens, temperature, optimizer, eval_levels, eval_problems, optional `seq_len` (the
  planned prompt + response width; default: the longest prompt + max_new_tokens), `remat`
  (training forward's remat policy), `reward` (`algorithms.rollout.RewardSpec` overrides),
  `clip_norm` (default 1.0, policy and critic), `grad_accum_steps` (default 1, per update),
  `value_optimizer` (PPO critic: keys over the policy's `optimizer`); `scalign.plan` reads
  the same keys;
- per method, `config.rl.per_method.<name>` overrides the algorithm's dataclass
  (`objectives.policy_gradient.PPOConfig` / `GRPOConfig`, `RestEMConfig`,
  `IterativeDPOConfig`) and may override `iterations`, `prompts_per_iteration`, `optimizer`
  (merged) and `reward`.

Then greedy accuracy on the first `eval_problems` test problems of each `eval_levels` level.
Rows: {"method", "split" (easy | hard | all), "mean", "std" (0: one run), "seeds" (1),
"problems", "wall_s" (the training loop's wall time; 0 for "sft")}. The report shows them in
the layout of Table 2 (`evaluation.rl_table`).

Each method writes `stages/rl/<name>/policy/` (the trained policy), `loop/` (loop
checkpoints) and `result.json`; a resumed stage skips methods with a `result.json` and
continues an interrupted one from its loop checkpoint. Each method's randomness is folded from
its name, so a method's numbers do not depend on which other methods run. The `policy`
artifact stays the starting policy (later stages, e.g. `rerank`, see the SFT policy).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from scalign.algorithms.grpo import GRPO
from scalign.algorithms.iterative_dpo import IterativeDPO, IterativeDPOConfig
from scalign.algorithms.ppo import PPO
from scalign.algorithms.rest_em import RestEM, RestEMConfig
from scalign.algorithms.rewards import DomainReward, problem_pool
from scalign.algorithms.rollout import RewardSpec, RolloutSpec
from scalign.evaluation.generation import sample_solutions
from scalign.evaluation.rl_table import table2
from scalign.evaluation.scoring import SequenceScorer
from scalign.models.heads import scalar_head_logical_axes
from scalign.models.transformer import param_logical_axes
from scalign.objectives import policy_gradient as pg
from scalign.reporting import markdown_table
from scalign.sampling import Sampler
from scalign.stages.base import Context, Stage, check_levels, register_stage, require_block
from scalign.stages.common import training_model
from scalign.training.checkpoint import Checkpointer, save_model
from scalign.training.state import OptimizerConfig, make_optimizer

ALGORITHMS = {"ppo": pg.PPOConfig, "grpo": pg.GRPOConfig, "rest_em": RestEMConfig,
              "iterative_dpo": IterativeDPOConfig}
#: method name -> (algorithm or None for the starting policy, uses the PRM, trains on all levels)
METHODS: dict[str, tuple[str | None, bool, bool]] = {
    "sft": (None, False, False),
    "rest_em": ("rest_em", True, True),
    "iterative_dpo": ("iterative_dpo", True, True),
    "ppo_answers": ("ppo", False, False),
    "ppo_prm": ("ppo", True, True),
    "grpo_answers": ("grpo", False, False),
    "grpo_prm": ("grpo", True, True),
}
KEYS = ("methods", "levels", "problems_per_level", "iterations", "prompts_per_iteration",
        "samples_per_prompt", "max_new_tokens", "optimizer", "eval_levels", "eval_problems")
#: shared keys a `per_method.<name>` block may override besides the algorithm's fields
SHARED_OVERRIDES = ("iterations", "prompts_per_iteration", "optimizer", "reward")


def _supervised(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    rm = config.get("reward_models", {})
    return tuple(rm.get("levels", ()) or config.get("sft", {}).get("levels", ()))


@dataclasses.dataclass(frozen=True)
class MethodPlan:
    """What one method of `config.rl.methods` runs (see the module docstring)."""

    name: str
    algorithm: str
    use_prm: bool
    levels: tuple[int, ...]
    iterations: int
    prompts_per_iteration: int
    hparams: Any                 # the algorithm's dataclass
    reward: RewardSpec
    optimizer: dict[str, Any]
    temperature: float


def method_plan(config: ml_collections.ConfigDict, name: str) -> MethodPlan:
    """Resolve method `name`'s settings from `config.rl` (raises TypeError / ValueError on
    unknown or bad keys, naming them)."""
    cfg = config.rl
    if name not in METHODS or METHODS[name][0] is None:
        raise ValueError(f"config.rl.methods: {name!r} is not a trained method; use "
                         f"{[m for m in METHODS if METHODS[m][0]]} (or 'sft')")
    algorithm, use_prm, all_levels = METHODS[name]
    per = dict((cfg.get("per_method", {}) or {}).get(name, {}) or {})
    per = {k: (v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v)
           for k, v in per.items()}
    shared = {k: per.pop(k) for k in SHARED_OVERRIDES if k in per}
    cls = ALGORITHMS[algorithm]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(per) - fields)
    if unknown:
        raise TypeError(f"config.rl.per_method.{name} has unknown keys {unknown}; allowed: "
                        f"{sorted(fields)} of {cls.__name__} and {list(SHARED_OVERRIDES)}")
    if "temperature" in fields:
        per.setdefault("temperature", float(cfg.get("temperature", 0.7)))
    hparams = cls(**per)
    reward = RewardSpec(**{**dict(cfg.get("reward", {}) or {}), **shared.get("reward", {}),
                           "use_prm": use_prm})
    optimizer = {**cfg.optimizer.to_dict(), **shared.get("optimizer", {})}
    supervised = _supervised(config)
    levels = tuple(int(lv) for lv in cfg.levels)
    if not all_levels:
        levels = tuple(lv for lv in levels if lv in set(supervised))
    return MethodPlan(name=name, algorithm=algorithm, use_prm=use_prm, levels=levels,
                      iterations=int(shared.get("iterations", cfg.iterations)),
                      prompts_per_iteration=int(shared.get("prompts_per_iteration",
                                                           cfg.prompts_per_iteration)),
                      hparams=hparams, reward=reward, optimizer=optimizer,
                      temperature=float(getattr(hparams, "temperature",
                                                cfg.get("temperature", 0.7))))


def methods_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    methods = config.rl.methods
    return (methods,) if isinstance(methods, str) else tuple(methods)


@register_stage
class RLStage(Stage):
    name = "rl"
    requires = {"policy": ("sft", "checkpoint"), "tokenizer": ("data", "checkpoint"),
                "domain": ("data",)}

    def validate(self, config: ml_collections.ConfigDict, mesh_shape: dict[str, int],
                 errors: list[str]) -> None:
        cfg = require_block(config, "rl", KEYS, errors)
        if cfg is None or any(k not in cfg for k in KEYS):
            return
        check_levels(config, "rl.levels", errors)
        check_levels(config, "rl.eval_levels", errors)
        if "method" in cfg:
            errors.append("config.rl.method is gone: list the methods in config.rl.methods "
                          f"(some of {list(METHODS)}) and their settings in "
                          "config.rl.per_method.<name>")
        methods = methods_of(config)
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods or len(set(methods)) != len(methods):
            errors.append(f"config.rl.methods={methods}: each must be one of {list(METHODS)}, "
                          f"at least one, no repeats")
            return
        extra = sorted(set((cfg.get("per_method", {}) or {}).keys()) - set(methods))
        if extra:
            errors.append(f"config.rl.per_method has blocks {extra} for methods not in "
                          f"config.rl.methods {methods}")
        supervised = _supervised(config)
        if not supervised:
            errors.append("config.rl: no supervised levels (config.reward_models.levels or "
                          "config.sft.levels)")
            return
        try:
            OptimizerConfig.from_config({**cfg.optimizer.to_dict(), "total_steps": 1})
        except (TypeError, ValueError) as e:
            errors.append(f"config.rl.optimizer: {e}")
        stages = list(config.get("stages", ()))
        before = stages[:stages.index(self.name)] if self.name in stages else stages
        div = mesh_shape["data"] * mesh_shape["fsdp"]
        seq_len = cfg.get("seq_len")
        if seq_len is not None and int(seq_len) <= int(cfg.max_new_tokens):
            errors.append(f"config.rl.seq_len={seq_len} must exceed config.rl.max_new_tokens="
                          f"{cfg.max_new_tokens} (prompt + response width)")
        accum = int(cfg.get("grad_accum_steps") or 1)
        if accum < 1:
            errors.append(f"config.rl.grad_accum_steps={accum} must be >= 1")
            accum = 1
        if cfg.get("value_optimizer") is not None:
            try:
                OptimizerConfig.from_config({**cfg.optimizer.to_dict(),
                                             **dict(cfg.value_optimizer), "total_steps": 1})
            except (TypeError, ValueError) as e:
                errors.append(f"config.rl.value_optimizer: {e}")
        if cfg.get("remat") not in (None, "none", "full", "dots"):
            errors.append(f"config.rl.remat={cfg.remat!r} must be none | full | dots")
        for name in methods:
            if name == "sft":
                continue
            try:
                plan = method_plan(config, name)
                OptimizerConfig.from_config({**plan.optimizer, "total_steps": 1})
            except (TypeError, ValueError) as e:
                errors.append(f"config.rl.per_method.{name}: {e}")
                continue
            rows = plan.prompts_per_iteration * int(cfg.samples_per_prompt)
            if rows % div:
                errors.append(f"config.rl ({name}): prompts_per_iteration x samples_per_prompt "
                              f"= {rows} rollout rows must be a multiple of data*fsdp = {div}")
            if (plan.use_prm or plan.algorithm == "ppo") and "reward_models" not in before:
                errors.append(f"config.rl.methods: {name!r} reads the easy-trained reward "
                              f"models (PRM or PPO critic): put stage 'reward_models' before "
                              f"'rl'")
            if plan.algorithm in ("ppo", "grpo"):
                mb = plan.hparams.minibatches
                if rows % (mb * div * accum):
                    errors.append(f"config.rl.per_method.{name}.minibatches={mb}: "
                                  f"prompts_per_iteration x samples_per_prompt = {rows} must "
                                  f"split into {mb} minibatches of a multiple of "
                                  f"data*fsdp*grad_accum_steps = {div}*{accum} rows")
            elif plan.hparams.batch_size % (div * accum):
                errors.append(f"config.rl.per_method.{name}.batch_size="
                              f"{plan.hparams.batch_size} must be a multiple of "
                              f"data*fsdp*grad_accum_steps = {div}*{accum}")
            if not plan.levels:
                errors.append(f"config.rl.levels {tuple(cfg.levels)} holds no supervised "
                              f"level {supervised} for {name!r}")
            total = int(cfg.problems_per_level) * len(plan.levels)
            if plan.prompts_per_iteration > total:
                errors.append(f"config.rl ({name}): prompts_per_iteration="
                              f"{plan.prompts_per_iteration} > the {total} training prompts "
                              f"(problems_per_level x levels)")

    # ------------------------------------------------------------------ run
    def run(self, ctx: Context) -> None:
        rows, results = [], {}
        for name in methods_of(ctx.config):
            results[name] = self._method(ctx, name)
            rows += [{"method": name, "split": split, "mean": acc, "std": 0.0, "seeds": 1,
                      "problems": n, "wall_s": float(results[name]["wall_s"])}
                     for split, (acc, n) in results[name]["evals"].items()]
            ctx.results.set_rows(self.name, rows)   # partial rows survive a crash
        self._report(ctx, rows, results)

    def load(self, ctx: Context) -> None:
        """Nothing to rehydrate: the `policy` artifact stays the starting policy."""

    def _method(self, ctx: Context, name: str) -> dict[str, Any]:
        """Train (unless "sft") and evaluate one method; cached in `<name>/result.json`."""
        directory = ctx.stage_dir(self.name) / name
        done = directory / "result.json"
        if done.exists():
            return json.loads(done.read_text())
        model, params = ctx.need("policy")
        if name == "sft":
            out = {"evals": self._evaluate(ctx, model, params), "wall_s": 0.0, "history": []}
        else:
            trained, out = self._train(ctx, name, model, params, directory)
            out["evals"] = self._evaluate(ctx, model, trained)
        directory.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(out, indent=1))
        return out

    def _train(self, ctx: Context, name: str, model: Any, params: Any, directory: Any
               ) -> tuple[Any, dict[str, Any]]:
        cfg = ctx.config.rl
        plan = method_plan(ctx.config, name)
        tokenizer, domain = ctx.need("tokenizer"), ctx.need("domain")
        supervised = _supervised(ctx.config)
        problems_by_level = {lv: list(domain.train_problems(lv))[:int(cfg.problems_per_level)]
                             for lv in plan.levels}
        pool, problems = problem_pool(domain, tokenizer, problems_by_level,
                                      supervised_levels=supervised)
        longest = max(len(e.data["prompt_ids"]) for e in pool.entries)
        width = longest + int(cfg.max_new_tokens)
        dropped = 0
        if cfg.get("seq_len") is not None:
            width = int(cfg.seq_len)
            fits = [i for i, e in enumerate(pool.entries)
                    if len(e.data["prompt_ids"]) + int(cfg.max_new_tokens) <= width]
            dropped = len(pool.entries) - len(fits)
            pool.set_active(fits)
        rms = ctx.artifacts.get("reward_models", {})
        prm = None
        if plan.use_prm:
            m, p = rms[cfg.get("prm", "prm")]
            prm = SequenceScorer(m, p, ctx.mesh, pad_id=tokenizer.pad_id)
        reward_fn = DomainReward(domain, tokenizer, problems, supervised_levels=supervised,
                                 prm=prm)
        spec = RolloutSpec(prompts_per_iteration=plan.prompts_per_iteration,
                           samples_per_prompt=int(cfg.samples_per_prompt),
                           max_new_tokens=int(cfg.max_new_tokens), width=width,
                           pad_id=tokenizer.pad_id, temperature=plan.temperature,
                           sample_kwargs={"decode_texts": True})
        opt_cfg = OptimizerConfig.from_config({**plan.optimizer,
                                               "total_steps": plan.iterations * 8})
        sampler = Sampler(model, params, tokenizer, mesh=ctx.mesh,
                          max_new_tokens=int(cfg.max_new_tokens))
        ckpt = Checkpointer(directory / "loop", save_every=int(cfg.get("checkpoint_every", 1)),
                            keep=2)
        train_model = training_model(model, cfg)
        common = dict(mesh=ctx.mesh, sampler=sampler, optimizer=make_optimizer(opt_cfg),
                      seed=int(jax.random.randint(ctx.key(self.name, name, "loop"), (), 0,
                                                  2**31 - 1)),
                      pool=pool, checkpointer=ckpt, metrics=ctx.metrics,
                      stage=f"{self.name}/{name}",
                      clip_norm=cfg.get("clip_norm", 1.0),
                      grad_accum_steps=int(cfg.get("grad_accum_steps") or 1))
        if plan.algorithm == "ppo":
            vmodel, vparams = rms[cfg.get("value_from", "prm")]
            vmodel = training_model(vmodel, cfg)
            v_opt = OptimizerConfig.from_config({
                **plan.optimizer, **dict(cfg.get("value_optimizer") or {}),
                "total_steps": plan.iterations * 8})
            algo = PPO(spec, reward_fn, plan.reward, plan.hparams)
            loop = algo.create_loop(
                train_model, params, value_params=vparams, value_config=vmodel,
                value_logical_axes={**param_logical_axes(vmodel),
                                    "scalar_head": scalar_head_logical_axes()},
                value_optimizer=make_optimizer(v_opt),
                value_clip_norm=cfg.get("clip_norm", 1.0), **common)
        elif plan.algorithm == "grpo":
            algo = GRPO(spec, reward_fn, plan.reward, plan.hparams)
            loop = algo.create_loop(train_model, params, **common)
        elif plan.algorithm == "rest_em":
            algo = RestEM(spec, reward_fn, plan.hparams)
            loop = algo.create_loop(train_model, params, **common)
        else:
            algo = IterativeDPO(spec, reward_fn, plan.hparams)
            loop = algo.create_loop(train_model, params, **common)
        t0 = time.perf_counter()
        try:
            history = loop.run(plan.iterations, algo)
        finally:
            ckpt.close()
        wall = time.perf_counter() - t0
        trained = loop.params
        save_model(directory / "policy", model, jax.device_get(trained),
                   {"method": name, "algorithm": plan.algorithm, "iterations": plan.iterations})
        keys = ("reward", "accuracy_known", "answer_rate", "loss", "kl_ref", "kept", "pairs",
                "iteration_s")
        curve = [{"iteration": int(h["iteration"]),
                  **{k: float(h[k]) for k in keys if k in h}} for h in history]
        return trained, {"wall_s": wall, "history": curve, "dropped_prompts": dropped,
                         "plan": {"algorithm": plan.algorithm, "use_prm": plan.use_prm,
                                  "levels": list(plan.levels), "iterations": plan.iterations,
                                  "prompts_per_iteration": plan.prompts_per_iteration,
                                  "learning_rate": plan.optimizer.get("learning_rate")}}

    # ------------------------------------------------------------------ helpers
    def _evaluate(self, ctx: Context, model: Any, params: Any) -> dict[str, tuple[float, int]]:
        """Greedy answer accuracy per split: {"easy" | "hard" | "all": (mean, problems)}."""
        cfg = ctx.config.rl
        domain, tokenizer = ctx.need("domain"), ctx.need("tokenizer")
        sampler = Sampler(model, params, tokenizer, mesh=ctx.mesh,
                          max_new_tokens=int(cfg.max_new_tokens))
        supervised = set(_supervised(ctx.config))
        by_level = {}
        for lv in cfg.eval_levels:
            test = list(domain.test_problems(lv))[:int(cfg.eval_problems)]
            sols = sample_solutions(sampler, domain, test, n=1, key=None, temperature=0.0,
                                    max_new_tokens=int(cfg.max_new_tokens),
                                    batch_rows=int(cfg.get("eval_batch_size", 256)),
                                    desc=f"rl greedy L{lv}", progress=False)
            by_level[int(lv)] = [bool(row[0].outcome_correct) for row in sols.verdicts]
        splits = {"easy": [lv for lv in by_level if lv in supervised],
                  "hard": [lv for lv in by_level if lv not in supervised],
                  "all": list(by_level)}
        out = {}
        for split, lvs in splits.items():
            ok = [c for lv in lvs for c in by_level[lv]]
            if ok:
                out[split] = (float(np.mean(ok)), len(ok))
        return out

    def _report(self, ctx: Context, rows: list[dict], results: dict[str, dict]) -> None:
        cfg = ctx.config.rl
        md = ["## RL from the easy-trained evaluators (Sun et al. 2024, Table 2 layout)", "",
              f"Every method starts from the same policy; rollouts of "
              f"{int(cfg.prompts_per_iteration)} prompts x {int(cfg.samples_per_prompt)} "
              f"samples (temperature as configured, {int(cfg.max_new_tokens)} new tokens); "
              f"greedy evaluation on {int(cfg.eval_problems)} test problems per level "
              f"{list(cfg.eval_levels)}.", "", table2(rows), ""]
        for name, res in results.items():
            if name == "sft":
                continue
            p = res.get("plan", {})
            md += [f"### {name}", "",
                   f"{p.get('algorithm')} on levels {p.get('levels')}, use_prm="
                   f"{p.get('use_prm')}, {p.get('iterations')} iterations of "
                   f"{p.get('prompts_per_iteration')} prompts, lr "
                   f"{p.get('learning_rate')}, {res['wall_s']:.0f} s"
                   + (f"; {res['dropped_prompts']} prompts longer than seq_len left out"
                      if res.get("dropped_prompts") else "") + ".", ""]
            curve = res.get("history", [])
            if curve:
                keys = [k for k in curve[-1] if k not in ("iteration", "iteration_s")]
                step = max(1, len(curve) // 10)
                shown = curve[step - 1::step]
                if shown[-1] is not curve[-1]:
                    shown.append(curve[-1])
                table = [{"iteration": h["iteration"], **{k: round(h[k], 4) for k in keys
                                                          if k in h}} for h in shown]
                md += [markdown_table(table, ["iteration", *keys]), ""]
        ctx.report.set_section(self.name, "\n".join(md))
