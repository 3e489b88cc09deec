"""decompress: turn a compressed delta directory back into something deltatune and transformers load.

One writer per layout (see `deltatune.compress.container` for the formats):

    lora_dense    -> dense delta directory (delta_model.safetensors + delta_config.json);
                     load it with `load_delta_into(model, dir)`
    lora_factors  -> PEFT adapter directory (adapter_config.json + adapter_model.safetensors);
                     load it with deltatune.load(base, adapter=dir) or peft
    model         -> full HF model directory: every base tensor, plus ΔW where one is stored, in
                     the fine-tuned dtype; config.json of the fine-tuned model, tokenizer and other
                     small files copied from the base directory. Plain transformers loads it.

The output directory appears in one rename, complete or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from deltatune.compress.base import Fields
from deltatune.compress.checkpoints import (
    SINGLE_FILE,
    DeltaInputError,
    copy_model_extras,
    open_checkpoint,
    output_directory,
)
from deltatune.compress.container import (
    COMPRESSED_WEIGHTS,
    CompressionConfig,
    TensorEntry,
    decode_parts,
    entry_dense,
    read_compressed,
    write_dense_delta,
)
from deltatune.deltas.base import PEFT_PREFIX

Stored = dict[str, dict[str, Fields]]


def _decoded(
    config: CompressionConfig, stored: Stored, src: Path
) -> Iterator[tuple[str, TensorEntry, dict[str, torch.Tensor]]]:
    for name, entry in config.tensors.items():
        yield name, entry, decode_parts(entry, stored[name], name, src / COMPRESSED_WEIGHTS)


def write_lora_dense(
    config: CompressionConfig, stored: Stored, src: Path, out: Path, base: str | None
) -> None:
    deltas = {
        name: entry_dense(entry, parts).to(entry.torch_dtype)
        for name, entry, parts in _decoded(config, stored, src)
    }
    meta = {"base_model_name_or_path": base or config.base_model, "compressed_with": config.method}
    write_dense_delta(out, deltas, meta)


def write_lora_factors(
    config: CompressionConfig, stored: Stored, src: Path, out: Path, base: str | None
) -> None:
    tensors = {}
    for name, entry, parts in _decoded(config, stored, src):
        dtype = entry.torch_dtype
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = parts["lora_A"].to(dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = parts["lora_B"].to(dtype).contiguous()
    adapter_config = dict(config.adapter_config or {})
    if base is not None:
        adapter_config["base_model_name_or_path"] = base
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def write_model(config: CompressionConfig, stored: Stored, src: Path, out: Path, base: str | None) -> None:
    from deltatune.models import resolve

    base_name = base or config.base_model
    if base_name is None:
        raise ValueError(f"{src}: no base model recorded; pass base=...")
    base_dir = resolve(base_name)
    with open_checkpoint(base_dir) as reader:
        missing = sorted(set(config.tensors) - set(reader.files))
        if missing:
            raise DeltaInputError(f"{base_dir}: base model has no tensor {missing[0]!r} (stored in {src})")
        tensors = {name: reader.get(name) for name in reader.names()}
    for name, entry, parts in _decoded(config, stored, src):
        weight = tensors[name]
        if list(weight.shape) != entry.shape:
            raise DeltaInputError(
                f"{base_dir}: {name} has shape {list(weight.shape)}, the delta in {src} has {entry.shape}"
            )
        tensors[name] = (weight.float() + entry_dense(entry, parts)).to(entry.torch_dtype)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / SINGLE_FILE, metadata={"format": "pt"})
    copy_model_extras(base_dir, out)
    (out / "config.json").write_text(json.dumps(config.hf_config, indent=2, sort_keys=True) + "\n")


WRITERS: dict[str, Callable[[CompressionConfig, Stored, Path, Path, str | None], None]] = {
    "lora_dense": write_lora_dense,
    "lora_factors": write_lora_factors,
    "model": write_model,
}


def decompress(
    src: str | Path, out: str | Path, *, base: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Write the decompressed form of the compressed delta `src` to the directory `out`.

    `base` overrides the base model recorded at compression time (needed for full models when
    the base directory moved; recorded as base_model_name_or_path for LoRA outputs).
    """
    src, out = Path(src), Path(out)
    config, stored = read_compressed(src)
    with output_directory(out, overwrite) as tmp:
        WRITERS[config.layout](config, stored, src, tmp, None if base is None else str(base))
    return out
