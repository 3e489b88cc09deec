"""The method registry and the verbs that work on any delta.

Adding a method = one module defining a `Method` subclass + one line in `_METHODS` below.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from deltatune.deltas.base import (
    DeltaConfig,
    DeltaLayer,
    Method,
    delta_layers,
    freeze_base,
    merge_into_base,
    named_delta_parameters,
    set_merged,
)
from deltatune.deltas.dora import Dora
from deltatune.deltas.lora import Lora

_METHODS: list[Method] = [Lora(), Dora()]
METHODS: dict[str, Method] = {m.name: m for m in _METHODS}

__all__ = [
    "METHODS",
    "DeltaConfig",
    "DeltaLayer",
    "Method",
    "add_delta",
    "delta_layers",
    "freeze_base",
    "get_method",
    "merge_into_base",
    "method_for_disk",
    "named_delta_parameters",
    "set_merged",
]


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}") from None


def method_for_disk(disk: dict[str, Any]) -> Method:
    """Which method wrote this adapter_config.json (deltatune's own key first, then PEFT's type)."""
    if "deltatune_method" in disk:
        return get_method(disk["deltatune_method"])
    peft_type = disk.get("peft_type")
    if peft_type == "LORA":
        return METHODS["dora" if disk.get("use_dora") else "lora"]
    for method in METHODS.values():
        if method.peft_type is not None and method.peft_type == peft_type:
            return method
    known = sorted({m.peft_type for m in METHODS.values() if m.peft_type})
    raise ValueError(f"peft_type {peft_type!r} is not supported; supported: {', '.join(known)}")


def add_delta(
    model: nn.Module, method: str | Method = "lora", config: DeltaConfig | None = None, **kwargs
) -> nn.Module:
    """Attach a fresh delta to `model` in place and freeze everything else; returns the model."""
    method = get_method(method) if isinstance(method, str) else method
    if delta_layers(model) or hasattr(model, "delta_method"):
        raise ValueError("model already has a delta attached; merge or reload it first")
    cfg = config if config is not None else method.config_class(**kwargs)
    paths = method.attach(model, cfg)
    model.delta_method = method.name
    model.delta_config = cfg
    model.delta_paths = paths
    freeze_base(model)
    return model
