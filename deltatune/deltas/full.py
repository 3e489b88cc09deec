"""Full fine-tuning and layer-selective fine-tuning, as dense weight deltas (weight deltas).

    every parameter p of a targeted module is used as p + Δp, Δp a trained tensor of p's shape

`full` targets every module that owns parameters (embeddings, linear layers, norms): the reference
the parameter-efficient methods are measured against. `layer_select` targets only the modules inside
chosen transformer blocks, which covers SubTuning-style and Half Fine-Tuning-style choices (the top
or bottom half, every other block, or an explicit list of block indices).

Keeping Δp separate from the frozen base (instead of training the base in place) is what lets a full
fine-tune go through the same contract as every other delta: it is saved, merged, compressed and
served as a delta on the untouched base. A parameter shared by two modules (tied input/output
embeddings) gets one shared Δp, so the tie holds during training and Δp is merged once. The forward
calls the base module with p + Δp in the base's dtype, so it equals the merged model exactly.
Stored in deltatune's own format (docs/formats.md): one `<name>_delta` tensor per parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from deltatune.deltas.base import DeltaConfig, DeltaLayer, Method


class FullConfig(DeltaConfig):
    pass


class LayerSelectConfig(DeltaConfig):
    # block indices (negative count from the end), or a rule over all blocks
    select_layers: list[int] | Literal["top_half", "bottom_half", "even", "odd"] = "top_half"


class FullDelta(DeltaLayer):
    def __init__(self, base_layer: nn.Module, shared: dict[int, nn.Parameter]):
        super().__init__()
        self.base_layer = base_layer
        self.owned: list[str] = []  # parameters whose Δ this layer merges (not a shared tie's second user)
        for name, param in base_layer.named_parameters(recurse=False):
            if id(param) not in shared:
                shared[id(param)] = nn.Parameter(torch.zeros(param.shape, device=param.device))
                self.owned.append(name)
            self.register_parameter(f"{name}_delta", shared[id(param)])
        self.names = [name for name, _ in base_layer.named_parameters(recurse=False)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.merged or self.disabled:
            return self.base_layer(*args, **kwargs)
        params = {}
        for name in self.names:
            base = getattr(self.base_layer, name)
            params[name] = (base + getattr(self, f"{name}_delta")).to(base.dtype)
        return functional_call(self.base_layer, params, args, kwargs)

    def delta_weight(self) -> torch.Tensor | None:
        return self._parameters.get("weight_delta")

    def delta_bias(self) -> torch.Tensor | None:
        return self._parameters.get("bias_delta")

    @torch.no_grad()
    def _shift(self, sign: int) -> None:
        for name in self.owned:
            base = getattr(self.base_layer, name)
            base.copy_((base.float() + sign * getattr(self, f"{name}_delta")).to(base.dtype))

    def merge(self) -> None:
        if not self.merged:
            self._shift(1)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._shift(-1)
            self.merged = False


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the longest nn.ModuleList in the model."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError("layer_select: the model has no list of transformer blocks")
    return max(lists, key=lambda item: len(item[1]))


def selected_blocks(n: int, rule: list[int] | str) -> list[int]:
    rules = {
        "top_half": list(range(n // 2, n)),
        "bottom_half": list(range(n // 2)),
        "even": list(range(0, n, 2)),
        "odd": list(range(1, n, 2)),
    }
    if isinstance(rule, str):
        return rules[rule]
    bad = [i for i in rule if not -n <= i < n]
    if bad:
        raise ValueError(f"select_layers: block index {bad[0]} is out of range for a model with {n} blocks")
    return sorted({i % n for i in rule})


def parameter_modules(model: nn.Module, prefix: str = "") -> list[str]:
    """Every module that owns parameters directly, under `prefix`."""
    return [
        n
        for n, m in model.named_modules()
        if n.startswith(prefix) and next(m.parameters(recurse=False), None) is not None
    ]


@dataclass(frozen=True)
class Full(Method):
    name = "full"
    config_class = FullConfig
    family = "weight"
    dense_base = "it trains the base weights themselves"

    def targets(self, model: nn.Module, cfg: DeltaConfig) -> list[str]:
        return parameter_modules(model)

    def attach(self, model: nn.Module, cfg: DeltaConfig) -> list[str]:
        paths = self.targets(model, cfg)
        if not paths:
            raise ValueError(f"method {self.name!r}: no module with parameters to train")
        shared: dict[int, nn.Parameter] = {}
        for path in paths:
            model.set_submodule(path, FullDelta(model.get_submodule(path), shared))
        return paths


@dataclass(frozen=True)
class LayerSelect(Full):
    name = "layer_select"
    config_class = LayerSelectConfig

    def targets(self, model: nn.Module, cfg: LayerSelectConfig) -> list[str]:
        prefix, blocks = block_list(model)
        chosen = selected_blocks(len(blocks), cfg.select_layers)
        return [p for i in chosen for p in parameter_modules(model, f"{prefix}.{i}.")]
