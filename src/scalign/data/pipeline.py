"""grain pipelines: example records -> fixed-shape, padded numpy batches.

Flow (per process)::

    source (list | tfds.data_source | any __len__/__getitem__)
      -> (index, record)                 index = position in the *global* source
      -> shard: rows shard_index::shard_count
      -> shuffle(seed)        (training)  grain MapDataset.shuffle: a new order per epoch
      -> repeat(num_epochs)   (training)  None = forever
      -> featurize            record -> dict of 1-D numpy arrays (threads, in order)
      -> too-long policy, batch, pad      `PaddedBatchIterDataset` (consumer thread)

Batch conventions (the train step and the losses rely on these keys):

- SFT (`SftFeaturizer`): `tokens` int32[B, T] = [bos] + prompt + response + [eos], right-padded
  with `pad_id`; `loss_mask` float32[B, T] = 1.0 exactly on the response ids and the eos (the
  *targets*), 0.0 on bos, prompt and padding. Targets are aligned with `tokens`: the loss of
  position t uses logits[:, t-1] against tokens[:, t] weighted by loss_mask[:, t], i.e.
  ``loss = sum(mask[:, 1:] * nll(logits[:, :-1], tokens[:, 1:])) / sum(mask[:, 1:])``.
- Eval batches (`make_eval_batch_iterator`) add `weight` float32[B]: 1.0 for real rows, 0.0
  for the padding rows that fill the last batch(es), so every example is seen exactly once
  and every batch has the same shape.
- Other record kinds (reward-model records with `tokens`/`labels`/`label_mask`, preference
  pairs with two token sequences, ...) plug in through a `Featurizer`: a callable
  record -> {key: 1-D array} plus a `fields` mapping {key: `Field(dtype, pad_value)`}; the
  batching and padding code below is shared.

Shapes: every batch is padded along the length axis to `seq_len`, or, with `buckets`, to the
smallest bucket that fits the longest example of that batch. Buckets trade padding FLOPs for
one compilation of the train step per bucket; and in multi-process runs each process picks
its bucket from its own rows, so the training loop must agree on one length across processes
(e.g. all-gather the local T, take the max and call `repad_batch`) before assembling a
global array. A single `seq_len` has no such caveat.

Too-long examples (longer than `seq_len` / the largest bucket) follow `on_too_long`:
"error" raises naming the record's index in the source; "drop" skips it; "truncate" keeps the
first `max_len` entries of every sequence field. Drops and truncations are counted in the
iterator (`BatchIterator.too_long_counts`) and in its checkpointed state.

Sharding: process p of n reads rows p, p+n, p+2n, ... of the source. For training the source
is first extended by wrapping around to a multiple of n (at most n-1 rows repeated, counted in
`ShardInfo.num_wrapped`), so all processes see the same number of examples per epoch and
produce the same number of batches; eval shards are not wrapped (no example counted twice)
and are instead padded with weight-0 batches to a common batch count. (With
`on_too_long="drop"` and a finite `num_epochs`, processes may still differ by a batch at the
very end; multi-host loops should run a fixed number of steps.)

Determinism: the same source, featurizer, seed and shard give the same batches; the iterator
state (`get_state()` / `set_state()`, JSON-serializable) resumes bitwise-identically.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import grain
import numpy as np

from scalign.data.tokenizer import Tokenizer, token_positions_of_chars

OnTooLong = Literal["error", "drop", "truncate"]
WEIGHT_KEY = "weight"
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=128)


# --------------------------------------------------------------------------- featurizers


@dataclasses.dataclass(frozen=True)
class Field:
    """How one feature key is batched.

    Attributes:
      dtype: numpy dtype of the batched array.
      pad_value: fill value for padding positions (and for padding rows).
      sequence: True for a 1-D per-example array padded along the length axis to the batch
        length T (batched shape [B, T]); False for a fixed-shape per-example array that is
        only stacked (batched shape [B, *shape]).
      shape: per-example shape of a non-sequence field (used to build padding rows).
    """

    dtype: Any
    pad_value: float | int = 0
    sequence: bool = True
    shape: tuple[int, ...] = ()


class Featurizer(Protocol):
    """record -> dict of numpy arrays, plus how each key is padded and batched."""

    @property
    def fields(self) -> Mapping[str, Field]: ...

    def __call__(self, record: Any) -> dict[str, np.ndarray]: ...


@dataclasses.dataclass(frozen=True)
class SftFeaturizer:
    """Supervised fine-tuning records {prompt, response} -> tokens and loss mask.

    tokens    = [bos] + enc(prompt) + enc(response) + [eos]
    loss_mask = [0]   + [0]*|prompt| + [1]*|response| + [1]

    The response is encoded as the continuation of the prompt (`Tokenizer.encode_continuation`:
    exactly the ids a sampler emits after that prompt, also for tokenizers with a dummy
    prefix), so the mask boundary is exact; the text fields may be str or UTF-8 bytes (TFDS
    text features).

    A record may also carry `exclude_key` ("exclude_spans"): [start, end) character spans of
    the response whose tokens get loss_mask 0 (every token that holds one of their
    characters), e.g. a demonstration's result that merely repeats the question's goal
    (`StepMathDomain.train_records(..., exclude_goal=True)`).
    """

    tokenizer: Tokenizer
    prompt_key: str = "prompt"
    response_key: str = "response"
    exclude_key: str = "exclude_spans"

    @property
    def fields(self) -> Mapping[str, Field]:
        return {"tokens": Field(np.int32, self.tokenizer.pad_id),
                "loss_mask": Field(np.float32, 0.0)}

    def __call__(self, record: Any) -> dict[str, np.ndarray]:
        prompt, response = self.tokenizer.encode_continuation(
            _get(record, self.prompt_key), _get(record, self.response_key), add_bos=True)
        tokens = [*prompt, *response, self.tokenizer.eos_id]
        mask = np.zeros(len(tokens), np.float32)
        mask[len(prompt):] = 1.0
        spans = record.get(self.exclude_key) if hasattr(record, "get") else None
        if spans is not None and len(spans):
            chars = [c for a, b in np.asarray(spans, np.int64).reshape(-1, 2)
                     for c in range(int(a), int(b))]
            owners = token_positions_of_chars(response, chars, self._token_bytes)
            mask[len(prompt) + owners] = 0.0
        return {"tokens": np.asarray(tokens, np.int32), "loss_mask": mask}

    @functools.cached_property
    def _token_bytes(self) -> list[bytes]:
        return self.tokenizer.token_bytes()


def _get(record: Any, key: str) -> Any:
    try:
        return record[key]
    except (KeyError, IndexError, TypeError) as e:
        keys = list(record.keys()) if hasattr(record, "keys") else type(record).__name__
        raise KeyError(f"record has no key {key!r} (has {keys})") from e


# --------------------------------------------------------------------------- padding


def example_length(example: Mapping[str, np.ndarray], fields: Mapping[str, Field]) -> int:
    """Length of an example: the longest of its sequence fields."""
    return max((len(example[k]) for k, f in fields.items() if f.sequence), default=0)


def pick_length(longest: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= `longest` (buckets sorted ascending); ValueError if none."""
    for b in buckets:
        if longest <= b:
            return b
    raise ValueError(f"length {longest} exceeds the largest bucket {buckets[-1]}")


def pad_batch(examples: Sequence[Mapping[str, np.ndarray]], fields: Mapping[str, Field],
              length: int, batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Stack examples into a batch, padding sequence fields to `length`.

    Rows beyond len(examples) (up to `batch_size`) are filled with each field's pad value.
    Also usable on an already-batched dict's rows to re-pad to a longer common length.
    """
    n = len(examples) if batch_size is None else batch_size
    if len(examples) > n:
        raise ValueError(f"{len(examples)} examples do not fit batch_size={n}")
    out = {}
    for key, f in fields.items():
        shape = (n, length) if f.sequence else (n, *f.shape)
        arr = np.full(shape, f.pad_value, dtype=f.dtype)
        for i, ex in enumerate(examples):
            v = ex[key]
            if f.sequence:
                if len(v) > length:
                    raise ValueError(f"field {key!r} of row {i} has length {len(v)} > {length}")
                arr[i, : len(v)] = v
            else:
                arr[i] = v
        out[key] = arr
    return out


def repad_batch(batch: Mapping[str, np.ndarray], fields: Mapping[str, Field],
                length: int) -> dict[str, np.ndarray]:
    """Pad every sequence field of a batch [B, T] to [B, length] (length >= T)."""
    out = {}
    for key, arr in batch.items():
        f = fields.get(key)
        if f is None or not f.sequence or arr.shape[1] == length:
            out[key] = arr
            continue
        if arr.shape[1] > length:
            raise ValueError(f"field {key!r} has length {arr.shape[1]} > {length}")
        widths = [(0, 0), (0, length - arr.shape[1])] + [(0, 0)] * (arr.ndim - 2)
        out[key] = np.pad(arr, widths, constant_values=f.pad_value)
    return out


def _check_example(example: Any, fields: Mapping[str, Field], index: int) -> None:
    if not isinstance(example, Mapping) or set(example) != set(fields):
        got = sorted(example) if isinstance(example, Mapping) else type(example).__name__
        raise ValueError(f"record {index}: featurizer returned keys {got}, "
                         f"its fields declare {sorted(fields)}")
    for key, f in fields.items():
        v = np.asarray(example[key])
        if f.sequence and v.ndim != 1:
            raise ValueError(f"record {index}: sequence field {key!r} must be 1-D, "
                             f"got shape {v.shape}")
        if not f.sequence and v.shape != tuple(f.shape):
            raise ValueError(f"record {index}: field {key!r} has shape {v.shape}, "
                             f"declared {f.shape}")


# --------------------------------------------------------------------------- batching stage


class BatchIterator(grain.DatasetIterator):
    """Applies the too-long policy, batches and pads; checkpointable with its parent.

    State: {"parent": parent state, "batches": emitted, "dropped": n, "truncated": n}.
    """

    def __init__(self, parent: grain.DatasetIterator, *, fields: Mapping[str, Field],
                 batch_size: int, buckets: tuple[int, ...], drop_remainder: bool,
                 on_too_long: OnTooLong, add_weight: bool, min_num_batches: int):
        super().__init__(parent)
        self._fields = dict(fields)
        self._batch_size = batch_size
        self._buckets = buckets
        self._drop_remainder = drop_remainder
        self._on_too_long = on_too_long
        self._add_weight = add_weight
        self._min_num_batches = min_num_batches
        self._batches = 0
        self._dropped = 0
        self._truncated = 0

    @property
    def too_long_counts(self) -> dict[str, int]:
        """Examples dropped / truncated so far by the too-long policy (this process)."""
        return {"dropped": self._dropped, "truncated": self._truncated}

    @property
    def num_batches(self) -> int:
        """Batches emitted so far."""
        return self._batches

    def _admit(self, index: int, example: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        length = example_length(example, self._fields)
        max_len = self._buckets[-1]
        if length <= max_len:
            return example
        if self._on_too_long == "error":
            raise ValueError(
                f"record {index}: length {length} exceeds the maximum sequence length "
                f"{max_len}; raise seq_len/buckets or set on_too_long='drop'|'truncate'")
        if self._on_too_long == "drop":
            self._dropped += 1
            return None
        self._truncated += 1
        return {k: (v[:max_len] if self._fields[k].sequence else v) for k, v in example.items()}

    def __next__(self) -> dict[str, np.ndarray]:
        rows: list[dict[str, np.ndarray]] = []
        while len(rows) < self._batch_size:
            try:
                index, example = next(self._parent)
            except StopIteration:
                break
            admitted = self._admit(index, example)
            if admitted is not None:
                rows.append(admitted)
        if len(rows) < self._batch_size:  # the source is exhausted
            if self._drop_remainder:
                raise StopIteration
            # Eval: pad a partial batch; emit all-padding batches until min_num_batches.
            if not rows and self._batches >= self._min_num_batches:
                raise StopIteration
        longest = max((example_length(r, self._fields) for r in rows), default=0)
        batch = pad_batch(rows, self._fields, pick_length(longest, self._buckets),
                          self._batch_size)
        if self._add_weight:
            weight = np.zeros((self._batch_size,), np.float32)
            weight[: len(rows)] = 1.0
            batch[WEIGHT_KEY] = weight
        self._batches += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "batches": self._batches,
                "dropped": self._dropped, "truncated": self._truncated}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._batches = int(state["batches"])
        self._dropped = int(state["dropped"])
        self._truncated = int(state["truncated"])

    def __str__(self) -> str:
        return (f"BatchIterator(batch_size={self._batch_size}, buckets={self._buckets}, "
                f"on_too_long={self._on_too_long})")


class PaddedBatchIterDataset(grain.IterDataset):
    """IterDataset of (index, example) pairs -> padded batches (see `BatchIterator`)."""

    def __init__(self, parent: grain.IterDataset, **batch_kwargs: Any):
        super().__init__(parent)
        self._batch_kwargs = batch_kwargs

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self._parent.__iter__(), **self._batch_kwargs)

    def __str__(self) -> str:
        return f"PaddedBatchIterDataset({self._batch_kwargs.get('buckets')})"


# --------------------------------------------------------------------------- sources, shards


class _IndexedSource:
    """Random access over `length` rows: row i -> (i mod N, source[i mod N])."""

    def __init__(self, source: Any, length: int):
        self._source = source
        self._n = len(source)
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i: int) -> tuple[int, Any]:
        j = int(i) % self._n
        return j, self._source[j]


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """What this process reads: `num_examples` rows per epoch, of which `num_wrapped` are
    repeats added so every shard has the same size (training only)."""

    shard_index: int
    shard_count: int
    num_examples: int
    num_wrapped: int
    local_batch_size: int


def resolve_shard(batch_size: int, num_source: int, shard_index: int | None,
                  shard_count: int | None, *, wrap: bool) -> ShardInfo:
    """Validate the global batch size and shard arguments (default: this JAX process)."""
    if shard_index is None or shard_count is None:
        if (shard_index is None) != (shard_count is None):
            raise ValueError("pass both shard_index and shard_count, or neither")
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    if batch_size <= 0 or batch_size % shard_count:
        raise ValueError(f"global batch_size={batch_size} must be a positive multiple of the "
                         f"process (shard) count {shard_count}")
    if num_source <= 0:
        raise ValueError("the data source is empty")
    if wrap:
        per_shard = math.ceil(num_source / shard_count)
        wrapped = per_shard * shard_count - num_source
    else:
        per_shard = len(range(shard_index, num_source, shard_count))
        wrapped = 0
    return ShardInfo(shard_index, shard_count, per_shard, wrapped, batch_size // shard_count)


def resolve_buckets(seq_len: int | None, buckets: Sequence[int] | None) -> tuple[int, ...]:
    """`seq_len` -> (seq_len,); `buckets` -> sorted unique tuple. Exactly one is required."""
    if (seq_len is None) == (buckets is None):
        raise ValueError("pass exactly one of seq_len or buckets")
    out = (int(seq_len),) if seq_len is not None else tuple(sorted({int(b) for b in buckets}))
    if not out or out[0] <= 0:
        raise ValueError(f"sequence lengths must be positive, got {out}")
    return out


class _Featurize:
    """(index, record) -> (index, example), naming the record on failure (picklable)."""

    def __init__(self, featurizer: Featurizer):
        self._featurizer = featurizer
        self._fields = dict(featurizer.fields)

    def __call__(self, item: tuple[int, Any]) -> tuple[int, dict[str, np.ndarray]]:
        index, record = item
        try:
            example = self._featurizer(record)
        except Exception as e:  # name the record, keep the original as the cause
            raise ValueError(f"record {index}: featurizer failed: {e}") from e
        _check_example(example, self._fields, index)
        return index, example


# --------------------------------------------------------------------------- public builders


def _check_on_too_long(on_too_long: str) -> None:
    if on_too_long not in ("error", "drop", "truncate"):
        raise ValueError(f"on_too_long must be 'error', 'drop' or 'truncate', "
                         f"got {on_too_long!r}")


def make_batch_dataset(
    source: Any,
    featurizer: Featurizer,
    *,
    batch_size: int,
    seq_len: int | None = None,
    buckets: Sequence[int] | None = None,
    seed: int = 0,
    num_epochs: int | None = None,
    shuffle: bool = True,
    on_too_long: OnTooLong = "error",
    shard_index: int | None = None,
    shard_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> tuple[PaddedBatchIterDataset, ShardInfo]:
    """Training pipeline over any random-access `source`; returns (dataset, shard info).

    `batch_size` is the *global* batch size; each process yields batch_size / shard_count
    rows per batch (drop_remainder=True). `iter(dataset)` is a `BatchIterator`.
    """
    _check_on_too_long(on_too_long)
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    lengths = resolve_buckets(seq_len, buckets)
    info = resolve_shard(batch_size, len(source), shard_index, shard_count, wrap=True)
    if num_epochs is not None and info.num_examples * num_epochs < info.local_batch_size:
        raise ValueError(
            f"shard {info.shard_index}/{info.shard_count} has {info.num_examples} examples x "
            f"{num_epochs} epoch(s), fewer than one local batch of {info.local_batch_size}")
    padded = info.num_examples * info.shard_count
    ds = grain.MapDataset.source(_IndexedSource(source, padded))
    ds = ds[info.shard_index:: info.shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = ds.map(_Featurize(featurizer))
    it = ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS)
    batched = PaddedBatchIterDataset(
        it, fields=featurizer.fields, batch_size=info.local_batch_size, buckets=lengths,
        drop_remainder=True, on_too_long=on_too_long, add_weight=False, min_num_batches=0)
    return batched, info


def make_batch_iterator(source: Any, featurizer: Featurizer, **kwargs: Any) -> BatchIterator:
    """`iter(make_batch_dataset(...)[0])`: a checkpointable training iterator."""
    ds, _ = make_batch_dataset(source, featurizer, **kwargs)
    return iter(ds)


def make_eval_batch_dataset(
    source: Any,
    featurizer: Featurizer,
    *,
    batch_size: int,
    seq_len: int | None = None,
    buckets: Sequence[int] | None = None,
    on_too_long: OnTooLong = "error",
    shard_index: int | None = None,
    shard_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> tuple[PaddedBatchIterDataset, ShardInfo]:
    """One ordered pass over `source`, no shuffle, nothing dropped silently.

    Every process yields the same number of batches, ceil(ceil(N / shard_count) / b) with
    b = batch_size / shard_count; rows past the end of the shard are padding with
    `weight` 0.0 (real rows have 1.0). Row order within a shard is source order.
    """
    if WEIGHT_KEY in featurizer.fields:
        raise ValueError(f"featurizer field name {WEIGHT_KEY!r} is reserved for eval batches")
    _check_on_too_long(on_too_long)
    lengths = resolve_buckets(seq_len, buckets)
    info = resolve_shard(batch_size, len(source), shard_index, shard_count, wrap=False)
    largest_shard = math.ceil(len(source) / info.shard_count)
    num_batches = math.ceil(largest_shard / info.local_batch_size)
    ds = grain.MapDataset.source(_IndexedSource(source, len(source)))
    ds = ds[info.shard_index:: info.shard_count].map(_Featurize(featurizer))
    it = ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS)
    batched = PaddedBatchIterDataset(
        it, fields=featurizer.fields, batch_size=info.local_batch_size, buckets=lengths,
        drop_remainder=False, on_too_long=on_too_long, add_weight=True,
        min_num_batches=num_batches)
    return batched, info


def make_eval_batch_iterator(source: Any, featurizer: Featurizer,
                             **kwargs: Any) -> BatchIterator:
    """`iter(make_eval_batch_dataset(...)[0])`."""
    ds, _ = make_eval_batch_dataset(source, featurizer, **kwargs)
    return iter(ds)


def make_sft_iterator(records: Any, tokenizer: Tokenizer, *, prompt_key: str = "prompt",
                      response_key: str = "response", **kwargs: Any) -> BatchIterator:
    """Training batches {tokens int32[b, T], loss_mask float32[b, T]} from SFT records.

    `records` is any random-access sequence of {prompt, response} records (a list, a
    `tfds.data_source`, ...); see the module docstring for the conventions. Keyword arguments
    are those of `make_batch_dataset` (batch_size, seq_len | buckets, seed, num_epochs, ...).
    """
    return make_batch_iterator(records, SftFeaturizer(tokenizer, prompt_key, response_key),
                               **kwargs)


def make_sft_eval_iterator(records: Any, tokenizer: Tokenizer, *, prompt_key: str = "prompt",
                           response_key: str = "response", **kwargs: Any) -> BatchIterator:
    """Eval batches {tokens, loss_mask, weight float32[b]}: one pass, last batch padded.

    Keyword arguments are those of `make_eval_batch_dataset`.
    """
    return make_eval_batch_iterator(records, SftFeaturizer(tokenizer, prompt_key, response_key),
                                    **kwargs)


def tfds_source(name: str, *, split: str, data_dir: str | None = None) -> Sequence[Any]:
    """A random-access TFDS source (array_record, no TensorFlow) for the builders above.

    `tfds.data_source(name, split=split, data_dir=data_dir, download=False)`: the dataset
    must already be prepared under `data_dir` (nothing downloads at run time). Records are
    dicts of numpy values; text features arrive as UTF-8 bytes, which the featurizers accept.
    """
    import tensorflow_datasets as tfds  # lazy: heavy import, only needed for TFDS data

    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


def make_sft_iterator_from_tfds(name: str, tokenizer: Tokenizer, *, split: str,
                                data_dir: str | None = None, **kwargs: Any) -> BatchIterator:
    """`make_sft_iterator(tfds_source(name, split=..., data_dir=...), tokenizer, **kwargs)`."""
    return make_sft_iterator(tfds_source(name, split=split, data_dir=data_dir), tokenizer,
                             **kwargs)
