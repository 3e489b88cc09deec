"""BOFT: OFT whose rotation is a product of butterfly-permuted block-diagonal rotations (weight delta).

    y = s ⊙ (W (M x)ᵀ...)   i.e.  W' = diag(s) · W · Mᵀ,   M = L_{m-1} ⋯ L_0,   L_i = P_i · diag(R_i,1 …) · P_iᵀ

With one factor (m = 1, peft's default) this is block-diagonal OFT with the exact Cayley transform
R = (I − Q)(I + Q)⁻¹ plus a trained output scale s (`boft_s`, starts at 1). More factors interleave
the blocks through the butterfly permutations P_i, so a few small blocks mix all features (the
Cooley–Tukey pattern). The forward never builds the dense M: it permutes, rotates per block and
permutes back. Keys (`boft_R` [m, blocks, b, b], `boft_s` [out, 1]) follow peft's BOFT adapters;
peft without its CUDA extension only runs m = 1, so adapters with more factors load in peft only
where that extension builds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.deltas.base import DeltaConfig, DeltaLayer, Method, in_delta_dtype, require_linear
from deltatune.deltas.oft import RotationLinear


class BoftConfig(DeltaConfig):
    boft_block_size: int = Field(8, ge=0)  # 0: set by boft_block_num instead
    boft_block_num: int = Field(0, ge=0)
    boft_butterfly_factor: int = Field(1, ge=1)
    target_modules: Literal["all-linear"] | list[str] | str = "all-linear"


def butterfly_permutation(n: int, blocks: int, half: int, levels: int) -> torch.Tensor:
    """Within each of `blocks` groups, the chunks of `half` features in the order evens, then odds."""
    if levels == 0:
        return torch.arange(n)
    size = n // blocks
    if blocks * half * 2 > n or size % half:
        raise ValueError(
            f"boft: cannot split {n} features into {blocks} butterfly groups of chunks of {half}"
        )
    chunks = [*range(0, size // half, 2), *range(1, size // half, 2)]
    order = torch.cat([torch.arange(c * half, (c + 1) * half) for c in chunks])
    return torch.cat([start + order for start in range(0, n, size)])


def cayley_exact(r: torch.Tensor) -> torch.Tensor:
    """[..., b, b] -> orthogonal (I − Q)(I + Q)⁻¹ with Q the skew part of r."""
    q = 0.5 * (r - r.transpose(-2, -1))
    eye = torch.eye(r.shape[-1], device=r.device, dtype=r.dtype).expand_as(q)
    return torch.linalg.solve(eye + q, eye - q, left=False)


def boft_shape(in_features: int, block_size: int, block_num: int, factor: int) -> tuple[int, int]:
    """(blocks, block size), with peft's validity rules."""
    if bool(block_size) == bool(block_num):
        raise ValueError("boft: set exactly one of boft_block_size and boft_block_num")
    size = block_size or in_features // block_num
    blocks = in_features // size
    if in_features % size or in_features % (size * 2 ** (factor - 1)):
        raise ValueError(
            f"boft: {in_features} input features do not fit block size {size} with butterfly factor {factor}"
        )
    if factor > 1 and (blocks % 2 or size % 2):
        raise ValueError(
            f"boft: blocks ({blocks}) and block size ({size}) must be even with butterfly factor > 1"
        )
    return blocks, size


class BoftLinear(RotationLinear):
    def __init__(self, base_layer: nn.Linear, blocks: int, size: int, factor: int):
        super().__init__()
        self.base_layer = base_layer
        device = base_layer.weight.device
        self.boft_R = nn.Parameter(torch.zeros(factor, blocks, size, size, device=device))
        self.boft_s = nn.Parameter(torch.ones(base_layer.out_features, 1, device=device))
        perms = torch.stack(
            [
                butterfly_permutation(base_layer.in_features, blocks // 2**i, size // 2, factor - 1)
                for i in range(factor)
            ]
        )
        self.register_buffer("perms", perms.to(device), persistent=False)
        self.register_buffer("inverse_perms", torch.argsort(perms, dim=1), persistent=False)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x @ M, level by level: x·P_i gathers by P_i⁻¹, the blocks rotate, ·P_iᵀ gathers by P_i."""
        x = in_delta_dtype(x, self.boft_R)
        rotations = cayley_exact(self.boft_R)
        for i in reversed(range(rotations.shape[0])):
            h = x[..., self.inverse_perms[i]].unflatten(-1, (rotations.shape[1], -1))
            x = torch.einsum("...nk,nkc->...nc", h, rotations[i].to(h.dtype)).flatten(-2)[..., self.perms[i]]
        return x

    def rotation(self) -> torch.Tensor:
        """The dense M [in, in] (for merging)."""
        eye = torch.eye(self.base_layer.in_features, device=self.boft_R.device)
        return self.rotate(eye)

    def inverse(self, rot: torch.Tensor) -> torch.Tensor:
        return rot.T  # M is exactly orthogonal (the exact Cayley transform)

    def output_scale(self) -> torch.Tensor:
        return self.boft_s


@dataclass(frozen=True)
class Boft(Method):
    name = "boft"
    config_class = BoftConfig
    family = "weight"
    peft_type = "BOFT"
    dense_base = "its forward multiplies the base weight by the butterfly rotation"

    def wrap(self, module: nn.Module, cfg: BoftConfig, path: str) -> DeltaLayer:
        linear = require_linear(module, self.name, path)
        factor = cfg.boft_butterfly_factor
        blocks, size = boft_shape(linear.in_features, cfg.boft_block_size, cfg.boft_block_num, factor)
        return BoftLinear(linear, blocks, size, factor)

    def disk_config(self, cfg: BoftConfig, paths: list[str], base_model: str | None) -> dict[str, Any]:
        return {
            "peft_type": "BOFT",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "boft_block_size": cfg.boft_block_size,
            "boft_block_num": cfg.boft_block_num,
            "boft_n_butterfly_factor": cfg.boft_butterfly_factor,
            "boft_dropout": 0.0,
            "target_modules": sorted({p.rsplit(".", 1)[-1] for p in paths}),
            "fan_in_fan_out": False,
            "bias": "none",
            "init_weights": True,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "inference_mode": True,
        }

    def config_from_disk(self, disk: dict[str, Any], tensors: dict[str, torch.Tensor]) -> BoftConfig:
        for key, ok in {"fan_in_fan_out": False, "bias": "none"}.items():
            if disk.get(key, ok) != ok:
                raise ValueError(f"{key}={disk[key]!r} is not supported (expected {ok!r})")
        if disk.get("modules_to_save"):
            raise ValueError(f"modules_to_save={disk['modules_to_save']!r} is not supported")
        paths = sorted(k.removesuffix(".boft_R") for k in tensors if k.endswith(".boft_R"))
        if not paths:
            raise ValueError("no boft_R weights found")
        factor, _, size, _ = tensors[f"{paths[0]}.boft_R"].shape
        return BoftConfig(
            boft_block_size=int(size),
            boft_butterfly_factor=int(factor),
            target_modules="|".join(re.escape(p) for p in paths),
        )
