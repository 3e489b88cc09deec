"""Export: fold a delta into the base weights and write a plain HF model directory.

The merge runs in fp32 on a freshly loaded base, whatever precision training used, so the
exported weights carry no bf16 rounding of ΔW. The directory is written under a temp name and
renamed, so a crash never leaves a half-written model that looks complete.

Deltas that change biases (BitFit, SSF) can give a bias to a linear layer the architecture
declares bias-free; transformers would silently drop it on reload. Llama-style configs have
`attention_bias` / `mlp_bias` switches: we turn the switch on and give the sibling layers zero
biases. Where no switch exists, export refuses rather than write a model that loads differently.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from deltatune import load
from deltatune.atomic import atomic_directory
from deltatune.deltas import merge_into_base
from deltatune.models import load_model, load_tokenizer


def export_merged(base: str, adapter: str | os.PathLike, out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new output directory")
    model = load(load_model(base, dtype=torch.float32), adapter)  # any delta kind deltatune writes
    if hasattr(model, "delta_method"):  # an attached delta; dense and compressed ones are added already
        merge_into_base(model)
    declare_new_biases(model)
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
