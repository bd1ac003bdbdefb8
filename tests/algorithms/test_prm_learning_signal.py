"""A learning signal end to end: a PRM trained on easy problems only judges hard steps.

stepmath problems of the default design `reach4c` (every level: 4 single-digit steps mod 10,
each followed by its distance to the target, "3+4=7, 7-5=2"; harder levels choose more
operations by search). Solutions: random fillings of the "?" operations (locally valid steps
that mostly miss the target, so their last distance is not 0), half of them with one step's
result corrupted; labels from the verifier (PRM800K: locally valid steps are positive, the first
wrong step negative, later steps dropped). The pipeline is the project's: BPE tokenizer, `score_positions`, `prm_record`,
`RewardFeaturizer`, `make_reward_loss` in the shared train step, `SequenceScorer`, `roc_auc`.
The backbone is first SFT'd on the gold solutions of levels 1-3 (as the policy is: a PRM
starts from the SFT policy, which knows the arithmetic); the PRM then sees labelled solutions of
levels 1-3 only and is tested on levels 4-5.
"""

import functools

import jax
import numpy as np
import pytest

from scalign import parallel
from scalign.algorithms.reward_labels import prm_record, score_positions
from scalign.data import stepmath
from scalign.data.pipeline import make_batch_iterator, make_sft_iterator
from scalign.data.tokenizer import Tokenizer
from scalign.evaluation.rerank import roc_auc
from scalign.evaluation.scoring import SequenceScorer
from scalign.models import init_params, param_logical_axes, presets
from scalign.models.heads import SCALAR_HEAD, add_scalar_head, scalar_head_logical_axes
from scalign.objectives.reward import RewardFeaturizer, make_reward_loss
from scalign.objectives.sft import make_sft_loss
from scalign.training.state import OptimizerConfig, make_optimizer
from scalign.training.step import init_train_state, make_train_step

DESIGN = "reach4c"


def _solution(p, rng):
    """A random filling of the free operations, with one corrupted result half the time."""
    ops = list(p.ops)
    for k in p.free:
        ops[k] = str(rng.choice(stepmath.OPS))
    bad = int(rng.integers(0, p.num_steps)) if rng.random() < 0.5 else None
    v, steps = p.start, []
    for k, (op, b) in enumerate(zip(ops, p.operands, strict=True)):
        c = stepmath.apply_op(v, op, b, p.modulus)
        if k == bad:
            c = (c + int(rng.integers(1, p.modulus))) % p.modulus
        steps.append(p.step_text(v, op, b, c))
        v = c
    answer = stepmath.format_expression(p.start, ops, p.operands, spaced=False)
    return stepmath.STEP_DELIMITER.join([*steps, stepmath.ANSWER_HEADER, answer])


def _records(problems, tok, rng):
    """PRM records; for each also every step's score position (the record's labels stop at the
    first wrong step) and whether the whole solution is right."""
    token_bytes = tok.token_bytes()
    out, positions, outcomes = [], [], []
    for p in problems:
        text = _solution(p, rng)
        prompt_ids = tok.encode(p.prompt, add_bos=True)
        response_ids = tok.encode(text)
        pos = score_positions(token_bytes, prompt_ids, response_ids, text,
                              stepmath.split_solution(text))
        verdict = stepmath.verify(p, text)
        rec = prm_record(pos, verdict, after_first_error="drop", level=p.level, uid=p.uid)
        if rec is not None:
            out.append(rec)
            positions.append(list(pos.step_positions))
            outcomes.append(verdict.answer_label)
    return out, positions, outcomes


@pytest.mark.slow
@pytest.mark.heavy  # 3 min alone on the 2-core CPU: outside `make test`
def test_easy_trained_prm_judges_hard_steps():
    rng = np.random.default_rng(0)
    spl = stepmath.splits([1, 2, 3, 4, 5], {1: 1500, 2: 1500, 3: 1500, 4: 0, 5: 0}, 150, seed=0,
                          design=DESIGN)
    easy = [p for lv in (1, 2, 3) for p in spl[lv].train]
    hard = [p for lv in (4, 5) for p in spl[lv].test]
    tok = Tokenizer.train([p.prompt + p.solution for p in easy], None, vocab_size=96,
                          user_defined_symbols=("\n\n",))
    train, _, _ = _records(easy[::2], tok, rng)
    test, test_positions, outcome = _records(hard, tok, rng)
    assert {r["level"] for r in train} == {1, 2, 3}

    model = presets.tiny(tok.vocab_size)
    mesh = parallel.single_device_mesh()
    # 1. SFT the backbone on easy gold solutions (the demo's recipe: lr 1e-3, batch 16)
    sft_steps = 1200
    opt = make_optimizer(OptimizerConfig.from_config(
        {"learning_rate": 1e-3, "warmup_steps": 50, "total_steps": sft_steps,
         "min_lr_ratio": 0.05}))
    state, sh = init_train_state(functools.partial(init_params, model),
                                 param_logical_axes(model), opt, mesh, seed=0)
    step = make_train_step(make_sft_loss(model), opt, mesh, state_sharding=sh)
    it = make_sft_iterator([stepmath.to_record(p) for p in easy], tok, batch_size=16,
                           seq_len=96, seed=0)
    for _ in range(sft_steps):
        state, metrics = step(state, parallel.shard_batch(next(it), mesh))
    params = add_scalar_head(model, jax.device_get(state.params), jax.random.PRNGKey(1))
    # 2. the PRM from the SFT backbone, easy labels only
    steps = 250
    opt = make_optimizer(OptimizerConfig.from_config(
        {"learning_rate": 2e-3, "warmup_steps": 20, "total_steps": steps}))
    axes = {**param_logical_axes(model), SCALAR_HEAD: scalar_head_logical_axes()}
    state, sh = init_train_state(lambda k: params, axes, opt, mesh, seed=0, params=params)
    step = make_train_step(make_reward_loss(model), opt, mesh, state_sharding=sh)
    it = make_batch_iterator(train, RewardFeaturizer(pad_id=tok.pad_id, kind="prm"),
                             batch_size=32, seq_len=104, seed=0)
    for _ in range(steps):
        state, metrics = step(state, parallel.shard_batch(next(it), mesh))

    scorer = SequenceScorer(model, state.params, mesh, pad_id=tok.pad_id, batch_size=128)
    probs = scorer.score([np.asarray(r["tokens"]) for r in test], progress=False)
    labels = [y for r in test for y in r["step_labels"]]
    scores = [float(pr[q]) for r, pr in zip(test, probs, strict=True)
              for q in r["step_end_positions"]]
    assert 0.2 < np.mean(labels) < 0.95  # both classes well represented
    auc = roc_auc(labels, scores)
    # a random scorer gives 0.5; measured 0.798 (reach4c, seed 0, 2026-12-05, 3 min unloaded;
    # reach4, the design before: 0.814, commit 63d1d84)
    print(f"hard step ROC-AUC of the easy-trained PRM: {auc:.3f} over {len(labels)} steps")
    assert auc > 0.7
    # the solution's score (product of its step scores) against whether it is right: the
    # issue-15 target for the evaluator's outcome judgement on hard problems; measured 0.968
    solution_scores = [float(np.prod([pr[q] for q in qs]))
                       for qs, pr in zip(test_positions, probs, strict=True)]
    assert 0.02 < np.mean(outcome) < 0.98
    outcome_auc = roc_auc(outcome, solution_scores)
    print(f"hard outcome ROC-AUC of the easy-trained PRM: {outcome_auc:.3f} over "
          f"{len(outcome)} solutions")
    assert outcome_auc > 0.8
