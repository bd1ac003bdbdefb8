"""`config.rerank.problems_per_level`: one count for every level, or one count per level."""

import ml_collections

from scalign.stages.rerank import RerankStage, per_level_counts


def _config(counts):
    return ml_collections.ConfigDict({
        "stages": ("data", "sft", "reward_models", "rerank"),
        "data": {"levels": (1, 2, 3, 4, 5)},
        "rerank": {"levels": (1, 4, 5), "problems_per_level": counts, "max_n": 8,
                   "temperature": 1.0, "seeds": 1, "num_subsets": 4, "max_new_tokens": 8}})


def test_per_level_counts_broadcast_and_per_level():
    assert per_level_counts(_config(7).rerank) == [7, 7, 7]
    assert per_level_counts(_config((5, 250, 250)).rerank) == [5, 250, 250]


def test_per_level_counts_must_match_levels():
    mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    errors = []
    RerankStage().validate(_config((5, 250)), mesh, errors)
    assert any("problems_per_level has 2 counts for 3 levels" in e for e in errors), errors
    errors = []
    RerankStage().validate(_config((5, 250, 250)), mesh, errors)
    assert not [e for e in errors if "problems_per_level" in e], errors
