"""Tests for scalign.data.pipeline (grain pipelines to fixed-shape batches)."""

from __future__ import annotations

import json
import pickle
from collections import Counter

import numpy as np
import pytest

from scalign.data import pipeline as P
from scalign.data.tokenizer import Tokenizer


def _records(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"Problem {i}: {i} + {i % 7} = ?\n\n",
             "response": f"Step 1: {i} + {i % 7} = {i + i % 7}\n\n#### {i + i % 7}"}
            for i in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    recs = _records(40)
    return Tokenizer.train([r["prompt"] + r["response"] for r in recs], None, vocab_size=96)


class IndexFeaturizer:
    """Generic reward-model-style records: int i -> tokens of length 1 + i % 9, per-token
    labels padded with -1, a label mask, and the record index as a non-sequence field."""

    fields = {
        "tokens": P.Field(np.int32, 0),
        "labels": P.Field(np.int32, -1),
        "label_mask": P.Field(np.float32, 0.0),
        "idx": P.Field(np.int64, -1, sequence=False),
    }

    def __call__(self, record):
        n = 1 + record % 9
        return {"tokens": np.full(n, record + 1, np.int32),
                "labels": np.arange(n, dtype=np.int32) % 2,
                "label_mask": np.ones(n, np.float32),
                "idx": np.int64(record)}


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype
            np.testing.assert_array_equal(x[k], y[k])


def test_sft_batch_conventions(tok):
    recs = _records(12)
    it = P.make_sft_iterator(recs, tok, batch_size=4, seq_len=48, num_epochs=1, shuffle=False,
                             shard_index=0, shard_count=1)
    batches = list(it)
    assert len(batches) == 3
    for bi, batch in enumerate(batches):
        assert set(batch) == {"tokens", "loss_mask"}
        assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (4, 48)
        assert batch["loss_mask"].dtype == np.float32 and batch["loss_mask"].shape == (4, 48)
        for row in range(4):
            rec = recs[4 * bi + row]
            p, r = tok.encode(rec["prompt"]), tok.encode(rec["response"])
            want = [tok.bos_id, *p, *r, tok.eos_id]
            toks, mask = batch["tokens"][row], batch["loss_mask"][row]
            assert toks[: len(want)].tolist() == want
            assert (toks[len(want):] == tok.pad_id).all()
            want_mask = [0.0] * (1 + len(p)) + [1.0] * (len(r) + 1)
            assert mask[: len(want)].tolist() == want_mask
            assert (mask[len(want):] == 0).all()
            assert tok.decode(toks) == rec["prompt"] + rec["response"]


def test_deterministic_and_seed_dependent():
    kw = dict(batch_size=4, seq_len=16, num_epochs=1, shard_index=0, shard_count=1)
    a = list(P.make_batch_iterator(list(range(40)), IndexFeaturizer(), seed=3, **kw))
    b = list(P.make_batch_iterator(list(range(40)), IndexFeaturizer(), seed=3, **kw))
    c = list(P.make_batch_iterator(list(range(40)), IndexFeaturizer(), seed=4, **kw))
    _assert_batches_equal(a, b)
    order_a = np.concatenate([x["idx"] for x in a]).tolist()
    order_c = np.concatenate([x["idx"] for x in c]).tolist()
    assert sorted(order_a) == list(range(40)) and order_a != list(range(40))
    assert order_a != order_c


def test_epochs_repeat_and_reshuffle():
    it = P.make_batch_iterator(list(range(12)), IndexFeaturizer(), batch_size=4, seq_len=16,
                               seed=0, num_epochs=2, shard_index=0, shard_count=1)
    idx = np.concatenate([b["idx"] for b in it]).tolist()
    assert len(idx) == 24
    assert sorted(idx[:12]) == sorted(idx[12:]) == list(range(12))
    assert idx[:12] != idx[12:]
    forever = P.make_batch_iterator(list(range(12)), IndexFeaturizer(), batch_size=4,
                                    seq_len=16, num_epochs=None, shard_index=0, shard_count=1)
    assert len(_take(forever, 20)) == 20  # 80 rows from a 12-row source


def test_generic_featurizer_padding():
    it = P.make_batch_iterator(list(range(8)), IndexFeaturizer(), batch_size=8, seq_len=12,
                               num_epochs=1, shuffle=False, shard_index=0, shard_count=1)
    batch = next(it)
    assert batch["idx"].tolist() == list(range(8)) and batch["idx"].dtype == np.int64
    for row, rec in enumerate(range(8)):
        n = 1 + rec % 9
        assert (batch["tokens"][row, :n] == rec + 1).all() and (batch["tokens"][row, n:] == 0).all()
        assert (batch["labels"][row, n:] == -1).all()
        assert batch["label_mask"][row].sum() == n


def test_sharding_disjoint_equal_and_covering():
    n, shards = 22, 3
    per_shard, counts = [], []
    for s in range(shards):
        ds, info = P.make_batch_dataset(list(range(n)), IndexFeaturizer(), batch_size=6,
                                        seq_len=16, seed=1, num_epochs=1, shard_index=s,
                                        shard_count=shards)
        assert info.local_batch_size == 2 and info.num_examples == 8 and info.num_wrapped == 2
        batches = list(ds)
        counts.append(len(batches))
        assert all(b["tokens"].shape == (2, 16) for b in batches)
        per_shard.append(np.concatenate([b["idx"] for b in batches]).tolist())
    assert counts == [4, 4, 4]  # equal across processes: no multi-host hang at epoch end
    seen = Counter(sum(per_shard, []))
    assert set(seen) == set(range(n))
    assert sum(seen.values()) == 24 and sorted(i for i, c in seen.items() if c > 1) == [0, 1]
    for s in range(shards):  # shard s reads rows s, s+3, ... (wrapped mod n)
        assert set(per_shard[s]) == {(s + 3 * k) % n for k in range(8)}


def test_batch_and_shard_validation():
    with pytest.raises(ValueError, match="multiple of the process"):
        P.make_batch_iterator(list(range(8)), IndexFeaturizer(), batch_size=5, seq_len=8,
                              shard_index=0, shard_count=2)
    with pytest.raises(ValueError, match="shard_index=2"):
        P.make_batch_iterator(list(range(8)), IndexFeaturizer(), batch_size=4, seq_len=8,
                              shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="exactly one of seq_len or buckets"):
        P.make_batch_iterator(list(range(8)), IndexFeaturizer(), batch_size=4,
                              shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="empty"):
        P.make_batch_iterator([], IndexFeaturizer(), batch_size=4, seq_len=8,
                              shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="fewer than one local batch"):
        P.make_batch_iterator(list(range(3)), IndexFeaturizer(), batch_size=4, seq_len=8,
                              num_epochs=1, shard_index=0, shard_count=1)
    # Default sharding is this JAX process (1 process here).
    _, info = P.make_batch_dataset(list(range(8)), IndexFeaturizer(), batch_size=4, seq_len=8)
    assert (info.shard_index, info.shard_count) == (0, 1)


@pytest.mark.parametrize("buckets", [None, (8, 12)])
def test_resume_from_state_is_bitwise_identical(tok, buckets):
    kw = dict(batch_size=4, seed=7, num_epochs=3, shard_index=1, shard_count=2,
              on_too_long="drop")
    kw.update(seq_len=32) if buckets is None else kw.update(buckets=(16, 24, 32))
    recs = _records(30)
    it = P.make_sft_iterator(recs, tok, **kw)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    rest = list(it)
    assert len(rest) > 3
    resumed = P.make_sft_iterator(recs, tok, **kw)
    resumed.set_state(state)
    _assert_batches_equal(list(resumed), rest)
    assert resumed.too_long_counts == it.too_long_counts


def test_buckets_pick_smallest_fitting_length():
    it = P.make_batch_iterator(list(range(8)), IndexFeaturizer(), batch_size=2,
                               buckets=(8, 4, 2), num_epochs=1, shuffle=False,
                               shard_index=0, shard_count=1)
    for batch in it:
        longest = int((batch["label_mask"] > 0).sum(axis=1).max())
        want = min(b for b in (2, 4, 8) if b >= longest)
        assert batch["tokens"].shape == (2, want) and batch["labels"].shape == (2, want)
    assert P.pick_length(3, (2, 4, 8)) == 4
    with pytest.raises(ValueError, match="largest bucket 8"):
        P.pick_length(9, (2, 4, 8))


def test_too_long_error_names_record_index():
    # Record 4 has length 5 > seq_len 4 (lengths are 1 + i % 9).
    it = P.make_batch_iterator(list(range(9)), IndexFeaturizer(), batch_size=3, seq_len=4,
                               num_epochs=1, shuffle=False, shard_index=0, shard_count=1)
    next(it)
    with pytest.raises(ValueError, match=r"record 4: length 5 exceeds the maximum sequence "
                                         r"length 4"):
        next(it)


def test_too_long_drop_and_truncate_are_counted():
    kw = dict(batch_size=2, seq_len=4, num_epochs=1, shuffle=False, shard_index=0,
              shard_count=1)
    drop = P.make_batch_iterator(list(range(9)), IndexFeaturizer(), on_too_long="drop", **kw)
    kept = np.concatenate([b["idx"] for b in drop]).tolist()
    assert kept == [0, 1, 2, 3]  # records 4..8 are too long
    assert drop.too_long_counts == {"dropped": 5, "truncated": 0}
    assert drop.get_state()["dropped"] == 5
    trunc = P.make_batch_iterator(list(range(9)), IndexFeaturizer(), on_too_long="truncate",
                                  **kw)
    batches = list(trunc)
    assert np.concatenate([b["idx"] for b in batches]).tolist() == list(range(8))
    assert all(b["tokens"].shape == (2, 4) for b in batches)
    # 4..8 truncated; 8 is then the partial last batch, dropped by drop_remainder.
    assert trunc.too_long_counts == {"dropped": 0, "truncated": 5}
    with pytest.raises(ValueError, match="on_too_long"):
        P.make_batch_iterator(list(range(9)), IndexFeaturizer(), on_too_long="skip", **kw)


def test_featurizer_errors_name_the_record(tok):
    recs = _records(6)
    recs[3] = {"prompt": "only a prompt"}
    it = P.make_sft_iterator(recs, tok, batch_size=2, seq_len=64, num_epochs=1, shuffle=False,
                             shard_index=0, shard_count=1)
    next(it)
    with pytest.raises(ValueError, match=r"record 3: featurizer failed.*'response'"):
        next(it)

    class BadKeys(IndexFeaturizer):
        def __call__(self, record):
            out = super().__call__(record)
            del out["labels"]
            return out

    bad = P.make_batch_iterator(list(range(4)), BadKeys(), batch_size=2, seq_len=16,
                                num_epochs=1, shuffle=False, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match=r"record 0: featurizer returned keys"):
        next(bad)


def test_eval_iterator_pads_last_batch_and_keeps_order(tok):
    recs = _records(10)
    batches = list(P.make_sft_eval_iterator(recs, tok, batch_size=4, seq_len=48,
                                            shard_index=0, shard_count=1))
    assert len(batches) == 3
    assert all(set(b) == {"tokens", "loss_mask", "weight"} for b in batches)
    assert all(b["tokens"].shape == (4, 48) and b["weight"].dtype == np.float32
               for b in batches)
    weight = np.concatenate([b["weight"] for b in batches])
    assert weight.tolist() == [1.0] * 10 + [0.0] * 2
    last = batches[-1]
    assert (last["tokens"][2:] == tok.pad_id).all() and (last["loss_mask"][2:] == 0).all()
    texts = [tok.decode(row) for b in batches for row in b["tokens"]][:10]
    assert texts == [r["prompt"] + r["response"] for r in recs]


def test_eval_shards_have_equal_batch_counts_and_see_each_example_once():
    n, shards = 11, 4  # shard sizes 3, 3, 3, 2; local batch 2 -> 2 batches each
    seen, counts = [], []
    for s in range(shards):
        ds, info = P.make_eval_batch_dataset(list(range(n)), IndexFeaturizer(), batch_size=8,
                                             seq_len=16, shard_index=s, shard_count=shards)
        assert info.num_wrapped == 0
        batches = list(ds)
        counts.append(len(batches))
        for b in batches:
            seen += b["idx"][b["weight"] > 0].tolist()
            assert (b["idx"][b["weight"] == 0] == -1).all()
    assert counts == [2, 2, 2, 2]
    assert sorted(seen) == list(range(n))
    # More shards than one batch's worth: the short shard emits an all-padding batch.
    ds, _ = P.make_eval_batch_dataset(list(range(5)), IndexFeaturizer(), batch_size=4,
                                      seq_len=16, shard_index=3, shard_count=4)
    batches = list(ds)
    assert len(batches) == 2 and batches[1]["weight"].tolist() == [0.0]


def test_eval_resume_midway():
    kw = dict(batch_size=3, seq_len=16, shard_index=0, shard_count=1)
    it = P.make_eval_batch_iterator(list(range(10)), IndexFeaturizer(), **kw)
    _take(it, 2)
    state = it.get_state()
    rest = list(it)
    again = P.make_eval_batch_iterator(list(range(10)), IndexFeaturizer(), **kw)
    again.set_state(state)
    _assert_batches_equal(list(again), rest)
    assert len(rest) == 2 and rest[-1]["weight"].tolist() == [1.0, 0.0, 0.0]


class FakeDataSource:
    """A tfds.data_source-like random-access source: bytes-valued feature dicts."""

    def __init__(self, records):
        self._records = records

    def __len__(self):
        return len(self._records)

    def __getitem__(self, i):
        r = self._records[i]
        return {"prompt": r["prompt"].encode(), "response": r["response"].encode(),
                "level": np.int64(i % 5)}


def test_random_access_source_matches_list(tok):
    recs = _records(16)
    kw = dict(batch_size=4, seq_len=48, seed=2, num_epochs=1, shard_index=0, shard_count=1)
    from_list = list(P.make_sft_iterator(recs, tok, **kw))
    from_source = list(P.make_sft_iterator(FakeDataSource(recs), tok, **kw))
    _assert_batches_equal(from_list, from_source)


def test_tfds_hook_reads_a_prepared_source_without_download(tok, monkeypatch):
    import tensorflow_datasets as tfds

    calls = []

    def fake_data_source(name, *, split, data_dir, download):
        calls.append((name, split, data_dir, download))
        return FakeDataSource(_records(8))

    monkeypatch.setattr(tfds, "data_source", fake_data_source)
    it = P.make_sft_iterator_from_tfds("stepmath", tok, split="train", data_dir="/data",
                                       batch_size=4, seq_len=48, num_epochs=1,
                                       shard_index=0, shard_count=1)
    assert len(list(it)) == 2
    assert calls == [("stepmath", "train", "/data", False)]


def test_featurize_step_is_picklable(tok):
    # grain's multiprocess prefetch pickles the MapDataset (incl. the map function).
    fn = P._Featurize(P.SftFeaturizer(tok))
    clone = pickle.loads(pickle.dumps(fn))
    rec = _records(1)[0]
    a, b = fn((0, rec)), clone((0, rec))
    np.testing.assert_array_equal(a[1]["tokens"], b[1]["tokens"])


def test_pad_helpers():
    fields = IndexFeaturizer.fields
    rows = [IndexFeaturizer()(i) for i in (0, 2)]
    batch = P.pad_batch(rows, fields, length=5, batch_size=3)
    assert batch["tokens"].tolist() == [[1, 0, 0, 0, 0], [3, 3, 3, 0, 0], [0] * 5]
    assert batch["idx"].tolist() == [0, 2, -1]
    longer = P.repad_batch(batch, fields, 7)
    assert longer["labels"].shape == (3, 7) and (longer["labels"][:, 5:] == -1).all()
    assert longer["idx"] is batch["idx"]
    with pytest.raises(ValueError, match="length 3 > 2"):
        P.pad_batch(rows, fields, length=2)
