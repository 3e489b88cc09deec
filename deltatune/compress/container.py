"""The on-disk formats of compressed and decompressed deltas, and loading them into a model.

A compressed delta is a directory:

    delta_compressed.safetensors   every stored field as a tensor, keyed "<name>::<part>::<field>"
    compression_config.json        `CompressionConfig`: format/version, method and its params, the
                                   layout, the base model reference, per-tensor entries (shape, dtype,
                                   parts and the codec of each), for LoRA inputs the PEFT
                                   adapter_config, for full models the fine-tuned config.json, and
                                   the compression report

`<name>` is the model parameter the delta adds to (`model.layers.0.mlp.up_proj.weight`), or, for
the `lora_factors` layout, the module path. Parts: `delta` (ΔW itself, layouts `lora_dense` and
`model`) or `lora_A` + `lora_B` (layout `lora_factors`, ΔW = lora_scale · B @ A). Fields are what
the part's codec wrote (see `deltatune.compress.base`). Nothing but tensors lives in the
safetensors file and nothing but metadata in the JSON, so sizes count honestly.

A decompressed LoRA delta in the `lora_dense` layout is a *dense delta* directory
(`deltatune.formats.dense`).

`load_delta_into(model, path)` adds either kind of directory to a loaded model's weights in place,
decoding compressed fields on the fly: this is how a compressed delta is used for inference.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ValidationError, field_validator
from safetensors.torch import save_file
from torch import nn

from deltatune.compress.base import Fields
from deltatune.compress.methods import get_codec
from deltatune.formats import COMPRESSED_CONFIG, COMPRESSED_WEIGHTS, DENSE_CONFIG, FormatError, read_json
from deltatune.formats.dense import load_safetensors, read_dense_delta
from deltatune.formats.peft import LoraFactors

FORMAT = "deltatune.compressed_delta"
SEP = "::"

Layout = Literal["lora_dense", "lora_factors", "model"]


class PartEntry(BaseModel):
    codec: str
    shape: list[int]


class TensorEntry(BaseModel):
    shape: list[int]  # of ΔW
    dtype: str  # of the source tensor; decompressed values are written in it
    parts: dict[str, PartEntry]
    lora_scale: float | None = None
    transposed: bool = False

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, name: str) -> str:
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"unknown dtype {name!r}")
        return name

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


class CompressionConfig(BaseModel):
    format: Literal["deltatune.compressed_delta"] = FORMAT
    version: Literal[1] = 1
    method: str
    params: dict[str, Any]
    layout: Layout
    base_model: str | None
    adapter_config: dict[str, Any] | None = None  # PEFT adapter_config.json of a LoRA input
    hf_config: dict[str, Any] | None = None  # config.json of the fine-tuned model
    tensors: dict[str, TensorEntry]
    report: dict[str, Any] | None = None


def field_key(name: str, part: str, field: str) -> str:
    return f"{name}{SEP}{part}{SEP}{field}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dense_from_parts(
    parts: dict[str, torch.Tensor], lora_scale: float | None = None, transposed: bool = False
) -> torch.Tensor:
    """ΔW from decoded parts: the delta itself, or lora_scale · B @ A."""
    if "delta" in parts:
        return parts["delta"]
    scale = 1.0 if lora_scale is None else lora_scale
    return LoraFactors(parts["lora_A"], parts["lora_B"], scale, transposed).dense()


def entry_dense(entry: TensorEntry, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    return dense_from_parts(parts, entry.lora_scale, entry.transposed)


# --- compressed directories -------------------------------------------------------------------------


def write_fields(directory: Path, fields: dict[str, torch.Tensor]) -> int:
    """Write the fields file into `directory` (made atomic by output_directory); returns its size."""
    path = directory / COMPRESSED_WEIGHTS
    save_file(
        {k: v.contiguous() for k, v in fields.items()}, path, metadata={"format": "pt", "deltatune": FORMAT}
    )
    return path.stat().st_size


def write_config(directory: Path, config: CompressionConfig) -> None:
    (directory / COMPRESSED_CONFIG).write_text(config.model_dump_json(indent=2) + "\n")


def read_compressed(path: Path) -> tuple[CompressionConfig, dict[str, dict[str, Fields]]]:
    """(config, fields by name then part) of a compressed directory; every problem names the file."""
    path = Path(path)
    if not path.is_dir():
        raise FormatError(f"compressed delta directory not found: {path}")
    config_file, weights_file = path / COMPRESSED_CONFIG, path / COMPRESSED_WEIGHTS
    try:
        config = CompressionConfig.model_validate(read_json(config_file))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise FormatError(f"{config_file}: {where}: {first['msg']}") from None
    stored: dict[str, dict[str, Fields]] = {}
    for key, value in load_safetensors(weights_file).items():
        name, part, field = (key.split(SEP) + ["", ""])[:3]
        if name not in config.tensors or part not in config.tensors[name].parts or not field:
            raise FormatError(f"{weights_file}: key {key!r} is not described in {config_file}")
        stored.setdefault(name, {}).setdefault(part, {})[field] = value
    for name, entry in config.tensors.items():
        for part in entry.parts:
            if part not in stored.get(name, {}):
                raise FormatError(f"{weights_file}: no fields for {name}{SEP}{part}")
    return config, stored


def decode_parts(
    entry: TensorEntry, parts: dict[str, Fields], name: str = "", where: Path | None = None
) -> dict[str, torch.Tensor]:
    """Decode every part of one tensor to fp32; a missing or malformed field names the tensor."""
    decoded = {}
    for part, spec in entry.parts.items():
        try:
            decoded[part] = get_codec(spec.codec).decode(parts[part], tuple(spec.shape))
        except (KeyError, ValueError, RuntimeError) as err:
            raise FormatError(
                f"{where or 'compressed delta'}: cannot decode {name}{SEP}{part} ({err})"
            ) from None
    return decoded


def decoded(
    config: CompressionConfig, stored: dict[str, dict[str, Fields]], path: Path
) -> Iterator[tuple[str, TensorEntry, dict[str, torch.Tensor]]]:
    """(name, entry, decoded fp32 parts) for each tensor of the compressed directory at `path`."""
    for name, entry in config.tensors.items():
        yield name, entry, decode_parts(entry, stored[name], name, Path(path) / COMPRESSED_WEIGHTS)


def compressed_lora(path: Path) -> dict[str, LoraFactors]:
    """The LoRA factors of a LoRA compressed in the `lora_factors` layout, decoded (for serving)."""
    config, stored = read_compressed(path)
    if config.layout != "lora_factors":
        raise FormatError(
            f"{Path(path) / COMPRESSED_CONFIG}: layout {config.layout!r} holds no LoRA factors; only LoRA "
            "compressed with lora_mode='factors' can be batched (or decompress with --rank R)"
        )
    scale = lambda entry: 1.0 if entry.lora_scale is None else entry.lora_scale  # noqa: E731
    return {
        name: LoraFactors(parts["lora_A"], parts["lora_B"], scale(entry), entry.transposed)
        for name, entry, parts in decoded(config, stored, path)
    }


# --- dense delta directories ----------------------------------------------------------------------------


def dense_deltas(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(parameter name, fp32 ΔW) from a compressed or a dense delta directory."""
    path = Path(path)
    if (path / COMPRESSED_CONFIG).is_file():
        for name, entry, parts in decoded(*read_compressed(path), path):
            param = f"{name}.weight" if "delta" not in parts else name
            yield param, entry_dense(entry, parts)
    elif (path / DENSE_CONFIG).is_file():
        yield from ((k, v.float()) for k, v in read_dense_delta(path)[1].items())
    else:
        raise FormatError(f"{path}: neither {COMPRESSED_CONFIG} nor {DENSE_CONFIG} found")


def _find_parameter(params: dict[str, nn.Parameter], name: str) -> nn.Parameter | None:
    """The parameter `name` refers to, also inside wrapped layers (deltatune / PEFT base_layer)."""
    module, _, leaf = name.rpartition(".")
    for candidate in (name, f"{module}.base_layer.{leaf}", f"base_model.model.{module}.base_layer.{leaf}"):
        if candidate in params:
            return params[candidate]
    return None


@torch.no_grad()
def load_delta_into(model: nn.Module, path: str | Path) -> list[str]:
    """Add the deltas at `path` (compressed or dense) to the model's weights in place.

    Addition happens in fp32 and is cast back to each weight's dtype. Returns the parameter names
    changed. A delta for a missing parameter, a wrong shape, or two deltas for one (tied) weight
    raise FormatError naming the key and the directory.
    """
    params = dict(model.named_parameters())
    seen: dict[int, str] = {}
    changed = []
    for name, delta in dense_deltas(Path(path)):
        param = _find_parameter(params, name)
        if param is None:
            raise FormatError(f"{path}: delta {name!r} matches no parameter of the model")
        if tuple(param.shape) != tuple(delta.shape):
            raise FormatError(
                f"{path}: delta {name!r} has shape {list(delta.shape)}, the model's is {list(param.shape)}"
            )
        if param.data_ptr() in seen:
            raise FormatError(f"{path}: deltas {seen[param.data_ptr()]!r} and {name!r} hit one tied weight")
        seen[param.data_ptr()] = name
        param.copy_((param.float() + delta.to(param.device)).to(param.dtype))
        changed.append(name)
    return changed
