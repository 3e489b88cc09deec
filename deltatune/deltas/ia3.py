"""IA3: learned rescaling of activations (activation delta).

    attention keys/values:   y = l ⊙ (W x + b)          l: [out, 1], starts at 1
    feed-forward input:      y = W (l ⊙ x) + b           l: [1, in],  starts at 1

A vector per targeted module rescales its output, or, for the feed-forward modules, its input.
Both fold into the weight (rows or columns of W scaled by l), so IA3 merges; unmerging divides by l
(exact to fp32 rounding while no entry of l is near zero). Targets default to peft's choice for
Llama (k_proj, v_proj, down_proj with down_proj feed-forward); keys follow peft's IA3 adapters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from deltatune.deltas.base import DeltaConfig, DeltaLayer, Method, require_linear


class Ia3Config(DeltaConfig):
    target_modules: Literal["all-linear"] | list[str] | str = ["k_proj", "v_proj", "down_proj"]
    ia3_feedforward_modules: list[str] | str = ["down_proj"]  # name suffixes or a regex: scale the input


class Ia3Linear(DeltaLayer):
    def __init__(self, base_layer: nn.Linear, feedforward: bool):
        super().__init__()
        self.base_layer = base_layer
        shape = (1, base_layer.in_features) if feedforward else (base_layer.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base_layer.weight.device))
        self.feedforward = feedforward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return self.base_layer((x * scale).to(x.dtype))
        out = self.base_layer(x)
        return (out * scale).to(out.dtype)

    def _factor(self) -> torch.Tensor:
        """l shaped to broadcast against W [out, in]."""
        return self.ia3_l if self.feedforward else self.ia3_l.view(-1, 1)

    def _original_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight.float()
        return weight / self._factor() if self.merged else weight

    def delta_weight(self) -> torch.Tensor:
        return self._original_weight() * (self._factor() - 1)

    def delta_bias(self) -> torch.Tensor | None:
        bias = self.base_layer.bias
        if bias is None or self.feedforward:
            return None
        original = bias.float() / self.ia3_l.flatten() if self.merged else bias.float()
        return original * (self.ia3_l.flatten() - 1)

    @torch.no_grad()
    def _scale_base(self, power: int) -> None:
        weight, bias = self.base_layer.weight, self.base_layer.bias
        weight.copy_((weight.float() * self._factor() ** power).to(weight.dtype))
        if bias is not None and not self.feedforward:
            bias.copy_((bias.float() * self.ia3_l.flatten() ** power).to(bias.dtype))

    def merge(self) -> None:
        if not self.merged:
            self._scale_base(1)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._scale_base(-1)
            self.merged = False


def _matches(path: str, modules: list[str] | str) -> bool:
    if isinstance(modules, str):
        return re.fullmatch(modules, path) is not None
    return any(path == m or path.endswith("." + m) for m in modules)


@dataclass(frozen=True)
class Ia3(Method):
    name = "ia3"
    config_class = Ia3Config
    family = "activation"
    peft_type = "IA3"

    def wrap(self, module: nn.Module, cfg: Ia3Config, path: str) -> DeltaLayer:
        linear = require_linear(module, self.name, path)
        return Ia3Linear(linear, _matches(path, cfg.ia3_feedforward_modules))

    def disk_config(self, cfg: Ia3Config, paths: list[str], base_model: str | None) -> dict[str, Any]:
        feedforward = sorted(
            {p.rsplit(".", 1)[-1] for p in paths if _matches(p, cfg.ia3_feedforward_modules)}
        )
        return {
            "peft_type": "IA3",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "target_modules": sorted({p.rsplit(".", 1)[-1] for p in paths}),
            "feedforward_modules": feedforward,
            "fan_in_fan_out": False,
            "init_ia3_weights": True,
            "modules_to_save": None,
            "inference_mode": True,
        }

    def config_from_disk(self, disk: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Ia3Config:
        if disk.get("fan_in_fan_out"):
            raise ValueError("fan_in_fan_out=True is not supported")
        if disk.get("modules_to_save"):
            raise ValueError(f"modules_to_save={disk['modules_to_save']!r} is not supported")
        paths = sorted(k.removesuffix(".ia3_l") for k in tensors if k.endswith(".ia3_l"))
        if not paths:
            raise ValueError("no ia3_l weights found")
        # which modules scale their input is read from the vector's shape ([1, in] vs [out, 1])
        feedforward = [
            p for p in paths if tensors[f"{p}.ia3_l"].shape[0] == 1 and tensors[f"{p}.ia3_l"].ndim == 2
        ]
        return Ia3Config(
            target_modules="|".join(re.escape(p) for p in paths),
            ia3_feedforward_modules="|".join(re.escape(p) for p in feedforward) or "(?!)",
        )
