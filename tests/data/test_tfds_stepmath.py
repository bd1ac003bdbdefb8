"""The stepmath TFDS builder writes array_record without TensorFlow; tfds.data_source and grain
read it back."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import grain
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from scalign.data import stepmath  # noqa: E402
from scalign.data import tfds_stepmath as T  # noqa: E402
from scalign.data.pipeline import make_sft_iterator  # noqa: E402
from scalign.data.tokenizer import Tokenizer  # noqa: E402

SIZES = {"n_train": 40, "n_test": 10}


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    T.build("easy", data_dir=path, **SIZES)
    T.build("hard", data_dir=path, **SIZES)
    return path


def test_tensorflow_is_not_needed():
    assert importlib.util.find_spec("tensorflow") is None


def test_writes_array_record_files(data_dir):
    folder = T.builder("easy", data_dir=data_dir, **SIZES).data_path
    names = sorted(p.name for p in folder.iterdir())
    assert any(".array_record-" in n and "-train." in n for n in names), names
    assert any(".array_record-" in n and "-test." in n for n in names), names
    assert "dataset_info.json" in names and "features.json" in names


@pytest.mark.parametrize("level_set", ["easy", "hard"])
def test_records_match_the_splits(data_dir, level_set):
    levels = T.LEVEL_SETS[level_set]
    spl = stepmath.splits(levels, SIZES["n_train"], SIZES["n_test"], T.DEFAULT_SEED)
    for split in ("train", "test"):
        src = T.data_source(level_set, split=split, data_dir=data_dir, **SIZES)
        want = {p.uid: stepmath.to_record(p) for lv in levels for p in getattr(spl[lv], split)}
        assert len(src) == len(want)
        got = [src[i] for i in range(len(src))]
        for rec in got:
            uid = _text(rec["uid"])
            assert uid in want
            w = want[uid]
            assert _text(rec["prompt"]) == w["prompt"]
            assert _text(rec["response"]) == w["response"]
            assert _text(rec["answer"]) == w["answer"] and int(rec["level"]) == w["level"]
            p = stepmath.from_record(rec)  # bytes fields are accepted
            assert stepmath.verify(p, rec["response"]).answer_label == 1


def test_train_and_test_are_disjoint_on_disk(data_dir):
    uids = {split: {_text(r["uid"]) for r in T.data_source("easy", split=split,
                                                            data_dir=data_dir, **SIZES)}
            for split in ("train", "test")}
    assert uids["train"].isdisjoint(uids["test"])


def test_plain_tfds_data_source_reads_a_built_config(tmp_path):
    T.build("hard", data_dir=tmp_path, n_train=5, n_test=2)  # a custom config, found on disk
    src = tfds.data_source("stepmath/hard_n5_t2_s0", split="test", data_dir=str(tmp_path),
                           download=False)
    assert len(src) == 4
    assert {int(r["level"]) for r in src} == {4, 5}


def test_unbuilt_config_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not built under"):
        T.data_source("all", split="train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown stepmath level set"):
        T.make_config("medium")


def test_fresh_process_reads_without_the_builder_module(data_dir):
    """A process that never imports scalign reads the files from their folder alone."""
    folder = T.builder("easy", data_dir=data_dir, **SIZES).data_path
    code = ("import tensorflow_datasets as tfds, sys;"
            f"b = tfds.builder_from_directory({str(folder)!r});"
            "src = b.as_data_source(split='test');"
            "print(len(src), 'scalign' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["30", "False"]


def test_grain_map_dataset_and_sft_iterator(data_dir):
    src = T.data_source("easy", split="train", data_dir=data_dir, **SIZES)
    ds = grain.MapDataset.source(src).map(lambda r: int(r["level"]))
    levels = list(ds)
    assert len(levels) == 120 and sorted(set(levels)) == [1, 2, 3]
    tok = Tokenizer.train([_text(r["prompt"]) + _text(r["response"]) for r in src], None,
                          vocab_size=64, user_defined_symbols=("\n\n",))
    it = make_sft_iterator(src, tok, batch_size=8, seq_len=96, seed=0)
    batch = next(it)
    assert batch["tokens"].shape == (8, 96) and batch["loss_mask"].shape == (8, 96)
    row, mask = batch["tokens"][0], batch["loss_mask"][0]
    response = tok.decode(row[mask > 0].tolist())
    assert "# Answer" in response
    assert np.all(mask[:2] == 0)  # bos and prompt are not trained on
