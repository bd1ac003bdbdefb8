"""eva's creator: how informative each prompt is, and which prompts to evolve.

Ye et al. (2024), *Evolving Alignment via Asymmetric Self-Play* (arXiv 2411.00062). One eva
iteration: the solver answers each prompt of the current set K times (6 in the paper,
temperature 0.7, top-p 0.9), a reward model scores the answers, the creator turns the K
rewards of a prompt into one *informativeness* number, draws a fraction of the prompts with
probability rising with it, evolves them into new prompts (`algorithms.evolve`), and the
solver trains with a preference loss on pairs (highest vs lowest reward) from the new set.

Informativeness of a prompt with rewards r_1..r_K (`informativeness`, one row per prompt):

    gap       max_i r_i - min_i r_i                         (the paper's default)
    maxmean   max_i r_i - mean(r)
    var       mean((r - mean(r))^2)                         (population variance)
    mean      mean(r)
    mean_inv  1 - (mean(r) - min_p mean) / (max_p mean - min_p mean)   over the prompt set
    loo       mean_i [r_i - (sum_j r_j - r_i) / (K - 1)]    mean leave-one-out advantage
    dts       best - second best                            (r sorted descending)
    uniform   1

`loo` is implemented exactly as that definition, which the authors' code also computes:
algebraically sum_i r_i - (K sum r - sum r)/(K - 1) = 0, so it is identically zero for every
prompt (up to rounding, which `informativeness` removes by computing the closed form) and its
selection is uniform. `loo_abs` (mean |leave-one-out advantage|, ours) is the contrast measure
the name suggests: the advantage is r_i - (S - r_i)/(K - 1) = K (r_i - mean(r)) / (K - 1), so
loo_abs = K / (K - 1) * mean_i |r_i - mean(r)|.

Selection (`select`), over P prompts with metric values v_p, drawing n = round(fraction * P):

    importance_weighted  w_p = u_p / sum(u), u = min-max normalised v; n draws without
                         replacement (the paper's default, fraction 0.25)
    greedy               the n prompts with the largest v (ties by index)
    stratified           10 quantile bins of v; from each bin round(fraction * size) prompts
                         drawn without replacement with the bin's weights w

`mean` is the one metric where *low* values are wanted ("train where the solver is weak"):
the authors' selection weights a prompt's mean reward inverted, which is `mean_inv` here;
`select` takes every metric's values as given (larger = more likely), so `mean` favours
prompts the solver already does well on and `mean_inv` is the authors' "mean" selection.
When all values are equal (e.g. `uniform`, `loo`) min-max normalisation is undefined and
every prompt gets the same weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from scalign.algorithms.evolve import evolve_chain
from scalign.algorithms.loop import host_rng, pack_rollout, pair_batches, sequence_log_probs
from scalign.objectives.preference import REFERENCE_FREE

METRICS = ("gap", "maxmean", "var", "mean", "mean_inv", "loo", "loo_abs", "dts", "uniform")
SELECTIONS = ("importance_weighted", "greedy", "stratified")


def informativeness(rewards: np.ndarray, metric: str = "gap") -> np.ndarray:
    """Per-prompt informativeness, float64 [P], from rewards [P, K] (K >= 2 samples each)."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 2 or r.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, samples] with >= 2 samples, got {r.shape}")
    if not np.isfinite(r).all():
        raise ValueError("rewards contain NaN or inf; score every sample before selecting")
    K = r.shape[1]
    if metric == "gap":
        return r.max(1) - r.min(1)
    if metric == "maxmean":
        return r.max(1) - r.mean(1)
    if metric == "var":
        return r.var(1)
    if metric == "mean":
        return r.mean(1)
    if metric == "mean_inv":
        return 1.0 - min_max(r.mean(1))
    if metric == "loo":
        # mean_i [r_i - (S - r_i)/(K-1)] = (S - (K-1)^-1 (K S - S)) / K = 0 in closed form
        return np.zeros(r.shape[0])
    if metric == "loo_abs":
        return np.abs(r - r.mean(1, keepdims=True)).mean(1) * K / (K - 1)
    if metric == "dts":
        top = -np.sort(-r, axis=1)
        return top[:, 0] - top[:, 1]
    if metric == "uniform":
        return np.ones(r.shape[0])
    raise ValueError(f"unknown informativeness metric {metric!r}; known: {METRICS}")


def min_max(v: np.ndarray) -> np.ndarray:
    """(v - min v) / (max v - min v); all ones when v is constant (no preference)."""
    v = np.asarray(v, np.float64)
    if v.size == 0:
        return v
    lo, hi = v.min(), v.max()
    if hi - lo <= 1e-12 * max(1.0, abs(hi), abs(lo)):
        return np.ones_like(v)
    return (v - lo) / (hi - lo)


def selection_weights(values: np.ndarray) -> np.ndarray:
    """w = u / sum(u) with u the min-max normalised values (uniform when u sums to 0)."""
    u = min_max(values)
    s = u.sum()
    return u / s if s > 0 else np.full_like(u, 1.0 / max(u.size, 1))


def select(values: np.ndarray, fraction: float, rng: np.random.Generator,
           method: str = "importance_weighted", bins: int = 10) -> np.ndarray:
    """Indices (int64, in draw order) of the prompts to evolve; see the module docstring.

    With importance weighting, only prompts of positive weight can be drawn: the minimum of
    min-max normalisation has weight 0, so at most P - (#prompts at the minimum) are available
    and n is capped there (a constant metric keeps every prompt available).
    """
    v = np.asarray(values, np.float64).reshape(-1)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"selection fraction must be in (0, 1], got {fraction}")
    P = v.size
    n = max(1, int(round(fraction * P))) if P else 0
    if method == "greedy":
        return np.lexsort((np.arange(P), -v))[:n].astype(np.int64)
    if method == "importance_weighted":
        return _weighted_draw(np.arange(P), selection_weights(v), n, rng)
    if method == "stratified":
        w = selection_weights(v)
        edges = np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1]) if P else np.array([])
        which = np.searchsorted(np.unique(edges), v, side="right")
        out = []
        for b in np.unique(which):
            members = np.flatnonzero(which == b)
            k = int(round(fraction * members.size))
            if k:
                out.append(_weighted_draw(members, w[members], k, rng))
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)
    raise ValueError(f"unknown selection method {method!r}; known: {SELECTIONS}")


def _weighted_draw(ids: np.ndarray, w: np.ndarray, n: int, rng: np.random.Generator
                   ) -> np.ndarray:
    w = np.asarray(w, np.float64)
    if w.sum() <= 0:
        w = np.ones_like(w)
    n = min(n, int((w > 0).sum()))
    return rng.choice(ids, size=n, replace=False, p=w / w.sum()).astype(np.int64)


def preference_pairs(rewards: np.ndarray, min_gap: float = 0.0) -> list[tuple[int, int, int]]:
    """(prompt, chosen sample, rejected sample) per prompt: chosen = highest reward,
    rejected = lowest (eva's pairing; first index on ties). Prompts whose gap is <= min_gap
    (e.g. all samples equally good) give no pair."""
    r = np.asarray(rewards, np.float64)
    hi, lo = r.argmax(1), r.argmin(1)
    return [(p, int(hi[p]), int(lo[p])) for p in range(r.shape[0])
            if r[p, hi[p]] - r[p, lo[p]] > min_gap]


def mix_prompts(evolved: Sequence[int], current: Sequence[int], total: int,
                evolved_share: float, rng: np.random.Generator) -> list[int]:
    """The next iteration's prompt ids: round(evolved_share * total) evolved ones and the rest
    from the current set (the paper's 80% / 20%), each drawn without replacement (fewer when
    a side has too few; the other side fills up to `total` where it can)."""
    if not 0.0 <= evolved_share <= 1.0:
        raise ValueError(f"evolved_share must be in [0, 1], got {evolved_share}")
    n_evo = min(len(evolved), int(round(evolved_share * total)))
    n_cur = min(len(current), total - n_evo)
    n_evo = min(len(evolved), total - n_cur)
    pick_e = rng.choice(np.asarray(evolved, np.int64), n_evo, replace=False) if n_evo else []
    pick_c = rng.choice(np.asarray(current, np.int64), n_cur, replace=False) if n_cur else []
    return [int(i) for i in pick_e] + [int(i) for i in pick_c]


def update_order(n_pairs: int, rows: int, updates: int | None, rng: np.random.Generator
                 ) -> np.ndarray:
    """The order in which an iteration's pairs are fed to the preference steps (indices into
    the pairs, cut into batches of `rows` by `loop.pair_batches`): a shuffle of all of them
    (updates=None: one pass, ceil(n / rows) steps), or exactly `updates * rows` indices made
    of consecutive independent shuffles, truncated (updates=u: exactly u full steps, each pair
    used floor or ceil of u * rows / n times). Empty when there are no pairs."""
    if n_pairs == 0:
        return np.zeros(0, np.int64)
    if updates is None:
        return rng.permutation(n_pairs).astype(np.int64)
    if updates < 1:
        raise ValueError(f"updates must be >= 1 or None, got {updates}")
    need = updates * rows
    reps = -(-need // n_pairs)
    return np.concatenate([rng.permutation(n_pairs) for _ in range(reps)])[:need].astype(np.int64)


# ============================================================================ the solver loop
def bradley_terry_win_rates(rewards: np.ndarray) -> np.ndarray:
    """P-hat(y_i beats another sample of its prompt) = mean_{j != i} sigmoid(r_i - r_j), [P, K]
    (Bradley & Terry 1952): SPPO's win-rate estimate from scalar rewards."""
    r = np.asarray(rewards, np.float64)
    K = r.shape[1]
    p = 1.0 / (1.0 + np.exp(-(r[:, :, None] - r[:, None, :])))
    return (p.sum(-1) - 0.5) / (K - 1)  # the diagonal contributes sigmoid(0) = 1/2


@dataclasses.dataclass
class EvaConfig:
    """One eva iteration's settings (the paper's values in brackets).

    samples [6], temperature [0.7], top_p [0.9]: the solver's responses per prompt.
    metric ["gap"], selection ["importance_weighted"], fraction [0.25]: the creator.
    evolutions [4]: chained evolutions per selected prompt. evolved_share [0.8]: share of
    evolved prompts in the next training set (the rest: current prompts). evolve: False gives
    the fixed-prompt baseline (same updates, same start, no creator).
    min_gap: pairs need a reward gap above this. rows: pairs per preference step (batches are
    padded to it). width: token length of a pair row (prompt + response).
    updates: preference steps per iteration. None: one pass over the iteration's pairs (the
    count then varies with how many prompts have a reward gap); an int fixes it, cycling
    through reshuffled pairs (or taking the first `updates * rows` of a shuffle), so eva and
    the fixed-prompt baseline take exactly the same number of updates (`update_order`).
    """

    samples: int = 6
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 64
    metric: str = "gap"
    selection: str = "importance_weighted"
    fraction: float = 0.25
    evolutions: int = 4
    evolved_share: float = 0.8
    evolve: bool = True
    min_gap: float = 0.0
    rows: int = 8
    width: int = 128
    pad_id: int = 0
    updates: int | None = None

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"eva.metric {self.metric!r} is not one of {METRICS}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"eva.selection {self.selection!r} is not one of {SELECTIONS}")
        if self.samples < 2:
            raise ValueError(f"eva.samples must be >= 2 (a reward gap needs two), got "
                             f"{self.samples}")


class EvaIteration:
    """One eva iteration as an `OnlineLoop` iterate (Ye et al. 2024, Algorithm 1):

      1. solver: K responses for every active prompt; reward them; informativeness per prompt
         (recorded in the pool with the mean reward);
      2. creator: select a fraction by informativeness and evolve each selection in a chain
         (every intermediate joins the pool with its parent);
      3. the training set: evolved_share evolved + the rest current prompts (same size as the
         active set); K responses for the new prompts, scored;
      4. pairs (highest vs lowest reward) -> preference steps (reference log-probs from the
         loop's training forward; SPPO win rates by Bradley-Terry from the rewards);
      5. the training set becomes the next iteration's active set.

    Args:
      config: `EvaConfig`.
      encode: prompt item -> token ids (e.g. tokenizer.encode(item["prompt"], add_bos=True)).
      reward: (items, SampleOutput) -> rewards float [len(items), K]: a reward model, a PRM
        (eva x easy-to-hard) or a verifier.
      evolver: an `algorithms.evolve.Evolver` (None only with config.evolve=False).
      loss_kind: the preference loss of the loop's step ("dpo", "simpo", "orpo", "sppo",
        ...): decides whether reference log-probs and win rates are put in the batch.
    """

    def __init__(self, config: EvaConfig, *, encode: Callable[[dict[str, Any]], list[int]],
                 reward: Callable[[list[dict[str, Any]], Any], np.ndarray],
                 evolver: Any = None, loss_kind: str = "dpo"):
        if config.evolve and evolver is None:
            raise ValueError("eva with evolve=True needs an evolver")
        self.config = config
        self.encode = encode
        self.reward = reward
        self.evolver = evolver
        self.loss_kind = loss_kind

    def _rollout(self, loop: Any, ids: Sequence[int], key: Any, rows: int | None = None
                 ) -> tuple[list[list[int]], Any, np.ndarray]:
        """Sample and score `ids`; with `rows`, the prompt batch is padded to that many
        prompts (repeats of the first, discarded) so its shape, and so the sampler's
        compiled program, does not change with the number of fresh prompts."""
        c = self.config
        items = [loop.pool[i].data for i in ids]
        prompts = [list(self.encode(it)) for it in items]
        padded = prompts + [prompts[0]] * max(0, (rows or 0) - len(prompts))
        out = loop.sample(padded, c.samples, key=key, temperature=c.temperature,
                          top_p=c.top_p, max_new_tokens=c.max_new_tokens)
        out = dataclasses.replace(out, **{
            f.name: getattr(out, f.name)[:len(ids)] for f in dataclasses.fields(out)
            if getattr(out, f.name) is not None})
        rewards = np.asarray(self.reward(items, out), np.float64)
        if rewards.shape != (len(ids), c.samples):
            raise ValueError(f"reward returned shape {rewards.shape}, expected "
                             f"{(len(ids), c.samples)}")
        return prompts, out, rewards

    def state_dict(self) -> dict[str, Any]:
        """The evolver's host state (e.g. the duplicate filter), saved with the loop."""
        get = getattr(self.evolver, "state_dict", None)
        return {"evolver": get() if callable(get) else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load = getattr(self.evolver, "load_state_dict", None)
        if callable(load) and state.get("evolver") is not None:
            load(state["evolver"])

    def __call__(self, loop: Any, k: int, key: Any) -> dict[str, float]:
        c = self.config
        rng = host_rng(key)
        active = list(loop.pool.active)
        prompts, out, rewards = self._rollout(loop, active, jax.random.fold_in(key, 0))
        info = informativeness(rewards, c.metric)
        loop.pool.record(active, c.metric, info)
        loop.pool.record(active, "mean_reward", rewards.mean(1))
        metrics: dict[str, float] = {"reward_mean": float(rewards.mean()),
                                     f"info_{c.metric}": float(info.mean())}
        rollouts = {i: (prompts[n], out.tokens[n], out.lengths[n], rewards[n])
                    for n, i in enumerate(active)}
        train_ids = active
        if c.evolve:
            chosen = select(info, c.fraction, rng, c.selection)
            new_ids = evolve_chain(loop.pool, [active[i] for i in chosen], self.evolver,
                                   c.evolutions, rng, iteration=k + 1)
            train_ids = mix_prompts(new_ids, active, len(active), c.evolved_share, rng)
            fresh = [i for i in train_ids if i not in rollouts]
            if fresh:
                p2, o2, r2 = self._rollout(loop, fresh, jax.random.fold_in(key, 1),
                                           rows=len(active))
                loop.pool.record(fresh, "mean_reward", r2.mean(1))
                loop.pool.record(fresh, c.metric, informativeness(r2, c.metric))
                rollouts.update({i: (p2[n], o2.tokens[n], o2.lengths[n], r2[n])
                                 for n, i in enumerate(fresh)})
            metrics.update(selected=float(len(chosen)), evolved=float(len(new_ids)),
                           evolved_in_train=float(sum(i not in active for i in train_ids)))
        # pairs over the training set: rows p * K + j of the packed rollout
        K = c.samples
        P_prompts = [rollouts[i][0] for i in train_ids]
        tokens = np.stack([rollouts[i][1] for i in train_ids])
        lengths = np.stack([rollouts[i][2] for i in train_ids])
        train_rewards = np.stack([rollouts[i][3] for i in train_ids])
        triples = preference_pairs(train_rewards, c.min_gap)
        metrics["pairs"] = float(len(triples))
        metrics["train_reward_mean"] = float(train_rewards.mean())
        if triples:
            packed = pack_rollout(P_prompts, tokens, lengths, pad_id=c.pad_id, width=c.width)
            pairs = [(p * K + ch, p * K + rj) for p, ch, rj in triples]
            ref = None
            if self.loss_kind not in REFERENCE_FREE:
                # one reference forward over the whole rollout (fixed shape), shared by all
                ref = sequence_log_probs(loop, packed["tokens"], packed["response_mask"])
            extras = None
            if self.loss_kind == "sppo":
                win = bradley_terry_win_rates(train_rewards)
                extras = {"chosen_win_rate": np.asarray([win[p, ch] for p, ch, _ in triples]),
                          "rejected_win_rate": np.asarray([win[p, rj] for p, _, rj in triples])}
            batches = pair_batches(packed["tokens"], packed["response_mask"], pairs,
                                   rows=c.rows, order=update_order(len(pairs), c.rows,
                                                                   c.updates, rng),
                                   ref_logps=ref, extras=extras,
                                   response_start=packed["response_start"],
                                   prompt_width=c.width - c.max_new_tokens)
            losses = []
            for b in batches:
                b.pop("pair_index")
                losses.append(loop.update(b)["loss"])
            metrics["loss"] = float(np.mean([float(x) for x in losses]))
            metrics["updates"] = float(len(batches))
        loop.pool.set_active(train_ids)
        return metrics
