"""Grafting (skill localization): train a dense ΔW, then keep only its top fraction (sparse weight delta).

Panigrahi et al. (2023) find that a tiny "graft" of the fine-tuned parameters, pasted onto the
pre-trained model, recovers most of the fine-tune. Here the graft is the `graft_density` fraction of
all ΔW entries (globally, across layers) with the largest magnitude. Training updates the dense ΔW;
evaluation, merging and saving use the graft only. The report (adapter_config.json,
"deltatune_report") gives the fraction of entries kept and the score kept: the share of the summed
|ΔW| (and of its squared norm) that the graft retains. Stored as indices + values
(sparse.py, docs/formats.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.deltas.base import DeltaConfig, Method, require_linear
from deltatune.deltas.sparse import (
    SparseLoadedConfig,
    SparseTrainLayer,
    attach_loaded,
    attach_sparse,
    loaded_config,
    selector_report,
    sparse_disk_config,
    sparse_to_disk,
)


class GraftConfig(DeltaConfig):
    graft_density: float = Field(0.01, gt=0, le=1)  # fraction of ΔW entries kept
    target_modules: Literal["all-linear"] | list[str] | str = "all-linear"


class GraftLinear(SparseTrainLayer):
    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.graft_delta = nn.Parameter(torch.zeros(base_layer.weight.shape, device=base_layer.weight.device))

    def train_delta(self) -> torch.Tensor:
        return self.graft_delta

    def candidate(self) -> torch.Tensor:
        return self.graft_delta


def graft_candidates(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removesuffix(".graft_delta"): v for k, v in state.items() if k.endswith(".graft_delta")}


@dataclass(frozen=True)
class Graft(Method):
    name = "graft"
    config_class = GraftConfig

    def attach(self, model: nn.Module, cfg: GraftConfig | SparseLoadedConfig) -> list[str]:
        if isinstance(cfg, SparseLoadedConfig):
            return attach_loaded(model, cfg)
        paths = self.targets(model, cfg)
        if not paths:
            raise ValueError(f"method {self.name!r}: target_modules matched no module of the model")
        attach_sparse(
            model, paths, lambda m, p: GraftLinear(require_linear(m, self.name, p)), cfg.graft_density
        )
        return paths

    def to_disk(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return sparse_to_disk(state, graft_candidates)

    def disk_config(self, cfg: DeltaConfig, paths: list[str], base_model: str | None) -> dict[str, Any]:
        return sparse_disk_config(self.name, cfg, base_model)

    def config_from_disk(self, disk: dict[str, Any], tensors: dict[str, torch.Tensor]) -> SparseLoadedConfig:
        return loaded_config(tensors)

    def report(self, model: nn.Module) -> dict[str, Any]:
        return selector_report(model)
