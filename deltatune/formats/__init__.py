"""Every file format deltatune reads or writes, each in one module:

    peft.py     PEFT adapter directories (adapter_config.json + adapter_model.safetensors)
    hf.py       HF model directories: single file or sharded, the streaming sharded writer, side files
    dense.py    dense delta directories (ΔW per parameter)

Compressed delta containers are read and written by compress/container.py, next to the codecs
that decode them; `delta_kind` below tells the four kinds of delta directory apart.

Every reader raises `FormatError` when a file or directory is not what it claims to be; the
message names the file and, where there is one, the key. Only safetensors is ever read: no pickle.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter (formats/peft.py)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIG = "config.json"  # an HF model directory (formats/hf.py)
DENSE_CONFIG = "delta_config.json"  # a dense delta (formats/dense.py)
DENSE_WEIGHTS = "delta_model.safetensors"
COMPRESSED_CONFIG = "compression_config.json"  # a compressed delta (compress/container.py)
COMPRESSED_WEIGHTS = "delta_compressed.safetensors"
DELTA_FILES = (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DENSE_CONFIG,
    DENSE_WEIGHTS,
    COMPRESSED_CONFIG,
    COMPRESSED_WEIGHTS,
)


class FormatError(ValueError):
    """A file or directory is missing, corrupt or not what it claims; the message names the file (and key)."""


def read_json(path: Path) -> Any:
    """Parsed JSON; a missing file or a syntax error names the file (and line)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FormatError(f"{path}: missing") from None
    except json.JSONDecodeError as err:
        raise FormatError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Call write(tmp_path), then rename onto `path`: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def delta_kind(path: str | os.PathLike) -> str:
    """ "adapter", "dense" or "compressed": which kind of delta directory `path` is."""
    path = Path(path)
    for kind, marker in (
        ("adapter", ADAPTER_CONFIG),
        ("dense", DENSE_CONFIG),
        ("compressed", COMPRESSED_CONFIG),
    ):
        if (path / marker).is_file():
            return kind
    if not path.is_dir():
        raise FormatError(f"adapter directory not found: {path}")
    raise FormatError(
        f"{path / ADAPTER_CONFIG}: missing (nor is there a {DENSE_CONFIG} or {COMPRESSED_CONFIG}: "
        "not a delta deltatune can load)"
    )
