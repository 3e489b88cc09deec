"""Adapters on disk, in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

Weights use PEFT's key names (`base_model.model.<module path>.lora_A.weight`, ...). Methods PEFT
does not have store `"deltatune_method": <name>` plus their own config keys in the same JSON, with
the same key prefix, so one reader serves both. Only safetensors is ever read: no pickle.
Each file is written to a temp path and renamed, so a crash never leaves half a file.

    read_adapter(dir)  -> Adapter: validated config + tensors + the registered method that reads it
    read_lora(dir)     -> LoraAdapter: per module, the factors A [r, in], B [out, r] and the scale
                          (alpha / r, or alpha / sqrt(r) with rsLoRA; PEFT's alpha/rank patterns),
                          parsed by the Lora method's own config reader, so ΔW = scale · B @ A
    write_adapter(dir, config, tensors), save_delta(model, dir), load_delta(model, dir)

Serving, merging, compression and training all read and write adapters through these functions.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.deltas import Method, add_delta, get_method, method_for_disk, named_delta_state
from deltatune.deltas.base import PEFT_PREFIX
from deltatune.deltas.lora import Lora, module_rank_scale, unsupported_setting
from deltatune.formats import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FormatError,
    atomic_write,
    read_json,
    write_json,
)

_LORA_KEY = re.compile(rf"{re.escape(PEFT_PREFIX)}(.+)\.lora_([AB])\.weight")


@dataclass(frozen=True)
class Adapter:
    """An adapter directory as read from disk: its config and its tensors by on-disk key."""

    directory: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def config_file(self) -> Path:
        return self.directory / ADAPTER_CONFIG

    @property
    def weights_file(self) -> Path:
        return self.directory / ADAPTER_WEIGHTS

    @cached_property
    def method(self) -> Method:
        """The registered method that reads this adapter; an unknown one names the config file."""
        try:
            return method_for_disk(self.config)
        except ValueError as err:
            raise FormatError(f"{self.config_file}: {err}") from None


@dataclass(frozen=True)
class LoraFactors:
    """One module of a LoRA adapter: ΔW = scale · B @ A (transposed for fan_in_fan_out layers)."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float
    transposed: bool = False  # fan_in_fan_out (GPT-2's Conv1D): the base weight is [in, out]

    def dense(self) -> torch.Tensor:
        """ΔW in fp32, computed in fp64."""
        delta = (self.b.double() @ self.a.double()).mul_(self.scale).float()
        return delta.T if self.transposed else delta


@dataclass(frozen=True)
class LoraAdapter:
    directory: Path
    config: dict[str, Any]  # adapter_config.json as written
    modules: dict[str, LoraFactors]  # by module path, sorted


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Read and validate an adapter directory; every problem names the file."""
    path = Path(path)
    config_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not path.is_dir():
        raise FormatError(f"adapter directory not found: {path}")
    if not config_file.is_file():
        raise FormatError(f"{config_file}: missing")
    if not weights_file.is_file():
        pickle = (path / "adapter_model.bin").exists()
        hint = " (adapter_model.bin is pickle and is never loaded)" if pickle else ""
        raise FormatError(f"{weights_file}: missing{hint}")
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise FormatError(f"{config_file}: expected a JSON object")
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError, ValueError) as err:
        raise FormatError(f"{weights_file}: not a valid safetensors file ({err})") from None
    return Adapter(path, config, tensors)


def lora_modules(adapter: Adapter, allow_fan_in_fan_out: bool = False) -> LoraAdapter:
    """The plain-LoRA factors of an adapter; anything else (DoRA, biases, ...) names the adapter."""
    bad = unsupported_setting(adapter.config, ("fan_in_fan_out",) if allow_fan_in_fan_out else ())
    if bad is not None:
        raise FormatError(f"adapter {adapter.directory}: {bad} is not supported (plain LoRA factors only)")
    if adapter.method.name != Lora.name:
        raise FormatError(f"{adapter.config_file}: method {adapter.method.name!r} is not plain LoRA")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in adapter.tensors.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            raise FormatError(f"{adapter.weights_file}: key {key!r} is not a LoRA factor (lora_A / lora_B)")
        pairs.setdefault(match.group(1), {})[match.group(2)] = value
    if not pairs:
        raise FormatError(f"{adapter.weights_file}: no lora_A weights found")
    for path, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            present, absent = ("lora_A", "lora_B") if "A" in ab else ("lora_B", "lora_A")
            raise FormatError(
                f"{adapter.weights_file}: {path}.{present}.weight has no matching {absent}.weight"
            )
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise FormatError(
                f"{adapter.weights_file}: {path}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not chain"
            )
    disk = {k: v for k, v in adapter.config.items() if k != "fan_in_fan_out"}
    cfg = Lora().config_from_disk(disk, Lora().from_disk(adapter.tensors))
    transposed = bool(adapter.config.get("fan_in_fan_out", False))
    modules = {
        path: LoraFactors(ab["A"], ab["B"], module_rank_scale(cfg, path)[1], transposed)
        for path, ab in sorted(pairs.items())
    }
    return LoraAdapter(adapter.directory, adapter.config, modules)


def read_lora(path: str | os.PathLike, allow_fan_in_fan_out: bool = False) -> LoraAdapter:
    """`lora_modules(read_adapter(path))`: the one reader of PEFT LoRA factors."""
    return lora_modules(read_adapter(path), allow_fan_in_fan_out)


def write_adapter(path: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write an adapter directory (weights first, then the config that makes it one)."""
    path = Path(path)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json(path / ADAPTER_CONFIG, config)
    return path


def save_delta(model: nn.Module, path: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write the model's delta as an adapter directory that peft (and deltatune) can load."""
    if not hasattr(model, "delta_method"):
        raise ValueError("model has no delta attached (use add_delta or load with an adapter)")
    method = get_method(model.delta_method)
    state = {k: _for_disk(v) for k, v in named_delta_state(model).items()}
    config = method.disk_config(model.delta_config, model.delta_paths, base_model)
    report = method.report(model)
    if report:
        config["deltatune_report"] = report
    return write_adapter(path, config, method.to_disk(state))


def _for_disk(t: torch.Tensor) -> torch.Tensor:
    """Float tensors are stored in fp32 (whatever the training precision); integer ones as they are."""
    t = t.detach().to("cpu")
    return t.float() if t.is_floating_point() else t


def load_delta(model: nn.Module, path: str | os.PathLike | Adapter) -> nn.Module:
    """Attach the adapter at `path` (or one read already) to `model` and load its weights; every
    mismatch names the file."""
    adapter = path if isinstance(path, Adapter) else read_adapter(path)
    method = adapter.method
    try:
        state = method.from_disk(adapter.tensors)
        cfg = method.config_from_disk(adapter.config, state)
    except ValueError as err:
        raise FormatError(f"{adapter.config_file}: {err}") from None
    try:
        add_delta(model, method, cfg)
    except (ValueError, TypeError) as err:
        raise FormatError(f"{adapter.directory}: does not fit this model: {err}") from None
    params = named_delta_state(model)
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    disk_key = lambda name: method.to_disk({name: None}).popitem()[0]  # noqa: E731
    if unexpected:
        raise FormatError(
            f"{adapter.weights_file}: key {disk_key(unexpected[0])} matches no module of this model "
            f"({len(unexpected)} such keys)"
        )
    if missing:
        raise FormatError(
            f"{adapter.weights_file}: missing key {disk_key(missing[0])} ({len(missing)} missing)"
        )
    with torch.no_grad():
        for name, param in params.items():
            value = state[name]
            if value.shape != param.shape:
                raise FormatError(
                    f"{adapter.weights_file}: {name} has shape {list(value.shape)}, the model expects {list(param.shape)}"
                )
            param.copy_(value.to(param.dtype))
    return model
