"""Tests for scalign.data.tokenizer (SentencePiece wrapper)."""

from __future__ import annotations

import pickle
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalign.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer


def _math_corpus(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        out.append(
            f"Problem: compute {a} + {b}.\n\nStep 1: {a} + {b} = {a + b}\n\n"
            f"Step 2: so  $x^2 = \\frac{{{a}}}{{{b + 1}}}$\n\n# Answer\n\n#### {a + b}"
        )
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "math.model"
    return Tokenizer.train(_math_corpus(), path, vocab_size=400)


ROUND_TRIP_TEXTS = [
    "",
    " ",
    "\n",
    "\n\n",
    "x\n\ny",
    "  leading and trailing spaces   ",
    "tabs\tand\r\nCRLF",
    "Step 1: 12 + 30 = 42\n\nStep 2: done\n\n#### 42",
    "\\frac{1}{2} + \\sqrt{3} \\cdot x^{2} \\le 10",
    "runs     of      spaces\n\n\n\nand newlines",
    "unseen: é 漢字 😀 ∑ ≠ ∞",
    "0123456789 9876543210",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab x1234567890#$\\{}^_\n\t+-=.é😀")), max_size=60))
def test_round_trip_property(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_byte_fallback_encodes_unseen_chars_without_unk(tok):
    assert tok.byte_fallback
    ids = tok.encode("漢字😀")
    assert tok.unk_id not in ids
    assert all(tok.id_to_piece(i).startswith("<0x") for i in ids)


def test_digits_are_single_pieces_and_no_dummy_prefix(tok):
    pieces = [tok.id_to_piece(i) for i in tok.encode("12345")]
    assert pieces == ["1", "2", "3", "4", "5"]
    # No dummy prefix: the first piece of "Step" is not "▁Step".
    first = tok.id_to_piece(tok.encode("Step 1")[0])
    assert not first.startswith("▁")
    assert tok.encode("") == []


def test_special_ids(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (PAD_ID, EOS_ID, BOS_ID, UNK_ID)
    assert len({tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id}) == 4
    assert tok.id_to_piece(tok.pad_id) == "<pad>"
    ids = tok.encode("1 + 1", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.piece_to_id("<s>") == tok.bos_id
    assert tok.piece_to_id("no-such-piece-xyz") == tok.unk_id
    assert 300 < tok.vocab_size <= 400


def test_decode_skips_control_ids_anywhere(tok):
    ids = tok.encode("Step 1: 2")
    noisy = [tok.bos_id, *ids[:2], tok.pad_id, *ids[2:], tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(noisy) == "Step 1: 2"
    assert tok.decode(np.asarray(noisy, np.int32)) == "Step 1: 2"


def test_decode_rejects_out_of_range(tok):
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="one sequence"):
        tok.decode(np.zeros((2, 3), np.int32))


def test_step_delimiter_as_user_symbol():
    tok = Tokenizer.train(_math_corpus(60), None, vocab_size=320, user_defined_symbols=("\n\n",))
    pieces = [tok.id_to_piece(i) for i in tok.encode("a.\n\nStep 2\n\n#### 4")]
    assert pieces.count("\n\n") == 2
    assert all(p == "\n\n" or "\n" not in p for p in pieces)
    assert tok.decode(tok.encode("a.\n\n\nb")) == "a.\n\n\nb"


def test_small_vocab_on_tiny_corpus():
    corpus = ["1 + 2 = 3\n\n#### 3", "4 + 4 = 8\n\n#### 8"]
    tok = Tokenizer.train(corpus, None, vocab_size=64)
    assert not tok.byte_fallback  # no room for 256 byte pieces: auto turns it off
    assert tok.vocab_size <= 64
    for text in corpus + ["3 + 8 = 11\n\n"]:
        assert tok.decode(tok.encode(text)) == text
    # Without byte fallback an unseen character is unk (documented), not an error.
    assert tok.unk_id in tok.encode("z")


def test_vocab_too_small_is_a_clear_error():
    corpus = _math_corpus(20)[:2]
    need = 4 + len(set("".join(corpus))) + 256  # special + chars + byte pieces
    with pytest.raises(ValueError, match=f"at least {need} is needed"):
        Tokenizer.train(corpus, None, vocab_size=64, byte_fallback=True)
    # Exactly the minimum trains.
    assert Tokenizer.train(corpus, None, vocab_size=need, byte_fallback=True).byte_fallback
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train(["abcdefghijklmnopqrstuvwxyz"], None, vocab_size=16)
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train(["", ""], None, vocab_size=64)
    with pytest.raises(ValueError, match="model_type"):
        Tokenizer.train(["abc"], None, vocab_size=64, model_type="wordpiece")


def test_unigram_model_type_round_trips():
    tok = Tokenizer.train(_math_corpus(80), None, vocab_size=400, model_type="unigram")
    assert tok.byte_fallback
    text = "Step 1: 3 + 4 = 7\n\n#### 7 漢"
    assert tok.decode(tok.encode(text)) == text


def test_save_load_from_proto_and_pickle(tok, tmp_path):
    path = tmp_path / "sub" / "copy.model"
    tok.save(path)
    assert path.read_bytes() == tok.serialized
    for other in (Tokenizer.load(path), Tokenizer.load(str(path)),
                  Tokenizer.from_proto(tok.serialized), pickle.loads(pickle.dumps(tok))):
        assert other.serialized == tok.serialized
        text = ROUND_TRIP_TEXTS[7]
        assert other.encode(text) == tok.encode(text)
    assert len(pickle.dumps(tok)) < 2 * len(tok.serialized) + 1000


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer.load(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        Tokenizer.from_proto(b"definitely not a model")


def test_train_writes_path(tmp_path):
    path = tmp_path / "t.model"
    tok = Tokenizer.train(["1 + 1 = 2", "2 + 2 = 4"], path, vocab_size=32)
    assert Tokenizer.load(path).serialized == tok.serialized


def test_encode_accepts_utf8_bytes(tok):
    assert tok.encode("Step 1 é".encode()) == tok.encode("Step 1 é")
    with pytest.raises(TypeError, match="expected str"):
        tok.encode(12)  # type: ignore[arg-type]


def test_encode_batch_right_and_left_padding(tok):
    texts = ["1 + 1", "Step 1: 22 + 33 = 55", ""]
    ids, lengths = tok.encode_batch(texts, max_len=24, add_bos=True, add_eos=True)
    assert ids.dtype == np.int32 and ids.shape == (3, 24)
    assert lengths.dtype == np.int32
    for i, text in enumerate(texts):
        want = tok.encode(text, add_bos=True, add_eos=True)
        assert lengths[i] == len(want)
        assert ids[i, : len(want)].tolist() == want
        assert (ids[i, len(want):] == tok.pad_id).all()
    left, left_lengths = tok.encode_batch(texts, max_len=24, pad_side="left", add_eos=True)
    np.testing.assert_array_equal(left_lengths, lengths)
    for i, text in enumerate(texts):
        want = tok.encode(text, add_bos=True, add_eos=True)
        assert left[i, 24 - len(want):].tolist() == want
        assert (left[i, : 24 - len(want)] == tok.pad_id).all()
    assert tok.decode(left[1]) == texts[1]


def test_encode_batch_too_long_and_truncation(tok):
    texts = ["1", "1 2 3 4 5 6 7 8 9"]
    n = len(tok.encode(texts[1])) + 1  # with bos
    with pytest.raises(ValueError, match=rf"text 1 has {n} tokens"):
        tok.encode_batch(texts, max_len=6)
    body = tok.encode(texts[1])
    right, lr = tok.encode_batch(texts, max_len=6, truncate="right", add_eos=True)
    assert right[1].tolist() == [tok.bos_id, *body[:4], tok.eos_id] and lr[1] == 6
    left, ll = tok.encode_batch(texts, max_len=6, truncate="left")
    assert left[1].tolist() == [tok.bos_id, *body[-5:]] and ll[1] == 6
    with pytest.raises(ValueError, match="pad_side"):
        tok.encode_batch(texts, max_len=6, pad_side="middle")  # type: ignore[arg-type]
    empty, empty_len = tok.encode_batch([], max_len=4)
    assert empty.shape == (0, 4) and empty_len.shape == (0,)


def test_thread_safe_encode_decode(tok):
    texts = _math_corpus(64, seed=1)
    want = [tok.encode(t) for t in texts]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(tok.encode, texts * 4))
        back = list(pool.map(tok.decode, got))
    assert got == want * 4
    assert back == texts * 4
