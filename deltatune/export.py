"""Export: fold a delta into the base weights and write a plain HF model directory.

The merge runs in fp32 on a freshly loaded base, whatever precision training used, so the
exported weights carry no bf16 rounding of ΔW. The directory is written under a temp name and
renamed, so a crash never leaves a half-written model that looks complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from deltatune.deltas import merge_into_base
from deltatune.formats.peft import load_delta
from deltatune.models import load_model, load_tokenizer


def export_merged(base: str, adapter: str | os.PathLike, out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new output directory")
    model = load_model(base, dtype=torch.float32)
    merge_into_base(load_delta(model, adapter))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        load_tokenizer(base).save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
