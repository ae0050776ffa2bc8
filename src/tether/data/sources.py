"""Reading rows from JSONL, JSON, Parquet, CSV, `datasets` folders and Hub data sets.

A folder saved with `save_to_disk` is loaded with `datasets.load_from_disk`; any other folder (a data set
repository downloaded from the Hub, or a Hub id's snapshot in the hub cache, `tether.hub`) with
`datasets.load_dataset(folder, name=subset, split=split)`, which finds its data files and splits as it does
on the Hub. Rows of such folders are read by `datasets`: a malformed file fails as a whole (`DataError`),
where a single file given directly is read here row by row.

`open_source(source, split=...)` checks the source up front (a missing file, a 0-byte file, an unknown
extension, a folder that is not a saved dataset, a missing split: `DataError` at once) and returns a
`RowSource`, which iterates `(row_number, row)` pairs. `row` is the parsed dict, or a `BadRow` for a row that
could not be read (`invalid_json`, `invalid_utf8`, `number_too_long`, `nested_too_deep`) so that the caller
can count or raise it; the reader never decides that for itself. Python's JSON parser refuses integers of more
than 4300 digits and recurses once per nesting level: both are bad rows here, never exceptions, in JSON lines
and JSON arrays alike (an array that fails to parse as a whole is parsed again one element at a time).

Row numbers are 1-based: the physical line for JSONL (blank lines are not rows but keep their number, so an
error names the line an editor shows), the row index (header excluded) for CSV, Parquet, JSON arrays and
datasets. Nothing here is validated beyond being readable: a JSONL line that is valid JSON but not an object
is passed on as it is, and `rows.parse_row` rejects it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether import hub
from tether.data.errors import (
    INVALID_JSON,
    INVALID_UTF8,
    MAX_NESTING,
    NESTED_TOO_DEEP,
    NUMBER_TOO_LONG,
    BadRow,
    DataError,
)

RowIterator = Iterator[tuple[int, Any]]

JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv",)
_BATCH = 1024


@dataclass
class RowSource:
    """An opened source. name: the file or dataset as errors show it; unit: "line" (JSONL) or "row"."""

    name: str
    unit: str
    _iterate: Callable[[], RowIterator]
    _count: Callable[[], int | None]

    def __iter__(self) -> RowIterator:
        return self._iterate()

    def count(self) -> int | None:
        """Number of rows (lines for JSONL, blank ones included) for a progress bar; None when unknown."""
        return self._count()


def open_source(
    source: Any, *, split: str = "train", subset: str | None = None, revision: str | None = None
) -> RowSource:
    """Open `source`: a path (str or PathLike) to a .jsonl/.json/.parquet/.pq/.csv file, to a folder saved
    with `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` or to a folder of data files; a Hub data
    set id (`org/name` at `revision`, from the hub cache); or an in-memory `datasets.Dataset` / `DatasetDict`.
    `split` picks the split of a DatasetDict or data folder and is ignored otherwise; `subset` the
    configuration of a data folder that has several.
    """
    if not isinstance(source, str | os.PathLike):
        return _open_in_memory(source, split, name=f"<{type(source).__name__}>")
    name = str(source)
    if hub.is_hub_id(source):
        try:
            folder = hub.snapshot(name, "dataset", revision).folder
        except hub.HubError as exc:
            raise DataError(str(exc), source=name, reason="file_not_found") from None
        return _open_data_folder(folder, split, subset, name)
    path = Path(source)
    if not path.exists():
        raise DataError(f"{name}: file not found", source=name, reason="file_not_found")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _open_saved_dataset(path, split)
        return _open_data_folder(path, split, subset, name)
    if path.stat().st_size == 0:
        raise DataError(f"{name}: the file is empty (0 bytes)", source=name, reason="empty_file")
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        if suffix == ".json" and _first_byte(path) == b"[":
            return _open_json_array(path)
        return RowSource(name, "line", lambda: _iter_json_lines(path), lambda: _count_lines(path))
    if suffix in PARQUET_SUFFIXES:
        return _open_parquet(path)
    if suffix in CSV_SUFFIXES:
        return RowSource(name, "row", lambda: _iter_csv(path), lambda: None)
    supported = ", ".join((*JSON_SUFFIXES, *PARQUET_SUFFIXES, *CSV_SUFFIXES))
    raise DataError(
        f"{name}: unknown file type {suffix or '(no extension)'!r}; supported: {supported}, or a folder "
        "saved with datasets' save_to_disk",
        source=name,
        reason="unknown_format",
    )


def load_rows(source: Any, *, split: str = "train") -> RowIterator:
    """Iterate `(row_number, row)` over `source` (see `open_source`); `row` is a dict or a `BadRow`.

    File-level problems raise `DataError` here, before the first row is read.
    """
    return iter(open_source(source, split=split))


def _first_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(4096)
    head = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    return head[:1]


def _count_lines(path: Path) -> int:
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def parse_json(text: str) -> Any:
    """`json.loads(text)`, or a `BadRow` for text that is not JSON or that Python's parser cannot build."""
    try:
        value, end = _decode(text, _WHITESPACE.match(text).end())
        end = _WHITESPACE.match(text, end).end()
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
    except json.JSONDecodeError as exc:
        return BadRow(INVALID_JSON, None, f"{exc.msg} (column {exc.colno})")
    return value


def _decode(text: str, start: int) -> tuple[Any, int]:
    """(value, index after it) for the JSON value at text[start], as `json.JSONDecoder.raw_decode`; the value is
    a `BadRow` (and the index found by `_skip_value`) where the parser recursed too deep or met an integer too
    long for `int`. Invalid JSON raises `json.JSONDecodeError`."""
    try:
        return _DECODER.raw_decode(text, start)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        detail = (
            f"objects or lists nested beyond Python's recursion limit (at most {MAX_NESTING} are allowed)"
        )
        return BadRow(NESTED_TOO_DEEP, None, detail), _skip_value(text, start)
    except ValueError as exc:  # int(): "Exceeds the limit (4300 digits) for integer string conversion ..."
        return BadRow(NUMBER_TOO_LONG, None, str(exc).split(";")[0]), _skip_value(text, start)


_DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _skip_value(text: str, start: int) -> int:
    """The index after the JSON value at text[start:] (which the parser could not build), found by matching
    brackets outside strings without recursion; len(text) if it never closes."""
    if text[start] not in "[{":
        match = _NUMBER.match(text, start)
        return match.end() if match else len(text)
    depth = 0
    for token in _STRING_OR_BRACKET.finditer(text, start):
        if token.group() in "[{":
            depth += 1
        elif token.group() in "]}":
            depth -= 1
            if depth == 0:
                return token.end()
    return len(text)


def _iter_json_lines(path: Path) -> RowIterator:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, BadRow(INVALID_UTF8, None, f"byte {exc.start} of the line: {exc.reason}")
                continue
            if not text.strip():
                continue
            yield number, parse_json(text)


def _open_json_array(path: Path) -> RowSource:
    name = str(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{name}: invalid_utf8 at byte {exc.start}: {exc.reason}; re-encode the file as UTF-8",
            source=name,
            reason=INVALID_UTF8,
        ) from None
    try:
        elements = json.loads(text)  # 3-4x faster than one element at a time, which only failures need
    except (ValueError, RecursionError):  # JSONDecodeError included: the slow path says where
        elements = list(_json_array_elements(text, name))
    rows = list(enumerate(elements, start=1))
    return RowSource(name, "row", lambda: iter(rows), lambda: len(rows))


def _json_array_elements(text: str, name: str) -> Iterator[Any]:
    """The elements of the JSON array `text`, one at a time, so that an element the parser cannot build is a
    `BadRow` of its own. Malformed JSON (nothing to resynchronize on) raises `DataError` for the file."""
    index = _WHITESPACE.match(text, _WHITESPACE.match(text).end() + 1).end()  # past "[" (open_source saw it)
    try:
        if text.startswith("]", index):
            index += 1
        else:
            while True:
                value, index = _decode(text, index)
                yield value
                index = _WHITESPACE.match(text, index).end()
                if text.startswith(",", index):
                    index = _WHITESPACE.match(text, index + 1).end()
                elif text.startswith("]", index):
                    index += 1
                    break
                else:
                    raise json.JSONDecodeError("Expecting ',' delimiter", text, index)
        index = _WHITESPACE.match(text, index).end()
        if index != len(text):
            raise json.JSONDecodeError("Extra data", text, index)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{name}, line {exc.lineno}: invalid_json: {exc.msg} (column {exc.colno}); a .json file must "
            "hold one JSON array of row objects, or one object per line (JSON lines)",
            source=name,
            row=exc.lineno,
            reason=INVALID_JSON,
        ) from None


def _open_parquet(path: Path) -> RowSource:
    import pyarrow.parquet as pq

    name = str(path)
    try:
        num_rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(
            f"{name}: not a readable Parquet file ({exc})", source=name, reason="unreadable_file"
        ) from None

    def iterate() -> RowIterator:
        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH):
            for row in _arrow_rows(batch):
                number += 1
                yield number, row

    return RowSource(name, "row", iterate, lambda: num_rows)


def _arrow_rows(batch: Any) -> list[Any]:
    """The rows of a pyarrow RecordBatch or Table as dicts. Arrow does not check that string columns hold
    UTF-8 (a writer may put any bytes there); a row whose text cannot be decoded is an `invalid_utf8` BadRow
    naming its column, instead of an exception for the whole batch."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        pass
    rows: list[Any] = []
    for i in range(batch.num_rows):
        row = batch.slice(i, 1)
        try:
            rows.append(row.to_pylist()[0])
            continue
        except UnicodeDecodeError as exc:
            reason = exc.reason
        column = None
        for name in row.schema.names:
            try:
                row.column(name).to_pylist()
            except UnicodeDecodeError:
                column = name
                break
        rows.append(BadRow(INVALID_UTF8, column, f"the text is not valid UTF-8 ({reason})"))
    return rows


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _iter_csv(path: Path) -> RowIterator:
    # Invalid bytes decode to lone surrogates ("surrogateescape"), so one bad row is reported as such
    # instead of failing the whole read. Long texts need a larger field limit than csv's 128 KiB default;
    # it is process-wide, so it is restored when the reader finishes.
    old_limit = csv.field_size_limit(sys.maxsize)
    try:
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            reader = csv.DictReader(f)
            number = 0
            try:
                for row in reader:
                    number += 1
                    bad = [k for k, v in row.items() if isinstance(v, str) and _has_surrogates(v)]
                    if bad:
                        yield number, BadRow(INVALID_UTF8, str(bad[0]), "the field is not valid UTF-8")
                    else:
                        yield number, row
            except csv.Error as exc:
                raise DataError(
                    f"{path}, line {reader.line_num}: not readable as CSV ({exc})",
                    source=str(path),
                    reason="unreadable_file",
                ) from None
    finally:
        csv.field_size_limit(old_limit)


def _open_saved_dataset(path: Path, split: str) -> RowSource:
    import datasets

    name = str(path)
    try:
        loaded = datasets.load_from_disk(name)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(
            f"{name}: a folder must be one saved with datasets' save_to_disk ({exc})",
            source=name,
            reason="unreadable_file",
        ) from None
    return _open_in_memory(loaded, split, name=name)


def _open_data_folder(folder: Path, split: str, subset: str | None, name: str) -> RowSource:
    """A folder of data files, read by `datasets.load_dataset` as it reads a Hub repository."""
    import datasets

    try:
        loaded = datasets.load_dataset(str(folder), name=subset, split=split)
    except ValueError as exc:  # an unknown split or subset (datasets names the ones there are)
        raise DataError(
            f"{name}: {exc} (set data.split / data.subset)", source=name, reason="missing_split"
        ) from None
    except Exception as exc:  # no data files, or a file datasets cannot parse
        raise DataError(
            f"{name}: datasets.load_dataset could not read the folder ({type(exc).__name__}: {exc}); a folder"
            " must hold data files (.jsonl/.json/.parquet/.csv, named by split) or be saved with save_to_disk;"
            " point data.train at a single file to have its rows checked one by one",
            source=name,
            reason="unreadable_file",
        ) from None
    return _open_in_memory(loaded, split, name=f"{name}[{split}]")


def _open_in_memory(data: Any, split: str, *, name: str) -> RowSource:
    import datasets

    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(
                f"{name}: no split {split!r}; the dataset has {sorted(data)} (set data.split)",
                source=name,
                reason="missing_split",
            )
        data = data[split]
        name = f"{name}[{split}]"
    if not isinstance(data, datasets.Dataset):
        raise TypeError(
            f"source must be a path or a datasets.Dataset / DatasetDict, got {type(data).__name__}"
        )

    def iterate() -> RowIterator:
        number = 0
        for start in range(0, len(data), _BATCH):
            stop = min(start + _BATCH, len(data))
            try:
                batch = data[start:stop]
            except UnicodeDecodeError:  # a string column that is not UTF-8: find the rows, as for Parquet
                rows = _arrow_rows(data.with_format("arrow")[start:stop])
            else:
                columns = list(batch)
                rows = [dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns))]
            for row in rows:
                number += 1
                yield number, row

    return RowSource(name, "row", iterate, lambda: len(data))
