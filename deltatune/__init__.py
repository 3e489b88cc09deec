"""deltatune: parameter-efficient fine-tuning and everything after it.

The public API is a handful of verbs over one object, the delta:

    model = deltatune.load("default", adapter="runs/x/adapter")   # a transformers model + delta
    model = deltatune.add_delta(model, "lora", lora_r=16)          # attach a fresh delta
    deltatune.train(config)                                        # the training loop
    deltatune.select("data.jsonl", "out.jsonl", budget=0.25)       # keep the records worth training on
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
__all__ = ["add_delta", "disable_delta", "load", "merge_delta", "save_delta", "select", "train"]

# Imported on first use, so `deltatune --help` and `import deltatune` do not pay for torch.
_LAZY = {
    "add_delta": "deltatune.deltas",
    "disable_delta": "deltatune.deltas",
    "save_delta": "deltatune.formats.peft",
}
# `deltatune.train(config)` and `deltatune.select(...)` are the train/ and select/ packages
# themselves, which are callable (see their docstrings).


def __getattr__(name: str) -> Any:
    import importlib

    if name in ("train", "select"):
        return importlib.import_module(f"deltatune.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deltatune' has no attribute {name!r}")


def load(
    base: str | os.PathLike | nn.Module | None = None,
    adapter: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    quantize: str = "none",
) -> PreTrainedModel:
    """A transformers model (name, directory or instance) with the delta at `adapter` applied.

    `adapter` is any delta deltatune writes: a PEFT adapter of any method (attached as a delta,
    so it can be merged, saved or disabled), or a dense or compressed delta directory (decoded
    and added to the base weights in fp32). `dtype` defaults to float32 for a model loaded here;
    an instance keeps its own. `quantize` ("nf4", "int8") stores the base's linear weights
    quantized (deltatune/quant/): a PEFT adapter is attached over them, as it was trained (QLoRA);
    a dense or compressed delta is added to the fp32 weights first, then the sum is quantized."""
    import torch
    from torch import nn

    from deltatune.formats import delta_kind
    from deltatune.quant import check_method, quantize_model

    kind = delta_kind(adapter) if adapter is not None else None
    peft_adapter = None
    if kind == "adapter":
        from deltatune.formats.peft import read_adapter

        peft_adapter = read_adapter(adapter)
    check_method(peft_adapter.method.name if peft_adapter else None, quantize)  # before loading weights
    # a dense or compressed delta is added into the full-precision weights: quantize after it
    now = quantize if kind in (None, "adapter") else "none"
    if isinstance(base, nn.Module):
        model = quantize_model(base, now)
    else:
        from deltatune.models import load_model

        model = load_model(base, dtype=dtype or torch.float32, device=device, quantize=now)
    if kind in ("dense", "compressed"):
        from deltatune.compress.container import load_delta_into

        load_delta_into(model, adapter)
        quantize_model(model, quantize)
    if peft_adapter is not None:
        from deltatune.formats.peft import load_delta

        load_delta(model, peft_adapter)
    if adapter is not None:
        model.to(device)
    return model.eval()


def merge_delta(model: nn.Module) -> nn.Module:
    """Fold the attached delta into the base weights; returns a plain transformers model.

    A quantized base is dequantized to fp32 first: the delta is merged into those weights, never
    into the quantized codes (which would round most of it away)."""
    from deltatune.deltas import merge_into_base
    from deltatune.quant import dequantize_model

    return merge_into_base(dequantize_model(model))
