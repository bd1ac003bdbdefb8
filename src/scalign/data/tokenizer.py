"""SentencePiece tokenizer: load, train, encode, decode, batch-encode.

`Tokenizer` wraps a `sentencepiece.SentencePieceProcessor` built from a serialized model
proto. The proto bytes are the single source of truth: `save` writes them, pickling ships
them (so a `Tokenizer` can travel into grain worker processes), and `load` reads them from a
local or `gs://` path through `etils.epath`.

Training (`Tokenizer.train`) targets exact round trips, `decode(encode(s)) == s`, for the
project's text (multi-line step-by-step math with "\\n\\n" step delimiters, runs of spaces,
digits, '#', LaTeX-ish symbols). The SentencePiece trainer options that give this
(see sentencepiece's `sentencepiece_model.proto`, `TrainerSpec` / `NormalizerSpec`):

- `normalization_rule_name="identity"`: no NFKC folding; the input is not rewritten.
- `remove_extra_whitespaces=False`: runs of spaces and newlines are kept.
- `add_dummy_prefix=False`: no space is prepended to the text (the default would make
  `decode(encode("x"))` fine but shift the pieces of every text by a leading "▁").
- `allow_whitespace_only_pieces=True`: a run of spaces may become one piece.
- `split_digits=True`: every digit is its own piece, so numbers tokenize uniformly.
- `character_coverage=1.0`: every character of the corpus gets a piece.
- `byte_fallback=True` (when the vocabulary has room for the 256 byte pieces): any
  character unseen in training is encoded as its UTF-8 bytes, so it still round-trips.
- `hard_vocab_limit=False`: on a tiny corpus the vocabulary may end up smaller than
  `vocab_size` instead of failing.
- `max_sentence_length` is raised to the longest training text, so no training text is
  silently skipped by the trainer.

"\\n" is an ordinary character under identity normalization (it is not whitespace to
SentencePiece), so BPE may merge it with neighbours (e.g. ".\\n\\n" or "\\n\\n####"). Pass
`user_defined_symbols=("\\n\\n",)` to make the step delimiter always one piece.

Known limit: SentencePiece escapes " " as "▁" (U+2581) internally, so a text that contains
a literal "▁" decodes with a space there instead.

The processor is safe to share between threads for encode/decode (sentencepiece issues
#207 and #657: encoding does not mutate the processor).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import sentencepiece as spm
from etils import epath

PathLike = str | os.PathLike

# Special-token ids used by `Tokenizer.train` (the layout of Gemma tokenizers: pad=0 so that
# zero-initialised token arrays are padding).
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
_NUM_BYTE_PIECES = 256
_NUM_META_PIECES = 4  # pad, eos, bos, unk
_MODEL_TYPES = ("bpe", "unigram", "char", "word")


class Tokenizer:
    """A SentencePiece model with the ids and batch helpers the pipelines need.

    Construct with `Tokenizer.load(path)`, `Tokenizer.from_proto(bytes)` or
    `Tokenizer.train(texts, path, vocab_size=...)`.
    """

    def __init__(self, serialized: bytes, *, source: str = "<bytes>"):
        self._serialized = bytes(serialized)
        self._source = source
        self._sp = _processor_from_proto(self._serialized, source)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_proto(cls, serialized: bytes) -> Tokenizer:
        """Build from the bytes of a serialized SentencePiece `ModelProto`."""
        return cls(serialized)

    @classmethod
    def load(cls, path: PathLike) -> Tokenizer:
        """Read a `.model` file from a local or `gs://` path."""
        p = epath.Path(path)
        if not p.exists():
            raise FileNotFoundError(f"tokenizer model not found: {p}")
        return cls(p.read_bytes(), source=str(p))

    def save(self, path: PathLike) -> None:
        """Write the serialized model (the `.model` file) to `path`, creating parents."""
        p = epath.Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(self._serialized)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        path: PathLike | None,
        *,
        vocab_size: int,
        model_type: str = "bpe",
        user_defined_symbols: Sequence[str] = (),
        byte_fallback: bool | None = None,
        split_digits: bool = True,
        character_coverage: float = 1.0,
        max_piece_length: int = 16,
        num_threads: int = 1,
    ) -> Tokenizer:
        """Train a SentencePiece model on an in-memory corpus; write it to `path` if given.

        Args:
          texts: the corpus, one training "sentence" per item (items may contain newlines;
            they are kept). Materialised into a list (the trainer needs its size and
            character set first).
          path: where to write the `.model` file (local or gs://), or None.
          vocab_size: the target vocabulary size, including the 4 special pieces
            (pad=0, eos=1, bos=2, unk=3), one piece per corpus character, the
            user-defined symbols and, with byte fallback, 256 byte pieces. On a tiny
            corpus the result may be smaller (`hard_vocab_limit=False`); read
            `.vocab_size` for the real size.
          model_type: "bpe" (default), "unigram", "char" or "word".
          user_defined_symbols: strings that always become exactly one piece.
          byte_fallback: encode unseen characters as UTF-8 byte pieces. None (default)
            turns it on iff `vocab_size` has room for the 256 byte pieces plus every corpus
            character and special piece; True with too small a vocabulary raises.
            Without byte fallback, characters unseen in training encode as `unk_id` and
            do not round-trip.
          split_digits: put every digit in its own piece.
          character_coverage: fraction of corpus characters that get a piece (1.0 = all).
          max_piece_length: longest piece, in characters.
          num_threads: trainer threads (SentencePiece's BPE trainer is single-threaded).

        Raises:
          ValueError: empty corpus, unknown model type, or a vocabulary too small for the
            required pieces (the message states the minimum).
        """
        corpus = [_as_text(t, i) for i, t in enumerate(texts)]
        if not any(corpus):
            raise ValueError("Tokenizer.train: the corpus is empty (no non-empty text)")
        if model_type not in _MODEL_TYPES:
            raise ValueError(f"Tokenizer.train: model_type must be one of {_MODEL_TYPES}, "
                             f"got {model_type!r}")
        symbols = [str(s) for s in user_defined_symbols]
        if any(not s for s in symbols):
            raise ValueError("Tokenizer.train: user_defined_symbols must be non-empty strings")
        chars = set().union(*(set(t) for t in corpus))
        # SentencePiece's own check (trainer_interface.cc): required chars + meta pieces
        # (+ byte pieces) <= vocab_size; user-defined symbols are not part of it.
        min_without_bytes = _NUM_META_PIECES + len(chars)
        min_with_bytes = min_without_bytes + _NUM_BYTE_PIECES
        if byte_fallback is None:
            byte_fallback = vocab_size >= min_with_bytes
        minimum = min_with_bytes if byte_fallback else min_without_bytes
        if vocab_size < minimum and character_coverage >= 1.0:
            raise ValueError(
                f"Tokenizer.train: vocab_size={vocab_size} is too small: the corpus has "
                f"{len(chars)} distinct characters, plus {_NUM_META_PIECES} special pieces"
                + (f" and {_NUM_BYTE_PIECES} byte pieces" if byte_fallback else "")
                + f", so at least {minimum} is needed"
                + (" (or pass byte_fallback=False)" if byte_fallback else "")
            )
        max_bytes = max(len(t.encode("utf-8")) for t in corpus)
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(corpus),
                model_writer=buf,
                vocab_size=vocab_size,
                model_type=model_type,
                user_defined_symbols=symbols,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                split_digits=split_digits,
                byte_fallback=byte_fallback,
                character_coverage=character_coverage,
                hard_vocab_limit=False,
                max_sentencepiece_length=max_piece_length,
                max_sentence_length=max(4192, max_bytes + 1),
                pad_id=PAD_ID,
                eos_id=EOS_ID,
                bos_id=BOS_ID,
                unk_id=UNK_ID,
                num_threads=num_threads,
                minloglevel=2,
            )
        except RuntimeError as e:  # sentencepiece reports option/size problems this way
            raise ValueError(f"Tokenizer.train (vocab_size={vocab_size}, "
                             f"model_type={model_type!r}): {e}") from e
        tok = cls(buf.getvalue(), source="<trained>")
        if path is not None:
            tok.save(path)
            tok._source = str(path)
        return tok

    # ------------------------------------------------------------------ pickling

    def __getstate__(self) -> dict[str, Any]:
        return {"serialized": self._serialized, "source": self._source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._serialized = state["serialized"]
        self._source = state["source"]
        self._sp = _processor_from_proto(self._serialized, self._source)

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self._source!r}, vocab_size={self.vocab_size}, "
                f"pad={self._sp.pad_id()}, bos={self.bos_id}, eos={self.eos_id}, "
                f"unk={self.unk_id})")

    # ------------------------------------------------------------------ ids

    @property
    def serialized(self) -> bytes:
        """The serialized `ModelProto` (the content of the `.model` file)."""
        return self._serialized

    @property
    def vocab_size(self) -> int:
        return int(self._sp.vocab_size())

    @property
    def bos_id(self) -> int:
        return _require_id(self._sp.bos_id(), "bos", self._source)

    @property
    def eos_id(self) -> int:
        return _require_id(self._sp.eos_id(), "eos", self._source)

    @property
    def pad_id(self) -> int:
        return _require_id(self._sp.pad_id(), "pad", self._source)

    @property
    def unk_id(self) -> int:
        return _require_id(self._sp.unk_id(), "unk", self._source)

    @property
    def byte_fallback(self) -> bool:
        """Whether the model has the 256 byte pieces (unseen characters round-trip)."""
        return any(self._sp.IsByte(i) for i in range(self.vocab_size))

    def id_to_piece(self, i: int) -> str:
        self._check_ids(np.asarray([i]))
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        """The id of `piece`, or `unk_id` if the piece is not in the vocabulary."""
        return int(self._sp.piece_to_id(piece))

    def token_bytes(self) -> list[bytes]:
        """The UTF-8 bytes each id contributes to decoded text, indexed by id (computed once).

        Control pieces (pad, bos, eos) give b""; byte-fallback pieces `<0xNN>` give the single
        byte NN; the unknown piece gives the model's `unk_surface` (" \u2047 " by default); every
        other piece gives its text with "\u2581" replaced by " ". Hence for ids from `encode`,
        `b"".join(tb[i] for i in ids).decode() == decode(ids)`, except that a model trained with
        `add_dummy_prefix=True` (not `Tokenizer.train`'s models) also drops one leading space in
        `decode`. The sampler builds its stop-string automaton from these byte strings.
        """
        cached = getattr(self, "_token_bytes_cache", None)
        if cached is not None:
            return cached
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self._serialized)
        unk = (proto.trainer_spec.unk_surface or " \u2047 ").encode("utf-8")
        sp = self._sp
        out: list[bytes] = []
        for i in range(self.vocab_size):
            if sp.IsControl(i):
                out.append(b"")
            elif sp.IsUnknown(i):
                out.append(unk)
            elif sp.IsByte(i):
                out.append(bytes([int(sp.id_to_piece(i)[3:-1], 16)]))
            else:
                out.append(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        self._token_bytes_cache = out
        return out

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally wrapped as [bos] + ids + [eos]."""
        ids = self._sp.encode(_as_text(text, None), out_type=int)
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_continuation(self, prompt: str, text: str, *, add_bos: bool = True
                            ) -> tuple[list[int], list[int]]:
        """(prompt ids, continuation ids) of prompt + text, as a sampler would produce them.

        The pair is encoded jointly and cut where the prompt's own ids end, so a tokenizer that
        prepends a space to every encoded text (SentencePiece's `add_dummy_prefix`, e.g.
        Llama's) does not put one before the continuation; if the joint ids do not start with
        the prompt's ids (a piece spans the boundary), the continuation is encoded on its own.
        """
        prompt_ids = self.encode(prompt, add_bos=add_bos)
        joint = self.encode(_as_text(prompt, None) + _as_text(text, None), add_bos=add_bos)
        if joint[:len(prompt_ids)] == prompt_ids:
            return prompt_ids, joint[len(prompt_ids):]
        return prompt_ids, self.encode(text)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids`. Control ids (pad, bos, eos) are skipped wherever they occur.

        Raises ValueError for ids outside [0, vocab_size).
        """
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim > 1:
            raise ValueError(f"decode takes one sequence of ids, got shape {arr.shape}; "
                             f"decode rows one at a time")
        arr = arr.reshape(-1)
        self._check_ids(arr)
        return self._sp.decode(arr.tolist())

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        max_len: int,
        pad_side: Literal["right", "left"] = "right",
        add_bos: bool = True,
        add_eos: bool = False,
        truncate: Literal["error", "left", "right"] = "error",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode and pad a batch to `[B, max_len]`.

        Each row is [bos]? + ids + [eos]? (length L_i), placed at the start of the row
        (`pad_side="right"`) or at its end (`"left"`, the layout for batched prefill); the
        rest is `pad_id`.

        Truncation (when L_i > max_len): "error" raises naming the row index and length;
        "left" drops the *first* text tokens (keeps the end of the text), "right" drops the
        *last* ones. bos/eos, when requested, are kept in both cases.

        Returns:
          (ids int32[B, max_len], lengths int32[B]) with lengths[i] = min(L_i, max_len).
        """
        if pad_side not in ("right", "left"):
            raise ValueError(f"pad_side must be 'right' or 'left', got {pad_side!r}")
        if truncate not in ("error", "left", "right"):
            raise ValueError(f"truncate must be 'error', 'left' or 'right', got {truncate!r}")
        n_special = int(add_bos) + int(add_eos)
        if max_len < max(1, n_special):
            raise ValueError(f"max_len={max_len} leaves no room for tokens "
                             f"(add_bos={add_bos}, add_eos={add_eos})")
        texts = [_as_text(t, i) for i, t in enumerate(texts)]
        bodies = self._sp.encode(texts, out_type=int) if texts else []
        out = np.full((len(texts), max_len), self.pad_id, dtype=np.int32)
        lengths = np.zeros((len(texts),), dtype=np.int32)
        room = max_len - n_special
        for i, body in enumerate(bodies):
            if len(body) > room:
                if truncate == "error":
                    raise ValueError(
                        f"encode_batch: text {i} has {len(body) + n_special} tokens "
                        f"(with bos/eos) > max_len={max_len}; raise max_len or pass "
                        f"truncate='left'|'right'")
                body = body[len(body) - room:] if truncate == "left" else body[:room]
            row = ([self.bos_id] if add_bos else []) + body + ([self.eos_id] if add_eos else [])
            lengths[i] = len(row)
            if pad_side == "right":
                out[i, : len(row)] = row
            else:
                out[i, max_len - len(row):] = row
        return out, lengths

    # ------------------------------------------------------------------ helpers

    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise ValueError(f"token id {int(bad)} is outside [0, {self.vocab_size}) "
                             f"for tokenizer {self._source}")


def _processor_from_proto(serialized: bytes, source: str) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(serialized)
    except (RuntimeError, OSError, TypeError) as e:
        raise ValueError(f"{source}: not a valid SentencePiece model ({e})") from e
    return sp


def _require_id(i: int, name: str, source: str) -> int:
    if i < 0:
        raise ValueError(f"tokenizer {source} has no {name} piece ({name}_id={i}); "
                         f"train it with {name}_id set (Tokenizer.train does)")
    return int(i)


def _as_text(text: Any, index: int | None) -> str:
    """Accept str, or UTF-8 bytes (as TFDS text features arrive); reject anything else."""
    if isinstance(text, str):
        return text
    if isinstance(text, bytes | np.bytes_):
        return bytes(text).decode("utf-8")
    where = "" if index is None else f" at index {index}"
    raise TypeError(f"expected str or UTF-8 bytes{where}, got {type(text).__name__}")


def token_positions_of_chars(token_ids: Sequence[int] | np.ndarray,
                             char_offsets: Sequence[int], token_bytes: Sequence[bytes]
                             ) -> np.ndarray:
    """Index of the token that holds each character offset of the decoded text.

    The text is b"".join(token_bytes[i] for i in token_ids) decoded as UTF-8 (for ids from
    `Tokenizer.encode` / the sampler this equals `Tokenizer.decode(token_ids)`; see
    `Tokenizer.token_bytes`). Use it to turn `stepmath.split_solution` offsets into label
    positions: a step ending at character e gets its label at the token holding character e
    (the first token of the "\\n\\n" delimiter); an answer ending at a gets it at the token
    holding character a - 1 (the answer's last token). Control tokens (no bytes) never hold
    a character. Raises ValueError for offsets outside the text.
    """
    lengths = np.asarray([len(token_bytes[int(i)]) for i in token_ids], np.int64)
    data = b"".join(token_bytes[int(i)] for i in token_ids)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"token ids do not decode to UTF-8 text: {e}") from e
    ends = np.cumsum(lengths)
    out = []
    for c in char_offsets:
        if not 0 <= int(c) < len(text):
            raise ValueError(f"character offset {c} outside the decoded text of "
                             f"{len(text)} characters")
        byte = len(text[: int(c)].encode("utf-8"))
        out.append(int(np.searchsorted(ends, byte, side="right")))
    return np.asarray(out, np.int64)
