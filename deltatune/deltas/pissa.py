"""PiSSA and OLoRA: LoRA whose factors start from the base weight instead of from zero (weight delta).

PiSSA puts the top-r singular triplets of W into the adapter (A0 = √S_r·U_rᵀ, B0 = V_r·√S_r, both
divided by the LoRA scale s), OLoRA the first r columns / rows of W's QR factors (B0 = Q_r, A0 = R_r).
Both then train A and B as LoRA. peft subtracts the initial product from the base weight
(W_res = W − s·B0A0), which mutates the base every other delta shares. Here the base is never
touched: the layer keeps A0 and B0 as fixed buffers and computes

    y = W x + s·B(A(dropout x)) − s·B0(A0 x)          ΔW = s·(BA − B0A0)

which is the same function with the same gradients as peft's, for one frozen rank-r product more.
ΔW is relative to the original base, so merging, compression and serving need no special case.
Saving does peft's own conversion (`path_initial_model_for_weight_conversion`): a plain LoRA

    A' = [A; A0],  B' = [B, −B0],  r' = 2r,  alpha' = 2·alpha  (√2·alpha with rsLoRA; s is unchanged)

which peft and deltatune load as `lora` on the untouched base model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from deltatune.deltas.base import PEFT_PREFIX, DeltaLayer, Method, in_delta_dtype, require_linear
from deltatune.deltas.lora import Lora, LoraConfig, LoraLinear, LowRankConfig, lora_scale

Factors = Callable[[torch.Tensor, int, float], tuple[torch.Tensor, torch.Tensor]]


class PissaConfig(LowRankConfig):
    """LoRA's shared keys (not `lora_init` or the per-module patterns); alpha defaults to r (scale 1)."""

    lora_alpha: float = Field(16.0, gt=0)


def pissa_factors(weight: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 [r, in], B0 [out, r]) with s·B0A0 = the rank-r truncated SVD of W."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = torch.sqrt(s[:r] / scale)
    return root[:, None] * vh[:r], u[:, :r] * root


def olora_factors(weight: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) = (R_r, Q_r) from W = QR; OLoRA does not divide by the scale."""
    q, rr = torch.linalg.qr(weight.float())
    return rr[:r], q[:, :r]


class InitLoraLinear(LoraLinear):
    """LoRA that starts at (A0, B0) and subtracts their fixed product, so it starts as a no-op."""

    def __init__(self, base_layer: nn.Linear, r: int, scale: float, dropout: float, factors: Factors):
        super().__init__(base_layer, r, scale, dropout)
        with torch.no_grad():
            a0, b0 = factors(base_layer.weight, r, scale)
            if a0.shape[0] < r:
                raise ValueError(f"rank {r} exceeds the size of a {tuple(base_layer.weight.shape)} weight")
            self.register_buffer("lora_A0", a0.contiguous())
            self.register_buffer("lora_B0", b0.contiguous())
            self.lora_A.weight.copy_(a0)
            self.lora_B.weight.copy_(b0)

    def lora_path(self, x: torch.Tensor) -> torch.Tensor:
        x = in_delta_dtype(x, self.lora_A.weight)
        initial = nn.functional.linear(nn.functional.linear(x, self.lora_A0), self.lora_B0)
        return (self.lora_B(self.lora_A(self.dropout(x))) - initial) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight - self.lora_B0 @ self.lora_A0) * self.scale


def to_plain_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's PiSSA/OLoRA → LoRA conversion: BA − B0A0 = [B, −B0]·[A; A0]."""
    out = {}
    for key, value in state.items():
        if key.endswith((".lora_A0", ".lora_B0")):
            continue
        path = key.rsplit(".lora_", 1)[0]
        if key.endswith(".lora_A.weight"):
            value = torch.cat([value, state[f"{path}.lora_A0"]], dim=0)
        elif key.endswith(".lora_B.weight"):
            value = torch.cat([value, -state[f"{path}.lora_B0"]], dim=1)
        out[key] = value
    return out


def from_plain_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse split (to resume training from a saved checkpoint)."""
    out = {}
    for key, value in state.items():
        path = key.rsplit(".lora_", 1)[0]
        if key.endswith(".lora_A.weight"):
            r = value.shape[0] // 2
            out[key], out[f"{path}.lora_A0"] = value[:r], value[r:]
        elif key.endswith(".lora_B.weight"):
            r = value.shape[1] // 2
            out[key], out[f"{path}.lora_B0"] = value[:, :r], -value[:, r:]
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class Pissa(Method):
    name = "pissa"
    config_class = PissaConfig
    family = "weight"
    peft_type = "LORA"
    lora_plus_params = (".lora_B.",)
    dense_base = "its initial factors are a decomposition of the base weight"
    factors: ClassVar[Factors] = staticmethod(pissa_factors)

    def wrap(self, module: nn.Module, cfg: PissaConfig, path: str) -> DeltaLayer:
        linear = require_linear(module, self.name, path)
        scale = lora_scale(cfg.lora_r, cfg.lora_alpha, cfg.use_rslora)
        return InitLoraLinear(linear, cfg.lora_r, scale, cfg.lora_dropout, self.factors)

    def claims(self, disk: dict[str, Any]) -> bool:
        return False  # saved as a plain LoRA, which loads as `lora`

    def to_disk(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {PEFT_PREFIX + k: v for k, v in to_plain_lora(state).items()}

    def from_disk(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return from_plain_lora({k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()})

    def disk_config(self, cfg: PissaConfig, paths: list[str], base_model: str | None) -> dict[str, Any]:
        alpha = cfg.lora_alpha * (math.sqrt(2) if cfg.use_rslora else 2)
        doubled = LoraConfig(
            lora_r=2 * cfg.lora_r,
            lora_alpha=alpha,
            lora_dropout=cfg.lora_dropout,
            use_rslora=cfg.use_rslora,
            target_modules=cfg.target_modules,
        )
        return Lora().disk_config(doubled, paths, base_model)


@dataclass(frozen=True)
class Olora(Pissa):
    name = "olora"
    factors: ClassVar[Factors] = staticmethod(olora_factors)
