"""Export: fold a delta into the base weights and write a plain HF model directory.

The merge runs in fp32 on a freshly loaded base, whatever precision training used, so the
exported weights carry no bf16 rounding of ΔW. The directory is written under a temp name and
renamed, so a crash never leaves a half-written model that looks complete.

Deltas that change biases (BitFit, SSF) can give a bias to a linear layer the architecture
declares bias-free; transformers would silently drop it on reload. Llama-style configs have
`attention_bias` / `mlp_bias` switches: we turn the switch on and give the sibling layers zero
biases. Where no switch exists, export refuses rather than write a model that loads differently.

Over a quantized base (`quantize="nf4"` / `"int8"`, what the adapter was trained over) the base is
quantized exactly as training quantized it, dequantized to fp32, and the delta merged into those
weights in fp32, never into the codes. `export_gguf` writes the merged model as one GGUF file for
llama.cpp (formats/gguf.py), checking the type and the architecture before loading anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from deltatune import load
from deltatune.atomic import atomic_directory, check_writable
from deltatune.deltas import merge_into_base
from deltatune.formats import MODEL_CONFIG, delta_kind, read_json
from deltatune.formats.gguf import check_architecture, check_gguf_type, read_tokenizer_pre, write_gguf
from deltatune.formats.peft import read_adapter
from deltatune.models import load_model, load_tokenizer, resolve, source_gguf
from deltatune.quant import check_method, dequantize_model


def merged_model(base: str, adapter: str | os.PathLike | None, quantize: str = "none") -> nn.Module:
    """The base with the delta folded in, in fp32 (see the module docstring for a quantized base)."""
    peft_adapter = read_adapter(adapter) if adapter is not None and delta_kind(adapter) == "adapter" else None
    check_method(peft_adapter.method.name if peft_adapter else None, quantize)
    model = dequantize_model(load_model(base, dtype=torch.float32, quantize=quantize))
    if adapter is not None:
        model = load(model, adapter)  # any delta kind deltatune writes
    if hasattr(model, "delta_method"):  # an attached delta; dense and compressed ones are added already
        merge_into_base(model)
    declare_new_biases(model)
    return model


def export_gguf(
    base: str,
    adapter: str | os.PathLike | None,
    out: str | os.PathLike,
    gguf_type: str = "f16",
    quantize: str = "none",
) -> Path:
    """Merge (when an adapter is given) and write one GGUF file at `out` (a path ending in .gguf)."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise ValueError(f"--format gguf writes one file: {out} must end in .gguf")
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new output file")
    check_writable(out.parent, out)  # before the model is loaded
    check_gguf_type(gguf_type)
    config = read_json(resolve(base) / MODEL_CONFIG)
    check_architecture(config.get("model_type"), f"base model {base}")
    model = merged_model(base, adapter, quantize)
    source = source_gguf(base)
    pre = read_tokenizer_pre(source) if source is not None else None
    return write_gguf(model, load_tokenizer(base), out, gguf_type, tokenizer_pre=pre)


def export_merged(
    base: str, adapter: str | os.PathLike, out: str | os.PathLike, quantize: str = "none"
) -> Path:
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new output directory")
    check_writable(out.parent, out)  # before the model is loaded
    model = merged_model(base, adapter, quantize)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        load_tokenizer(base).save_pretrained(tmp)
    return out


BIAS_SWITCHES = {"self_attn": "attention_bias", "mlp": "mlp_bias"}  # block name -> config flag


def declare_new_biases(model: nn.Module) -> None:
    """Make biases added by a merge survive save_pretrained + from_pretrained (see module docstring)."""
    config = model.config
    for block, flag in BIAS_SWITCHES.items():
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and f".{block}." in n}
        if not any(m.bias is not None for m in linears.values()) or getattr(config, flag, True):
            continue
        if not hasattr(config, flag):
            raise ValueError(
                f"the merged delta adds biases to {block} layers, which {type(model).__name__} cannot store"
            )
        setattr(config, flag, True)
        for m in linears.values():
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype))
    untouched = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.bias is not None and not any(f".{b}." in n for b in BIAS_SWITCHES)
    ]
    if untouched and not getattr(config, "bias", False):
        raise ValueError(
            f"the merged delta adds a bias to {untouched[0]}, which this architecture cannot store"
        )
