"""decompress: turn a compressed delta directory back into something deltatune and transformers load.

One writer per layout (see `deltatune.compress.container` for the formats):

    lora_dense    -> dense delta directory (delta_model.safetensors + delta_config.json);
                     deltatune.load / eval / generate / export --merge use it; with `rank=r`,
                     a PEFT LoRA adapter instead, by SVD of each ΔW to rank r (the relative error
                     per module is recorded as "deltatune_report" in adapter_config.json), for
                     tools outside deltatune (peft, serving)
    lora_factors  -> PEFT adapter directory (adapter_config.json + adapter_model.safetensors);
                     load it with deltatune.load(base, adapter=dir) or peft
    model         -> full HF model directory: every base tensor, plus ΔW where one is stored, in
                     the fine-tuned dtype; config.json of the fine-tuned model, tokenizer and other
                     small files copied from the base directory. Plain transformers loads it.

The output directory appears in one rename, complete or not at all.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from deltatune.atomic import new_directory
from deltatune.compress.base import Fields
from deltatune.compress.container import (
    CompressionConfig,
    decoded,
    entry_dense,
    read_compressed,
)
from deltatune.deltas.base import PEFT_PREFIX
from deltatune.deltas.lora import truncate_dense
from deltatune.formats import MODEL_CONFIG, FormatError
from deltatune.formats.dense import write_dense_delta
from deltatune.formats.hf import SINGLE_NAME, ModelFiles, copy_side_files
from deltatune.formats.peft import write_adapter

Stored = dict[str, dict[str, Fields]]


def write_lora_dense(
    config: CompressionConfig, stored: Stored, src: Path, out: Path, base: str | None
) -> None:
    deltas = {
        name: entry_dense(entry, parts).to(entry.torch_dtype)
        for name, entry, parts in decoded(config, stored, src)
    }
    meta = {"base_model_name_or_path": base or config.base_model, "compressed_with": config.method}
    write_dense_delta(out, deltas, meta)


def write_lora_factors(
    config: CompressionConfig, stored: Stored, src: Path, out: Path, base: str | None
) -> None:
    tensors = {}
    for name, entry, parts in decoded(config, stored, src):
        dtype = entry.torch_dtype
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = parts["lora_A"].to(dtype)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = parts["lora_B"].to(dtype)
    write_adapter(out, _adapter_config(config, base), tensors)


def write_lora_svd(
    config: CompressionConfig, stored: Stored, src: Path, out: Path, base: str | None, rank: int
) -> None:
    """A dense-layout LoRA back to PEFT LoRA factors of `rank` (scale 1), by SVD of each ΔW."""
    tensors, errors = {}, {}
    for name, entry, parts in decoded(config, stored, src):
        a, b, errors[name] = truncate_dense(entry_dense(entry, parts), rank)
        module = name.removesuffix(".weight")
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.to(entry.torch_dtype)
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.to(entry.torch_dtype)
    adapter_config = _adapter_config(config, base)
    adapter_config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    adapter_config["deltatune_report"] = {"svd_rank": rank, "svd_relative_errors": errors}
    write_adapter(out, adapter_config, tensors)


def _adapter_config(config: CompressionConfig, base: str | None) -> dict:
    adapter_config = dict(config.adapter_config or {})
    if base is not None:
        adapter_config["base_model_name_or_path"] = base
    return adapter_config


def write_model(config: CompressionConfig, stored: Stored, src: Path, out: Path, base: str | None) -> None:
    from deltatune.models import resolve

    base_name = base or config.base_model
    if base_name is None:
        raise ValueError(f"{src}: no base model recorded; pass base=...")
    base_dir = resolve(base_name)
    files = ModelFiles(base_dir)
    missing = sorted(set(config.tensors) - set(files.tensors))
    if missing:
        raise FormatError(f"{base_dir}: base model has no tensor {missing[0]!r} (stored in {src})")
    with files.reader() as read:
        tensors = {name: read(name) for name in files.names()}
    for name, entry, parts in decoded(config, stored, src):
        weight = tensors[name]
        if list(weight.shape) != entry.shape:
            raise FormatError(
                f"{base_dir}: {name} has shape {list(weight.shape)}, the delta in {src} has {entry.shape}"
            )
        tensors[name] = (weight.float() + entry_dense(entry, parts)).to(entry.torch_dtype)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / SINGLE_NAME, metadata={"format": "pt"})
    copy_side_files(base_dir, out)
    (out / MODEL_CONFIG).write_text(json.dumps(config.hf_config, indent=2, sort_keys=True) + "\n")


WRITERS = {"lora_dense": write_lora_dense, "lora_factors": write_lora_factors, "model": write_model}


def decompress(
    src: str | Path,
    out: str | Path,
    *,
    base: str | Path | None = None,
    rank: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the decompressed form of the compressed delta `src` to the directory `out`.

    `base` overrides the base model recorded at compression time (needed for full models when
    the base directory moved; recorded as base_model_name_or_path for LoRA outputs). `rank` turns
    a LoRA compressed in the dense layout into a PEFT LoRA adapter of that rank (see above).
    """
    src, out = Path(src), Path(out)
    config, stored = read_compressed(src)
    if rank is not None and (rank < 1 or config.layout != "lora_dense"):
        why = (
            "must be >= 1"
            if rank < 1
            else f"applies to LoRA deltas in the dense layout, not {config.layout!r}"
        )
        raise ValueError(f"rank {rank} {why}")
    base_name = None if base is None else str(base)
    with new_directory(out, overwrite) as tmp:
        if rank is not None:
            write_lora_svd(config, stored, src, tmp, base_name, rank)
        else:
            WRITERS[config.layout](config, stored, src, tmp, base_name)
    return out
