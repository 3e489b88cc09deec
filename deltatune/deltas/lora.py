"""LoRA: W' = W + (alpha / r) · B A, with A: [r, in], B: [out, r], B initialised to zero.

The forward never materialises ΔW: it is `base(x) + scale · B(A(dropout(x)))`. rsLoRA changes the
scale to alpha / sqrt(r), which keeps the update size stable as the rank grows. LoRA+ (a larger
learning rate for B) is an optimizer concern: `lora_plus_params` names B for the training loop.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.deltas.base import DeltaConfig, DeltaLayer, Method, in_delta_dtype, require_linear


class LowRankConfig(DeltaConfig):
    """The keys every LoRA-style method reads (PiSSA and OLoRA take only these)."""

    lora_r: int = Field(16, ge=1)
    lora_alpha: float = Field(32.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    use_rslora: bool = False
    target_modules: Literal["all-linear"] | list[str] | str = "all-linear"


class LoraConfig(LowRankConfig):
    lora_init: Literal["kaiming", "gaussian"] = "kaiming"
    rank_pattern: dict[str, int] = {}  # PEFT's per-module overrides: module-suffix regex -> value
    alpha_pattern: dict[str, float] = {}


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / (math.sqrt(r) if use_rslora else r)


def module_rank_scale(cfg: LoraConfig, path: str) -> tuple[int, float]:
    """(r, scale) of the module at `path`: PEFT's rank_pattern / alpha_pattern over the defaults."""
    r = pattern_value(cfg.rank_pattern, path, cfg.lora_r)
    return r, lora_scale(r, pattern_value(cfg.alpha_pattern, path, cfg.lora_alpha), cfg.use_rslora)


# adapter_config.json settings plain LoRA factors cannot express, with the value that is fine.
UNSUPPORTED = {
    "use_dora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
    "layers_to_transform": None, "layer_replication": None, "lora_bias": False,
    "trainable_token_indices": None, "target_parameters": None, "use_qalora": False,
}  # fmt: skip


def unsupported_setting(disk: dict[str, Any], allowed: tuple[str, ...] = ()) -> str | None:
    """The first setting of an adapter_config.json that plain LoRA cannot honour, as 'key=value'."""
    for key, ok in UNSUPPORTED.items():
        if key not in allowed and disk.get(key, ok) not in (ok, [], {}):
            return f"{key}={disk[key]!r}"
    return None


def factors_from_svd(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LoRA factors (A [rank, in], B [out, rank]) of the top-`rank` part of U diag(s) Vh, with √s
    on each side, zero-padded to `rank`; and the relative Frobenius error of dropping the rest.

    By Eckart-Young B A is the best rank-`rank` approximation of the full product."""
    total = float(s.double().square().sum())
    kept = min(rank, s.numel())
    dropped = total - float(s[:kept].double().square().sum())
    error = math.sqrt(max(dropped, 0.0) / total) if total > 0 else 0.0
    root = s[:kept].sqrt()
    b = u.new_zeros(u.shape[0], rank)
    a = vh.new_zeros(rank, vh.shape[1])
    b[:, :kept] = u[:, :kept] * root
    a[:kept] = root[:, None] * vh[:kept]
    return a, b, error


def truncate_dense(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of a dense delta; returns (A, B, relative Frobenius error)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return factors_from_svd(u, s, vh, rank)


class LoraLinear(DeltaLayer):
    def __init__(
        self, base_layer: nn.Linear, r: int, scale: float, dropout: float = 0.0, init: str = "kaiming"
    ):
        super().__init__()
        self.base_layer = base_layer
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = scale
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def lora_path(self, x: torch.Tensor) -> torch.Tensor:
        """scale · B(A(dropout(x))); under autocast the matmuls run in the autocast dtype."""
        return self.lora_B(self.lora_A(in_delta_dtype(self.dropout(x), self.lora_A.weight))) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        return out + self.lora_path(x).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale


def pattern_value(pattern: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module path suffix (regex)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


@dataclass(frozen=True)
class Lora(Method):
    name = "lora"
    config_class = LoraConfig
    family = "weight"
    peft_type = "LORA"
    lora_plus_params = (".lora_B.",)
    servable = True  # DoRA and the other subclasses are not plain LoRA: they set it back

    layer_class: ClassVar[type[LoraLinear]] = LoraLinear
    use_dora: ClassVar[bool] = False

    def wrap(self, module: nn.Module, cfg: LoraConfig, path: str) -> DeltaLayer:
        linear = require_linear(module, self.name, path)
        r, scale = module_rank_scale(cfg, path)
        return self.layer_class(linear, r, scale, cfg.lora_dropout, cfg.lora_init)

    def claims(self, disk: dict[str, Any]) -> bool:
        return disk.get("peft_type") == "LORA" and bool(disk.get("use_dora", False)) == self.use_dora

    def disk_config(self, cfg: LoraConfig, paths: list[str], base_model: str | None) -> dict[str, Any]:
        suffixes = sorted({p.rsplit(".", 1)[-1] for p in paths})
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": cfg.lora_r,
            "lora_alpha": cfg.lora_alpha,
            "lora_dropout": cfg.lora_dropout,
            "use_rslora": cfg.use_rslora,
            "use_dora": self.use_dora,
            "target_modules": suffixes,
            "bias": "none",
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "init_lora_weights": True,
            "inference_mode": True,
            "rank_pattern": cfg.rank_pattern,
            "alpha_pattern": cfg.alpha_pattern,
        }

    def config_from_disk(self, disk: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LoraConfig:
        bad = unsupported_setting(disk, allowed=("use_dora",))  # claims() matched use_dora already
        if bad is not None:
            raise ValueError(f"adapter_config.json: {bad} is not supported")
        # Targets are exactly the modules that have weights on disk; ranks come from their shapes.
        paths = sorted({k.rsplit(".lora_A.", 1)[0] for k in tensors if ".lora_A." in k})
        if not paths:
            raise ValueError("no lora_A weights found")
        return LoraConfig(
            lora_r=int(disk.get("r", 8)),
            lora_alpha=float(disk.get("lora_alpha", 8)),
            lora_dropout=float(disk.get("lora_dropout", 0.0)),
            use_rslora=bool(disk.get("use_rslora", False)),
            target_modules="|".join(re.escape(p) for p in paths),
            rank_pattern={re.escape(p): tensors[f"{p}.lora_A.weight"].shape[0] for p in paths},
            alpha_pattern=disk.get("alpha_pattern") or {},
        )
