"""Records in, records out: the text a record is compared by, and the kept records in the input's format.

The output keeps the input's container and bytes as far as the format allows: a jsonl output holds
the kept input lines verbatim, a json output the kept list items, a csv output the kept rows under
the same header (cells as read, not as decoded), a parquet output the kept table rows. Only the
order of kept records is the input's; nothing is re-keyed or re-encoded.

All outputs of one selection are written as temp files beside their targets and renamed only when
every one of them is complete (`commit`), so an error leaves nothing behind.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from deltatune.data.tokenize import Chat, RawText

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def record_text(parsed: Chat | RawText) -> str:
    """The whole record (prompt and answer) as one text: message contents, or prompt and completion."""
    if isinstance(parsed, Chat):
        return "\n".join(m["content"] for m in parsed.messages)
    return f"{parsed.prompt}\n{parsed.completion}" if parsed.prompt else parsed.completion


def _line_number(where: str) -> int:
    return int(where.rsplit(":", 1)[1])


def write_kept(src: Path, dst: Path, kept: list[int], where: list[str]) -> None:
    """Write the records at indices `kept` (ascending) of `src` to `dst`, in `src`'s format."""
    suffix = src.suffix.lower()
    if suffix == ".jsonl":
        lines = src.read_text(encoding="utf-8").splitlines()
        text = "".join(lines[_line_number(where[i]) - 1] + "\n" for i in kept)
        dst.write_text(text, encoding="utf-8")
    elif suffix == ".json":
        data = json.loads(src.read_text(encoding="utf-8"))
        dst.write_text(json.dumps([data[i] for i in kept], indent=2, ensure_ascii=False) + "\n", "utf-8")
    elif suffix == ".csv":
        with src.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)  # one per record, as read_records yields them
            fields = reader.fieldnames or []
        with dst.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows[i] for i in kept)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(pq.read_table(src).take(kept), dst)
    else:  # read_records refused it already
        raise ValueError(f"{src}: unsupported file type {src.suffix!r}")


def commit(files: dict[Path, Callable[[Path], None]]) -> None:
    """Write every file through `write(tmp)` into a temp path beside it, then rename them all.

    Nothing is renamed until all writes succeeded; on any error the temp files are removed, so a
    failed selection leaves no output (an earlier output at the same paths stays as it was)."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            staged.append((Path(tmp), path))
            write(Path(tmp))
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
