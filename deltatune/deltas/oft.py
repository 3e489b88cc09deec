"""OFT: rotate the input features with a trained block-diagonal orthogonal matrix (weight delta).

    y = W (R x) = (W Rᵀ) x           R = diag(R_1, ..., R_n),  R_i = cayley(Q_i),  Q_i skew-symmetric

Each block is parametrised by the upper triangle of a skew-symmetric Q (b(b-1)/2 numbers), starting at
zero, so R starts as the identity. A rotation keeps the angles between the weight's neurons
("hyperspherical energy"), which is the point of the method. `cayley` is peft's: by default the
truncated Neumann series I + 2Q + 2Q² + … + 2Q^(k-2) + Q^(k-1), k = `oft_neumann_terms` (cheap, nearly
orthogonal for small Q);
with `oft_cayley_neumann: false` the exact (I − Q)(I + Q)⁻¹. Merging folds R into W; unmerging
multiplies by R⁻¹ (exact to fp32 rounding). Keys (`oft_R.weight`) follow peft's OFT adapters.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.deltas.base import PEFT_PREFIX, DeltaConfig, DeltaLayer, Method, in_delta_dtype, require_linear

PEFT_FORMAT_VERSION = "0.21.2"  # the peft release whose OFT format this follows


class OftConfig(DeltaConfig):
    oft_block_size: int = Field(32, ge=0)  # 0: set by oft_r instead
    oft_r: int = Field(0, ge=0)  # number of blocks; 0: set by oft_block_size instead
    oft_cayley_neumann: bool = True
    oft_neumann_terms: int = Field(5, ge=1)
    target_modules: Literal["all-linear"] | list[str] | str = "all-linear"


def skew(upper: torch.Tensor, block: int) -> torch.Tensor:
    """[n, b(b-1)/2] upper-triangle entries -> [n, b, b] skew-symmetric matrices."""
    rows, cols = torch.triu_indices(block, block, 1, device=upper.device)
    q = upper.new_zeros(upper.shape[0], block, block)
    q[:, rows, cols] = upper
    return q - q.transpose(-2, -1)


def cayley(q: torch.Tensor, neumann: bool, terms: int) -> torch.Tensor:
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if not neumann:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    if terms == 1:
        return eye.clone()
    r = eye + 2 * q
    if terms > 2:  # peft's series: 2Q² … 2Q^(k-2), then Q^(k-1) — and Q³ last when k is 3
        power = q @ q
        r = r + 2 * power
        for _ in range(3, terms - 1):
            power = power @ q
            r = r + 2 * power
        r = r + power @ q
    return r


def block_size_for(in_features: int, block_size: int, blocks: int) -> int:
    size = block_size if block_size else in_features // max(blocks, 1)
    if size < 1 or in_features % size:
        raise ValueError(f"oft: {in_features} input features do not split into blocks of {size}")
    return size


class RotationLinear(DeltaLayer):
    """y = s ⊙ (W Rᵀ x) + b, merged as W' = diag(s) · W · Rᵀ: OFT (s = 1) and BOFT share all but R.

    A subclass gives `rotate` (rows x ↦ x R, cast to the delta's dtype unless autocast is on), the
    dense `rotation` R for merging, and optionally `inverse` and a trained output scale s [out, 1].
    """

    def inverse(self, rot: torch.Tensor) -> torch.Tensor:
        return torch.linalg.inv(rot)

    def output_scale(self) -> torch.Tensor | None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        out = self.base_layer(self.rotate(x).to(x.dtype))
        scale, bias = self.output_scale(), self.base_layer.bias
        if scale is None:
            return out
        scale = scale.squeeze(-1)
        if bias is None:
            return (out * scale).to(out.dtype)
        return ((out - bias) * scale + bias).to(out.dtype)

    def _rotated(self, weight: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:  # W -> diag(s) W Rᵀ
        scale = self.output_scale()
        return weight @ rot.T if scale is None else scale * (weight @ rot.T)

    def _unrotated(self, weight: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:  # and back
        scale = self.output_scale()
        return (weight if scale is None else weight / scale) @ self.inverse(rot).T

    def delta_weight(self) -> torch.Tensor:
        weight, rot = self.base_layer.weight.float(), self.rotation()
        original = self._unrotated(weight, rot) if self.merged else weight
        return self._rotated(original, rot) - original

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            weight = self.base_layer.weight
            weight.copy_(self._rotated(weight.float(), self.rotation()).to(weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            weight = self.base_layer.weight
            weight.copy_(self._unrotated(weight.float(), self.rotation()).to(weight.dtype))
            self.merged = False


class OftLinear(RotationLinear):
    def __init__(self, base_layer: nn.Linear, block: int, neumann: bool, terms: int):
        super().__init__()
        self.base_layer = base_layer
        n = base_layer.in_features // block
        self.oft_R = nn.Parameter(
            torch.zeros(n, block * (block - 1) // 2, device=base_layer.weight.device, dtype=torch.float32)
        )
        self.block, self.neumann, self.terms = block, neumann, terms

    def rotations(self) -> torch.Tensor:
        """[n, b, b]: the blocks of R."""
        return cayley(skew(self.oft_R, self.block), self.neumann, self.terms)

    def rotation(self) -> torch.Tensor:
        return torch.block_diag(*self.rotations())

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.rotations()
        h = in_delta_dtype(x, blocks).unflatten(-1, (-1, self.block))
        return torch.einsum("...nk,nkc->...nc", h, blocks).flatten(-2)


@dataclass(frozen=True)
class Oft(Method):
    name = "oft"
    config_class = OftConfig
    family = "weight"
    peft_type = "OFT"
    dense_base = "its forward multiplies the base weight by the rotation"

    def wrap(self, module: nn.Module, cfg: OftConfig, path: str) -> DeltaLayer:
        linear = require_linear(module, self.name, path)
        block = block_size_for(linear.in_features, cfg.oft_block_size, cfg.oft_r)
        return OftLinear(linear, block, cfg.oft_cayley_neumann, cfg.oft_neumann_terms)

    def to_disk(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {PEFT_PREFIX + k + ".weight": v for k, v in state.items()}

    def from_disk(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.removeprefix(PEFT_PREFIX).removesuffix(".weight"): v for k, v in tensors.items()}

    def disk_config(self, cfg: OftConfig, paths: list[str], base_model: str | None) -> dict[str, Any]:
        return {
            "peft_type": "OFT",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": cfg.oft_r if not cfg.oft_block_size else 0,
            "oft_block_size": cfg.oft_block_size,
            "use_cayley_neumann": cfg.oft_cayley_neumann,
            "num_cayley_neumann_terms": cfg.oft_neumann_terms,
            "target_modules": sorted({p.rsplit(".", 1)[-1] for p in paths}),
            "module_dropout": 0.0,
            "coft": False,
            "eps": 6e-05,
            "block_share": False,
            "fan_in_fan_out": False,
            "bias": "none",
            "init_weights": True,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "inference_mode": True,
            # peft changed the Cayley-Neumann series in 0.18.0 and reads this key to tell the two apart
            "peft_version": PEFT_FORMAT_VERSION,
        }

    def config_from_disk(self, disk: dict[str, Any], tensors: dict[str, torch.Tensor]) -> OftConfig:
        unsupported = {"coft": False, "block_share": False, "fan_in_fan_out": False, "bias": "none"}
        for key, ok in unsupported.items():
            if disk.get(key, ok) != ok:
                raise ValueError(f"{key}={disk[key]!r} is not supported (expected {ok!r})")
        if disk.get("modules_to_save"):
            raise ValueError(f"modules_to_save={disk['modules_to_save']!r} is not supported")
        version = str(disk.get("peft_version", "0.0.0")).partition("@")[0]
        if disk.get("use_cayley_neumann") and tuple(int(x) for x in re.findall(r"\d+", version)[:2]) < (
            0,
            18,
        ):
            raise ValueError(
                f"written by peft {version}, whose Cayley-Neumann series predates peft 0.18.0; not supported"
            )
        paths = sorted(k.removesuffix(".oft_R") for k in tensors if k.endswith(".oft_R"))
        if not paths:
            raise ValueError("no oft_R weights found")
        # the block size is read from the weights, which also covers peft's silent per-layer adjustments
        sizes = {round((1 + math.sqrt(1 + 8 * tensors[f"{p}.oft_R"].shape[1])) / 2) for p in paths}
        if len(sizes) != 1:
            raise ValueError(f"layers use different OFT block sizes {sorted(sizes)}; not supported")
        return OftConfig(
            oft_block_size=sizes.pop(),
            oft_cayley_neumann=bool(disk.get("use_cayley_neumann", True)),
            oft_neumann_terms=int(disk.get("num_cayley_neumann_terms", 5)),
            target_modules="|".join(re.escape(p) for p in paths),
        )
