"""Input deltas: virtual tokens the real tokens attend to (the machinery prompt/prefix methods share).

Prompt tuning, prefix tuning and P-tuning v2 all end up as per-layer key/value states of T virtual
tokens placed before the input. Prefix methods train those states directly; prompt tuning trains
input embeddings, whose states come from running the frozen model over them. In a causal decoder
the states of a leading prompt do not depend on what follows, so running the prompt separately
(once, batch 1, then broadcast) and prepending its states gives exactly the logits of the
concatenated input that peft builds, with the virtual positions already cut off.

The states enter through a forward pre-hook on the decoder backbone (`model.base_model`), which
every call path goes through: the training loss (which calls the backbone directly), `model(...)`
and `model.generate`. The hook:

    - fills an empty (or absent) KV cache with the prefix and marks it, so later decoding steps of
      the same cache are recognised;
    - shifts explicit position ids by T (real tokens sit at T, T+1, …, as after a real prefix);
    - extends the attention mask: a 2D padding mask gets T leading ones, a 4D mask T leading
      "attend" columns; packed rows (restarting position ids, no mask) get an explicit block-diagonal
      mask in which every packed sample also sees the prefix.

The delta module wraps no base module (base_layer is None) and sits at `prompt_encoder`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from deltatune.deltas.base import DeltaLayer

ENCODER = "prompt_encoder"  # the delta's path in the model
DISK_KEY = "prompt_embeddings"  # peft's key for prompt and prefix tensors
_MARK = "deltatune_prefix"  # attribute set on a cache that holds our prefix
_FORWARD_ARGS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "past_key_values",
    "inputs_embeds",
    "use_cache",
)


def kv_geometry(config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def flat_to_layers(flat: torch.Tensor, config: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """peft's prefix layout [T, layers·2·kv_heads·head_dim] -> per layer (keys, values) [1, kv, T, hd]."""
    layers, kv_heads, head_dim = kv_geometry(config)
    states = flat.view(flat.shape[0], 2 * layers, kv_heads, head_dim).permute(1, 2, 0, 3)
    return [(states[2 * i][None], states[2 * i + 1][None]) for i in range(layers)]


def layers_to_flat(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Inverse of flat_to_layers (batch 1)."""
    states = torch.stack([s[0] for pair in kv for s in pair])  # [2·layers, kv, T, hd]
    return states.permute(2, 0, 1, 3).flatten(1)


def text_token_ids(model: nn.Module, text: str, tokenizer: str | None, n: int) -> torch.Tensor:
    """`n` token ids of `text`, repeated or cut to length as peft does."""
    from deltatune.models import load_tokenizer

    name = tokenizer or getattr(model, "name_or_path", "") or "default"
    tok = load_tokenizer(name)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"prompt_init_text {text!r} has no tokens")
    vocab = model.get_input_embeddings().num_embeddings
    if max(ids) >= vocab:
        raise ValueError(
            f"tokenizer {name!r} does not match the model (token id {max(ids)} >= vocab {vocab})"
        )
    return torch.tensor((ids * (n // len(ids) + 1))[:n])


def run_prefix(backbone: nn.Module, **inputs: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of a forward over some leading tokens, starting at position 0."""
    cache = DynamicCache(config=backbone.config)
    backbone(past_key_values=cache, use_cache=True, **inputs)
    return [(layer.keys, layer.values) for layer in cache.layers]


class PrefixDelta(DeltaLayer):
    """Delta state whose contribution is a key/value prefix; subclasses say how it is computed."""

    def __init__(self, num_virtual_tokens: int):
        super().__init__()
        self.base_layer = None
        self.num_virtual_tokens = num_virtual_tokens
        self._busy = False

    def prefix(self, backbone: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def install(self, backbone: nn.Module) -> None:
        self._hook = backbone.register_forward_pre_hook(self._inject, with_kwargs=True)

    def _inject(self, backbone: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.disabled or self._busy:
            return None
        kwargs = {**dict(zip(_FORWARD_ARGS[: len(args)], args, strict=True)), **kwargs}
        tokens = kwargs.get("input_ids")
        tokens = kwargs["inputs_embeds"] if tokens is None else tokens
        batch, length = tokens.shape[:2]
        n = self.num_virtual_tokens
        cache = kwargs.get("past_key_values")
        fresh = cache is None or (cache.get_seq_length() == 0 and not hasattr(cache, _MARK))
        if fresh:
            cache = DynamicCache(config=backbone.config) if cache is None else cache
            self._busy = True
            try:
                states = self.prefix(backbone)
            finally:
                self._busy = False
            dtype = _state_dtype(backbone, tokens.device)
            for i, (keys, values) in enumerate(states):
                cache.update(
                    keys.to(dtype).expand(batch, -1, -1, -1), values.to(dtype).expand(batch, -1, -1, -1), i
                )
            setattr(cache, _MARK, n)
            kwargs["past_key_values"] = cache
        elif getattr(cache, _MARK, None) != n:
            raise ValueError(
                f"{type(self).__name__}: past_key_values holds tokens but not this delta's prefix; "
                "start from an empty cache"
            )
        positions = kwargs.get("position_ids")
        if positions is not None:
            kwargs["position_ids"] = positions + n
        kwargs["attention_mask"] = _extend_mask(
            kwargs.get("attention_mask"), positions if fresh else None, batch, length, n, backbone.config
        )
        return (), kwargs


def _state_dtype(backbone: nn.Module, device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return backbone.get_input_embeddings().weight.dtype


def _extend_mask(
    mask: torch.Tensor | None, positions: torch.Tensor | None, batch: int, length: int, n: int, config: Any
) -> torch.Tensor | None:
    if mask is None:
        from transformers.masking_utils import find_packed_sequence_indices  # pulls in torch._dynamo: ~2 s

        packed = None if positions is None else find_packed_sequence_indices(positions.expand(batch, -1))
        if packed is None:
            return None  # plain causal attention already sees the whole prefix
        same = packed[:, :, None] == packed[:, None, :]
        causal = torch.ones(length, length, dtype=torch.bool, device=packed.device).tril()
        allowed = torch.cat(
            [torch.ones(batch, length, n, dtype=torch.bool, device=packed.device), same & causal], -1
        )
        return _as_attention_mask(allowed[:, None], config)
    if mask.ndim == 2:
        return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    if mask.ndim == 4:
        lead = (
            mask.new_ones(*mask.shape[:-1], n)
            if mask.dtype == torch.bool
            else mask.new_zeros(*mask.shape[:-1], n)
        )
        return torch.cat([lead, mask], dim=-1)
    raise ValueError(f"prefix methods cannot extend an attention mask of shape {tuple(mask.shape)}")


def _as_attention_mask(allowed: torch.Tensor, config: Any) -> torch.Tensor:
    """A boolean [B, 1, q, kv] mask in the form the configured attention implementation expects."""
    from deltatune.attention import NAME as PACKED  # its rows carry a prefix, so it falls back to SDPA

    impl = config._attn_implementation
    if impl in ("sdpa", PACKED):
        return allowed
    if impl == "eager":
        return (
            torch.zeros(allowed.shape)
            .masked_fill(~allowed, torch.finfo(torch.float32).min)
            .to(allowed.device)
        )
    raise ValueError(f"prefix methods with packed rows support sdpa and eager attention, not {impl!r}")
