"""Prefix tuning and P-tuning v2: trained key/value states of T virtual tokens at every layer (input deltas).

Prefix tuning (Li & Liang 2021) trains the per-layer prefix P through a reparametrisation, which the
paper found necessary for stable training:

    P = P0 + MLP(E)          E: [T, hidden] trained,  MLP: hidden -> prefix_projection_hidden -> tanh -> P

and keeps only P after training. P0 is the key/value states of a real text's tokens (the paper's
"initialise with real words" finding), a fixed offset; the MLP's output layer starts at zero, so P
starts exactly there. P-tuning v2 (Liu et al. 2022, "deep prompt tuning") trains P directly, from
the same real-word start. Both are saved as peft's PREFIX_TUNING adapters: P flattened to
`prompt_embeddings` [T, layers·2·kv_heads·head_dim], `prefix_projection` true for prefix tuning
(peft's own saved form for a reparametrised prefix, which it loads without the MLP), false for
P-tuning v2. A loaded prefix-tuning adapter trains P directly (`prefix_projection_hidden: 0`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import nn

from deltatune.deltas.base import DeltaConfig, Method
from deltatune.deltas.prompt_tuning import DEFAULT_INIT_TEXT
from deltatune.deltas.prompts import (
    DISK_KEY,
    ENCODER,
    PrefixDelta,
    flat_to_layers,
    kv_geometry,
    layers_to_flat,
    run_prefix,
    text_token_ids,
)


class PtuningV2Config(DeltaConfig):
    num_virtual_tokens: int = Field(20, ge=1)
    prompt_init_text: str | None = DEFAULT_INIT_TEXT  # None: a small random prefix
    prompt_tokenizer: str | None = None


class PrefixTuningConfig(PtuningV2Config):
    prefix_projection_hidden: int = Field(512, ge=0)  # 0: no MLP, P trains directly


class Prefix(PrefixDelta):
    """P itself is the parameter (P-tuning v2, and any loaded prefix)."""

    def __init__(self, initial: torch.Tensor):
        super().__init__(initial.shape[0])
        self.prompt_embeddings = nn.Parameter(initial)

    def flat(self) -> torch.Tensor:
        return self.prompt_embeddings

    def prefix(self, backbone: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return flat_to_layers(self.flat(), backbone.config)


class ReparametrizedPrefix(Prefix):
    """P = P0 + MLP(E); only E and the MLP train."""

    def __init__(self, initial: torch.Tensor, embeddings: torch.Tensor, hidden: int):
        PrefixDelta.__init__(self, initial.shape[0])
        self.register_buffer("prefix_offset", initial)
        self.prefix_embedding = nn.Parameter(embeddings)
        width, device = embeddings.shape[1], embeddings.device
        self.prefix_mlp = nn.Sequential(
            nn.Linear(width, hidden, device=device),
            nn.Tanh(),
            nn.Linear(hidden, initial.shape[1], device=device),
        )
        nn.init.zeros_(self.prefix_mlp[2].weight)
        nn.init.zeros_(self.prefix_mlp[2].bias)

    def flat(self) -> torch.Tensor:
        return self.prefix_offset + self.prefix_mlp(self.prefix_embedding)


def reparametrized(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """P from a saved ReparametrizedPrefix state (the same function as its forward, on plain tensors)."""
    get = lambda name: state[f"{ENCODER}.{name}"]  # noqa: E731
    hidden = torch.tanh(get("prefix_embedding") @ get("prefix_mlp.0.weight").T + get("prefix_mlp.0.bias"))
    return get("prefix_offset") + hidden @ get("prefix_mlp.2.weight").T + get("prefix_mlp.2.bias")


def initial_prefix(model: nn.Module, cfg: PtuningV2Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(P0 [T, flat], token embeddings [T, hidden]) from the init text, or small random values."""
    n, embedding = cfg.num_virtual_tokens, model.get_input_embeddings()
    layers, kv_heads, head_dim = kv_geometry(model.config)
    device = embedding.weight.device
    if cfg.prompt_init_text is None:
        flat = torch.randn(n, 2 * layers * kv_heads * head_dim, device=device) * 0.02
        return flat, torch.randn(n, embedding.embedding_dim, device=device) * 0.02
    ids = text_token_ids(model, cfg.prompt_init_text, cfg.prompt_tokenizer, n).to(device)[None]
    with torch.no_grad():
        states = run_prefix(model.base_model, input_ids=ids)
        return layers_to_flat(states).float().clone(), embedding(ids)[0].float().clone()


def prefix_disk_config(cfg: PtuningV2Config, projection: bool, hidden: int, base_model: str | None) -> dict:
    return {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "num_transformer_submodules": 1,
        "prefix_projection": projection,
        "encoder_hidden_size": hidden,
        "inference_mode": True,
    }


def check_geometry(disk: dict[str, Any], flat: torch.Tensor) -> None:
    if disk.get("num_transformer_submodules", 1) != 1:
        raise ValueError("only decoder-only models (num_transformer_submodules 1) are supported")
    layers, heads, dim = disk.get("num_layers"), disk.get("num_attention_heads"), disk.get("token_dim")
    if None not in (layers, heads, dim) and flat.shape[1] != 2 * layers * dim:
        raise ValueError(f"{DISK_KEY} has width {flat.shape[1]}, the config says 2·{layers}·{dim}")


@dataclass(frozen=True)
class PtuningV2(Method):
    name = "ptuning_v2"
    config_class = PtuningV2Config
    family = "input"
    peft_type = "PREFIX_TUNING"
    projection = False

    def make(self, model: nn.Module, cfg: PtuningV2Config) -> Prefix:
        return Prefix(initial_prefix(model, cfg)[0])

    def attach(self, model: nn.Module, cfg: PtuningV2Config) -> list[str]:
        prefix = self.make(model, cfg)
        model.add_module(ENCODER, prefix)
        prefix.install(model.base_model)
        return [ENCODER]

    def claims(self, disk: dict[str, Any]) -> bool:
        return (
            disk.get("peft_type") == "PREFIX_TUNING"
            and bool(disk.get("prefix_projection")) == self.projection
        )

    def to_disk(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if f"{ENCODER}.prefix_mlp.0.weight" in state:
            return {DISK_KEY: reparametrized(state)}
        return {DISK_KEY: state[f"{ENCODER}.prompt_embeddings"]}

    def from_disk(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"{ENCODER}.{k}": v for k, v in tensors.items()}

    def disk_config(self, cfg: PtuningV2Config, paths: list[str], base_model: str | None) -> dict[str, Any]:
        return prefix_disk_config(cfg, False, 0, base_model)

    def config_from_disk(self, disk: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PtuningV2Config:
        key = f"{ENCODER}.{DISK_KEY}"
        if key not in tensors:
            raise ValueError(f"no {DISK_KEY} tensor found")
        check_geometry(disk, tensors[key])
        # the stored prefix replaces the initial one: skip the (tokenizer-dependent) text init
        return self.config_class(num_virtual_tokens=int(tensors[key].shape[0]), prompt_init_text=None)


@dataclass(frozen=True)
class PrefixTuning(PtuningV2):
    name = "prefix_tuning"
    config_class = PrefixTuningConfig
    projection = True

    def make(self, model: nn.Module, cfg: PrefixTuningConfig) -> Prefix:
        initial, embeddings = initial_prefix(model, cfg)
        if cfg.prefix_projection_hidden == 0:
            return Prefix(initial)
        return ReparametrizedPrefix(initial, embeddings, cfg.prefix_projection_hidden)

    def disk_config(
        self, cfg: PrefixTuningConfig, paths: list[str], base_model: str | None
    ) -> dict[str, Any]:
        return prefix_disk_config(cfg, True, cfg.prefix_projection_hidden, base_model)

    def config_from_disk(self, disk: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PrefixTuningConfig:
        cfg = super().config_from_disk(disk, tensors)
        return cfg.model_copy(update={"prefix_projection_hidden": 0})
