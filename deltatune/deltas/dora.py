"""DoRA: split a weight into magnitude and direction, train the magnitude and a LoRA on the direction.

    W' = m · (W + s·BA) / ‖W + s·BA‖_row

m ([out], initialised to the row norms of W) is trained; the norm is detached as in the paper
(section 4.3), so it acts as a per-row constant in the backward pass. The forward reuses the
base output instead of materialising W':

    y = base(x) + (m/‖·‖ - 1) · (base(x) - bias) + (m/‖·‖) · s·B(A(x))

Merging folds the whole expression into W; unmerging needs the norm used at merge time, which is
kept (one vector per layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.deltas.lora import Lora, LoraLinear


class DoraLinear(LoraLinear):
    def __init__(
        self, base_layer: nn.Linear, r: int, scale: float, dropout: float = 0.0, init: str = "kaiming"
    ):
        super().__init__(base_layer, r, scale, dropout, init)
        with torch.no_grad():
            norm = base_layer.weight.float().norm(dim=1)
        self.lora_magnitude_vector = nn.Parameter(norm)
        self._merge_norm: torch.Tensor | None = None

    def weight_norm(self) -> torch.Tensor:
        """‖W + s·BA‖ per output row, detached; computed in fp32 without autocast."""
        with torch.no_grad(), torch.autocast(self.base_layer.weight.device.type, enabled=False):
            weight = self.base_layer.weight.float() + self.scale * (self.lora_B.weight @ self.lora_A.weight)
            return weight.norm(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        bias = self.base_layer.bias
        if isinstance(self.dropout, nn.Identity):
            base_no_bias = out if bias is None else out - bias
        else:  # the base term must see the same dropped-out input as the LoRA term
            base_no_bias = F.linear(self.dropout(x), self.base_layer.weight)
        ratio = self.lora_magnitude_vector / self.weight_norm()
        ratio = ratio.to(out.dtype)
        return out + (ratio - 1) * base_no_bias + ratio * self.lora_path(x).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight.float()
        directed = weight + self.scale * (self.lora_B.weight @ self.lora_A.weight)
        return (self.lora_magnitude_vector / self.weight_norm()).unsqueeze(1) * directed - weight

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self._merge_norm = self.weight_norm()
        super().merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        ratio = (self.lora_magnitude_vector / self._merge_norm).unsqueeze(1)
        weight = self.base_layer.weight.float() / ratio - self.scale * (
            self.lora_B.weight @ self.lora_A.weight
        )
        self.base_layer.weight.copy_(weight.to(self.base_layer.weight.dtype))
        self.merged = False


@dataclass(frozen=True)
class Dora(Lora):
    name = "dora"
    servable = False
    dense_base = "its forward normalises the columns of W + ΔW (the magnitude vector)"
    layer_class: ClassVar[type[LoraLinear]] = DoraLinear
    use_dora: ClassVar[bool] = True
