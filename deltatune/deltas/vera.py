"""VeRA: one pair of frozen random matrices shared by every layer, scaled by two trained vectors (weight delta).

    ΔW = diag(λ_b) · B[:out] · diag(λ_d) · A[:, :in]          A: [r, max in], B: [max out, r]

A and B are drawn once for the whole model (Kaiming-uniform from a seeded generator, A first, in
the order peft uses, so the same `vera_prng_key` gives the same matrices) and sliced per layer; only
λ_d ([r], starts at `vera_d_initial`) and λ_b ([out], starts at zero) train. The shared matrices live
in one `VeraProjections` module that wraps nothing (so moving the model to a device moves them
once) and are saved as peft saves them: `base_model.vera_A`, `base_model.vera_B`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from deltatune.deltas.base import PEFT_PREFIX, DeltaConfig, DeltaLayer, Method, in_delta_dtype, require_linear

SHARED = "vera_projections"  # where the shared matrices sit in the model
DISK_SHARED = "base_model."  # ... and the prefix peft gives them on disk


class VeraConfig(DeltaConfig):
    vera_r: int = Field(256, ge=1)
    vera_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    vera_d_initial: float = 0.1
    vera_prng_key: int = 0
    vera_save_projection: bool = True  # False: A and B are regenerated from the key when loading
    target_modules: Literal["all-linear"] | list[str] | str = "all-linear"


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def shared_projections(r: int, max_in: int, max_out: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(key)
    vera_a = kaiming_uniform((r, max_in), generator)
    return vera_a, kaiming_uniform((max_out, r), generator)


class VeraProjections(DeltaLayer):
    """The frozen shared A and B; wraps no module and has nothing of its own to merge."""

    def __init__(self, vera_a: torch.Tensor, vera_b: torch.Tensor, persistent: bool):
        super().__init__()
        self.base_layer = None
        self.register_buffer("vera_A", vera_a, persistent=persistent)
        self.register_buffer("vera_B", vera_b, persistent=persistent)

    def merge(self) -> None:
        self.merged = True

    def unmerge(self) -> None:
        self.merged = False


class VeraLinear(DeltaLayer):
    def __init__(self, base_layer: nn.Linear, shared: VeraProjections, r: int, dropout: float, d_init: float):
        super().__init__()
        self.base_layer = base_layer
        self._shared = [shared]  # a plain list: the shared module must not become a child of every layer
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.vera_lambda_b = nn.Parameter(torch.zeros(base_layer.out_features, **factory))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), d_init, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self._shared[0]
        return shared.vera_A[:, : self.base_layer.in_features], shared.vera_B[: self.base_layer.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        vera_a, vera_b = self._slices()
        h = in_delta_dtype(self.dropout(x), vera_a)
        delta = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(h, vera_a), vera_b)
        return out + delta.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        vera_a, vera_b = self._slices()
        return (self.vera_lambda_b[:, None] * vera_b) @ (self.vera_lambda_d[:, None] * vera_a)


@dataclass(frozen=True)
class Vera(Method):
    name = "vera"
    config_class = VeraConfig
    family = "weight"
    peft_type = "VERA"

    def attach(self, model: nn.Module, cfg: VeraConfig) -> list[str]:
        paths = self.targets(model, cfg)
        if not paths:
            raise ValueError(f"method {self.name!r}: target_modules matched no module of the model")
        linears = {p: require_linear(model.get_submodule(p), self.name, p) for p in paths}
        max_out = max(m.out_features for m in linears.values())
        max_in = max(m.in_features for m in linears.values())
        device = next(iter(linears.values())).weight.device
        vera_a, vera_b = shared_projections(cfg.vera_r, max_in, max_out, cfg.vera_prng_key)
        shared = VeraProjections(vera_a.to(device), vera_b.to(device), cfg.vera_save_projection)
        model.add_module(SHARED, shared)
        for path, linear in linears.items():
            layer = VeraLinear(linear, shared, cfg.vera_r, cfg.vera_dropout, cfg.vera_d_initial)
            model.set_submodule(path, layer)
        return paths

    def to_disk(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            (DISK_SHARED + k.removeprefix(SHARED + ".") if k.startswith(SHARED + ".") else PEFT_PREFIX + k): v
            for k, v in state.items()
        }

    def from_disk(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in tensors.items():
            if key.startswith(PEFT_PREFIX):
                out[key.removeprefix(PEFT_PREFIX)] = value
            else:
                out[SHARED + "." + key.removeprefix(DISK_SHARED)] = value
        return out

    def disk_config(self, cfg: VeraConfig, paths: list[str], base_model: str | None) -> dict[str, Any]:
        return {
            "peft_type": "VERA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": cfg.vera_r,
            "target_modules": sorted({p.rsplit(".", 1)[-1] for p in paths}),
            "projection_prng_key": cfg.vera_prng_key,
            "save_projection": cfg.vera_save_projection,
            "vera_dropout": cfg.vera_dropout,
            "d_initial": cfg.vera_d_initial,
            "fan_in_fan_out": False,
            "bias": "none",
            "modules_to_save": None,
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "inference_mode": True,
        }

    def config_from_disk(self, disk: dict[str, Any], tensors: dict[str, torch.Tensor]) -> VeraConfig:
        for key, ok in {"fan_in_fan_out": False, "bias": "none", "modules_to_save": None}.items():
            if disk.get(key, ok) not in (ok, []):
                raise ValueError(
                    f"adapter_config.json: {key}={disk[key]!r} is not supported (expected {ok!r})"
                )
        paths = sorted({k.rsplit(".vera_lambda_b", 1)[0] for k in tensors if k.endswith(".vera_lambda_b")})
        if not paths:
            raise ValueError("no vera_lambda_b weights found")
        return VeraConfig(
            vera_r=int(tensors[f"{paths[0]}.vera_lambda_d"].shape[0]),
            vera_dropout=float(disk.get("vera_dropout", 0.0)),
            vera_d_initial=float(disk.get("d_initial", 0.1)),
            vera_prng_key=int(disk.get("projection_prng_key", 0)),
            vera_save_projection=bool(disk.get("save_projection", True)),
            target_modules="|".join(re.escape(p) for p in paths),
        )
