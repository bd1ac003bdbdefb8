"""PPO, GRPO, ReST-EM and iterative DPO on the online loop, with a toy scorer: a rollout +
update cycle never recompiles after iteration 1, moves the policy (and the critic), and the
bookkeeping (pool statistics, filtering, pairs) is what the algorithm says."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from scalign import parallel
from scalign.algorithms.grpo import GRPO, last_delimiters
from scalign.algorithms.iterative_dpo import (
    IterativeDPO,
    IterativeDPOConfig,
    sample_scores,
    select_pairs,
)
from scalign.algorithms.loop import PromptPool
from scalign.algorithms.ppo import PPO
from scalign.algorithms.rest_em import RestEM, RestEMConfig, select_solutions
from scalign.algorithms.rollout import RewardSpec, RolloutScores, RolloutSpec
from scalign.models import ModelConfig, init_params, param_logical_axes
from scalign.models.heads import add_scalar_head, scalar_head_logical_axes
from scalign.objectives import policy_gradient as pg
from scalign.sampling import Sampler
from scalign.training.state import OptimizerConfig, make_optimizer

V, DELIM = 48, 2              # vocabulary; the step delimiter token
P, N, M, T = 4, 4, 6, 16       # prompts per iteration, samples per prompt, new tokens, width


def _config() -> ModelConfig:
    return ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       head_dim=8, mlp_dim=64, tie_embeddings=False, family="llama")


def toy_reward(data, out) -> RolloutScores:
    """An answer line = a token t with t % 4 == 3; easy prompts are correct with two of them,
    hard ones have no answer (NaN); steps end at DELIM tokens (and at the last token), a step
    scores the share of its even tokens."""
    Pn, Nn, Mn = out.tokens.shape
    valid = np.arange(Mn)[None, None, :] < out.lengths[..., None]
    count = ((out.tokens % 4 == 3) & valid).sum(-1)
    easy = np.array([d["easy"] for d in data])[:, None]
    correct = np.where(easy, (count >= 2).astype(float), np.nan)
    delim = np.full((Pn, Nn, Mn), -1, np.int32)
    scores = np.zeros((Pn, Nn, Mn))
    smask = np.zeros((Pn, Nn, Mn))
    for p in range(Pn):
        for j in range(Nn):
            s, start = 0, 0
            toks = out.tokens[p, j, :out.lengths[p, j]]
            for i, t in enumerate(toks):
                if t == DELIM or i == len(toks) - 1:
                    delim[p, j, i] = s
                    scores[p, j, s] = float(np.mean(toks[start:i + 1] % 2 == 0))
                    smask[p, j, s] = 1.0
                    s, start = s + 1, i + 1
    return RolloutScores(correct=correct, has_answer=count > 0, step_scores=scores,
                         step_mask=smask, delimiters=delim)


def _pool(n=8):
    rng = np.random.default_rng(0)
    return PromptPool.from_prompts([
        {"prompt_ids": rng.integers(1, V, size=int(rng.integers(2, 6))).tolist(),
         "easy": bool(i % 2)} for i in range(n)])


@pytest.fixture(scope="module")
def model():
    config = _config()
    params = jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x,
                          init_params(config, jax.random.PRNGKey(0)))
    return config, params


def _common(config, params, mesh_shape=(1, 1, 1)):
    n = int(np.prod(mesh_shape))
    mesh = parallel.make_mesh(mesh_shape, jax.devices()[:n])
    sampler = Sampler(config, params, None, max_new_tokens=M, min_prompt_bucket=8, mesh=mesh)
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-2, total_steps=10,
                                         schedule="constant"))
    return dict(mesh=mesh, sampler=sampler, optimizer=opt, seed=3, pool=_pool(),
                progress=False)


SPEC = RolloutSpec(prompts_per_iteration=P, samples_per_prompt=N, max_new_tokens=M, width=T,
                   temperature=1.0, sample_kwargs={"stop_on_eos": False})


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _moved(a, b):
    return any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _run_and_check_no_recompile(loop, algo, iterations=3):
    sizes = []

    def iterate(lp, k, key):
        out = algo(lp, k, key)
        sizes.append(lp.cache_sizes())
        return out
    history = loop.run(iterations, iterate)
    assert all(s == sizes[0] for s in sizes[1:]), sizes
    assert any(k.startswith("sampler.") for k in sizes[0]), sizes[0]
    return history


def test_ppo_cycle_never_recompiles_and_moves_policy_and_critic(model):
    config, params = model
    vparams = add_scalar_head(config, params, jax.random.PRNGKey(1))
    vaxes = {**param_logical_axes(config), "scalar_head": scalar_head_logical_axes()}
    algo = PPO(SPEC, toy_reward, RewardSpec(use_prm=True), pg.PPOConfig(minibatches=2))
    loop = algo.create_loop(config, params, value_params=vparams, value_logical_axes=vaxes,
                            value_optimizer=make_optimizer(OptimizerConfig(
                                learning_rate=1e-2, total_steps=10, schedule="constant")),
                            **_common(config, params))
    start_p, start_v = _leaves(loop.params), _leaves(loop.state.value.params)
    history = _run_and_check_no_recompile(loop, algo)
    assert _moved(start_p, _leaves(loop.params))
    assert _moved(start_v, _leaves(loop.state.value.params))
    assert int(loop.state.policy.step) == 3 * 2 and int(loop.state.value.step) == 3 * 2
    for key in ("loss", "value/loss", "reward", "kl_ref", "clipfrac"):
        assert np.isfinite([h[key] for h in history]).all(), key
    drawn = [e for e in loop.pool.entries if "mean_reward" in e.stats]
    assert drawn and all("answer_rate" in e.stats for e in drawn)


@pytest.mark.parametrize("process,minibatches", [(False, 1), (True, 2)])
def test_grpo_cycle_never_recompiles(model, process, minibatches):
    config, params = model
    algo = GRPO(SPEC, toy_reward, RewardSpec(use_prm=True),
                pg.GRPOConfig(process=process, minibatches=minibatches))
    loop = algo.create_loop(config, params, **_common(config, params))
    start = _leaves(loop.params)
    history = _run_and_check_no_recompile(loop, algo)
    assert _moved(start, _leaves(loop.params))
    assert int(loop.state.policy.step) == 3 * minibatches
    assert np.isfinite([h["loss"] for h in history]).all()
    # the reference stays the starting policy
    for a, b in zip(start, _leaves(loop.state.reference), strict=True):
        np.testing.assert_array_equal(a, b)


def test_grpo_process_advantages_follow_the_steps():
    """Process supervision: a step's normalised reward counts for the tokens up to its end."""
    delim = np.array([[-1, 0, 0, -1, 1, -1]])
    np.testing.assert_array_equal(last_delimiters(delim), [[-1, -1, 0, -1, 1, -1]])


def test_rest_em_selection_by_hand():
    nan = np.nan
    correct = np.array([[1, 0, 1, 1], [nan, nan, nan, nan]], float)
    has_answer = np.array([[1, 1, 1, 0], [1, 1, 0, 1]], bool)
    prm = np.array([[0.1, 0.9, 0.2, 0.9], [0.6, 0.4, 0.9, 0.7]])
    keep = select_solutions(correct, has_answer, prm, threshold=0.5, max_per_problem=1)
    # easy: correct and answered -> 0, 2; the higher PRM score first -> 2
    # hard: PRM >= .5 and answered -> 0 (.6), 3 (.7); highest first -> 3
    np.testing.assert_array_equal(keep, [[0, 0, 1, 0], [0, 0, 0, 1]])
    keep = select_solutions(correct, has_answer, prm, threshold=0.5, max_per_problem=4,
                            completions=np.array([[[1], [2], [1], [3]], [[4], [5], [6], [4]]]))
    # sample 0 of problem 0 duplicates sample 2 (kept first); sample 0 of problem 1 duplicates 3
    np.testing.assert_array_equal(keep, [[0, 0, 1, 0], [0, 0, 0, 1]])


def test_dpo_pair_selection_by_hand():
    s = sample_scores(np.array([[1.0, 0.0, np.nan, 1.0, 0.0, 0.0]]),
                      np.array([[0.5, 0.2, 0.9, np.nan, 0.4, 0.3]]))
    np.testing.assert_allclose(s, [[1.5, 0.2, 0.9, 1.0, 0.4, 0.3]])
    # order: 0 (1.5), 3 (1.0), 2 (.9), 4 (.4), 5 (.3), 1 (.2)
    # pairs: (0, 1) gap 1.3; (3, 5) gap .7; (2, 4) gap .5 is not > .5
    assert select_pairs(s[0], gap_threshold=0.5, max_pairs=3) == [(0, 1), (3, 5)]
    assert select_pairs(s[0], gap_threshold=0.5, max_pairs=1) == [(0, 1)]
    # with 0 and 1 identical, (0, 1) is skipped; gap 0: (3, 5) .7, (2, 4) .5
    assert select_pairs(s[0], gap_threshold=0.0, max_pairs=3,
                        completions=np.array([[1], [1], [2], [3], [4], [5]])) == [(3, 5), (2, 4)]


def test_rest_em_cycle_resets_to_base_and_never_recompiles(model):
    config, params = model
    algo = RestEM(SPEC, toy_reward, RestEMConfig(prm_threshold=0.3, max_per_problem=2,
                                                 batch_size=4))
    loop = algo.create_loop(config, params, **_common(config, params))
    history = _run_and_check_no_recompile(loop, algo)
    assert all(h["kept"] > 0 for h in history)
    # fine-tuned from the base each iteration: the step counter restarts
    assert int(loop.state.policy.step) == int(history[-1]["sft_steps"])
    assert any("num_kept" in e.stats for e in loop.pool.entries)


def test_iterative_dpo_cycle_refreshes_reference_and_never_recompiles(model):
    config, params = model
    algo = IterativeDPO(SPEC, toy_reward, IterativeDPOConfig(gap_threshold=0.05, batch_size=4))
    loop = algo.create_loop(config, params, **_common(config, params))
    start = _leaves(loop.params)
    history = _run_and_check_no_recompile(loop, algo)
    assert all(h["pairs"] > 0 for h in history)
    assert np.isfinite([h["dpo/loss"] for h in history]).all()
    # the reference is the policy as it was at the start of the last iteration: not the start
    assert _moved(start, _leaves(loop.state.reference))
    assert _moved(_leaves(loop.state.reference), _leaves(loop.params))


# ---------------------------------------------------------------------------- domain reward
def test_domain_reward_verifies_easy_only_and_reads_prm_steps_at_delimiters(tmp_path):
    from scalign.algorithms.rewards import DomainReward, problem_pool
    from scalign.data import stepmath
    from scalign.data.domain import StepMathDomain
    from scalign.data.tokenizer import Tokenizer
    from scalign.evaluation.scoring import SequenceScorer
    from scalign.sampling import SampleOutput

    # a chain design: integer answers, so "answer + 1" below is a wrong answer
    easy = stepmath.generate(1, 1, seed=0, design="graded99")
    hard = stepmath.generate(4, 1, seed=0, design="graded99")
    tok = Tokenizer.train([p.prompt + p.solution for p in easy + hard
                           + stepmath.generate(2, 100, seed=1)], tmp_path / "t.model",
                          vocab_size=64, user_defined_symbols=("\n\n",))
    domain = StepMathDomain({}, "x", 0)
    pool, problems = problem_pool(domain, tok, {1: easy, 4: hard}, supervised_levels=(1, 2, 3))
    assert [e.data["easy"] for e in pool.entries] == [True, False]
    # per problem: the gold solution, a wrong answer, no answer section
    texts = [[p.solution, p.solution.rsplit("\n\n", 1)[0] + "\n\n" + str(int(p.answer) + 1),
              "\n\n".join(p.steps)] for p in easy + hard]
    ids = [[tok.encode(t) + [tok.eos_id] for t in row] for row in texts]
    M = max(len(x) for row in ids for x in row)
    tokens = np.full((2, 3, M), tok.pad_id, np.int32)
    lengths = np.zeros((2, 3), np.int32)
    for p in range(2):
        for j in range(3):
            tokens[p, j, :len(ids[p][j])], lengths[p, j] = ids[p][j], len(ids[p][j])
    out = SampleOutput(tokens=tokens, logprobs=np.zeros(tokens.shape, np.float32),
                       model_logprobs=np.zeros(tokens.shape, np.float32), lengths=lengths,
                       stop_reason=np.full((2, 3), "eos"), texts=texts)
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                      head_dim=8, mlp_dim=32, tie_embeddings=False, family="llama")
    prm_params = add_scalar_head(cfg, init_params(cfg, jax.random.PRNGKey(0)),
                                 jax.random.PRNGKey(1))
    scorer = SequenceScorer(cfg, prm_params, parallel.make_mesh((1, 1, 1), jax.devices()[:1]),
                            pad_id=tok.pad_id)
    data = [e.data for e in pool.entries]
    s = DomainReward(domain, tok, problems, supervised_levels=(1, 2, 3), prm=scorer)(data, out)
    np.testing.assert_array_equal(s.correct[0], [1.0, 0.0, 0.0])
    assert np.isnan(s.correct[1]).all()          # a hard problem's answer is never read
    np.testing.assert_array_equal(s.has_answer, [[True, True, False]] * 2)
    # the gold solution of the easy problem: one score per step, read at its delimiter token
    n_steps = len(easy[0].steps)
    assert n_steps >= 2
    assert s.step_mask[0, 0].sum() == n_steps
    delim = tok.piece_to_id("\n\n")
    where = np.flatnonzero(s.delimiters[0, 0] >= 0)
    assert list(s.delimiters[0, 0][where]) == list(range(n_steps))
    assert all(tokens[0, 0, t] == delim for t in where)
    probs = scorer.score([np.asarray(data[0]["prompt_ids"] + ids[0][0])], progress=False)[0]
    start = len(data[0]["prompt_ids"])
    np.testing.assert_allclose(s.step_scores[0, 0, :n_steps], probs[start + where], rtol=1e-6)
