"""Directory outputs that appear whole or not at all: written into a temp directory, then renamed."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yield a temp directory beside `out`; on success it becomes `out` in one rename, on failure it
    is deleted. Whatever is at `out` already is replaced (callers decide first whether it may be)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():  # swap the old one aside, so `out` is never missing a complete directory
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def new_directory(out: Path, overwrite: bool = False) -> AbstractContextManager[Path]:
    """`atomic_directory(out)`, refused if `out` holds something and `overwrite` is not set."""
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty (pass overwrite=True to replace it)")
    return atomic_directory(out)
