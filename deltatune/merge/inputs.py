"""What a merge combines: the config's models found on disk, and each tensor's method arguments.

Both executors (full models, tensor by tensor; adapters, module by module) share this: which input
is the base, whether the inputs are PEFT adapters, and how a tensor name turns into the keyword
arguments of the method's pure function (mergekit parameters resolved at the tensor's layer
position, the LiNeS scale, and DARE's per-tensor generator).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltatune.formats import ADAPTER_CONFIG, MODEL_CONFIG
from deltatune.formats.hf import token_indexed
from deltatune.merge.config import MergeConfig, ParameterResolver
from deltatune.merge.methods import lines_scale

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


@dataclass
class MergeReport:
    """What a merge produced; `svd_errors` is per module (relative Frobenius error) for adapter merges."""

    method: str
    out_dir: Path
    kind: str  # "model" or "adapter"
    tensors: int
    bytes_written: int
    seconds: float
    rank: int | None = None
    svd_errors: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeInputs:
    """The config's models resolved to local directories, with the base set apart."""

    base: Path | None
    models: list[Path]  # what the method combines: the base excluded when the method has one
    params: list[dict[str, Any]]  # per-model parameters, aligned with `models`
    names: list[str]  # as written in the config, for messages
    adapters: bool


def layer_index(name: str) -> int | None:
    """The block index in a tensor name such as `model.layers.12.mlp.up_proj.weight`."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def gradient_t(layer: int | None, num_layers: int) -> float:
    """mergekit's position for gradients: layer / (L - 1); 0 outside the layers; 1 for a single layer."""
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def seeded_generator(seed: int, tensor: str, model: int) -> torch.Generator:
    """A generator that depends only on (seed, tensor name, model index), not on thread scheduling."""
    digest = hashlib.sha256(f"{seed}\0{tensor}\0{model}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def torch_dtype(name: str | None) -> torch.dtype | None:
    return getattr(torch, name.removeprefix("torch.")) if name else None


def method_kwargs(
    cfg: MergeConfig, resolver: ParameterResolver, name: str, num_layers: int
) -> dict[str, Any]:
    """Keyword arguments of the method's function for tensor `name`."""
    layer = layer_index(name)
    kwargs = resolver.resolve(name, gradient_t(layer, num_layers))
    spec = cfg.spec
    if spec.task_vector:
        lines = cfg.lines
        kwargs["layer_scale"] = lines_scale(layer, num_layers, lines.alpha, lines.beta) if lines else 1.0
    if spec.random:
        kwargs["generator"] = lambda i: seeded_generator(cfg.seed, name, i)
    if spec.spectral:  # token rows are no linear map: they get the mean update (as fusion-bench's LLM code)
        kwargs["as_matrix"] = not token_indexed(name)
    return kwargs


def _resolve_path(cfg: MergeConfig, name: str, loc: Sequence[str | int]) -> Path:
    path = Path(name).expanduser()
    if (path / ADAPTER_CONFIG).is_file() or (path / MODEL_CONFIG).is_file():
        return path.resolve()
    from deltatune.models import resolve  # 'default', .gguf, hub ids; imports transformers, so only then

    try:
        return resolve(name).resolve()
    except FileNotFoundError as err:
        raise cfg.error(loc, str(err)) from None


def resolve_inputs(cfg: MergeConfig) -> MergeInputs:
    """Find every model on disk; check the kind of inputs, their count and their required parameters."""
    spec = cfg.spec
    base = _resolve_path(cfg, cfg.base_model, ["base_model"]) if cfg.base_model else None
    models, params, names, locs = [], [], [], []
    for i, entry in enumerate(cfg.models):
        path = _resolve_path(cfg, entry.model, ["models", i, "model"])
        if spec.needs_base and path == base:
            continue  # the base may be listed among the models, as mergekit configs often do
        models.append(path)
        params.append(entry.parameters or {})
        names.append(entry.model)
        locs.append(["models", i])
    kinds = [(m / ADAPTER_CONFIG).is_file() for m in models]
    if any(kinds) and not all(kinds):
        raise cfg.error(
            locs[kinds.index(not kinds[0])], "mixes PEFT adapters and full models; merge one kind at a time"
        )
    adapters = bool(kinds) and all(kinds)
    if not adapters and cfg.rank is not None:
        raise cfg.error(["rank"], "'rank' applies to adapter merges only")
    if not adapters and spec.needs_base and base is None:  # adapters are deltas already: no base needed
        raise cfg.error(["merge_method"], f"merge_method {cfg.merge_method} needs a base_model")
    if len(models) < spec.min_models or (spec.max_models is not None and len(models) > spec.max_models):
        wanted = (
            f"exactly {spec.min_models}"
            if spec.max_models == spec.min_models
            else f"at least {spec.min_models}"
        )
        raise cfg.error(
            ["models"], f"{cfg.merge_method} merges {wanted} model(s) besides the base; got {len(models)}"
        )
    global_params = cfg.parameters or {}
    for own, loc, name in zip(params, locs, names, strict=True):
        missing = [
            p.name for p in spec.params if p.per_model and p.required and p.name not in own | global_params
        ]
        if missing:
            raise cfg.error(
                loc, f"model {name} needs the parameter(s) {', '.join(missing)} for {cfg.merge_method}"
            )
    return MergeInputs(base, models, params, names, adapters)
