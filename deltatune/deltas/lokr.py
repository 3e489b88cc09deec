"""LoKr: a Kronecker product of a small and a (low-rank) larger factor (weight delta, from LyCORIS).

    ΔW = (alpha / r) · W1 ⊗ W2          out = a·b, in = c·d;  W1: [a, c], W2: [b, d]

The dimensions are split into two factors near their square roots (or near `lokr_decompose_factor`).
Each factor is a full matrix, or a rank-r product (W?a W?b) when r is below half its larger side;
by default only W2 is decomposed (`lokr_decompose_both` decomposes W1 too). W1 starts at zero (a
no-op delta), W2 Kaiming-uniform, as in peft. Keys, the factorisation and `rank_pattern` /
`alpha_pattern` follow peft's LOKR adapters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.deltas.base import DeltaConfig, DeltaLayer, DenseDeltaLinear, Method, require_linear
from deltatune.deltas.loha import lycoris_disk_config, lycoris_paths, patterned_rank_alpha


class LokrConfig(DeltaConfig):
    lokr_r: int = Field(8, ge=1)
    lokr_alpha: float = Field(8.0, gt=0)
    lokr_decompose_both: bool = False
    lokr_decompose_factor: int = -1  # -1: factors as close to the square root as possible
    target_modules: Literal["all-linear"] | list[str] | str = "all-linear"
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}


def factorize(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension: (factor, dimension / factor) when the factor divides, else m ≤ n is
    the largest divisor not above √dimension nor `factor` (-1: no limit). The same split as peft's."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    for cand in range(2, math.isqrt(dimension) + 1):
        if cand > limit:
            break
        if dimension % cand == 0:
            m, n = cand, dimension // cand
    return m, n


class LokrLinear(DenseDeltaLinear):
    def __init__(self, base_layer: nn.Linear, r: int, scale: float, decompose_both: bool, factor: int):
        super().__init__()
        self.base_layer = base_layer
        out_f, in_f = base_layer.weight.shape
        out_a, out_b = factorize(out_f, factor)
        in_c, in_d = factorize(in_f, factor)
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        if decompose_both and r < max(out_a, in_c) / 2:
            self.lokr_w1_a = nn.Parameter(torch.zeros(out_a, r, **factory))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, in_c, **factory))
            nn.init.kaiming_uniform_(self.lokr_w1_b, a=math.sqrt(5))
        else:
            self.lokr_w1 = nn.Parameter(torch.zeros(out_a, in_c, **factory))
        if r < max(out_b, in_d) / 2:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_b, r, **factory))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, in_d, **factory))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lokr_w2_b, a=math.sqrt(5))
        else:
            self.lokr_w2 = nn.Parameter(torch.empty(out_b, in_d, **factory))
            nn.init.kaiming_uniform_(self.lokr_w2, a=math.sqrt(5))
        self.scale = scale

    def _factor(self, name: str) -> torch.Tensor:
        params = self._parameters
        return params[name] if name in params else params[f"{name}_a"] @ params[f"{name}_b"]

    def delta_weight(self) -> torch.Tensor:
        return torch.kron(self._factor("lokr_w1"), self._factor("lokr_w2")) * self.scale


@dataclass(frozen=True)
class Lokr(Method):
    name = "lokr"
    config_class = LokrConfig
    family = "weight"
    peft_type = "LOKR"

    def wrap(self, module: nn.Module, cfg: LokrConfig, path: str) -> DeltaLayer:
        r, alpha = patterned_rank_alpha(cfg, cfg.lokr_r, cfg.lokr_alpha, path)
        linear = require_linear(module, self.name, path)
        return LokrLinear(linear, r, alpha / r, cfg.lokr_decompose_both, cfg.lokr_decompose_factor)

    def disk_config(self, cfg: LokrConfig, paths: list[str], base_model: str | None) -> dict[str, Any]:
        return lycoris_disk_config("LOKR", cfg.lokr_r, cfg.lokr_alpha, cfg, paths, base_model) | {
            "decompose_both": cfg.lokr_decompose_both,
            "decompose_factor": cfg.lokr_decompose_factor,
            "rank_dropout_scale": False,
        }

    def config_from_disk(self, disk: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LokrConfig:
        if disk.get("modules_to_save"):
            raise ValueError(f"modules_to_save={disk['modules_to_save']!r} is not supported")
        marker = ".lokr_w1" if any(".lokr_w1" in k for k in tensors) else ".lokr_w2"
        return LokrConfig(
            lokr_r=int(disk.get("r", 8)),
            lokr_alpha=float(disk.get("alpha", 8)),
            lokr_decompose_both=bool(disk.get("decompose_both", False)),
            lokr_decompose_factor=int(disk.get("decompose_factor", -1)),
            target_modules=lycoris_paths(tensors, marker),
            rank_pattern=disk.get("rank_pattern") or {},
            alpha_pattern=disk.get("alpha_pattern") or {},
        )
