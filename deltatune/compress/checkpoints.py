"""The edges: reading HF model directories and PEFT LoRA adapters, writing directories atomically.

Model directories hold `model.safetensors` or shards listed in `model.safetensors.index.json`;
tensors are read one at a time through memory-mapped `safe_open` handles, so comparing two
checkpoints never holds both in memory. Only safetensors is read, never pickle. Every bad input
raises `DeltaInputError` naming the file (and key) at fault.

A LoRA adapter becomes a list of `LoraModule`s: the factors A [r, in], B [out, r] and the scale
alpha / r (alpha / sqrt(r) with rsLoRA; per-module alpha from PEFT's `alpha_pattern`), so that
ΔW = scale · B @ A (transposed for `fan_in_fan_out` layers such as GPT-2's Conv1D).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from deltatune.atomic import atomic_directory
from deltatune.deltas.base import PEFT_PREFIX
from deltatune.deltas.lora import lora_scale
from deltatune.formats.peft import read_adapter

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


class DeltaInputError(ValueError):
    """An input file is missing, corrupt or inconsistent; the message names the file."""


# --- model directories ----------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    """Parsed JSON; a missing file or a syntax error names the file (and line)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DeltaInputError(f"{path}: missing") from None
    except json.JSONDecodeError as err:
        raise DeltaInputError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None


def _safetensors_keys(path: Path) -> list[str]:
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as err:
        raise DeltaInputError(f"{path}: not a valid safetensors file ({err})") from None


def tensor_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for a single-file or sharded checkpoint."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DeltaInputError(f"model directory not found: {model_dir}")
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise DeltaInputError(f"{index}: no 'weight_map'")
        files = {name: model_dir / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise DeltaInputError(f"{shard}: missing (listed in {index})")
        return files
    single = model_dir / SINGLE_FILE
    if not single.is_file():
        raise DeltaInputError(
            f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors weights are read, never pickle)"
        )
    return dict.fromkeys(_safetensors_keys(single), single)


class TensorReader:
    """Reads named tensors from a checkpoint's files, opening each file once."""

    def __init__(self, files: dict[str, Path], stack: ExitStack):
        self.files = files
        self._stack = stack
        self._handles: dict[Path, Any] = {}

    def names(self) -> list[str]:
        return sorted(self.files)

    def get(self, name: str) -> torch.Tensor:
        path = self.files[name]
        try:
            if path not in self._handles:
                self._handles[path] = self._stack.enter_context(safe_open(path, framework="pt"))
            return self._handles[path].get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise DeltaInputError(f"{path}: cannot read tensor {name!r} ({err})") from None


@contextmanager
def open_checkpoint(model_dir: Path) -> Iterator[TensorReader]:
    files = tensor_files(model_dir)
    with ExitStack() as stack:
        yield TensorReader(files, stack)


def check_same_tensors(base: TensorReader, finetuned: TensorReader, base_dir: Path, ft_dir: Path) -> None:
    """Base and fine-tuned checkpoints must hold the same tensor names."""
    only_ft = sorted(set(finetuned.files) - set(base.files))
    only_base = sorted(set(base.files) - set(finetuned.files))
    if only_ft:
        raise DeltaInputError(f"{ft_dir}: tensor {only_ft[0]!r} is not in the base model {base_dir}")
    if only_base:
        raise DeltaInputError(f"{ft_dir}: tensor {only_base[0]!r} of the base model {base_dir} is missing")


def copy_model_extras(src: Path, dst: Path, skip: tuple[str, ...] = ("config.json",)) -> None:
    """Copy tokenizer, generation config and other small files; never weights."""
    for item in sorted(Path(src).iterdir()):
        if (
            item.is_file()
            and item.name not in skip
            and not item.name.endswith(WEIGHT_SUFFIXES + (".index.json",))
        ):
            shutil.copy2(item, dst / item.name)


# --- LoRA adapters ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraModule:
    path: str  # module path in the model, e.g. model.layers.0.self_attn.q_proj
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float
    transposed: bool = False  # fan_in_fan_out: the base weight is [in, out]

    @property
    def param_name(self) -> str:
        return f"{self.path}.weight"

    def dense(self) -> torch.Tensor:
        return lora_dense(self.a, self.b, self.scale, self.transposed)


def lora_dense(a: torch.Tensor, b: torch.Tensor, scale: float, transposed: bool = False) -> torch.Tensor:
    """ΔW = scale · B @ A in fp32 (transposed for fan_in_fan_out layers)."""
    delta = (b.float() @ a.float()) * scale
    return delta.T if transposed else delta


def _alpha_for(path: str, config: dict[str, Any]) -> float:
    """PEFT's alpha_pattern lookup: a key is a regex matching a module path suffix."""
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return float(value)
    return float(config.get("lora_alpha", 8))


def read_lora(adapter_dir: Path) -> tuple[dict[str, Any], list[LoraModule]]:
    """(adapter_config, modules) of a PEFT LoRA adapter directory."""
    adapter_dir = Path(adapter_dir)
    config, tensors = read_adapter(adapter_dir)
    config_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if config.get("peft_type") != "LORA":
        raise DeltaInputError(f"{config_file}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise DeltaInputError(
            f"{config_file}: DoRA adapters are not supported (the magnitude is not a delta)"
        )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise DeltaInputError(f"{weights_file}: key {key!r} is not a LoRA factor (lora_A / lora_B)")
        pairs.setdefault(match.group(1), {})[match.group(2)] = value
    if not pairs:
        raise DeltaInputError(f"{weights_file}: no LoRA weights")
    modules = []
    for path, factors in sorted(pairs.items()):
        if set(factors) != {"A", "B"}:
            missing = "lora_B" if "A" in factors else "lora_A"
            raise DeltaInputError(f"{weights_file}: {path} has no {missing}.weight")
        a, b = factors["A"], factors["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise DeltaInputError(
                f"{weights_file}: {path}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not chain"
            )
        r = a.shape[0]
        scale = lora_scale(r, _alpha_for(path, config), bool(config.get("use_rslora", False)))
        modules.append(LoraModule(path, a, b, scale, bool(config.get("fan_in_fan_out", False))))
    return config, modules


# --- atomic output ------------------------------------------------------------------------------------


def output_directory(out: Path, overwrite: bool = False) -> AbstractContextManager[Path]:
    """`atomic_directory(out)`, refused if `out` holds something and `overwrite` is not set."""
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty (pass overwrite=True to replace it)")
    return atomic_directory(out)
