"""Stage `rl`: improve the policy with RL from easy-trained evaluators (Sun et al. 2024, sec. 4).

One method per run (`config.rl.method`: "ppo" | "grpo" | "rest_em" | "iterative_dpo") from the
`policy` of stage `sft` (or `checkpoint`), on an `algorithms.loop.OnlineLoop`:

- prompts: `problems_per_level` train problems of each level in `config.rl.levels` (the paper's
  rows: "easy answers only" = the supervised levels; "all problems" = every level);
- reward: `algorithms.rewards.DomainReward`: the verifier's answer check on supervised levels
  only (`config.reward_models.levels`, else `config.sft.levels`), the stop penalty, and with
  `use_prm` the easy-trained PRM's step scores (`min` shaping for PPO/GRPO, acceptance for
  ReST-EM, pair scores for iterative DPO); PPO's critic starts from that reward model
  (`value_from`, default "prm");
- hyperparameters: `config.rl.<method>` overrides the method's dataclass
  (`objectives.policy_gradient.PPOConfig` / `GRPOConfig`, `RestEMConfig`,
  `IterativeDPOConfig`); `config.rl.reward` overrides `algorithms.rollout.RewardSpec`.

Then greedy accuracy on the first `eval_problems` test problems of each `eval_levels` level,
for the starting policy ("sft") and the trained one (`config.rl.name`, default the method).
Rows: {"method", "split" (easy | hard | all), "mean", "std", "seeds", "problems", "wall_s"}.
Artifact: `policy` <- the trained policy (also saved under `stages/rl/policy/`).
"""

from __future__ import annotations

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
from scalign.evaluation.scoring import SequenceScorer
from scalign.models.heads import scalar_head_logical_axes
from scalign.models.transformer import param_logical_axes
from scalign.objectives import policy_gradient as pg
from scalign.reporting import markdown_table
from scalign.sampling import Sampler
from scalign.stages.base import Context, Stage, register_stage, require_block
from scalign.stages.common import shardings_for
from scalign.training.checkpoint import Checkpointer, load_model, save_model
from scalign.training.state import OptimizerConfig, make_optimizer

METHODS = {"ppo": pg.PPOConfig, "grpo": pg.GRPOConfig, "rest_em": RestEMConfig,
           "iterative_dpo": IterativeDPOConfig}
KEYS = ("method", "levels", "problems_per_level", "iterations", "prompts_per_iteration",
        "samples_per_prompt", "max_new_tokens", "optimizer", "eval_levels", "eval_problems")


def _supervised(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    rm = config.get("reward_models", {})
    return tuple(rm.get("levels", ()) or config.get("sft", {}).get("levels", ()))


def _method_config(cfg: ml_collections.ConfigDict) -> Any:
    cls = METHODS[cfg.method]
    overrides = dict(cfg.get(cfg.method, {}) or {})
    if cfg.method in ("ppo", "grpo") and "temperature" in cfg:
        overrides.setdefault("temperature", float(cfg.temperature))
    return cls(**overrides)


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
        if cfg.method not in METHODS:
            errors.append(f"config.rl.method must be one of {sorted(METHODS)}, got "
                          f"{cfg.method!r}")
            return
        try:
            method = _method_config(cfg)
            RewardSpec(**dict(cfg.get("reward", {}) or {}))
            OptimizerConfig.from_config({**cfg.optimizer.to_dict(), "total_steps": 1})
        except (TypeError, ValueError) as e:
            errors.append(f"config.rl.{cfg.method} / reward / optimizer: {e}")
            return
        needs_rm = cfg.get("use_prm", False) or cfg.method == "ppo"
        stages = list(config.get("stages", ()))
        if needs_rm and "reward_models" not in stages[:stages.index(self.name)]:
            errors.append(f"config.rl: method {cfg.method!r} with use_prm="
                          f"{cfg.get('use_prm', False)} reads the easy-trained reward models: "
                          f"put stage 'reward_models' before 'rl'")
        if not _supervised(config):
            errors.append("config.rl: no supervised levels (config.reward_models.levels or "
                          "config.sft.levels)")
        div = mesh_shape["data"] * mesh_shape["fsdp"]
        rows = int(cfg.prompts_per_iteration) * int(cfg.samples_per_prompt)
        if cfg.method in ("ppo", "grpo"):
            if rows % (method.minibatches * div):
                errors.append(f"config.rl: prompts_per_iteration x samples_per_prompt = {rows} "
                              f"must split into {method.minibatches} minibatches of a multiple "
                              f"of data*fsdp = {div} rows")
        elif method.batch_size % div:
            errors.append(f"config.rl.{cfg.method}.batch_size={method.batch_size} must be a "
                          f"multiple of data*fsdp = {div}")
        if rows % div:
            errors.append(f"config.rl: {rows} rollout rows must be a multiple of data*fsdp "
                          f"= {div}")
        total = int(cfg.problems_per_level) * len(tuple(cfg.levels))
        if int(cfg.prompts_per_iteration) > total:
            errors.append(f"config.rl.prompts_per_iteration={cfg.prompts_per_iteration} > the "
                          f"{total} training prompts")

    # ------------------------------------------------------------------ run
    def run(self, ctx: Context) -> None:
        cfg = ctx.config.rl
        model, params = ctx.need("policy")
        tokenizer = ctx.need("tokenizer")
        domain = ctx.need("domain")
        supervised = _supervised(ctx.config)
        name = str(cfg.get("name", cfg.method))
        evals = {"sft": self._evaluate(ctx, model, params)}

        problems_by_level = {int(lv): list(domain.train_problems(lv))[:int(cfg.problems_per_level)]
                             for lv in cfg.levels}
        pool, problems = problem_pool(domain, tokenizer, problems_by_level,
                                      supervised_levels=supervised)
        rms = ctx.artifacts.get("reward_models", {})
        use_prm = bool(cfg.get("use_prm", False))
        prm = None
        if use_prm:
            m, p = rms[cfg.get("prm", "prm")]
            prm = SequenceScorer(m, p, ctx.mesh, pad_id=tokenizer.pad_id)
        reward_fn = DomainReward(domain, tokenizer, problems, supervised_levels=supervised,
                                 prm=prm)
        width = max(len(e.data["prompt_ids"]) for e in pool.entries) + int(cfg.max_new_tokens)
        spec = RolloutSpec(prompts_per_iteration=int(cfg.prompts_per_iteration),
                           samples_per_prompt=int(cfg.samples_per_prompt),
                           max_new_tokens=int(cfg.max_new_tokens), width=width,
                           pad_id=tokenizer.pad_id,
                           temperature=float(cfg.get("temperature", 0.7)),
                           sample_kwargs={"decode_texts": True})
        method = _method_config(cfg)
        reward = RewardSpec(**{"use_prm": use_prm, **dict(cfg.get("reward", {}) or {})})
        opt_cfg = OptimizerConfig.from_config({**cfg.optimizer.to_dict(),
                                               "total_steps": int(cfg.iterations) * 8})
        sampler = Sampler(model, params, tokenizer, mesh=ctx.mesh,
                          max_new_tokens=int(cfg.max_new_tokens))
        ckpt = Checkpointer(ctx.stage_dir(self.name) / "loop",
                            save_every=int(cfg.get("checkpoint_every", 1)), keep=2)
        common = dict(mesh=ctx.mesh, sampler=sampler, optimizer=make_optimizer(opt_cfg),
                      seed=int(jax.random.randint(ctx.key(self.name, "loop"), (), 0, 2**31 - 1)),
                      pool=pool, checkpointer=ckpt, metrics=ctx.metrics, stage=self.name)
        if cfg.method == "ppo":
            vmodel, vparams = rms[cfg.get("value_from", "prm")]
            algo = PPO(spec, reward_fn, reward, method)
            loop = algo.create_loop(
                model, params, value_params=vparams, value_config=vmodel,
                value_logical_axes={**param_logical_axes(vmodel),
                                    "scalar_head": scalar_head_logical_axes()},
                value_optimizer=make_optimizer(opt_cfg), **common)
        elif cfg.method == "grpo":
            algo = GRPO(spec, reward_fn, reward, method)
            loop = algo.create_loop(model, params, **common)
        elif cfg.method == "rest_em":
            algo = RestEM(spec, reward_fn, method)
            loop = algo.create_loop(model, params, **common)
        else:
            algo = IterativeDPO(spec, reward_fn, method)
            loop = algo.create_loop(model, params, **common)
        t0 = time.perf_counter()
        try:
            history = loop.run(int(cfg.iterations), algo)
        finally:
            ckpt.close()
        wall = time.perf_counter() - t0
        trained = jax.device_get(loop.params)
        save_model(ctx.stage_dir(self.name) / "policy", model, trained,
                   {"method": cfg.method, "name": name, "iterations": int(cfg.iterations)})
        ctx.artifacts["policy"] = (model, jax.device_put(trained, shardings_for(ctx, model)))
        evals[name] = self._evaluate(ctx, model, ctx.artifacts["policy"][1])
        rows = [{"method": m, "split": split, "mean": acc, "std": 0.0, "seeds": 1,
                 "problems": n, "wall_s": wall if m == name else 0.0}
                for m, by_split in evals.items() for split, (acc, n) in by_split.items()]
        ctx.results.set_rows(self.name, rows)
        self._report(ctx, name, rows, history, wall)

    def load(self, ctx: Context) -> None:
        model, params, _ = load_model(ctx.stage_dir(self.name) / "policy")
        ctx.artifacts["policy"] = (model, jax.device_put(params, shardings_for(ctx, model)))

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

    def _report(self, ctx: Context, name: str, rows: list[dict], history: list[dict],
                wall: float) -> None:
        cfg = ctx.config.rl
        keys = [k for k in ("reward", "accuracy_known", "answer_rate", "loss", "kl_ref",
                            "kept", "pairs") if history and k in history[-1]]
        curve = [{"iteration": h["iteration"], **{k: round(float(h[k]), 4) for k in keys}}
                 for h in history]
        md = [f"## RL: {name}", "",
              f"Method {cfg.method} (use_prm={bool(cfg.get('use_prm', False))}) on levels "
              f"{list(cfg.levels)}, {int(cfg.iterations)} iterations of "
              f"{int(cfg.prompts_per_iteration)} prompts x {int(cfg.samples_per_prompt)} "
              f"samples, {wall:.0f} s. Greedy answer accuracy before (sft) and after:", "",
              markdown_table(rows, ["method", "split", "mean", "problems", "wall_s"]), ""]
        if curve:
            md += ["Per iteration:", "", markdown_table(curve, ["iteration", *keys]), ""]
        ctx.report.set_section(self.name, "\n".join(md))

