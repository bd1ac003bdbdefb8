"""eva's creator (informativeness, selection, pairs, mixing), evolution chains, win rates:
hand-computed cases."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from scalign.algorithms.eva import (
    METRICS,
    informativeness,
    mix_prompts,
    preference_pairs,
    select,
    selection_weights,
)
from scalign.algorithms.evolve import EVOLVE_TEMPLATES, LLMEvolver, evolve_chain
from scalign.algorithms.loop import PromptPool
from scalign.evaluation.winrate import bootstrap_mean_ci, prompt_outcomes, win_rate

R = np.array([[1.0, 3.0, 2.0, 6.0],     # mean 3, max 6, min 1, second 3
              [2.0, 2.0, 2.0, 2.0],     # constant
              [0.0, 4.0, 4.0, 0.0]])    # mean 2, ties at the top


def test_each_metric_by_hand():
    np.testing.assert_allclose(informativeness(R, "gap"), [5, 0, 4])
    np.testing.assert_allclose(informativeness(R, "maxmean"), [3, 0, 2])
    # population variance: (4 + 0 + 1 + 9) / 4, 0, (4 * 4) / 4
    np.testing.assert_allclose(informativeness(R, "var"), [3.5, 0, 4])
    np.testing.assert_allclose(informativeness(R, "mean"), [3, 2, 2])
    # means 3, 2, 2 -> min-max 1, 0, 0 -> inverted 0, 1, 1
    np.testing.assert_allclose(informativeness(R, "mean_inv"), [0, 1, 1])
    # leave-one-out advantages of row 0: 1-11/3, 3-3, 2-10/3, 6-2 -> mean 0 (every row)
    np.testing.assert_allclose(informativeness(R, "loo"), [0, 0, 0])
    # |advantages| of row 0: 8/3, 0, 4/3, 4 -> mean 2; row 2: all 8/3
    np.testing.assert_allclose(informativeness(R, "loo_abs"), [2, 0, 8 / 3])
    np.testing.assert_allclose(informativeness(R, "dts"), [3, 0, 0])
    np.testing.assert_allclose(informativeness(R, "uniform"), [1, 1, 1])
    assert set(METRICS) >= {"gap", "maxmean", "var", "mean", "mean_inv", "loo", "dts",
                            "uniform"}
    with pytest.raises(ValueError, match="unknown informativeness"):
        informativeness(R, "entropy")
    with pytest.raises(ValueError, match="NaN"):
        informativeness(np.array([[1.0, np.nan]]), "gap")


def test_selection_weights_and_methods():
    v = np.array([5.0, 0.0, 4.0, 1.0])
    # min-max: 1, 0, .8, .2 -> / 2.0
    np.testing.assert_allclose(selection_weights(v), [0.5, 0, 0.4, 0.1])
    np.testing.assert_allclose(selection_weights(np.ones(4)), [0.25] * 4)
    np.testing.assert_array_equal(select(v, 0.5, np.random.default_rng(0), "greedy"), [0, 2])
    # ties in greedy go to the lower index
    np.testing.assert_array_equal(select(np.array([1.0, 2, 2, 0]), 0.5,
                                         np.random.default_rng(0), "greedy"), [1, 2])
    # importance weighting never draws a zero-weight prompt; frequencies follow the weights
    counts = collections.Counter()
    rng = np.random.default_rng(1)
    for _ in range(4000):
        (i,) = select(v, 0.25, rng, "importance_weighted")
        counts[int(i)] += 1
    assert counts[1] == 0
    np.testing.assert_allclose([counts[0] / 4000, counts[2] / 4000, counts[3] / 4000],
                               [0.5, 0.4, 0.1], atol=0.03)
    # without replacement, capped at the prompts of positive weight
    picked = select(v, 1.0, np.random.default_rng(2), "importance_weighted")
    assert sorted(picked.tolist()) == [0, 2, 3]
    # stratified: 10 values -> quantile bins; fraction 0.5 of each bin of 2 -> 5 prompts,
    # one from each bin
    vals = np.arange(10.0)
    picked = select(vals, 0.5, np.random.default_rng(3), "stratified", bins=5)
    assert len(picked) == 5 and sorted(set(np.asarray(picked) // 2)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="fraction"):
        select(v, 0.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown selection"):
        select(v, 0.5, np.random.default_rng(0), "topk")


def test_pairs_and_mixing():
    assert preference_pairs(R) == [(0, 3, 0), (2, 1, 0)]   # constant row 1 gives no pair
    assert preference_pairs(R, min_gap=4.5) == [(0, 3, 0)]
    mix = mix_prompts(list(range(100, 120)), list(range(10)), 10, 0.8,
                      np.random.default_rng(0))
    assert len(mix) == 10 and len(set(mix)) == 10
    assert sum(i >= 100 for i in mix) == 8
    # too few evolved prompts: the current set fills up
    mix = mix_prompts([100], list(range(10)), 5, 0.8, np.random.default_rng(0))
    assert sum(i >= 100 for i in mix) == 1 and len(mix) == 5


class _Suffix:
    """A deterministic test evolver: appends '+', rejects prompts that reach 3 '+'."""

    def __init__(self):
        self.counts = collections.Counter()

    def mutate(self, items, rng):
        out = []
        for it in items:
            if it["prompt"].count("+") >= 2:
                self.counts["rejected"] += 1
                out.append(None)
            else:
                out.append({**it, "prompt": it["prompt"] + "+"})
        return out


def test_chained_evolution_keeps_every_intermediate_with_lineage():
    pool = PromptPool.from_prompts([{"prompt": "a"}, {"prompt": "b+"}])
    new = evolve_chain(pool, [0, 1], _Suffix(), 4, np.random.default_rng(0), iteration=3)
    texts = {pool[i].data["prompt"]: i for i in new}
    # a -> a+ -> a++ (then rejected); b+ -> b++ (then rejected)
    assert set(texts) == {"a+", "a++", "b++"}
    assert pool.lineage(texts["a++"]) == [0, texts["a+"], texts["a++"]]
    assert pool.lineage(texts["b++"]) == [1, texts["b++"]]
    assert all(pool[i].iteration == 3 for i in new)
    with pytest.raises(ValueError, match="steps"):
        evolve_chain(pool, [0], _Suffix(), 0, np.random.default_rng(0), iteration=0)


class _FixedSampler:
    """Stands in for the creator's Sampler in a filtering test: returns given texts."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.calls = []

    tokenizer = type("Chars", (), {"encode": staticmethod(
        lambda s, add_bos=True: [ord(ch) for ch in s])})()

    def generate_ids(self, prompts, n, **kw):
        self.calls.append(([("".join(chr(i) for i in p)) for p in prompts], kw))
        out = [[self.replies.pop(0)] for _ in prompts]
        return type("Out", (), {"texts": out})()


def test_llm_evolver_filters_and_counts():
    sampler = _FixedSampler(["  Explain tides, citing two causes. ", "", "x" * 700,
                             "explain   TIDES, citing two causes.", "Describe monsoons.",
                             "Rewrite the task below so that it adds exactly one new "
                             "requirement or constraint: tides."])
    ev = LLMEvolver(sampler, templates=("constraints",), max_chars=600)
    items = [{"prompt": f"Explain tides {i}.", "topic": "sea"} for i in range(6)]
    out = ev.mutate(items, np.random.default_rng(0))
    assert out[0] == {"prompt": "Explain tides, citing two causes.", "topic": "sea",
                      "evolution": out[0]["evolution"]}
    assert out[1] is None and out[2] is None and out[3] is None
    assert out[4]["prompt"] == "Describe monsoons."
    assert out[5] is None  # the creator echoed its instruction
    assert ev.counts == {"accepted": 2, "empty": 1, "too_long": 1, "duplicate": 1, "echo": 1}
    texts, kw = sampler.calls[0]
    assert all(t.startswith("Rewrite the task below so that it adds") for t in texts)
    assert "Explain tides 0." in texts[0] and kw["temperature"] == 0.88
    with pytest.raises(ValueError, match="unknown evolve templates"):
        LLMEvolver(sampler, templates=("shorten",))
    assert set(EVOLVE_TEMPLATES) == {"constraints", "deepen", "concretise", "reasoning",
                                     "breadth"}


def test_win_rate_ties_half_and_bootstrap():
    a = np.array([[3.0, 1.0], [2.0, 2.0], [0.0, 5.0]])
    b = np.array([[1.0, 1.0], [3.0, 1.0], [1.0, 1.0]])
    # prompt 0: win + tie = 0.75; prompt 1: loss + win = 0.5; prompt 2: loss + win = 0.5
    np.testing.assert_allclose(prompt_outcomes(a, b), [0.75, 0.5, 0.5])
    w = win_rate(a, b, n_boot=500, seed=0)
    assert w["mean"] == pytest.approx(1.75 / 3)
    assert (w["wins"], w["ties"], w["losses"], w["prompts"]) == (3, 1, 2, 3)
    assert 0.5 <= w["ci_low"] <= w["mean"] <= w["ci_high"] <= 0.75
    # a constant outcome has a zero-width interval; identical policies score exactly 0.5
    assert bootstrap_mean_ci(np.ones(7)) == (1.0, 1.0)
    assert win_rate(b, b)["mean"] == 0.5
    with pytest.raises(ValueError, match="differ"):
        win_rate(a, b[:2])


# ------------------------------------------------------------------ the solver loop
class _AppendToken:
    """A domain evolver for token-id prompts: appends one random token (in-depth: longer)."""

    def __init__(self, vocab):
        self.vocab = vocab
        self.counts = collections.Counter()

    def mutate(self, items, rng):
        self.counts["accepted"] += len(items)
        return [{"ids": it["ids"] + [int(rng.integers(1, self.vocab))]} for it in items]

    def state_dict(self):
        return {"counts": dict(self.counts)}

    def load_state_dict(self, state):
        self.counts = collections.Counter(state["counts"])


def _eva_loop(tmp_path, loss_kind, evolve=True):
    import jax

    from scalign import parallel
    from scalign.algorithms.eva import EvaConfig, EvaIteration
    from scalign.algorithms.loop import OnlineLoop
    from scalign.models import ModelConfig, init_params
    from scalign.objectives.preference import make_preference_loss
    from scalign.sampling import Sampler
    from scalign.training.checkpoint import Checkpointer
    from scalign.training.state import OptimizerConfig, make_optimizer

    V, target = 32, 5
    config = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=8, mlp_dim=64, tie_embeddings=False, family="llama")
    params = init_params(config, jax.random.PRNGKey(0))
    mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    rng = np.random.default_rng(0)
    pool = PromptPool.from_prompts([{"ids": rng.integers(1, V, 3).tolist()} for _ in range(8)])
    hp = {"dpo": {"beta": 0.1}, "sppo": {"eta": 10.0}, "simpo": {}, "orpo": {}}[loss_kind]
    loop = OnlineLoop.create(
        config, params, mesh=mesh, sampler=Sampler(config, params, None, max_new_tokens=6),
        optimizer=make_optimizer(OptimizerConfig(learning_rate=1e-2, total_steps=10)),
        loss_fn=make_preference_loss(config, loss_kind, **hp), seed=1,
        reference=loss_kind not in ("simpo", "orpo"), pool=pool, progress=False,
        checkpointer=Checkpointer(tmp_path, save_every=1, keep=2))

    def reward(items, out):  # share of the target token in each response
        valid = np.arange(out.tokens.shape[-1]) < out.lengths[..., None]
        return ((out.tokens == target) & valid).sum(-1) / np.maximum(out.lengths, 1)

    cfg = EvaConfig(samples=4, max_new_tokens=6, fraction=0.25, evolutions=2, rows=8,
                    width=24, evolve=evolve)
    it = EvaIteration(cfg, encode=lambda item: item["ids"], reward=reward,
                      evolver=_AppendToken(V) if evolve else None, loss_kind=loss_kind)
    return loop, it


@pytest.mark.parametrize("loss_kind", ["dpo", "sppo", "simpo", "orpo"])
def test_eva_iterations_evolve_the_pool_and_train(tmp_path, loss_kind):
    loop, it = _eva_loop(tmp_path, loss_kind)
    history = loop.run(2, it)
    pool = loop.pool
    # 8 seeds; each iteration evolves round(0.25 * 8) = 2 prompts twice in a chain
    assert len(pool) == 8 + 2 * 2 * 2
    assert len(pool.active) == 8
    # 80% of the next set is evolved (capped by the 4 evolved prompts of an iteration)
    assert sum(pool[i].parent is not None for i in pool.active) == 4
    child = next(i for i in range(8, len(pool)) if pool[pool[i].parent].parent is not None)
    chain = pool.lineage(child)
    assert len(chain) == 3 and chain[0] < 8
    assert pool[child].data["ids"][:-1] == pool[chain[1]].data["ids"]
    assert all(np.isfinite(h["loss"]) for h in history if "loss" in h)
    assert all("gap" in pool[i].stats for i in pool.active)
    loop.checkpointer.close()


def test_eva_fixed_prompt_baseline_and_resume(tmp_path):
    loop, it = _eva_loop(tmp_path / "fixed", "dpo", evolve=False)
    loop.run(2, it)
    assert len(loop.pool) == 8 and loop.pool.active == list(range(8))
    loop.checkpointer.close()
    # eva: killed after iteration 1, resumed, equals the straight run (pool, params, evolver)
    from scalign.training.loop import Interrupted

    a, it_a = _eva_loop(tmp_path / "a", "dpo")
    a.run(3, it_a)
    b, it_b = _eva_loop(tmp_path / "b", "dpo")
    with pytest.raises(Interrupted):
        b.run(3, it_b, stop_after=1)
    b.checkpointer.close()
    c, it_c = _eva_loop(tmp_path / "b", "dpo")
    c.run(3, it_c)
    assert c.pool.state_dict() == a.pool.state_dict()
    assert it_c.evolver.counts == it_a.evolver.counts
    import jax
    for x, y in zip(jax.tree.leaves(jax.device_get(a.state)),
                    jax.tree.leaves(jax.device_get(c.state)), strict=True):
        assert np.array_equal(x, y)
    a.checkpointer.close()
    c.checkpointer.close()
