"""Diff pruning: a sparse ΔW = z ⊙ w with a learned mask z (sparse weight delta).

Guo et al. (2021) learn the mask with the hard-concrete relaxation of the L0 norm (Louizos et al.
2018): per entry a logit α, a stretched, clamped sigmoid sample z ∈ [0, 1] while training, and the
penalty λ · Σ P(z ≠ 0) = λ · Σ σ(α − β·log(−γ/ζ)) pushing entries off. At evaluation z is
deterministic (clamp(σ(α)(ζ − γ) + γ, 0, 1)), and, as in the paper, the result is magnitude-projected
to at most `diff_density` of all entries (globally) before it is used or saved.

The penalty's gradient is added inside the layer's backward (an identity op on the sampled ΔW that
contributes λ·∂penalty/∂α), so the training loop needs no extra loss term; with gradient
accumulation it is counted once per micro-batch. β = 2/3, γ = −0.1, ζ = 1.1 as in Louizos et al.;
α starts at 5 (z ≈ 1 everywhere), w at 0. The report gives the L0 density before the projection
(`nonzero_fraction`) and what the projection kept. Stored as indices + values (sparse.py).
"""

from __future__ import annotations

import math
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

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1
L0_SHIFT = BETA * math.log(-GAMMA / ZETA)


class DiffPruningConfig(DeltaConfig):
    diff_density: float = Field(0.005, gt=0, le=1)  # at most this fraction of ΔW entries is kept
    diff_l0_weight: float = Field(1.25e-7, ge=0)  # λ of the expected-L0 penalty (the paper's value)
    diff_init_logit: float = 5.0
    target_modules: Literal["all-linear"] | list[str] | str = "all-linear"


def hard_concrete_sample(logits: torch.Tensor) -> torch.Tensor:
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + logits) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def hard_concrete_mean(logits: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(logits) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def expected_l0(logits: torch.Tensor) -> torch.Tensor:
    """P(z ≠ 0) per entry."""
    return torch.sigmoid(logits - L0_SHIFT)


class _AddL0Gradient(torch.autograd.Function):
    """Identity on `delta`; in the backward, adds weight · ∂Σ P(z ≠ 0)/∂α to α's gradient."""

    @staticmethod
    def forward(ctx, delta: torch.Tensor, logits: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.save_for_backward(logits)
        ctx.weight = weight
        return delta.view_as(delta)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (logits,) = ctx.saved_tensors
        p = expected_l0(logits)
        return grad, ctx.weight * p * (1 - p), None


class DiffPruningLinear(SparseTrainLayer):
    def __init__(self, base_layer: nn.Linear, init_logit: float, l0_weight: float):
        super().__init__()
        self.base_layer = base_layer
        shape, device = base_layer.weight.shape, base_layer.weight.device
        self.diff_weight = nn.Parameter(torch.zeros(shape, device=device))
        self.diff_logits = nn.Parameter(torch.full(shape, init_logit, device=device))
        self.l0_weight = l0_weight

    def train_delta(self) -> torch.Tensor:
        delta = hard_concrete_sample(self.diff_logits) * self.diff_weight
        if self.l0_weight and torch.is_grad_enabled():
            return _AddL0Gradient.apply(delta, self.diff_logits, self.l0_weight)
        return delta

    def candidate(self) -> torch.Tensor:
        return hard_concrete_mean(self.diff_logits) * self.diff_weight


@dataclass(frozen=True)
class DiffPruning(SparseMethod):
    name = "diff_pruning"
    config_class = DiffPruningConfig

    def wrap(self, module: nn.Module, cfg: DiffPruningConfig, path: str) -> DiffPruningLinear:
        return DiffPruningLinear(
            require_linear(module, self.name, path), cfg.diff_init_logit, cfg.diff_l0_weight
        )

    def density(self, cfg: DiffPruningConfig) -> float:
        return cfg.diff_density

    def candidates(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            k.removesuffix(".diff_weight"): hard_concrete_mean(
                state[k.replace(".diff_weight", ".diff_logits")]
            )
            * v
            for k, v in state.items()
            if k.endswith(".diff_weight")
        }
