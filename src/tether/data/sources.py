"""Reading rows from JSONL, JSON, Parquet, CSV and `datasets` folders.

`open_source(source, split=...)` checks the source up front (a missing file, a 0-byte file, an unknown
extension, a folder that is not a saved dataset, a missing split: `DataError` at once) and returns a
`RowSource`, which iterates `(row_number, row)` pairs. `row` is the parsed dict, or a `BadRow` for a line that
could not be read (`invalid_json`, `invalid_utf8`) so that the caller can count or raise it; the reader never
decides that for itself.

Row numbers are 1-based: the physical line for JSONL (blank lines are not rows but keep their number, so an
error names the line an editor shows), the row index (header excluded) for CSV, Parquet, JSON arrays and
datasets. Nothing here is validated beyond being readable: a JSONL line that is valid JSON but not an object
is passed on as it is, and `rows.parse_row` rejects it.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.data.errors import INVALID_JSON, INVALID_UTF8, BadRow, DataError

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


def open_source(source: Any, *, split: str = "train") -> RowSource:
    """Open `source`: a path (str or PathLike) to a .jsonl/.json/.parquet/.pq/.csv file or to a folder saved
    with `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or an in-memory `datasets.Dataset` /
    `DatasetDict`. `split` picks the split of a DatasetDict and is ignored otherwise.
    """
    if not isinstance(source, str | os.PathLike):
        return _open_in_memory(source, split, name=f"<{type(source).__name__}>")
    path = Path(source)
    name = str(source)
    if not path.exists():
        raise DataError(f"{name}: file not found", source=name, reason="file_not_found")
    if path.is_dir():
        return _open_saved_dataset(path, split)
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
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, BadRow(INVALID_JSON, None, f"{exc.msg} (column {exc.colno})")


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
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{name}, line {exc.lineno}: invalid_json: {exc.msg} (column {exc.colno}); a .json file must "
            "hold one JSON array of row objects, or one object per line (JSON lines)",
            source=name,
            row=exc.lineno,
            reason=INVALID_JSON,
        ) from None
    return RowSource(name, "row", lambda: enumerate(rows, start=1), lambda: len(rows))


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
            for row in batch.to_pylist():
                number += 1
                yield number, row

    return RowSource(name, "row", iterate, lambda: num_rows)


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
        for batch in data.iter(batch_size=_BATCH):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns)):
                number += 1
                yield number, dict(zip(columns, values))

    return RowSource(name, "row", iterate, lambda: len(data))
