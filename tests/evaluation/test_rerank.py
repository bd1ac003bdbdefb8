"""Tests for scalign.evaluation.rerank: every rule pinned on hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scalign.evaluation.rerank import (
    aggregate,
    answer_ids,
    best_of_n,
    draw_subsets,
    majority_vote,
    pad_steps,
    paired_bootstrap_diff,
    rerank_accuracy,
    rerank_correct,
    roc_auc,
    weighted_vote,
)

# ----------------------------------------------------------------------------- aggregate


@pytest.mark.parametrize("method,expected", [
    ("min", 0.5), ("prod", 0.36), ("mean", 2.2 / 3), ("max", 0.9), ("last", 0.8)])
def test_aggregate_1d(method, expected):
    out = aggregate([0.9, 0.5, 0.8], method)
    assert isinstance(out, float)
    assert out == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("method", ["min", "prod", "mean", "max", "last"])
def test_aggregate_empty_is_zero(method):
    assert aggregate([], method) == 0.0
    out = aggregate(np.array([[0.3, 0.7], [0.9, 0.9]]), method,
                    mask=np.array([[False, False], [True, True]]))
    assert out[0] == 0.0


def test_aggregate_padded_with_mask():
    scores = np.array([[0.9, 0.5, 0.8, 0.0],
                       [0.6, 0.1, 0.3, 0.7],     # mask skips 0.1 and the last entry
                       [0.4, 0.0, 0.0, 0.0]])
    mask = np.array([[1, 1, 1, 0],
                     [1, 0, 1, 0],
                     [1, 0, 0, 0]], bool)
    np.testing.assert_allclose(aggregate(scores, "min", mask), [0.5, 0.3, 0.4])
    np.testing.assert_allclose(aggregate(scores, "max", mask), [0.9, 0.6, 0.4])
    np.testing.assert_allclose(aggregate(scores, "prod", mask), [0.36, 0.18, 0.4])
    np.testing.assert_allclose(aggregate(scores, "mean", mask), [2.2 / 3, 0.45, 0.4])
    # "last" = highest-index masked entry (the mask need not be a prefix)
    np.testing.assert_allclose(aggregate(scores, "last", mask), [0.8, 0.3, 0.4])


def test_aggregate_batched_leading_dims_and_pad_steps():
    arr, mask = pad_steps([[0.5, 0.5], [0.2], []])
    np.testing.assert_array_equal(mask, [[1, 1], [1, 0], [0, 0]])
    np.testing.assert_allclose(aggregate(arr, "prod", mask), [0.25, 0.2, 0.0])
    stacked = np.stack([arr, arr])                      # [2, 3, 2]
    out = aggregate(stacked, "last", np.stack([mask, mask]))
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out, [[0.5, 0.2, 0.0]] * 2)


def test_aggregate_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown aggregation 'median'"):
        aggregate([0.5], "median")


# ----------------------------------------------------------------------------- voting


def test_majority_vote_counts_and_strips():
    assert majority_vote([None, "5", " 7", "7 ", "5", "7"]) == " 7"  # 7 x3 beats 5 x2


def test_majority_vote_tie_goes_to_first_occurrence():
    assert majority_vote(["1", "2", "2", "1", "3"]) == "1"
    assert majority_vote(["2", "1", "1", "2"]) == "2"


def test_majority_vote_none_answers():
    assert majority_vote([None, None, "4"]) == "4"
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_majority_vote_key_canonicaliser():
    # "01", "1", "1.0" are one answer under int(float(.)); "2" x2 loses to it (3 votes)
    answers = ["2", "01", "1", "2", "1.0"]
    assert majority_vote(answers, key=lambda a: int(float(a))) == "01"
    assert majority_vote(answers) == "2"                  # distinct strings: "2" x2 wins
    # a key that returns None marks the answer as missing
    assert majority_vote(["x", "x", "3"], key=lambda a: int(a) if a.isdigit() else None) == "3"


def test_best_of_n():
    assert best_of_n(["a", "b", None, "c"], [0.3, 0.9, 0.95, 0.9]) == "b"  # None skipped, tie
    assert best_of_n(["a", "b"], [0.2, 0.1]) == "a"
    assert best_of_n([None, None], [0.5, 0.6]) is None
    with pytest.raises(ValueError, match="2 answers but 3 scores"):
        best_of_n(["a", "b"], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        best_of_n(["a", "b"], [0.1, float("nan")])


def test_weighted_vote_sums_scores():
    answers = ["a", "b", "b", "a", "c"]
    scores = [0.9, 0.5, 0.45, 0.125, 0.95]
    # a: 1.025, b: 0.95, c: 0.95
    assert weighted_vote(answers, scores) == "a"
    # majority says a/b tie -> a; best-of-n says c
    assert best_of_n(answers, scores) == "c"


def test_weighted_vote_differs_from_majority():
    answers = ["x", "y", "y", "x", "y"]
    scores = [0.9, 0.1, 0.2, 0.8, 0.3]     # x: 1.7 (2 votes), y: 0.6 (3 votes)
    assert majority_vote(answers) == "y"
    assert weighted_vote(answers, scores) == "x"


def test_weighted_vote_ties_none_and_key():
    assert weighted_vote(["x", "y", "y"], [0.5, 0.25, 0.25]) == "x"   # 0.5 vs 0.5 -> first
    assert weighted_vote([None, "y", "z"], [5.0, 0.25, 0.5]) == "z"   # None's score ignored
    assert weighted_vote([None], [1.0]) is None
    assert weighted_vote(["1", "01", "2"], [0.25, 0.25, 0.375], key=int) == "1"  # 0.5 > 0.375


# ----------------------------------------------------------------------------- rerank_accuracy

ANSWERS = [["4", "5", "5", None],          # problem 0: gold 4
           ["7", "7", "8", "9"],           # problem 1: gold 9
           ["1", "2", "3", "1"]]           # problem 2: gold 2
CORRECT = [[True, False, False, False],
           [False, False, False, True],
           [False, True, False, False]]
SCORES = [[0.9, 0.3, 0.3, 0.99],
          [0.2, 0.3, 0.1, 0.6],
          [0.1, 0.8, 0.2, 0.1]]


def test_answer_ids():
    np.testing.assert_array_equal(answer_ids(ANSWERS), [[0, 1, 1, -1], [0, 0, 1, 2],
                                                        [0, 1, 2, 0]])
    with pytest.raises(ValueError, match="rectangular"):
        answer_ids([["a", "b"], ["c"]])


@pytest.mark.parametrize("method,expected", [
    # majority: p0 "5" (wrong), p1 "7" (wrong), p2 "1" (wrong)          -> 0/3
    ("majority", 0.0),
    # best-of-n: p0 "4" (0.99 has no answer), p1 "9", p2 "2"           -> 3/3
    ("best_of_n", 1.0),
    # weighted: p0 4: 0.9 vs 5: 0.6 -> right; p1 7: 0.5 vs 9: 0.6 -> right;
    #           p2 1: 0.2, 2: 0.8, 3: 0.2 -> right                      -> 3/3
    ("weighted", 1.0),
    ("oracle", 1.0),
])
def test_rerank_accuracy_full_set_is_deterministic(method, expected):
    mean, std = rerank_accuracy(ANSWERS, CORRECT, SCORES, n=4, method=method, num_subsets=7,
                                rng=3)
    assert mean == pytest.approx(expected)
    assert std == 0.0


def test_rerank_accuracy_weighted_vs_majority_hand_example():
    answers = [["a", "b", "b"]]
    correct = [[True, False, False]]
    scores = [[0.9, 0.25, 0.25]]
    assert rerank_accuracy(answers, correct, scores, n=3, method="majority") == (0.0, 0.0)
    assert rerank_accuracy(answers, correct, scores, n=3, method="weighted") == (1.0, 0.0)


def test_rerank_accuracy_subsets_hand_computed_expectation():
    # K = 3, n = 2: subsets {0,1}, {0,2} -> tie a/b -> "a" (first) right; {1,2} -> "b" wrong.
    # Each repetition's accuracy over 200 identical problems estimates 2/3.
    answers = [["a", "b", "b"]] * 200
    correct = [[True, False, False]] * 200
    mean, std = rerank_accuracy(answers, correct, None, n=2, method="majority",
                                num_subsets=20, rng=np.random.default_rng(0))
    assert mean == pytest.approx(2 / 3, abs=0.03)
    assert 0.0 < std < 0.1
    # n = 1: accuracy = fraction of correct samples = 1/3
    mean1, _ = rerank_accuracy(answers, correct, None, n=1, method="majority", num_subsets=20,
                               rng=1)
    assert mean1 == pytest.approx(1 / 3, abs=0.03)
    # same rng seed -> same numbers
    assert rerank_accuracy(answers, correct, None, n=2, method="majority", num_subsets=20,
                           rng=np.random.default_rng(0)) == (mean, std)


def test_rerank_accuracy_matches_deterministic_rules_on_random_data():
    rng = np.random.default_rng(0)
    num_p, k = 60, 9
    answers = [[None if rng.random() < 0.15 else str(rng.integers(0, 4)) for _ in range(k)]
               for _ in range(num_p)]
    gold = [str(rng.integers(0, 4)) for _ in range(num_p)]
    correct = [[a == g for a in row] for row, g in zip(answers, gold, strict=True)]
    # scores from a small grid (multiples of 1/8) to create exact ties in sums and maxima
    scores = rng.integers(0, 9, (num_p, k)) / 8.0
    for method, fn in [("majority", lambda a, s: majority_vote(a)),
                       ("best_of_n", best_of_n), ("weighted", weighted_vote)]:
        expected = np.mean([fn(a, s) == g for a, s, g in zip(answers, scores, gold,
                                                              strict=True)])
        mean, std = rerank_accuracy(answers, correct, scores, n=k, method=method)
        assert mean == pytest.approx(expected), method
        assert std == 0.0


def test_rerank_accuracy_errors():
    with pytest.raises(ValueError, match="needs solution scores"):
        rerank_accuracy(ANSWERS, CORRECT, None, n=2, method="weighted")
    with pytest.raises(ValueError, match=r"n must be in \[1, K=4\]"):
        rerank_accuracy(ANSWERS, CORRECT, SCORES, n=5, method="majority")
    with pytest.raises(ValueError, match="unknown re-ranking method"):
        rerank_accuracy(ANSWERS, CORRECT, SCORES, n=2, method="vote")


def test_rerank_accuracy_nan_score_of_a_missing_answer_is_ignored():
    # answers [b, a, a, None]: weighted vote 0.1 for b vs 1.0 for a -> a (correct). A NaN score
    # of the answerless sample once turned every weighted vote of the problem into NaN and the
    # pick fell to group 0 (b).
    answers = [["b", "a", "a", None]]
    correct = [[False, True, True, False]]
    for missing in (np.nan, 0.0):
        scores = [[0.1, 0.5, 0.5, missing]]
        for method in ("weighted", "best_of_n"):
            assert rerank_accuracy(answers, correct, scores, n=4, method=method) == (1.0, 0.0)
    with pytest.raises(ValueError, match="scores contain NaN"):
        rerank_accuracy(answers, correct, [[np.nan, 0.5, 0.5, 0.0]], n=4, method="weighted")


def _brute_force_accuracy(answers, gold, scores, subsets, method):
    """Every (subset, problem) through the deterministic per-problem functions."""
    fns = {"majority": lambda a, s: majority_vote(a), "best_of_n": best_of_n,
           "weighted": weighted_vote}
    accs = []
    for sub in subsets:
        hits = [fns[method]([answers[p][j] for j in sel], [scores[p][j] for j in sel]) == gold[p]
                for p, sel in enumerate(sub)]
        accs.append(np.mean(hits))
    return float(np.mean(accs))


def test_rerank_accuracy_on_shared_subsets_matches_per_problem_rules():
    rng = np.random.default_rng(3)
    num_p, k, n = 40, 16, 5
    answers = [[None if rng.random() < 0.2 else int(rng.integers(0, 5)) for _ in range(k)]
               for _ in range(num_p)]
    gold = [int(rng.integers(0, 5)) for _ in range(num_p)]
    correct = [[a == g for a in row] for row, g in zip(answers, gold, strict=True)]
    scores = rng.integers(0, 9, (num_p, k)) / 8.0
    subsets = draw_subsets(num_p, k, n, num_subsets=7, rng=11)
    assert subsets.shape == (7, num_p, n)
    assert np.all(np.diff(subsets, axis=-1) > 0)            # sorted, without replacement
    for method in ("majority", "best_of_n", "weighted"):
        mean, _ = rerank_accuracy(answers, correct, scores, n=n, method=method, subsets=subsets)
        assert mean == pytest.approx(_brute_force_accuracy(answers, gold, scores, subsets,
                                                           method)), method


def test_shared_subsets_make_methods_paired():
    # weighted voting with equal scores IS majority voting: on one shared subset draw the two
    # agree on every subset and problem; on two independent draws they would not.
    rng = np.random.default_rng(0)
    num_p, k, n = 300, 32, 4
    ids = rng.integers(-1, 4, (num_p, k))
    correct = ids == 0
    ones = np.ones((num_p, k))
    subsets = draw_subsets(num_p, k, n, num_subsets=5, rng=1)
    maj = rerank_correct(ids, correct, None, "majority", subsets)
    wtd = rerank_correct(ids, correct, ones, "weighted", subsets)
    np.testing.assert_array_equal(maj, wtd)
    diff, lo, hi = paired_bootstrap_diff(wtd, maj, rng=0)
    assert (diff, lo, hi) == (0.0, 0.0, 0.0)
    other = rerank_correct(ids, correct, ones, "weighted", draw_subsets(num_p, k, n, 5, rng=2))
    assert not np.array_equal(maj, other)


def test_paired_bootstrap_diff_interval():
    # method a right on 60 of 100 problems, b on 50, a >= b everywhere: diff 0.10, and the CI of
    # a mean of 10 ones among 100 zeros/ones lies within [0.04, 0.17] and excludes zero
    a = np.zeros(100, bool)
    a[:60] = True
    b = np.zeros(100, bool)
    b[:50] = True
    diff, lo, hi = paired_bootstrap_diff(a, b, num_boot=4000, rng=0)
    assert diff == pytest.approx(0.10)
    assert 0.03 < lo < 0.07 and 0.13 < hi < 0.17
    # swapped roles: the interval mirrors
    d2, lo2, hi2 = paired_bootstrap_diff(b, a, num_boot=4000, rng=0)
    assert d2 == pytest.approx(-0.10) and hi2 < 0
    with pytest.raises(ValueError, match="differ in shape"):
        paired_bootstrap_diff(a, b[:5])


# ----------------------------------------------------------------------------- roc_auc


def test_roc_auc_hand_computed():
    # positives {0.9, 0.4}, negatives {0.1, 0.6}: 3 of 4 pairs ordered right
    assert roc_auc([1, 0, 1, 0], [0.9, 0.1, 0.4, 0.6]) == pytest.approx(0.75)
    assert roc_auc([True, False], [0.9, 0.1]) == 1.0
    assert roc_auc([True, False], [0.1, 0.9]) == 0.0


def test_roc_auc_ties_count_half():
    # pairs (pos, neg): (0.5,0.5) 1/2, (0.5,0.2) 1, (0.8,0.5) 1, (0.8,0.2) 1 -> 3.5 / 4
    assert roc_auc([1, 0, 1, 0], [0.5, 0.5, 0.8, 0.2]) == pytest.approx(0.875)
    assert roc_auc([1, 0, 1, 0], [0.3, 0.3, 0.3, 0.3]) == pytest.approx(0.5)


def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.3
    s = np.round(rng.random(200), 1)                      # many ties
    pos, neg = s[y], s[~y]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert roc_auc(y, s) == pytest.approx(pairwise)


def test_roc_auc_single_class_is_nan():
    assert math.isnan(roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(roc_auc([0, 0], [0.1, 0.2]))
    assert math.isnan(roc_auc([], []))
