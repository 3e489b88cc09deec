"""Routed deltas: a delta whose layers mix several sub-deltas per token, with router weights.

A routed delta is still a delta (deltas/base.py): it attaches with `add_delta`, saves with
`save_delta`, loads with `deltatune.load`, and can be disabled; but its `delta_weight()` is None,
because no single ΔW folds into the weights, so it cannot be merged.

    arrow.py    Arrow: route each token over a library of existing LoRA adapters, no training
    mixlora.py  MixLoRA / LoRAMoE: a trained mixture of LoRA experts on each MLP, with a router
"""

from __future__ import annotations

import deltatune.deltas  # noqa: F401  (the registry imports route.arrow: load it first, not halfway)
from deltatune.route.arrow import (
    Arrow,
    ArrowConfig,
    ArrowLinear,
    arrow_coefficients,
    gen_know_sub,
    top_right_singular_vector,
)
from deltatune.route.mixlora import MixLora, MixLoraConfig, MixLoraMLP, plot_router_load

__all__ = [
    "Arrow",
    "ArrowConfig",
    "ArrowLinear",
    "arrow_coefficients",
    "gen_know_sub",
    "top_right_singular_vector",
    "MixLora",
    "MixLoraConfig",
    "MixLoraMLP",
    "plot_router_load",
]
