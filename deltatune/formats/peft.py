"""Adapters on disk, in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

Weights use PEFT's key names (`base_model.model.<module path>.lora_A.weight`, ...). Methods PEFT
does not have store `"deltatune_method": <name>` plus their own config keys in the same JSON, with
the same key prefix, so one reader serves both. Only safetensors is ever read: no pickle.
Each file is written to a temp path and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.deltas import add_delta, get_method, method_for_disk, named_delta_state
from deltatune.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FormatError, atomic_write, write_json

CONFIG_NAME, WEIGHTS_NAME = ADAPTER_CONFIG, ADAPTER_WEIGHTS
AdapterError = FormatError  # transitional alias, removed once every caller uses FormatError


def save_delta(model: nn.Module, path: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write the model's delta as an adapter directory that peft (and deltatune) can load."""
    if not hasattr(model, "delta_method"):
        raise ValueError("model has no delta attached (use add_delta or load with an adapter)")
    method = get_method(model.delta_method)
    path = Path(path)
    state = {k: _for_disk(v) for k, v in named_delta_state(model).items()}
    tensors = method.to_disk(state)
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config = method.disk_config(model.delta_config, model.delta_paths, base_model)
    report = method.report(model)
    if report:
        config["deltatune_report"] = report
    write_json(path / CONFIG_NAME, config)
    return path


def _for_disk(t: torch.Tensor) -> torch.Tensor:
    """Float tensors are stored in fp32 (whatever the training precision); integer ones as they are."""
    t = t.detach().to("cpu")
    return (t.float() if t.is_floating_point() else t).contiguous()


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and validate an adapter directory: (config, tensors by on-disk key)."""
    path = Path(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not path.is_dir():
        raise AdapterError(f"adapter directory not found: {path}")
    if not config_file.is_file():
        raise AdapterError(f"{config_file}: missing")
    if not weights_file.is_file():
        hint = (
            " (adapter_model.bin is pickle and is never loaded)"
            if (path / "adapter_model.bin").exists()
            else ""
        )
        raise AdapterError(f"{weights_file}: missing{hint}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{config_file}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file}: expected a JSON object")
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{weights_file}: not a valid safetensors file ({err})") from None
    return config, tensors


def load_delta(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Attach the adapter at `path` to `model` and load its weights; every mismatch names the file."""
    path = Path(path)
    disk, tensors = read_adapter(path)
    weights_file = path / WEIGHTS_NAME
    try:
        method = method_for_disk(disk)
        state = method.from_disk(tensors)
        cfg = method.config_from_disk(disk, state)
    except ValueError as err:
        raise AdapterError(f"{path / CONFIG_NAME}: {err}") from None
    try:
        add_delta(model, method, cfg)
    except (ValueError, TypeError) as err:
        raise AdapterError(f"{path}: does not fit this model: {err}") from None
    params = named_delta_state(model)
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if unexpected:
        raise AdapterError(
            f"{weights_file}: key {method.to_disk({unexpected[0]: None}).popitem()[0]} "
            f"matches no module of this model ({len(unexpected)} such keys)"
        )
    if missing:
        raise AdapterError(
            f"{weights_file}: missing key {method.to_disk({missing[0]: None}).popitem()[0]} "
            f"({len(missing)} missing)"
        )
    with torch.no_grad():
        for name, param in params.items():
            value = state[name]
            if value.shape != param.shape:
                raise AdapterError(
                    f"{weights_file}: {name} has shape {list(value.shape)}, the model expects {list(param.shape)}"
                )
            param.copy_(value.to(param.dtype))
    return model
