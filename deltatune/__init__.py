"""deltatune: parameter-efficient fine-tuning and everything after it.

The public API is a handful of verbs over one object, the delta:

    model = deltatune.load("default", adapter="runs/x/adapter")   # a transformers model + delta
    model = deltatune.add_delta(model, "lora", lora_r=16)          # attach a fresh delta
    deltatune.train(config)                                        # the training loop
    deltatune.save_delta(model, "out/")                            # PEFT-format adapter dir
    plain = deltatune.merge_delta(model)                           # fold ΔW into the base weights
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deltatune.deltas import add_delta, merge_into_base
from deltatune.formats.peft import load_delta, save_delta

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__version__ = "0.1.0"
__all__ = ["add_delta", "load", "merge_delta", "save_delta", "train"]


def load(
    base: str | os.PathLike | nn.Module | None = None,
    adapter: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """A transformers model (name, directory or instance) with the adapter at `adapter` attached."""
    if isinstance(base, nn.Module):
        model = base
    else:
        from deltatune.models import load_model

        model = load_model(base, dtype=dtype, device=device)
    if adapter is not None:
        load_delta(model, adapter)
        model.to(device)
    return model.eval()


def merge_delta(model: nn.Module) -> nn.Module:
    """Fold the attached delta into the base weights; returns a plain transformers model."""
    return merge_into_base(model)


def train(config: Any) -> dict:
    """Run the training loop for a TrainConfig (or a dict of config keys); returns the summary."""
    from deltatune.training import run

    return run(config)
