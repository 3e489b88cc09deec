"""The method registry and the verbs that work on any delta.

Adding a method = one module defining a `Method` subclass + one line in `_METHODS` below.
Methods are grouped by what they change (`Method.family`, the "unified view" of parameter-efficient
tuning):

    weight deltas       W' = W + ΔW (low-rank, orthogonal, Kronecker, bias, sparse, dense)
    activation deltas   h' = h ⊙ s + b, or h + f(h)
    input deltas        virtual tokens / per-layer key-value prefixes the input attends to
    routed deltas       each token mixes several sub-deltas by router weights (deltatune/route/)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from deltatune.deltas.adapters import Houlsby, Parallel
from deltatune.deltas.base import (
    DeltaConfig,
    DeltaLayer,
    Method,
    delta_layers,
    freeze_base,
    merge_into_base,
    named_delta_parameters,
    named_delta_state,
    set_merged,
)
from deltatune.deltas.bitfit import Bitfit
from deltatune.deltas.boft import Boft
from deltatune.deltas.diff_pruning import DiffPruning
from deltatune.deltas.dora import Dora
from deltatune.deltas.full import Full, LayerSelect
from deltatune.deltas.graft import Graft
from deltatune.deltas.ia3 import Ia3
from deltatune.deltas.loha import Loha
from deltatune.deltas.lokr import Lokr
from deltatune.deltas.lora import Lora
from deltatune.deltas.oft import Oft
from deltatune.deltas.pissa import Olora, Pissa
from deltatune.deltas.prefix_tuning import PrefixTuning, PtuningV2
from deltatune.deltas.prompt_tuning import PromptTuning
from deltatune.deltas.ssf import Ssf
from deltatune.deltas.vera import Vera
from deltatune.route.arrow import Arrow
from deltatune.route.mixlora import MixLora

_METHODS: list[Method] = [
    # weight deltas
    Lora(),
    Dora(),
    Pissa(),
    Olora(),
    Vera(),
    Loha(),
    Lokr(),
    Oft(),
    Boft(),
    Bitfit(),
    Full(),
    DiffPruning(),
    Graft(),
    LayerSelect(),
    # activation deltas
    Ia3(),
    Ssf(),
    Houlsby(),
    Parallel(),
    # input deltas
    PromptTuning(),
    PrefixTuning(),
    PtuningV2(),
    # routed deltas
    Arrow(),
    MixLora(),
]
FAMILIES: dict[str, str] = {m.name: m.family for m in _METHODS}
METHODS: dict[str, Method] = {m.name: m for m in _METHODS}

__all__ = [
    "FAMILIES",
    "METHODS",
    "DeltaConfig",
    "DeltaLayer",
    "Method",
    "add_delta",
    "delta_report",
    "delta_layers",
    "disable_delta",
    "freeze_base",
    "get_method",
    "merge_into_base",
    "method_for_disk",
    "named_delta_parameters",
    "named_delta_state",
    "set_merged",
]


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}") from None


def method_for_disk(disk: dict[str, Any]) -> Method:
    """Which method reads this adapter_config.json: the one registered method that claims it."""
    if "deltatune_method" in disk:
        get_method(disk["deltatune_method"])  # an unknown name gets the list of valid ones
    claimants = [m for m in _METHODS if m.claims(disk)]
    if len(claimants) == 1:
        return claimants[0]
    if claimants:
        names = ", ".join(m.name for m in claimants)
        raise ValueError(f"adapter config is claimed by several methods ({names}); this is a registry bug")
    known = sorted({m.peft_type for m in METHODS.values() if m.peft_type})
    raise ValueError(f"peft_type {disk.get('peft_type')!r} is not supported; supported: {', '.join(known)}")


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


def delta_report(model: nn.Module) -> dict[str, Any]:
    """What the attached delta reports about itself (e.g. a sparse method's fraction and score kept)."""
    return get_method(model.delta_method).report(model) if hasattr(model, "delta_method") else {}


@contextmanager
def disable_delta(model: nn.Module) -> Iterator[nn.Module]:
    """The base model inside the block, the delta again after it (peft's `model.disable_adapter()`).

    Every delta layer, prompts included, is switched off. No method edits the base weights when it
    attaches (PiSSA/OLoRA keep their initial factors as buffers), so this is exactly the base model;
    a merged delta is part of the weights and is refused (unmerge it first: `set_merged`).
    """
    layers = list(delta_layers(model).values())
    if any(layer.merged for layer in layers):
        raise ValueError("the delta is merged into the base weights; unmerge it before disabling it")
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, disabled in zip(layers, before, strict=True):
            layer.disabled = disabled
