"""Directory outputs that appear whole or not at all: written into a temp directory, then renamed.

`check_writable` is the early half of that promise: an output that cannot be created (its parent is
a file, the directory is read-only, immutable or on a read-only mount) is refused with one message
naming the path before any work is done, instead of an OSError traceback halfway through.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path


class OutputPathError(ValueError):
    """An output path that cannot be created or written; the message names it and says why."""


def check_writable(directory: str | os.PathLike, output: str | os.PathLike | None = None) -> None:
    """Refuse now if files cannot be created in `directory` (existing, or to be made with its parents).

    The nearest existing ancestor must be a directory in which a file can really be created: a probe
    file is made and removed there, because permission bits alone miss read-only mounts, immutable
    directories and ACLs, and mean nothing to root. `output` is the path the message names (default:
    `directory`).
    """
    directory = Path(directory)
    named = Path(output) if output is not None else directory
    existing = next((p for p in (directory, *directory.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise OutputPathError(f"output {named}: {existing} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".deltatune-probe-", dir=existing)
    except OSError as err:
        reason = (err.strerror or str(err)).lower()
        raise OutputPathError(f"output {named}: cannot create files in {existing}: {reason}") from None
    os.close(fd)
    os.unlink(probe)


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yield a temp directory beside `out`; on success it becomes `out` in one rename, on failure it
    is deleted. Whatever is at `out` already is replaced (callers decide first whether it may be)."""
    out = Path(out)
    check_writable(out.parent, out)
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
    """`atomic_directory(out)`, refused if `out` holds something and `overwrite` is not set.

    Both refusals (occupied, not writable) happen here, when it is called, not when it is entered."""
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty (pass overwrite=True to replace it)")
    check_writable(out.parent, out)
    return atomic_directory(out)
