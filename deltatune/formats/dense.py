"""Dense delta directories: ΔW per parameter, for deltas that are not (or no longer) low-rank.

    delta_model.safetensors   "<module>.weight" -> ΔW, in the source's dtype
    delta_config.json         {"format": "deltatune.dense_delta", "version": 1,
                               "base_model_name_or_path": ..., "compressed_with": method}

`deltatune decompress` writes one for a LoRA compressed in its dense layout; `deltatune.load`,
`eval`, `generate` and `export --merge` add it to the base weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltatune.formats import DENSE_CONFIG, DENSE_WEIGHTS, FormatError, read_json, write_json

DENSE_FORMAT = "deltatune.dense_delta"


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a missing or corrupt file is named."""
    if not Path(path).is_file():
        raise FormatError(f"{path}: missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise FormatError(f"{path}: not a valid safetensors file ({err})") from None


def write_dense_delta(
    directory: str | os.PathLike, deltas: dict[str, torch.Tensor], config: dict[str, Any]
) -> None:
    directory = Path(directory)
    tensors = {k: v.contiguous() for k, v in deltas.items()}
    save_file(tensors, directory / DENSE_WEIGHTS, metadata={"format": "pt"})
    write_json(directory / DENSE_CONFIG, {"format": DENSE_FORMAT, "version": 1, **config})


def read_dense_delta(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, ΔW by parameter name) of a dense delta directory."""
    path = Path(path)
    config = read_json(path / DENSE_CONFIG)
    if not isinstance(config, dict) or config.get("format") != DENSE_FORMAT:
        raise FormatError(f"{path / DENSE_CONFIG}: not a dense delta (format must be {DENSE_FORMAT!r})")
    return config, load_safetensors(path / DENSE_WEIGHTS)
