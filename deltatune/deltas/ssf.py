"""SSF: scale and shift the output features of every targeted linear layer (activation delta).

    y = γ ⊙ (W x + b) + β          γ starts at 1, β at 0

The affine map folds into the layer: W' = diag(γ) W and b' = γ ⊙ b + β, so SSF merges (a bias is
created where the base has none, and removed again on unmerge). Unmerging divides by γ, exact to
fp32 rounding while no γ is near zero. Stored in deltatune's own format (docs/formats.md):
`ssf_scale`, `ssf_shift` per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from deltatune.deltas.base import DeltaConfig, DeltaLayer, Method, fold_bias, require_linear, unfold_bias


class SsfConfig(DeltaConfig):
    target_modules: Literal["all-linear"] | list[str] | str = "all-linear"


class SsfLinear(DeltaLayer):
    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        device = base_layer.weight.device
        self.ssf_scale = nn.Parameter(torch.ones(base_layer.out_features, device=device))
        self.ssf_shift = nn.Parameter(torch.zeros(base_layer.out_features, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        return (out * self.ssf_scale + self.ssf_shift).to(out.dtype)

    def _original(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W, b) of the unmodified base layer, whether or not it is merged right now."""
        weight, bias = self.base_layer.weight.float(), self.base_layer.bias
        if not self.merged:
            return weight, None if bias is None else bias.float()
        original_bias = None
        if not getattr(self, "_created_bias", False):
            original_bias = (bias.float() - self.ssf_shift) / self.ssf_scale
        return weight / self.ssf_scale[:, None], original_bias

    def delta_weight(self) -> torch.Tensor:
        weight, _ = self._original()
        return weight * (self.ssf_scale[:, None] - 1)

    def delta_bias(self) -> torch.Tensor:
        _, bias = self._original()
        return self.ssf_shift if bias is None else bias * (self.ssf_scale - 1) + self.ssf_shift

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            bias = self.delta_bias()
            weight = self.base_layer.weight
            weight.copy_((weight.float() * self.ssf_scale[:, None]).to(weight.dtype))
            fold_bias(self, bias)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            bias = self.delta_bias()
            weight = self.base_layer.weight
            weight.copy_((weight.float() / self.ssf_scale[:, None]).to(weight.dtype))
            unfold_bias(self, bias)
            self.merged = False


@dataclass(frozen=True)
class Ssf(Method):
    name = "ssf"
    config_class = SsfConfig
    family = "activation"

    def wrap(self, module: nn.Module, cfg: SsfConfig, path: str) -> DeltaLayer:
        return SsfLinear(require_linear(module, self.name, path))
