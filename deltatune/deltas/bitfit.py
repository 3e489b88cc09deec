"""BitFit: train only bias terms (weight delta on the bias).

    y = W x + (b + Δb)

Llama-style models have no biases in their linear layers, so BitFit adds a zero-initialised Δb to
every targeted linear layer; where a bias exists, Δb trains on top of it (the same thing as training
that bias). Merging folds Δb into the layer's bias, creating one where the base had none; unmerging
removes it again. Stored in deltatune's own format (docs/formats.md): one `bitfit_bias` per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from deltatune.deltas.base import DeltaConfig, DeltaLayer, Method, require_linear


class BitfitConfig(DeltaConfig):
    target_modules: Literal["all-linear"] | list[str] | str = "all-linear"


class BiasLinear(DeltaLayer):
    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.bitfit_bias = nn.Parameter(torch.zeros(base_layer.out_features, device=base_layer.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        return (out + self.bitfit_bias).to(out.dtype)

    def delta_bias(self) -> torch.Tensor:
        return self.bitfit_bias


@dataclass(frozen=True)
class Bitfit(Method):
    name = "bitfit"
    config_class = BitfitConfig
    family = "weight"

    def wrap(self, module: nn.Module, cfg: BitfitConfig, path: str) -> DeltaLayer:
        return BiasLinear(require_linear(module, self.name, path))
