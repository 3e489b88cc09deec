"""Bottleneck adapters, in series (Houlsby) or in parallel (He et al.) (activation deltas).

    houlsby:            y = f(x);   y + up(act(down(y)))            after each targeted module
    parallel_adapter:   y = f(x) + s · up(act(down(x)))             beside each targeted module

A small two-layer MLP (hidden width `adapter_size`) learns a correction of a sub-layer's output.
Houlsby et al. insert one after the attention output projection and one after the feed-forward
output (before the residual add), so the defaults target o_proj and down_proj; He et al.'s parallel
adapter, best placed beside the feed-forward block with a scale of 4, reads the block's input.
`up` starts at zero, so both start as the identity. The nonlinearity makes them unmergeable.
Stored in deltatune's own format (docs/formats.md).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.deltas.base import DeltaConfig, DeltaLayer, Method, in_delta_dtype

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class HoulsbyConfig(DeltaConfig):
    adapter_size: int = Field(64, ge=1)  # bottleneck width
    adapter_act: Literal["relu", "gelu", "silu"] = "relu"
    target_modules: list[str] | str = ["o_proj", "down_proj"]


class ParallelAdapterConfig(HoulsbyConfig):
    adapter_scale: float = 4.0
    target_modules: list[str] | str = ["mlp"]


def _width(module: nn.Module, path: str) -> int:
    """The hidden width the adapter reads and writes: that of a linear layer, or of a block's input."""
    if isinstance(module, nn.Linear):
        return module.out_features
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(
            f"adapters: {path} ({type(module).__name__}) has no linear layer to size the adapter by"
        )
    return linears[0].in_features


class Bottleneck(nn.Module):
    def __init__(self, width: int, size: int, act: str, device: torch.device):
        super().__init__()
        self.adapter_down = nn.Linear(width, size, device=device)
        self.adapter_up = nn.Linear(size, width, device=device)
        self.act = ACTIVATIONS[act]()
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.adapter_up(self.act(self.adapter_down(in_delta_dtype(h, self.adapter_down.weight))))


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _device(module: nn.Module) -> torch.device:
    """Where the wrapped block lives; a block over a quantized base may own no parameter at all."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return next(m.weight.device for m in module.modules() if isinstance(m, nn.Linear))


def _replace_first(out: Any, value: torch.Tensor) -> Any:
    return (value, *out[1:]) if isinstance(out, tuple) else value


class SeriesAdapter(DeltaLayer):
    def __init__(self, base_layer: nn.Module, width: int, size: int, act: str):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = Bottleneck(width, size, act, _device(base_layer))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if self.disabled:
            return out
        y = _first(out)
        return _replace_first(out, y + self.adapter(y).to(y.dtype))


class ParallelAdapter(DeltaLayer):
    def __init__(self, base_layer: nn.Module, width: int, size: int, act: str, scale: float):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = Bottleneck(width, size, act, _device(base_layer))
        self.scale = scale

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(hidden_states, *args, **kwargs)
        if self.disabled:
            return out
        y = _first(out)
        return _replace_first(out, y + (self.scale * self.adapter(hidden_states)).to(y.dtype))


def match_modules(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Modules of any type by name suffix (a list) or full-path regex (a string)."""
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(target_modules, str):
        return [n for n in names if re.fullmatch(target_modules, n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in target_modules)]


@dataclass(frozen=True)
class Houlsby(Method):
    name = "houlsby"
    config_class = HoulsbyConfig
    family = "activation"

    def targets(self, model: nn.Module, cfg: HoulsbyConfig) -> list[str]:
        return match_modules(model, cfg.target_modules)

    def wrap(self, module: nn.Module, cfg: HoulsbyConfig, path: str) -> DeltaLayer:
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"houlsby adds an adapter after a linear layer; {path} is {type(module).__name__}"
            )
        return SeriesAdapter(module, module.out_features, cfg.adapter_size, cfg.adapter_act)


@dataclass(frozen=True)
class Parallel(Houlsby):
    name = "parallel_adapter"
    config_class = ParallelAdapterConfig

    def wrap(self, module: nn.Module, cfg: ParallelAdapterConfig, path: str) -> DeltaLayer:
        width = _width(module, path)
        return ParallelAdapter(module, width, cfg.adapter_size, cfg.adapter_act, cfg.adapter_scale)
