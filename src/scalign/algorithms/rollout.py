"""What every RL algorithm of the online loop shares: draw prompts, sample, score, pack.

The reward is an injected callable, so a verifier, an easy-trained PRM or any other scorer plugs
in without the algorithms knowing it:

    reward_fn(data: list[dict], out: SampleOutput) -> RolloutScores

`data` are the drawn prompts' pool payloads (`PromptEntry.data`, e.g. {"prompt_ids": [...],
"answer": ..., "level": ...}); `out` is the sampler's result for them ([P, N, M] arrays). The
scorer reports, per completion, what it knows:

- `correct` float [P, N]: 1 / 0 by the final answer where the answer is supervised (easy
  problems), NaN where it is not (hard problems);
- `has_answer` bool [P, N]: the completion produced an answer line (else the stop penalty);
- optionally PRM step scores `step_scores` [P, N, S] in (0, 1) with `step_mask` [P, N, S],
  and `delimiters` int [P, N, M]: for each completion token that is (part of) step s's
  delimiter, s; -1 elsewhere (where `min_shaping`'s step rewards land).

`RewardSpec` turns those into rewards the way Sun et al. (2024)'s PPO does (see
`objectives.policy_gradient`): terminal reward (easy 1/0, hard a constant, stop penalty) on the
last completion token, plus, with `use_prm`, the `min`-shaped step rewards on the delimiters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from scalign.algorithms.loop import OnlineLoop, host_rng, pack_rollout
from scalign.objectives import policy_gradient as pg


@dataclasses.dataclass
class RolloutScores:
    """A scorer's verdict on a [P, N] rollout (see the module docstring)."""

    correct: np.ndarray
    has_answer: np.ndarray
    step_scores: np.ndarray | None = None
    step_mask: np.ndarray | None = None
    delimiters: np.ndarray | None = None

    def prm_score(self) -> np.ndarray:
        """Sequence PRM score [P, N]: the minimum step score (NaN without steps)."""
        if self.step_scores is None:
            return np.full(np.shape(self.correct), np.nan)
        s = np.where(np.asarray(self.step_mask, bool), self.step_scores, np.inf)
        low = s.min(-1, initial=np.inf)
        return np.where(np.isfinite(low), low, np.nan)


RewardFn = Callable[[list[dict[str, Any]], Any], RolloutScores]


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """How scores become rewards (defaults: the e2h PPO code, Sun et al. 2024).

    use_prm: add the PRM's `min`-shaped step rewards (paper rows "all problems + PRM");
      False uses answers only ("easy answers only").
    hard_reward: terminal reward of a problem without a supervised answer.
    stop_penalty: added when a completion has no answer line.
    shaping_upper / shaping_bonus: `min_shaping`'s upper bound and total per-solution bonus.
    """

    use_prm: bool = False
    hard_reward: float = 0.25
    stop_penalty: float = -1.0
    shaping_upper: float = 0.5
    shaping_bonus: float = 0.25

    def terminal(self, scores: RolloutScores) -> np.ndarray:
        """Terminal rewards [P, N]."""
        correct = np.asarray(scores.correct, np.float64)
        easy = ~np.isnan(correct)
        return np.asarray(pg.terminal_rewards(np.nan_to_num(correct), scores.has_answer, easy,
                                              hard_reward=self.hard_reward,
                                              stop_penalty=self.stop_penalty), np.float64)

    def step_rewards(self, scores: RolloutScores) -> np.ndarray | None:
        """`min`-shaped step rewards [P, N, S], or None without PRM use / step scores."""
        if not self.use_prm:
            return None
        if scores.step_scores is None or scores.delimiters is None:
            raise ValueError("RewardSpec(use_prm=True) needs step_scores, step_mask and "
                             "delimiters from the reward function")
        return np.asarray(pg.min_shaping(scores.step_scores, scores.step_mask,
                                         upper=self.shaping_upper, bonus=self.shaping_bonus))


@dataclasses.dataclass
class Rollout:
    """One iteration's samples, packed for the training forward (row r = p * N + j)."""

    ids: list[int]                   # pool ids of the P prompts
    prompts: list[list[int]]
    out: Any                         # SampleOutput
    scores: RolloutScores
    batch: dict[str, np.ndarray]     # pack_rollout: tokens, response_mask, prompt_index, ...

    @property
    def num_rows(self) -> int:
        return int(self.batch["tokens"].shape[0])

    def token_map(self, per_completion: np.ndarray, fill: Any) -> np.ndarray:
        """[P, N, M] completion-token values -> [R, T] aligned with `batch["tokens"]`."""
        P, N, M = self.out.tokens.shape
        R, T = self.batch["tokens"].shape
        out = np.full((R, T), fill, np.asarray(per_completion).dtype)
        flat = np.asarray(per_completion).reshape(R, M)
        lengths = self.out.lengths.reshape(R)
        for r in range(R):
            s, L = int(self.batch["response_start"][r]), int(lengths[r])
            out[r, s:s + L] = flat[r, :L]
        return out


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    """Which prompts and how many samples an iteration draws.

    prompts_per_iteration P (drawn from the pool's active set without replacement),
    samples_per_prompt N, max_new_tokens M, width T of the packed rows (fixed: every iteration
    compiles the same programs), pad_id, temperature, extra `Sampler.generate_ids` kwargs
    (stop strings, top_p ...), and `prompt_key`: the payload key of the prompt's token ids.
    """

    prompts_per_iteration: int
    samples_per_prompt: int
    max_new_tokens: int
    width: int
    pad_id: int = 0
    temperature: float = 0.7
    sample_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    prompt_key: str = "prompt_ids"


def collect(loop: OnlineLoop, spec: RolloutSpec, reward_fn: RewardFn, key: jax.Array, *,
            temperature: float | None = None) -> Rollout:
    """Draw P prompts (host rng from `key`), sample N each with the current policy
    (`loop.sample`), score them with `reward_fn` and pack them (`pack_rollout`)."""
    ids = loop.pool.sample(spec.prompts_per_iteration, host_rng(jax.random.fold_in(key, 1)))
    data = [loop.pool[i].data for i in ids]
    prompts = [list(d[spec.prompt_key]) for d in data]
    out = loop.sample(prompts, spec.samples_per_prompt, key=jax.random.fold_in(key, 2),
                      temperature=spec.temperature if temperature is None else temperature,
                      max_new_tokens=spec.max_new_tokens, **spec.sample_kwargs)
    scores = reward_fn(data, out)
    P, N = out.lengths.shape
    for name in ("correct", "has_answer"):
        if np.shape(getattr(scores, name)) != (P, N):
            raise ValueError(f"reward_fn returned {name} of shape "
                             f"{np.shape(getattr(scores, name))}, expected {(P, N)}")
    batch = pack_rollout(prompts, out.tokens, out.lengths, pad_id=spec.pad_id, width=spec.width)
    return Rollout(ids, prompts, out, scores, batch)


def minibatch_rows(num_rows: int, minibatches: int, rng: np.random.Generator,
                   divisor: int = 1) -> list[np.ndarray]:
    """A random split of rows 0..R-1 into `minibatches` equal parts (each a multiple of
    `divisor`, the mesh's data x fsdp size)."""
    if num_rows % minibatches or (num_rows // minibatches) % divisor:
        raise ValueError(f"{num_rows} rollout rows do not split into {minibatches} minibatches "
                         f"of a multiple of {divisor} rows (prompts_per_iteration x "
                         f"samples_per_prompt must divide)")
    return np.split(rng.permutation(num_rows), minibatches)


def mean_metrics(metrics: Sequence[dict[str, Any]], prefix: str = "") -> dict[str, float]:
    """Average a list of device metric dicts into host floats."""
    if not metrics:
        return {}
    host = jax.device_get(list(metrics))
    return {prefix + k: float(np.mean([float(m[k]) for m in host])) for k in host[0]}


def record(loop: OnlineLoop, rollout: Rollout, rewards: np.ndarray) -> dict[str, float]:
    """Per-prompt statistics into the pool (`mean_reward`, `accuracy` where known,
    `answer_rate`) and the rollout's summary metrics."""
    correct = np.asarray(rollout.scores.correct, np.float64)
    known = ~np.isnan(correct)
    acc = np.where(known.any(1), np.nansum(np.where(known, correct, 0), 1)
                   / np.maximum(known.sum(1), 1), np.nan)
    loop.pool.record(rollout.ids, "mean_reward", rewards.mean(1))
    loop.pool.record(rollout.ids, "accuracy", acc)
    loop.pool.record(rollout.ids, "answer_rate", np.asarray(rollout.scores.has_answer).mean(1))
    out = {"reward": float(rewards.mean()),
           "answer_rate": float(np.asarray(rollout.scores.has_answer).mean()),
           "response_tokens": float(rollout.out.lengths.mean())}
    if known.any():
        out["accuracy_known"] = float(correct[known].mean())
    return out
