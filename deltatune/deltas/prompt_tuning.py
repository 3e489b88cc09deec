"""Prompt tuning: a trained soft prompt of T input embeddings before every input (input delta).

Lester et al. (2021): only the T prompt embeddings train. Initialising them with the embeddings of
a real text (repeated or cut to T tokens) trains much better than random vectors; that is the
default here, with a generic instruction as the text. The prompt's key/value states are computed by
running the frozen model over it (prompts.py explains why that equals concatenating it to the
input). Saved exactly as peft's PROMPT_TUNING adapters: one `prompt_embeddings` [T, hidden].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.deltas.base import DeltaConfig, Method
from deltatune.deltas.prompts import DISK_KEY, ENCODER, PrefixDelta, run_prefix, text_token_ids

DEFAULT_INIT_TEXT = "Read the task carefully and answer with the exact result only."


class PromptTuningConfig(DeltaConfig):
    num_virtual_tokens: int = Field(20, ge=1)
    prompt_init: Literal["text", "vocab", "random"] = "text"  # vocab: embeddings of random tokens
    prompt_init_text: str = DEFAULT_INIT_TEXT  # text whose tokens initialise the virtual tokens
    prompt_tokenizer: str | None = None  # default: the model's own, else deltatune's default one


class SoftPrompt(PrefixDelta):
    def __init__(self, embeddings: torch.Tensor):
        super().__init__(embeddings.shape[0])
        self.prompt_embeddings = nn.Parameter(embeddings)

    def prefix(self, backbone: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        embeds = self.prompt_embeddings[None].to(backbone.get_input_embeddings().weight.dtype)
        return run_prefix(backbone, inputs_embeds=embeds)


def initial_prompt(model: nn.Module, cfg: PromptTuningConfig) -> torch.Tensor:
    embedding = model.get_input_embeddings()
    n = cfg.num_virtual_tokens
    if cfg.prompt_init == "random":  # peft's RANDOM: nn.Embedding's N(0, 1) init
        return torch.randn(n, embedding.embedding_dim, device=embedding.weight.device)
    if cfg.prompt_init == "vocab":
        ids = torch.randint(0, embedding.num_embeddings, (n,))
    else:
        ids = text_token_ids(model, cfg.prompt_init_text, cfg.prompt_tokenizer, n)
    with torch.no_grad():
        return embedding(ids.to(embedding.weight.device)).float().clone()


@dataclass(frozen=True)
class PromptTuning(Method):
    name = "prompt_tuning"
    config_class = PromptTuningConfig
    family = "input"
    peft_type = "PROMPT_TUNING"

    def attach(self, model: nn.Module, cfg: PromptTuningConfig) -> list[str]:
        prompt = SoftPrompt(initial_prompt(model, cfg))
        model.add_module(ENCODER, prompt)
        prompt.install(model.base_model)
        return [ENCODER]

    def to_disk(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {DISK_KEY: state[f"{ENCODER}.prompt_embeddings"]}

    def from_disk(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"{ENCODER}.{k}": v for k, v in tensors.items()}

    def disk_config(
        self, cfg: PromptTuningConfig, paths: list[str], base_model: str | None
    ) -> dict[str, Any]:
        text = cfg.prompt_init == "text"
        return {
            "peft_type": "PROMPT_TUNING",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "num_virtual_tokens": cfg.num_virtual_tokens,
            "num_transformer_submodules": 1,
            "prompt_tuning_init": {"text": "TEXT", "vocab": "SAMPLE_VOCAB", "random": "RANDOM"}[
                cfg.prompt_init
            ],
            "prompt_tuning_init_text": cfg.prompt_init_text if text else None,
            # peft only reads the tokenizer to initialise a new prompt, never to load one
            "tokenizer_name_or_path": (cfg.prompt_tokenizer or base_model or "default") if text else None,
            "inference_mode": True,
        }

    def config_from_disk(self, disk: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PromptTuningConfig:
        if disk.get("num_transformer_submodules", 1) != 1:
            raise ValueError("only decoder-only models (num_transformer_submodules 1) are supported")
        key = f"{ENCODER}.{DISK_KEY}"
        if key not in tensors:
            raise ValueError(f"no {DISK_KEY} tensor found")
        # the stored embeddings replace the initial ones: skip the (tokenizer-dependent) text init
        return PromptTuningConfig(num_virtual_tokens=int(tensors[key].shape[0]), prompt_init="random")
