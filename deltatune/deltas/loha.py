"""LoHa: the Hadamard product of two low-rank matrices (weight delta, from LyCORIS / FedPara).

    ΔW = (alpha / r) · (W1a W1b) ⊙ (W2a W2b)          W?a: [out, r], W?b: [r, in]

The element-wise product of two rank-r matrices can have rank up to r², so LoHa reaches a higher
rank than LoRA for the same parameter count; the price is that ΔW is materialised at every forward.
W2b starts at zero (a no-op delta), the other three Kaiming-uniform, as in peft. Keys and
`rank_pattern` / `alpha_pattern` follow peft's LOHA adapters.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.deltas.base import DeltaConfig, DeltaLayer, DenseDeltaLinear, Method, require_linear
from deltatune.deltas.lora import pattern_value


class LohaConfig(DeltaConfig):
    loha_r: int = Field(8, ge=1)
    loha_alpha: float = Field(8.0, gt=0)
    target_modules: Literal["all-linear"] | list[str] | str = "all-linear"
    rank_pattern: dict[str, int] = {}  # peft's per-module overrides: module-suffix regex -> value
    alpha_pattern: dict[str, float] = {}


def hadamard_weight(w1a, w1b, w2a, w2b, scale: float) -> torch.Tensor:
    return (w1a @ w1b) * (w2a @ w2b) * scale


class LohaLinear(DenseDeltaLinear):
    def __init__(self, base_layer: nn.Linear, r: int, scale: float):
        super().__init__()
        self.base_layer = base_layer
        out_f, in_f = base_layer.weight.shape
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.hada_w1_a = nn.Parameter(torch.empty(out_f, r, **factory))
        self.hada_w1_b = nn.Parameter(torch.empty(r, in_f, **factory))
        self.hada_w2_a = nn.Parameter(torch.empty(out_f, r, **factory))
        self.hada_w2_b = nn.Parameter(torch.zeros(r, in_f, **factory))
        for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        self.scale = scale

    def delta_weight(self) -> torch.Tensor:
        return hadamard_weight(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scale)


def patterned_rank_alpha(cfg: Any, r: int, alpha: float, path: str) -> tuple[int, float]:
    return pattern_value(cfg.rank_pattern, path, r), pattern_value(cfg.alpha_pattern, path, alpha)


def lycoris_disk_config(peft_type: str, r: int, alpha: float, cfg: Any, paths: list[str], base_model) -> dict:
    """The adapter_config.json keys peft's LyCORIS-family configs (LOHA, LOKR) share."""
    return {
        "peft_type": peft_type,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "alpha": alpha,
        "target_modules": sorted({p.rsplit(".", 1)[-1] for p in paths}),
        "rank_pattern": cfg.rank_pattern,
        "alpha_pattern": cfg.alpha_pattern,
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "use_effective_conv2d": False,
        "init_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }


def lycoris_paths(tensors: dict[str, torch.Tensor], marker: str) -> str:
    """The exact module paths that have weights on disk, as a target_modules regex."""
    paths = sorted({k.rsplit(marker, 1)[0] for k in tensors if marker in k})
    if not paths:
        raise ValueError(f"no {marker.strip('.')} weights found")
    if "modules_to_save" in tensors:
        raise ValueError("modules_to_save is not supported")
    return "|".join(re.escape(p) for p in paths)


@dataclass(frozen=True)
class Loha(Method):
    name = "loha"
    config_class = LohaConfig
    family = "weight"
    peft_type = "LOHA"

    def wrap(self, module: nn.Module, cfg: LohaConfig, path: str) -> DeltaLayer:
        r, alpha = patterned_rank_alpha(cfg, cfg.loha_r, cfg.loha_alpha, path)
        return LohaLinear(require_linear(module, self.name, path), r, alpha / r)

    def disk_config(self, cfg: LohaConfig, paths: list[str], base_model: str | None) -> dict[str, Any]:
        return lycoris_disk_config("LOHA", cfg.loha_r, cfg.loha_alpha, cfg, paths, base_model)

    def config_from_disk(self, disk: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LohaConfig:
        if disk.get("modules_to_save"):
            raise ValueError(f"modules_to_save={disk['modules_to_save']!r} is not supported")
        return LohaConfig(
            loha_r=int(disk.get("r", 8)),
            loha_alpha=float(disk.get("alpha", 8)),
            target_modules=lycoris_paths(tensors, ".hada_w1_a"),
            rank_pattern=disk.get("rank_pattern") or {},
            alpha_pattern=disk.get("alpha_pattern") or {},
        )
