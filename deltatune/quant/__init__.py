"""Quantized frozen bases: train a delta over NF4 or int8 base weights (QLoRA-style), and undo it.

    quantize_model(model, "nf4")   every linear layer but the output head becomes an Nf4Linear /
                                   Int8Linear (quant/linear.py says how, and why bitsandbytes)
    dequantize_model(model)        back to plain nn.Linear with the dequantized weights in fp32:
                                   what export merges into (never into the codes)
    check_method(method, "nf4")    refuses a method whose forward or initialisation needs the dense
                                   base weight (`Method.dense_base` says why), naming the method

The output head stays dense (QLoRA and transformers' bitsandbytes loader do the same): with tied
embeddings it is the embedding matrix, which is looked up, not multiplied. Embeddings and norms keep
the model's dtype.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from deltatune.quant.linear import (
    FORMATS,
    Int8Linear,
    Nf4Linear,
    QuantizedLinear,
    QuantizedWeightError,
)

QUANTIZE_CHOICES = ("none", "nf4", "int8")
Quantize = Literal["none", "nf4", "int8"]

__all__ = [
    "QUANTIZE_CHOICES",
    "Int8Linear",
    "Nf4Linear",
    "QuantizedLinear",
    "QuantizedWeightError",
    "base_weight_bytes",
    "check_method",
    "dequantize_model",
    "is_quantized",
    "parameter_count",
    "quantize_model",
]


def _validate(quantize: str) -> None:
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize: unknown value {quantize!r}; valid: {', '.join(QUANTIZE_CHOICES)}")


def check_method(method: str | None, quantize: str) -> None:
    """Raise ValueError naming the method when it cannot run over a `quantize` base (None: only
    check the `quantize` value)."""
    from deltatune.deltas import get_method

    _validate(quantize)
    why = get_method(method).dense_base if method is not None else ""
    if quantize != "none" and why:
        raise ValueError(
            f"quantize: {quantize!r} cannot be used with method {method!r}: {why}, so it needs the "
            "dense base weight; use quantize: none, or a method whose forward only calls the base "
            "layer (lora, vera, loha, lokr, ia3, ...)"
        )


def _output_layers(model: nn.Module) -> set[int]:
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if get_out else None
    return set() if out is None else {id(out)}


@torch.no_grad()
def quantize_model(model: nn.Module, quantize: str) -> nn.Module:
    """Replace every nn.Linear but the output head by its quantized version, in place; each dense
    weight is freed as soon as its layer is quantized. `quantize="none"` returns the model as is."""
    _validate(quantize)
    if quantize == "none":
        return model
    if is_quantized(model):
        raise ValueError("the model is quantized already")
    if hasattr(model, "delta_method"):
        raise ValueError("quantize the base before attaching a delta (its own layers stay in full precision)")
    skip = _output_layers(model)
    paths = [
        n for n, m in model.named_modules() if type(m) is nn.Linear and id(m) not in skip and m.weight.numel()
    ]
    for path in paths:
        layer = FORMATS[quantize](model.get_submodule(path))
        layer.layer_name = f"{path} ({quantize})"
        model.set_submodule(path, layer)
    model.quantization = quantize
    return model


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Put plain nn.Linear layers back, holding the dequantized weights (in `dtype`), in place."""
    for path, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]:
        device = layer.codes.device
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=device)
        dense.weight = nn.Parameter(layer.dequantize(dtype), requires_grad=False)
        if layer.bias is not None:
            dense.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
        model.set_submodule(path, dense)
    if hasattr(model, "quantization"):
        del model.quantization
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def parameter_count(model: nn.Module) -> int:
    """Parameters of the model, counting each quantized weight as the dense one it stands for."""
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    return sum(p.numel() for p in model.parameters()) + quantized


def base_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of a base model (before a delta is attached): `linear` = the weights of every linear
    layer but the output head (quantized ones as stored), `total` = that plus every other parameter
    (embeddings, norms, biases), each tied tensor once."""
    skip = _output_layers(model)
    dense = [m.weight for m in model.modules() if type(m) is nn.Linear and id(m) not in skip]
    quantized = sum(m.quantized_bytes() for m in model.modules() if isinstance(m, QuantizedLinear))
    linear = quantized + sum(w.numel() * w.element_size() for w in dense)
    counted = {id(w) for w in dense}
    other = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in counted)
    return {"linear": linear, "total": linear + other}
