"""`python -m scalign.bench grpo --workload grpo_llama_small`: GRPO iterations per second.

One iteration is the project's own `algorithms.grpo.GRPO` on an `algorithms.loop.OnlineLoop`,
exactly as an RL run does it: `batch` prompts (random ids, spec seed) x `num_generations`
samples of exactly `max_new_tokens` tokens at temperature 1 (one prefill per prompt; the loop's
sampler gets the current params), reward = the fraction of even token ids
(`even_fraction`), group advantages (r - mean) / (std_ddof1 + 1e-4), reference log-probs from the
frozen initial policy (`loop.log_probs(..., "reference")`), and one AdamW step on the whole
batch of the clipped surrogate + beta KL_k3 (old log-probs = stop_gradient(logp): one update per
rollout, no extra forward, as the spec allows and both peers do). No gradient clipping.

value = 1 / median iteration seconds over `timed_steps` after `warmup_steps`. The line also
reports each phase (median seconds): `rollout_s` (sampling + reward + packing), `reference_s`
(reference forward), `update_s` (policy forward + backward + AdamW, one jitted step), and
`generated_tokens_per_s`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from scalign import parallel
from scalign.algorithms.grpo import GRPO
from scalign.algorithms.loop import PromptPool
from scalign.algorithms.rollout import RolloutScores, RolloutSpec
from scalign.bench import common
from scalign.models import init_params
from scalign.objectives import policy_gradient as pg
from scalign.sampling import Sampler
from scalign.training.state import OptimizerConfig, make_optimizer


def even_fraction(data: list[dict[str, Any]], out: Any) -> RolloutScores:
    """The workload's reward as a scorer: `correct` = the share of even ids of each completion
    (every prompt counts as "easy", so the terminal reward is that share), an answer always."""
    valid = np.arange(out.tokens.shape[-1]) < out.lengths[..., None]
    share = ((out.tokens % 2 == 0) & valid).sum(-1) / np.maximum(out.lengths, 1)
    return RolloutScores(correct=share.astype(np.float64),
                         has_answer=np.ones(share.shape, bool))


def run(workload: str, spec_path: str | None = None, **extra: Any) -> dict:
    wl, model = common.load_workload(workload, spec_path)
    if wl["kind"] != "grpo":
        raise SystemExit(f"workload {workload!r} is of kind {wl['kind']!r}, not 'grpo'")
    if wl.get("num_iterations", 1) != 1 or wl.get("optimizer_steps_per_iteration", 1) != 1:
        raise SystemExit("only num_iterations = 1 with one optimizer step is benchmarked")
    overrides = {k: extra[k] for k in ("dtype",) if k in extra}
    config = common.model_config_from_spec(model, **overrides)
    params = init_params(config, jax.random.PRNGKey(model.get("init_seed", 0)))
    P, N, M, T = wl["batch"], wl["num_generations"], wl["max_new_tokens"], wl["prompt_len"]
    prompts = common.random_ids(wl["prompt_seed"], wl["prompt_token_low"], config.vocab_size,
                                (P, T))
    mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    sampler = Sampler(config, params, None, max_new_tokens=M, min_prompt_bucket=T)
    opt = make_optimizer(OptimizerConfig(learning_rate=wl["learning_rate"],
                                         weight_decay=wl["weight_decay"], schedule="constant"))
    spec = RolloutSpec(prompts_per_iteration=P, samples_per_prompt=N, max_new_tokens=M,
                       width=T + M, temperature=float(wl["temperature"]),
                       sample_kwargs={"stop_on_eos": bool(wl["stop_on_eos"]),
                                      "top_k": int(wl["top_k"]), "top_p": float(wl["top_p"]),
                                      "decode_texts": False})
    algo = GRPO(spec, even_fraction,
                grpo=pg.GRPOConfig(clip_eps=float(wl["epsilon"]), kl_coef=float(wl["beta"]),
                                   kl_estimator="k3", adv_eps=float(wl["advantage_eps"]),
                                   adv_ddof=1, temperature=float(wl["temperature"])))
    pool = PromptPool.from_prompts([{"prompt_ids": p.tolist()} for p in prompts])
    loop = algo.create_loop(config, params, mesh=mesh, sampler=sampler, optimizer=opt,
                            seed=0, pool=pool, progress=False,
                            clip_norm=wl["grad_clip"] if wl["grad_clip"] else None)
    warm, timed = int(wl["warmup_steps"]), int(wl["timed_steps"])
    history = loop.run(warm + timed, algo)[warm:]
    sizes = loop.cache_sizes()
    med = {k: common.median([h[k] for h in history])
           for k in ("iteration_s", "time/rollout_s", "time/reference_s", "time/advantages_s",
                     "time/update_s")}
    it_s = med["iteration_s"]
    return common.emit(
        workload, wl["metric"], round(1.0 / it_s, 4), wl["unit"],
        iteration_seconds=[round(h["iteration_s"], 3) for h in history],
        rollout_s=round(med["time/rollout_s"], 3), reference_s=round(med["time/reference_s"], 3),
        advantages_s=round(med["time/advantages_s"], 3), update_s=round(med["time/update_s"], 3),
        generated_tokens_per_s=round(P * N * M / it_s, 1), loss=history[-1]["loss"],
        reward=history[-1]["reward"], cache_sizes=sizes, dtype=config.dtype,
        threads=os.cpu_count(), load_avg_1m=round(os.getloadavg()[0], 2),
        notes="algorithms.grpo.GRPO on algorithms.loop.OnlineLoop; old logp = "
              "stop_gradient(logp); whole batch in one step")
