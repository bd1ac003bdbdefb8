"""Rebuild a SentencePiece `ModelProto` from GGUF tokenizer metadata.

llama.cpp stores a SentencePiece vocabulary (`tokenizer.ggml.model == "llama"`, used by Llama 1/2,
Mistral, Gemma 1/2/3) as three parallel arrays: `tokenizer.ggml.tokens` (piece strings),
`tokenizer.ggml.scores` (float32) and `tokenizer.ggml.token_type` (int32), plus the special ids
and `tokenizer.ggml.add_space_prefix`. The token_type numbers are SentencePiece's own
`ModelProto.SentencePiece.Type` values (1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED,
6 BYTE), so the pieces go back into a proto as they are, with three fix-ups that make the
rebuilt model tokenize like the original tokenizer (and like transformers' GGUF tokenizer):

1. USER_DEFINED pieces were written with real spaces (e.g. the whitespace-run pieces "  ",
   "    " of Gemma); SentencePiece matches user-defined symbols after escaping " " to "▁"
   (U+2581), so the spaces are turned back into "▁".
2. CONTROL pieces other than pad / eos / bos / unk (`<start_of_turn>`, `<end_of_turn>`,
   `<mask>`, `<unusedN>`, ...) become USER_DEFINED: SentencePiece never matches a CONTROL piece
   in input text, while chat templates spell these markers as text.
3. The unk piece is typed UNKNOWN (SentencePiece requires exactly one).

The normalizer is the identity with whitespace escaping and no extra-whitespace removal; the
dummy prefix follows `add_space_prefix` (llama.cpp's default for SentencePiece vocabularies when
the key is absent: true). The trainer spec records BPE with byte fallback, digit splitting and
whitespace-only pieces, the special ids and the vocabulary size. Source of the facts:
sentencepiece's `sentencepiece_model.proto` and llama.cpp's GGUF vocabulary keys.

Known differences from the original tokenizer (measured on Gemma 3): runs of more than 31 spaces
split differently (SentencePiece takes the longest whitespace piece first), and text spelling a
CONTROL piece ("<bos>") stays text.
"""

from __future__ import annotations

from collections.abc import Sequence

SPACE_MARK = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def fix_piece_types(tokens: Sequence[str], types: Sequence[int], *, keep_control: set[int],
                    unk_id: int) -> tuple[list[str], list[int]]:
    """Apply fix-ups 1-3 of the module docstring; returns new (pieces, types) lists."""
    pieces, out_types = [], []
    for i, (tok, ty) in enumerate(zip(tokens, types, strict=True)):
        ty = int(ty)
        if ty == USER_DEFINED:
            tok = tok.replace(" ", SPACE_MARK)
        if ty == CONTROL and i not in keep_control:
            ty = USER_DEFINED
        if i == unk_id:
            ty = UNKNOWN
        elif ty == UNKNOWN:  # a second "unknown" piece would make the proto invalid
            ty = CONTROL
        pieces.append(tok)
        out_types.append(ty)
    return pieces, out_types


def build_sentencepiece(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int],
                        *, bos_id: int, eos_id: int, unk_id: int, pad_id: int | None,
                        add_space_prefix: bool, model_type: str = "bpe") -> bytes:
    """A serialized SentencePiece ModelProto from GGUF-style vocabulary arrays.

    Args:
      tokens, scores, types: the parallel `tokenizer.ggml.*` arrays.
      bos_id, eos_id, unk_id, pad_id: special ids (pad may be None); these stay CONTROL
        (unk: UNKNOWN).
      add_space_prefix: SentencePiece's add_dummy_prefix.
      model_type: "bpe" (llama.cpp's "llama" vocabularies are BPE SentencePiece models) or
        "unigram".
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    n = len(tokens)
    if not (len(scores) == len(types) == n):
        raise ValueError(f"tokenizer arrays differ in length: tokens {n}, scores {len(scores)}, "
                         f"token_type {len(types)}")
    for name, i in (("bos", bos_id), ("eos", eos_id), ("unk", unk_id), ("pad", pad_id)):
        if i is not None and not 0 <= i < n:
            raise ValueError(f"tokenizer {name}_id={i} is outside the vocabulary of {n}")
    keep = {i for i in (bos_id, eos_id, unk_id, pad_id) if i is not None}
    pieces, fixed = fix_piece_types(tokens, types, keep_control=keep, unk_id=unk_id)
    m = sp_pb2.ModelProto()
    for piece, score, ty in zip(pieces, scores, fixed, strict=True):
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, float(score), ty
    ts = m.trainer_spec
    ts.model_type = {"bpe": sp_pb2.TrainerSpec.BPE,
                     "unigram": sp_pb2.TrainerSpec.UNIGRAM}[model_type]
    ts.vocab_size = n
    ts.byte_fallback = any(t == BYTE for t in fixed)
    ts.split_digits = True
    ts.allow_whitespace_only_pieces = True
    ts.unk_id, ts.bos_id, ts.eos_id = unk_id, bos_id, eos_id
    ts.pad_id = -1 if pad_id is None else pad_id
    ts.unk_piece, ts.bos_piece, ts.eos_piece = pieces[unk_id], pieces[bos_id], pieces[eos_id]
    if pad_id is not None:
        ts.pad_piece = pieces[pad_id]
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(add_space_prefix)
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    ns.precompiled_charsmap = b""
    return m.SerializeToString()
