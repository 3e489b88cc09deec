"""Attention over packed rows that costs what the samples cost, not what the rows cost.

A packed row of 512 tokens holding seven 70-token samples needs seven 70x70 causal blocks, but a
masked SDPA call computes the whole 512x512 square (on CPU it was ~40% of a LoRA training step).
Here the samples of a batch are gathered into a few buckets of similar length, each bucket runs
one plain causal SDPA call (no mask: right padding inside a sample is invisible to its real
queries under the causal rule), and the outputs are scattered back:

    rows [B, T] ──gather──► bucket 1 [S1, L1] ─┐
                            bucket 2 [S2, L2] ─┼─ causal SDPA each ──scatter──► [B, T]
                            ...               ─┘

The layout is computed once per forward from the restarted position_ids and handed down to every
layer through transformers' attention kwargs (`packed_layout=`). Without a layout (generation,
KV caches, prefix methods), the function is exactly transformers' SDPA attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "deltatune_packed"


@dataclass
class PackedLayout:
    buckets: list[tuple[torch.Tensor, torch.Tensor]]  # (gather index [S, L] into B*T+1, valid [S, L])
    inverse: torch.Tensor  # concatenated bucket outputs -> flat B*T order


def packed_layout(position_ids: torch.Tensor) -> PackedLayout:
    """Sample spans from restarted position ids, grouped into buckets of lengths within 2x."""
    b, t = position_ids.shape
    device = position_ids.device
    is_start = position_ids.reshape(-1) == 0
    is_start[torch.arange(0, b * t, t, device=device)] = True  # a row start is always a sample start
    starts = is_start.nonzero().squeeze(1)
    lengths = torch.diff(starts, append=torch.tensor([b * t], device=device))
    order = torch.argsort(lengths, descending=True, stable=True)
    starts, lengths = starts[order], lengths[order]
    sizes = lengths.tolist()
    buckets, pieces, first = [], [], 0
    while first < len(sizes):
        last = first
        while last + 1 < len(sizes) and 2 * sizes[last + 1] >= sizes[first]:
            last += 1
        span = torch.arange(sizes[first], device=device)
        valid = span[None, :] < lengths[first : last + 1, None]
        index = torch.where(valid, starts[first : last + 1, None] + span[None, :], b * t)  # b*t: a zero row
        buckets.append((index, valid))
        pieces.append(index[valid])
        first = last + 1
    return PackedLayout(buckets, torch.argsort(torch.cat(pieces)))


def packed_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_layout: PackedLayout | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if packed_layout is None or key.shape[-2] != query.shape[-2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    b, heads, t, dim = query.shape
    repeat = heads // key.shape[1]

    def flat(x: torch.Tensor) -> torch.Tensor:  # [B, h, T, D] -> [B*T + 1, h, D], last row zeros
        x = x.transpose(1, 2).reshape(b * t, x.shape[1], dim)
        return torch.cat([x, x.new_zeros(1, x.shape[1], dim)])

    q, k, v = flat(query), flat(key), flat(value)
    outputs = []
    for index, valid in packed_layout.buckets:
        kb, vb = k[index].transpose(1, 2), v[index].transpose(1, 2)
        if repeat > 1:
            kb, vb = kb.repeat_interleave(repeat, dim=1), vb.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(
            q[index].transpose(1, 2), kb, vb, is_causal=True, scale=scaling, dropout_p=dropout
        )
        outputs.append(out.transpose(1, 2)[valid])  # [real tokens, heads, D]
    out = torch.cat(outputs)[packed_layout.inverse]
    return out.view(b, t, heads, dim), None


AttentionInterface.register(NAME, packed_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_packed_attention(model: nn.Module) -> bool:
    """Switch an SDPA model to packed attention; other implementations (flash, eager) are kept."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return True
