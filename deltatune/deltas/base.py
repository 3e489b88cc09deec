"""The delta contract: what a parameter-efficient method must say, and nothing more.

A *delta* is the trained change to a base model. A method module answers five questions:

    1. which modules it targets          Method.targets(model, cfg)   -> module paths
    2. what replaces a target            Method.wrap(module, cfg)      -> a DeltaLayer
    3. the forward contribution          DeltaLayer.forward
    4. the dense weight change, if any   DeltaLayer.delta_weight()     -> ΔW (merge, compress, export use it)
    5. how its state maps to disk        Method.to_disk / from_disk    (PEFT names by default)

Training, saving, merging and serving are written once against this contract, in the generic
functions at the bottom of this file. Methods that do not wrap linear layers (soft prompts, ...)
override `Method.attach` instead of `wrap`.

         base model                          with a delta attached
    ┌──────────────────┐              ┌──────────────────────────────┐
    │ q_proj: Linear   │   attach()   │ q_proj: LoraLinear            │
    │                  │  ─────────►  │   base_layer: Linear (frozen) │
    │                  │              │   lora_A, lora_B  (trainable) │
    └──────────────────┘              └──────────────────────────────┘
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

PEFT_PREFIX = "base_model.model."


class DeltaConfig(BaseModel):
    """Hyperparameters of a method; flat keys so they double as training-config keys."""

    model_config = ConfigDict(extra="forbid")


class DeltaLayer(nn.Module):
    """A module that wraps a frozen base module and adds a trainable change to it."""

    base_layer: nn.Module
    merged: bool = False
    disabled: bool = False

    def delta_weight(self) -> torch.Tensor | None:
        """Dense ΔW in the base weight's shape, or None when the change is not a weight delta."""
        return None

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        delta = self.delta_weight()
        if delta is None:
            raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights")
        self.base_layer.weight += delta.to(self.base_layer.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = False

    def delta_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters this delta owns (everything except the wrapped base module)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base_layer.")}


@dataclass(frozen=True)
class Method:
    """One registry entry. Subclass it in the method's module; override only what differs."""

    name: ClassVar[str]
    config_class: ClassVar[type[DeltaConfig]]
    peft_type: ClassVar[str | None] = None  # None: stored in deltatune's own format

    def targets(self, model: nn.Module, cfg: DeltaConfig) -> list[str]:
        return match_linear_modules(model, getattr(cfg, "target_modules", "all-linear"))

    def wrap(self, module: nn.Module, cfg: DeltaConfig, path: str) -> DeltaLayer:
        raise NotImplementedError

    def attach(self, model: nn.Module, cfg: DeltaConfig) -> list[str]:
        paths = self.targets(model, cfg)
        if not paths:
            raise ValueError(f"method {self.name!r}: target_modules matched no module of the model")
        for path in paths:
            model.set_submodule(path, self.wrap(model.get_submodule(path), cfg, path))
        return paths

    # --- disk mapping (PEFT naming by default) ---------------------------------------------------
    def to_disk(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {PEFT_PREFIX + k: v for k, v in state.items()}

    def from_disk(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}

    def disk_config(self, cfg: DeltaConfig, paths: list[str], base_model: str | None) -> dict[str, Any]:
        """The adapter_config.json written next to the weights."""
        return {"deltatune_method": self.name, "base_model_name_or_path": base_model, **cfg.model_dump()}

    def config_from_disk(self, disk: dict[str, Any], tensors: dict[str, torch.Tensor]) -> DeltaConfig:
        fields = self.config_class.model_fields
        return self.config_class(**{k: v for k, v in disk.items() if k in fields})


# --- target matching ------------------------------------------------------------------------------


def _output_layer_names(model: nn.Module) -> set[str]:
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if get_out else None
    return {n for n, m in model.named_modules() if out is not None and m is out}


def match_linear_modules(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """PEFT's matching rules: 'all-linear' (minus the output layer), a list of name suffixes, or a regex."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if target_modules == "all-linear":
        skip = _output_layer_names(model)
        return [n for n in linears if n not in skip]
    if isinstance(target_modules, str):
        return [n for n in linears if re.fullmatch(target_modules, n)]
    return [n for n in linears if any(n == t or n.endswith("." + t) for t in target_modules)]


# --- generic operations over any attached delta -----------------------------------------------------


def delta_layers(model: nn.Module) -> dict[str, DeltaLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DeltaLayer)}


def named_delta_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable delta parameters by their path in the model (the keys saved to disk, minus prefix)."""
    extra = getattr(model, "delta_extra_parameters", None)
    params = dict(extra()) if extra else {}
    for path, layer in delta_layers(model).items():
        params.update({f"{path}.{n}": p for n, p in layer.delta_parameters().items()})
    return params


def freeze_base(model: nn.Module) -> None:
    """Only delta parameters train; everything else is frozen."""
    trainable = {id(p) for p in named_delta_parameters(model).values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def merge_into_base(model: nn.Module) -> nn.Module:
    """Fold every delta into the base weights and put the plain base modules back."""
    for path, layer in delta_layers(model).items():
        layer.merge()
        model.set_submodule(path, layer.base_layer)
    for attr in ("delta_method", "delta_config"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def set_merged(model: nn.Module, merged: bool) -> None:
    """Merge or unmerge in place, keeping the delta layers (for equivalence checks and fast eval)."""
    for layer in delta_layers(model).values():
        layer.merge() if merged else layer.unmerge()
