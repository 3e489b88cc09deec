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

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel

__version__ = "0.1.0"
__all__ = ["add_delta", "disable_delta", "load", "merge_delta", "save_delta", "train"]

# Imported on first use, so `deltatune --help` and `import deltatune` do not pay for torch.
_LAZY = {
    "add_delta": "deltatune.deltas",
    "disable_delta": "deltatune.deltas",
    "save_delta": "deltatune.formats.peft",
}
# `deltatune.train(config)` is the train/ package itself, which is callable (see its docstring).


def __getattr__(name: str) -> Any:
    import importlib

    if name == "train":
        return importlib.import_module("deltatune.train")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deltatune' has no attribute {name!r}")


def load(
    base: str | os.PathLike | nn.Module | None = None,
    adapter: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """A transformers model (name, directory or instance) with the delta at `adapter` applied.

    `adapter` is any delta deltatune writes: a PEFT adapter of any method (attached as a delta,
    so it can be merged, saved or disabled), or a dense or compressed delta directory (decoded
    and added to the base weights in fp32). `dtype` defaults to float32 for a model loaded here;
    an instance keeps its own."""
    import torch
    from torch import nn

    from deltatune.formats import delta_kind

    if isinstance(base, nn.Module):
        model = base
    else:
        from deltatune.models import load_model

        model = load_model(base, dtype=dtype or torch.float32, device=device)
    if adapter is not None:
        if delta_kind(adapter) == "adapter":
            from deltatune.formats.peft import load_delta

            load_delta(model, adapter)
        else:
            from deltatune.compress.container import load_delta_into

            load_delta_into(model, adapter)
        model.to(device)
    return model.eval()


def merge_delta(model: nn.Module) -> nn.Module:
    """Fold the attached delta into the base weights; returns a plain transformers model."""
    from deltatune.deltas import merge_into_base

    return merge_into_base(model)
