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
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.deltas.base import DeltaConfig, require_linear
from deltatune.deltas.sparse import (
    SparseMethod,
    SparseTrainLayer,
)


class GraftConfig(DeltaConfig):
    # fraction of ΔW entries kept. 1% lost every skill in the method table: after a short dense
    # run ΔW is spread out (1% of entries held 6% of its energy); TIES keeps the top 20% of a
    # fine-tune by magnitude with little loss, so the default sits between
    graft_density: float = Field(0.1, gt=0, le=1)
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


@dataclass(frozen=True)
class Graft(SparseMethod):
    name = "graft"
    config_class = GraftConfig

    def wrap(self, module: nn.Module, cfg: GraftConfig, path: str) -> GraftLinear:
        return GraftLinear(require_linear(module, self.name, path))

    def density(self, cfg: GraftConfig) -> float:
        return cfg.graft_density

    def candidates(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.removesuffix(".graft_delta"): v for k, v in state.items() if k.endswith(".graft_delta")}
