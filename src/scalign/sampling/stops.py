"""Stop strings: an Aho-Corasick automaton over bytes, lifted to whole tokens.

A row stops after the token that completes one of the stop strings in the generated text (only
the generated text is searched, not the prompt). Stop strings are matched on the bytes the
tokens decode to (`Tokenizer.token_bytes`) by an Aho-Corasick automaton (Aho & Corasick 1975)
over bytes, lifted to whole tokens on the host: table[q, v] is the state after feeding token
v's bytes from state q, or -1 if a stop string is completed inside them (`stop_string_table`,
vectorised numpy, cached per stop-string set by the `Sampler`). The decode loop carries one
automaton state per row, so a stop string spanning several tokens or lying inside one longer
token is found at the exact token that completes its first occurrence. The decoded texts are
cut right after the first occurrence (`first_stop_end`), or right before it; a token can carry
text past the stop string, which is cut from the text but kept in the tokens. (A SentencePiece
model with add_dummy_prefix drops one leading space when decoding a completion; the automaton
still sees that space, so a stop string that starts with it can match at the very start.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def aho_corasick(patterns: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Byte-level Aho-Corasick automaton (Aho & Corasick 1975) as a complete DFA.

    Returns (delta int32 [Q, 256], accept bool [Q]): state 0 is the root (nothing matched);
    delta[q, b] is the state after reading byte b in state q (the longest suffix of the text
    read so far that is a prefix of some pattern); accept[q] is True iff some pattern is a suffix
    of that text, i.e. a pattern occurrence ends at the byte just read.
    """
    if not patterns or any(len(p) == 0 for p in patterns):
        raise ValueError("stop strings must be non-empty")
    children: list[dict[int, int]] = [{}]
    accept = [False]
    for pat in patterns:
        q = 0
        for b in pat:
            if b not in children[q]:
                children.append({})
                accept.append(False)
                children[q][b] = len(children) - 1
            q = children[q][b]
        accept[q] = True
    n = len(children)
    delta = np.zeros((n, 256), np.int32)
    fail = [0] * n
    order = []  # BFS order, so a state's failure target is complete before the state
    for b, child in children[0].items():
        delta[0, b] = child
        order.append(child)
    head = 0
    while head < len(order):
        q = order[head]
        head += 1
        accept[q] = accept[q] or accept[fail[q]]
        delta[q] = delta[fail[q]]
        for b, child in children[q].items():
            delta[q, b] = child
            fail[child] = int(delta[fail[q], b]) if q else 0
            order.append(child)
    return delta, np.asarray(accept)


def stop_string_table(token_bytes: Sequence[bytes], stop_strings: Sequence[str]) -> np.ndarray:
    """The token-level stop automaton: int32 [Q, V].

    table[q, v] = the automaton state after reading token v's bytes from state q, or -1 if a
    stop string occurrence ends inside those bytes. Computed for all (q, v) at once: tokens are
    sorted by byte length and byte position j only updates the tokens longer than j, so the
    work is Q * sum_v len(v) byte steps in numpy.
    """
    delta, accept = aho_corasick([s.encode("utf-8") for s in stop_strings])
    V, Q = len(token_bytes), delta.shape[0]
    lengths = np.fromiter((len(b) for b in token_bytes), np.int64, count=V)
    order = np.argsort(-lengths, kind="stable")
    max_len = int(lengths.max()) if V else 0
    padded = np.zeros((V, max(max_len, 1)), np.uint8)
    for row, v in enumerate(order):
        b = token_bytes[v]
        padded[row, :len(b)] = np.frombuffer(b, np.uint8)
    sorted_len = lengths[order]
    state = np.repeat(np.arange(Q, dtype=np.int32)[:, None], V, axis=1)  # [Q, V] sorted order
    hit = np.zeros((Q, V), bool)
    for j in range(max_len):
        n = int(np.searchsorted(-sorted_len, -j, side="left"))  # tokens with len > j
        live = ~hit[:, :n]
        nxt = delta[state[:, :n], padded[None, :n, j]]
        state[:, :n] = np.where(live, nxt, state[:, :n])
        hit[:, :n] |= live & accept[nxt]
    table = np.empty((Q, V), np.int32)
    table[:, order] = np.where(hit, -1, state)
    return table


def first_stop_end(text: str, stop_strings: Sequence[str]) -> tuple[int, int] | None:
    """(start, end) of the stop-string occurrence that ends first in `text` (ties: the longest),
    or None. Used to cut decoded texts; the device automaton stops at the same occurrence."""
    best: tuple[int, int] | None = None
    for s in stop_strings:
        i = text.find(s)
        if i < 0:
            continue
        cand = (i, i + len(s))
        if best is None or cand[1] < best[1] or (cand[1] == best[1] and cand[0] < best[0]):
            best = cand
    return best

