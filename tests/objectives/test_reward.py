"""Tests for scalign.objectives.reward: BCE / Bradley-Terry values, label placement,
featurizers through the grain pipeline, and one train step on a tiny scalar-head model."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalign import parallel
from scalign.data.pipeline import make_batch_iterator
from scalign.data.stepmath import split_solution
from scalign.models import init_params, param_logical_axes, presets
from scalign.models.heads import add_scalar_head, scalar_head_logical_axes, scalar_values
from scalign.objectives.reward import (
    PairwiseRewardFeaturizer,
    RewardFeaturizer,
    bradley_terry_loss,
    make_pairwise_reward_loss,
    make_reward_loss,
    oprm_records,
    orm_example,
    prm_example,
    token_bce_loss,
    token_positions_of_chars,
)
from scalign.training.state import OptimizerConfig, make_optimizer
from scalign.training.step import init_train_state, make_train_step

# ----------------------------------------------------------------------------- token BCE


def _numpy_bce(s, y, m):
    p = 1.0 / (1.0 + np.exp(-s))
    per = -(y * np.log(p) + (1.0 - y) * np.log(1.0 - p))
    return (per * m).sum() / m.sum()


def test_token_bce_matches_numpy_formula():
    rng = np.random.default_rng(0)
    s = rng.normal(0, 2, (3, 7))
    y = (rng.random((3, 7)) < 0.5).astype(np.float64)
    m = (rng.random((3, 7)) < 0.6).astype(np.float64)
    loss, metrics = token_bce_loss(jnp.asarray(s), jnp.asarray(y), jnp.asarray(m))
    assert float(loss) == pytest.approx(_numpy_bce(s, y, m), rel=1e-5)
    assert float(metrics["num_labels"]) == m.sum() == float(metrics["weight"])


def test_token_bce_hand_computed_metrics():
    # labelled: (s=2, y=1) right, (s=-1, y=0) right, (s=0.5, y=0) wrong; s=9 is masked out
    s = jnp.asarray([[2.0, -1.0, 0.5, 9.0]])
    y = jnp.asarray([[1.0, 0.0, 0.0, 0.0]])
    m = jnp.asarray([[1.0, 1.0, 1.0, 0.0]])
    loss, metrics = token_bce_loss(s, y, m)
    # (log(1+e^-2) + log(1+e^-1) + log(1+e^0.5)) / 3
    assert float(loss) == pytest.approx((0.12692801104297263 + 0.31326168751822286
                                         + 0.9740769841801067) / 3, rel=1e-6)
    assert float(metrics["accuracy"]) == pytest.approx(2 / 3)
    assert float(metrics["prob_pos"]) == pytest.approx(0.8807970779778823, rel=1e-6)
    # mean of sigma(-1) = 0.26894142, sigma(0.5) = 0.62245933
    assert float(metrics["prob_neg"]) == pytest.approx(0.4457003766, rel=1e-6)
    assert float(metrics["num_labels"]) == 3.0
    assert float(metrics["num_positive"]) == 1.0


def test_token_bce_is_stable_at_extreme_logits():
    s = jnp.asarray([[80.0, -80.0]])
    loss, _ = token_bce_loss(s, jnp.asarray([[0.0, 1.0]]), jnp.ones((1, 2)))
    grads = jax.grad(lambda x: token_bce_loss(x, jnp.asarray([[0.0, 1.0]]),
                                              jnp.ones((1, 2)))[0])(s)
    assert float(loss) == pytest.approx(80.0, rel=1e-5)
    assert np.all(np.isfinite(np.asarray(grads)))
    empty, _ = token_bce_loss(s, jnp.zeros((1, 2)), jnp.zeros((1, 2)))
    assert float(empty) == 0.0


# ----------------------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_hand_computed():
    rc, rr = jnp.asarray([2.0, 0.0]), jnp.asarray([1.0, 1.0])
    loss, m = bradley_terry_loss(rc, rr)
    # (log(1 + e^-1) + log(1 + e^1)) / 2
    assert float(loss) == pytest.approx(0.8132616875182228, rel=1e-6)
    assert float(m["accuracy"]) == 0.5
    assert float(m["margin"]) == 0.0
    assert float(m["weight"]) == 2.0
    loss, _ = bradley_terry_loss(rc, rr, margin=1.0)       # (log 2 + log(1 + e^2)) / 2
    assert float(loss) == pytest.approx(1.410037595801459, rel=1e-6)
    grad_c = jax.grad(lambda c: bradley_terry_loss(c, rr)[0])(rc)
    assert np.all(np.asarray(grad_c) < 0)                  # pushes chosen scores up


# ----------------------------------------------------------------------------- label placement


def test_prm_example_places_step_and_answer_labels():
    ex = prm_example(np.arange(10), step_end_positions=[3, 6], step_labels=[1, 0],
                     answer_position=8, answer_label=0)
    np.testing.assert_array_equal(ex["tokens"], np.arange(10))
    np.testing.assert_array_equal(ex["label_mask"], [0, 0, 0, 1, 0, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(ex["labels"], [0, 0, 0, 1, 0, 0, 0, 0, 0, 0])
    assert ex["tokens"].dtype == np.int32 and ex["labels"].dtype == np.float32
    ex = prm_example([5, 6, 7], [1], [1])                  # no answer label
    np.testing.assert_array_equal(ex["label_mask"], [0, 1, 0])


def test_prm_example_errors():
    with pytest.raises(ValueError, match="outside the 4 tokens"):
        prm_example(np.arange(4), [4], [1])
    with pytest.raises(ValueError, match="2 step_end_positions but 1 step_labels"):
        prm_example(np.arange(4), [1, 2], [1])
    with pytest.raises(ValueError, match="conflicting labels"):
        prm_example(np.arange(4), [2], [1], answer_position=2, answer_label=0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        prm_example(np.arange(4), [2], [2])
    with pytest.raises(ValueError, match="both answer_position and answer_label"):
        prm_example(np.arange(4), [2], [1], answer_position=3)


def test_orm_example_final_and_every_token():
    ex = orm_example(np.arange(10), final_position=8, outcome=1)
    np.testing.assert_array_equal(ex["label_mask"], [0] * 8 + [1, 0])
    np.testing.assert_array_equal(ex["labels"], [0] * 8 + [1, 0])
    ex = orm_example(np.arange(10), final_position=8, outcome=1, every_token=True,
                     response_start=5)
    np.testing.assert_array_equal(ex["label_mask"], [0, 0, 0, 0, 0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(ex["labels"], [0, 0, 0, 0, 0, 1, 1, 1, 1, 0])
    with pytest.raises(ValueError, match="needs response_start"):
        orm_example(np.arange(10), 8, 1, every_token=True)


def test_token_positions_of_chars():
    # decoded text: "1 + 2 = 3\n\n3 * 4 = 12\n\n# Answer\n\n12"
    token_bytes = [b"", b"1 + 2", b" = 3", b"\n\n", b"3", b" * 4 = 12\n", b"\n# Answer\n\n",
                   b"12"]
    ids = [0, 1, 2, 3, 4, 5, 6, 7]                    # id 0 = control token (bos)
    text = b"".join(token_bytes[i] for i in ids).decode()
    parsed = split_solution(text)
    assert parsed.step_ends == (9, 21) and parsed.answer_end == len(text)
    # step 1 ends at char 9 -> the "\n\n" token (3); step 2 ends at char 21, inside " * 4 = 12\n"
    # (5); the answer's last char (len-1) is in "12" (7)
    got = token_positions_of_chars(ids, [*parsed.step_ends, parsed.answer_end - 1], token_bytes)
    np.testing.assert_array_equal(got, [3, 5, 7])
    # multi-byte characters count as one character
    tb = [b"\xc3\xa9t\xc3\xa9", b"\n\n", b"x"]          # "été" "\n\n" "x"
    np.testing.assert_array_equal(token_positions_of_chars([0, 1, 2], [2, 3, 5], tb), [0, 1, 2])
    with pytest.raises(ValueError, match="outside the decoded text"):
        token_positions_of_chars([0, 1, 2], [6], tb)


# ----------------------------------------------------------------------------- featurizers

RECORDS = [
    {"tokens": [1, 5, 6, 7, 8, 9], "step_end_positions": [2, 4], "step_labels": [1, 0],
     "answer_position": 5, "answer_label": 0, "final_position": 5, "outcome": 0,
     "response_start": 2},
    {"tokens": [1, 5, 6, 7], "step_end_positions": [2], "step_labels": [1],
     "answer_position": None, "final_position": 3, "outcome": 1, "response_start": 1},
]


def _batches(records, featurizer, batch_size, seq_len):
    it = make_batch_iterator(records, featurizer, batch_size=batch_size, seq_len=seq_len,
                             shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
    return list(it)


def test_reward_featurizer_prm_orm_through_pipeline():
    (prm,) = _batches(RECORDS, RewardFeaturizer(pad_id=0, kind="prm"), 2, 8)
    assert prm["tokens"].shape == (2, 8)
    np.testing.assert_array_equal(prm["tokens"][1], [1, 5, 6, 7, 0, 0, 0, 0])
    np.testing.assert_array_equal(prm["label_mask"], [[0, 0, 1, 0, 1, 1, 0, 0],
                                                      [0, 0, 1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(prm["labels"], [[0, 0, 1, 0, 0, 0, 0, 0],
                                                  [0, 0, 1, 0, 0, 0, 0, 0]])
    (orm,) = _batches(RECORDS, RewardFeaturizer(kind="orm", orm_every_token=True), 2, 8)
    np.testing.assert_array_equal(orm["label_mask"], [[0, 0, 1, 1, 1, 1, 0, 0],
                                                      [0, 1, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(orm["labels"], [[0, 0, 0, 0, 0, 0, 0, 0],
                                                  [0, 1, 1, 1, 0, 0, 0, 0]])


def test_reward_featurizer_oprm_union():
    data = oprm_records(RECORDS)
    assert [r["kind"] for r in data] == ["prm", "prm", "orm", "orm"]
    b1, b2 = _batches(data, RewardFeaturizer(kind="oprm"), 2, 6)
    np.testing.assert_array_equal(b1["label_mask"].sum(-1), [3, 1])     # PRM rows
    np.testing.assert_array_equal(b2["label_mask"], [[0, 0, 0, 0, 0, 1],  # ORM rows
                                                     [0, 0, 0, 1, 0, 0]])
    np.testing.assert_array_equal(b2["labels"][:, :6], [[0] * 6, [0, 0, 0, 1, 0, 0]])
    with pytest.raises(KeyError, match="no key 'kind'"):
        RewardFeaturizer(kind="oprm")(RECORDS[0])
    with pytest.raises(ValueError, match="kind must be"):
        RewardFeaturizer(kind="xrm")


def test_pairwise_featurizer_through_pipeline():
    recs = [{"chosen_tokens": [1, 2, 3], "rejected_tokens": [1, 2, 4, 5], "margin": 0.5},
            {"chosen_tokens": [1, 7], "rejected_tokens": [1, 8, 9], "chosen_position": 0,
             "margin": 1.0}]
    (b,) = _batches(recs, PairwiseRewardFeaturizer(with_margin=True), 2, 5)
    np.testing.assert_array_equal(b["chosen_tokens"], [[1, 2, 3, 0, 0], [1, 7, 0, 0, 0]])
    np.testing.assert_array_equal(b["chosen_position"], [2, 0])
    np.testing.assert_array_equal(b["rejected_position"], [3, 2])
    np.testing.assert_array_equal(b["margin"], [0.5, 1.0])


# ----------------------------------------------------------------------------- model side


@pytest.fixture(scope="module")
def tiny():
    config = presets.tiny(32).replace(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1,
                                      head_dim=16, mlp_dim=64)
    mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    opt = make_optimizer(OptimizerConfig(learning_rate=3e-3, schedule="constant"))

    def init_fn(key):
        return add_scalar_head(config, init_params(config, key), jax.random.fold_in(key, 1))

    axes = {**param_logical_axes(config), "scalar_head": scalar_head_logical_axes()}
    state, st_sh = init_train_state(init_fn, axes, opt, mesh, seed=0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 32, (4, 8)).astype(np.int32)
    labels = (rng.random((4, 8)) < 0.5).astype(np.float32)
    mask = (rng.random((4, 8)) < 0.5).astype(np.float32)
    batch = {"tokens": tokens, "labels": labels, "label_mask": mask,
             "chosen_tokens": tokens, "rejected_tokens": tokens[::-1].copy(),
             "chosen_position": np.array([7, 6, 5, 4], np.int32),
             "rejected_position": np.array([1, 2, 3, 7], np.int32)}
    return config, mesh, opt, state, st_sh, batch


def test_reward_losses_read_the_right_scores(tiny):
    config, _, _, state, _, batch = tiny
    reward, pairwise = make_reward_loss(config), make_pairwise_reward_loss(config)

    @jax.jit
    def run(p, b):
        return (scalar_values(config, p, b["tokens"]),
                scalar_values(config, p, b["rejected_tokens"]),
                reward(p, b, None, None), pairwise(p, b, None, None))

    s_c, s_r, (bce, bce_m), (bt, bt_m) = jax.device_get(run(state.params, batch))
    assert float(bce) == pytest.approx(_numpy_bce(s_c.astype(np.float64), batch["labels"],
                                                  batch["label_mask"]), rel=1e-5)
    assert float(bce_m["num_labels"]) == batch["label_mask"].sum()
    rc = s_c[np.arange(4), batch["chosen_position"]]
    rr = s_r[np.arange(4), batch["rejected_position"]]
    want = np.mean(np.log1p(np.exp(-(rc.astype(np.float64) - rr))))
    assert float(bt) == pytest.approx(want, rel=1e-5)
    assert float(bt_m["rewards/chosen"]) == pytest.approx(rc.mean(), rel=1e-5, abs=1e-6)


def test_reward_losses_plug_into_the_train_step(tiny):
    """ORM/PRM BCE and Bradley-Terry in ONE compiled step (their sum is the objective)."""
    config, mesh, opt, state, st_sh, batch = tiny
    reward, pairwise = make_reward_loss(config), make_pairwise_reward_loss(config)

    def loss_fn(params, b, rng, frozen):
        bce, m1 = reward(params, b, rng, frozen)
        bt, m2 = pairwise(params, b, rng, frozen)
        return bce + bt, {"bce": bce, "bt": bt, "num_labels": m1["num_labels"],
                          "num_pairs": m2["num_pairs"]}

    step = make_train_step(loss_fn, opt, mesh, state_sharding=st_sh, donate=False)
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        metrics = jax.device_get(metrics)
        assert all(math.isfinite(float(metrics[k])) for k in ("loss", "bce", "bt", "grad_norm"))
        losses.append(float(metrics["loss"]))
    assert metrics["num_labels"] == batch["label_mask"].sum() and metrics["num_pairs"] == 4
    assert losses[-1] < losses[0]
    assert "scalar_head" in state.params
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


def test_prm_label_spans_as_in_the_easy_to_hard_code():
    from scalign.objectives.reward import label_span_positions, prm_example

    # tokens 0..11, response from 4; steps end (delimiter) at 6 and 9; answer at 11
    assert label_span_positions([6, 9], "end", 12) == [[6], [9]]
    assert label_span_positions([6, 9], "around", 12) == [[5, 6, 7], [8, 9, 10]]
    assert label_span_positions([6, 9], "step", 12, start=4) == [[4, 5, 6], [7, 8, 9]]
    # neighbouring delimiters: a position already claimed stays with the earlier step
    assert label_span_positions([3, 4], "around", 12) == [[2, 3, 4], [5]]
    ex = prm_example(list(range(12)), [6, 9], [1, 0], answer_position=11, answer_label=0,
                     span="step", response_start=4)
    np.testing.assert_array_equal(np.flatnonzero(ex["label_mask"]), [4, 5, 6, 7, 8, 9, 11])
    np.testing.assert_array_equal(ex["labels"][[4, 5, 6, 7, 8, 9, 11]], [1, 1, 1, 0, 0, 0, 0])
    # "around" never overwrites the answer token's own label
    ex = prm_example(list(range(12)), [6, 10], [1, 1], answer_position=11, answer_label=0,
                     span="around")
    np.testing.assert_array_equal(np.flatnonzero(ex["label_mask"]), [5, 6, 7, 9, 10, 11])
    assert ex["labels"][11] == 0.0 and ex["labels"][10] == 1.0
    with pytest.raises(ValueError, match="label span"):
        label_span_positions([6], "middle", 12)
