"""Read training records from .jsonl, .json, .csv and .parquet files, each tagged with where it came from.

Every record travels with a location string so that any later error (a missing key, a bad role)
can name the file and the line: "data.jsonl:17" and "data.csv:4" are 1-based line numbers (for CSV the
line where the record starts, the header being line 1); "data.json[3]" and "data.parquet[3]" are
0-based record indices, as `jq '.[3]'` or `table.slice(3)` would address them.

One reader per file suffix, in a registry. CSV and parquet cells that hold JSON text for a nested
field (a `messages` list) are decoded here, so the formats downstream see the same records whatever
the container.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Record = dict[str, Any]
NESTED_FIELDS = ("messages",)  # fields that CSV/parquet may hold as JSON text


class DataError(ValueError):
    """A data file or record is unusable; the message names the file and line (or record index)."""


def _records_jsonl(path: Path) -> Iterator[tuple[Any, str]]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                yield json.loads(line), where
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None


def _records_json(path: Path) -> Iterator[tuple[Any, str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for index, record in enumerate(data):
        yield record, f"{path}[{index}]"


def _records_csv(path: Path) -> Iterator[tuple[Any, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        start = 2  # line 1 is the header
        for row in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1  # a quoted cell may span lines: the next record starts after this one
            if None in row or None in row.values():
                raise DataError(f"{where}: row has a different number of cells than the header")
            # An empty cell means "absent" (CSV has no null), so optional fields like `input` work.
            yield {k: v for k, v in row.items() if v != ""}, where


def _records_parquet(path: Path) -> Iterator[tuple[Any, str]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read parquet ({err})") from None
    for index, row in enumerate(rows):
        yield {k: v for k, v in row.items() if v is not None}, f"{path}[{index}]"


READERS: dict[str, Callable[[Path], Iterator[tuple[Any, str]]]] = {
    ".jsonl": _records_jsonl,
    ".json": _records_json,
    ".csv": _records_csv,
    ".parquet": _records_parquet,
}


def _decode_nested(record: Record, where: str) -> Record:
    for field in NESTED_FIELDS:
        value = record.get(field)
        if isinstance(value, str):
            try:
                record[field] = json.loads(value)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: field {field!r} is text but not valid JSON ({err.msg})") from None
    return record


def read_records(path: str | Path) -> list[tuple[Record, str]]:
    """All records of a data file as (record, location); a non-object record or an empty file is an error."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(READERS)}")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    out = []
    try:
        for record, where in reader(path):
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected an object with named fields, got {type(record).__name__}")
            out.append((_decode_nested(record, where), where))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason})") from None
    if not out:
        raise DataError(f"{path}: no records (empty file)")
    return out
