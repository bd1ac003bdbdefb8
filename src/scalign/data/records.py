"""Shared record reading: JSONL / JSON-file iteration, typed field access, error/skip policy.

Every reader in `scalign.data` that turns files into typed records uses this module, so they
all behave the same way on bad input:

* A bad record (broken JSON, undecodable bytes, a missing key, a value of the wrong type, an
  unparseable value) becomes a `DataError` whose message names the file, the 1-based line
  number (JSONL) or the file path alone (one-JSON-object-per-file layouts), and the dotted
  key, e.g. ``/data/x.jsonl:17: key 'label.steps[2].rating': expected int or null, got str``.
* ``on_error="raise"`` (the default) raises that error at the first bad record.
  ``on_error="skip"`` skips the record and counts it in `ReadStats` under the error's
  ``reason`` (``"bad_json"``, ``"missing_key"``, ``"wrong_type"``, ``"bad_value"``, ...).
* A reader may also drop a well-formed record by a documented rule (e.g. a PRM800K solution
  with no labelled step) by raising `Skip(reason)`; such records are counted under that
  reason whatever ``on_error`` says. Nothing is dropped without being counted:
  ``stats.read + stats.skipped`` is the number of records in the input (blank JSONL lines
  are not records and are ignored).

Readers return a `ReadResult` (a named tuple ``(items, stats)``) so callers can either
unpack it or use the attributes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, Literal, NamedTuple, TypeVar

from etils import epath

T = TypeVar("T")
OnError = Literal["raise", "skip"]
PathLike = str | epath.PathLike

ON_ERROR_VALUES: tuple[str, ...] = ("raise", "skip")


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a record came from: a file and, for JSONL, the 1-based line number."""

    path: str
    line: int | None = None

    @property
    def name(self) -> str:
        """The file's base name."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return f"{self.path}:{self.line}" if self.line is not None else self.path


class DataError(ValueError):
    """A bad input record.

    The message reads ``"{path}:{line}: key '{key}': {detail}"`` (``"{path}: ..."`` when
    there is no line, no ``key`` part when the record as a whole is bad).

    Attributes:
      where: the record's `Location` (``where.path``, ``where.line``).
      key: dotted key path of the offending field, e.g. ``"label.steps[2].rating"``.
      reason: short machine-readable category, used as the skip counter key.
      detail: the human explanation without the location prefix.
    """

    def __init__(self, where: Location, detail: str, *, key: str | None = None,
                 reason: str) -> None:
        self.where = where
        self.key = key
        self.reason = reason
        self.detail = detail
        key_part = f"key {key!r}: " if key else ""
        super().__init__(f"{where}: {key_part}{detail}")


class Skip(Exception):
    """Raised by a record converter to drop a well-formed record by a documented rule."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass
class ReadStats:
    """Counts of one read.

    Attributes:
      read: records turned into items.
      skipped: records that produced no item (bad records under ``on_error="skip"``, and
        records dropped by a reader's documented rules).
      reasons: ``skipped`` broken down by reason.
    """

    read: int = 0
    skipped: int = 0
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)

    def count_skip(self, reason: str) -> None:
        """Records one skipped record under ``reason``."""
        self.skipped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def merge(self, other: ReadStats) -> ReadStats:
        """Returns the sum of two stats (e.g. over several files)."""
        reasons = dict(self.reasons)
        for reason, n in other.reasons.items():
            reasons[reason] = reasons.get(reason, 0) + n
        return ReadStats(self.read + other.read, self.skipped + other.skipped, reasons)


class ReadResult(NamedTuple, Generic[T]):
    """What a reader returns: the items and the counts. Unpacks as ``items, stats``."""

    items: list[T]
    stats: ReadStats


def check_on_error(on_error: str) -> None:
    """Raises ValueError unless ``on_error`` is ``"raise"`` or ``"skip"``."""
    if on_error not in ON_ERROR_VALUES:
        raise ValueError(f"on_error must be one of {ON_ERROR_VALUES}, got {on_error!r}")


def location(path: PathLike, line: int | None = None) -> Location:
    """The `Location` of a JSONL line (1-based) or of a whole file (``line=None``)."""
    return Location(str(path), line)


def _type_names(types: tuple[type, ...], allow_none: bool) -> str:
    names = [{dict: "object", list: "list", str: "str", int: "int", float: "float",
              bool: "bool"}.get(t, t.__name__) for t in types]
    if allow_none:
        names.append("null")
    return " or ".join(names)


def _json_type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "str", int: "int", float: "float",
            bool: "bool"}.get(type(value), type(value).__name__)


def _is_instance(value: Any, types: tuple[type, ...]) -> bool:
    # JSON booleans are Python bools, which are ints: only accept them where bool is asked for.
    if isinstance(value, bool) and bool not in types:
        return False
    if isinstance(value, int) and not isinstance(value, bool) and float in types:
        return True
    return isinstance(value, types)


@dataclasses.dataclass(frozen=True)
class Fields:
    """Typed access to one JSON object; every failure is a `DataError` naming file/line/key.

    ``prefix`` is the dotted key path of this object inside the record ("" at top level).
    """

    obj: Mapping[str, Any]
    where: Location
    prefix: str = ""

    @classmethod
    def of(cls, value: Any, where: Location, key: str = "") -> Fields:
        """Wraps ``value``, which must be a JSON object (``key`` names it in errors)."""
        if not isinstance(value, Mapping):
            raise DataError(where, f"expected object, got {_json_type_name(value)}",
                            key=key or None, reason="wrong_type")
        return cls(value, where, key)

    def key_path(self, key: str) -> str:
        """Dotted path of ``key`` inside the record."""
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str | None, detail: str, reason: str = "bad_value") -> DataError:
        """A `DataError` about ``key`` of this object."""
        return DataError(self.where, detail, key=self.key_path(key) if key else self.prefix or None,
                         reason=reason)

    def _check(self, key: str, value: Any, types: tuple[type, ...], allow_none: bool) -> Any:
        if value is None and allow_none:
            return None
        if not _is_instance(value, types):
            raise self.error(key, f"expected {_type_names(types, allow_none)}, "
                                  f"got {_json_type_name(value)}", reason="wrong_type")
        return value

    def req(self, key: str, *types: type, allow_none: bool = False) -> Any:
        """The value of a required key, checked against ``types``."""
        if key not in self.obj:
            raise self.error(key, "missing", reason="missing_key")
        return self._check(key, self.obj[key], types, allow_none)

    def opt(self, key: str, *types: type, default: Any = None) -> Any:
        """The value of an optional key (``default`` when absent or null)."""
        value = self.obj.get(key)
        if value is None:
            return default
        return self._check(key, value, types, allow_none=False)

    def sub(self, key: str) -> Fields:
        """A required nested object."""
        return Fields(self.req(key, dict), self.where, self.key_path(key))

    def objects(self, key: str) -> list[Fields]:
        """A required list of objects, each wrapped as `Fields` (``key[i]`` in errors)."""
        items = self.req(key, list)
        return [Fields.of(item, self.where, f"{self.key_path(key)}[{i}]")
                for i, item in enumerate(items)]


def iter_jsonl(path: PathLike) -> Iterator[tuple[Location, Any | DataError]]:
    """Yields ``(where, value)`` per non-blank line of a JSONL file.

    ``value`` is the decoded JSON value, or a `DataError` (reason ``"bad_encoding"`` or
    ``"bad_json"``) for a line that does not decode, so the caller applies its policy.
    The file is read as bytes and decoded line by line, so one bad line cannot hide the rest.
    """
    path = epath.Path(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = location(path, lineno)
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, DataError(where, f"not UTF-8 ({e.reason} at byte {e.start})",
                                       reason="bad_encoding")
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                yield where, DataError(where, f"invalid JSON ({e.msg} at column {e.colno})",
                                       reason="bad_json")


def load_json_file(path: PathLike) -> Any | DataError:
    """The JSON value of a whole file, or a `DataError` naming the file if it doesn't decode."""
    path = epath.Path(path)
    where = location(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        return DataError(where, f"not UTF-8 ({e.reason} at byte {e.start})", reason="bad_encoding")
    except json.JSONDecodeError as e:
        return DataError(where, f"invalid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                         reason="bad_json")


def convert_records(
    records: Iterable[tuple[Location, Any | DataError]],
    convert: Callable[[Fields], T],
    *,
    on_error: OnError = "raise",
) -> ReadResult[T]:
    """Applies ``convert`` to each record under the error/skip policy.

    Args:
      records: ``(where, value)`` pairs as yielded by `iter_jsonl` (a `DataError` value is a
        record that failed to decode).
      convert: maps a record's `Fields` to an item; raises `DataError` for bad input or
        `Skip` to drop the record by rule.
      on_error: ``"raise"``: re-raise the first `DataError`; ``"skip"``: count and go on.
    """
    check_on_error(on_error)
    stats = ReadStats()
    items: list[T] = []
    for where, value in records:
        try:
            if isinstance(value, DataError):
                raise value
            items.append(convert(Fields.of(value, where)))
        except DataError as err:
            if on_error == "raise":
                raise
            stats.count_skip(err.reason)
        except Skip as skip:
            stats.count_skip(skip.reason)
        else:
            stats.read += 1
    return ReadResult(items, stats)


def read_jsonl(
    path: PathLike, convert: Callable[[Fields], T], *, on_error: OnError = "raise"
) -> ReadResult[T]:
    """Reads a JSONL file (local or ``gs://``) into items with `convert_records`."""
    return convert_records(iter_jsonl(path), convert, on_error=on_error)


def merge_results(results: Iterable[ReadResult[T]]) -> ReadResult[T]:
    """Concatenates items and sums stats of several reads (in order)."""
    items: list[T] = []
    stats = ReadStats()
    for result in results:
        items.extend(result.items)
        stats = stats.merge(result.stats)
    return ReadResult(items, stats)
