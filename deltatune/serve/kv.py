"""The running batch's KV cache: one left-padded transformers `DynamicCache` plus a 2-D mask.

Rows of a continuous batch have different lengths. transformers 5 masks from a 2-D attention mask
whose width equals the cache length, and takes RoPE positions from `position_ids`, so a left-padded
batch works as is:

    cache keys/values  [rows, kv_heads, width, head_dim]   row i's tokens in its last len_i columns
    mask               [rows, width]                       1 where a real token sits
    positions          [rows]                              len_i: the next token's RoPE position

A decode step feeds one token per row with `mask + [1]` and `positions`; the cache appends one
column for every row. A joining group (prefilled on its own, also left-padded) is merged by
left-padding whichever side is narrower and concatenating along rows; leaving rows are dropped by
indexing, then the columns that are padding for every remaining row are cut from the left. Pad
columns are masked, so their contents never reach a real token. Only full-attention layers
(`DynamicLayer`) are supported: a sliding-window cache would drop different columns per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def check_cache(cache: DynamicCache) -> None:
    bad = next((type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer), None)
    if bad is not None:
        raise ValueError(f"the serving engine supports full-attention caches only; this model uses {bad}")


def prefill_positions(mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions for a left-padded prompt batch: 0.. for real tokens, 0 on padding."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


class BatchKV:
    """Cache, mask and next positions of the rows now decoding, in batch order."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor):
        check_cache(cache)
        self.cache = cache
        self.mask = mask
        self.positions = mask.sum(-1)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention_mask [rows, width + 1], position_ids [rows, 1]) for a one-token decode step."""
        mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return mask, self.positions.unsqueeze(1)

    def advance(self) -> None:
        """The forward appended one column per row: record it."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        self.positions = self.positions + 1

    def select(self, keep: list[int]) -> None:
        """Keep only rows `keep` (in that order) and cut the columns no remaining row uses."""
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, index)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]

    def merge(self, other: BatchKV) -> None:
        """Append `other`'s rows after ours, left-padding the narrower side to a common width."""
        width = max(self.width, other.width)
        pad_self, pad_other = width - self.width, width - other.width
        self.mask = torch.cat([F.pad(self.mask, (pad_self, 0)), F.pad(other.mask, (pad_other, 0))])
        self.positions = torch.cat([self.positions, other.positions])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat(
                [F.pad(mine.keys, (0, 0, pad_self, 0)), F.pad(theirs.keys, (0, 0, pad_other, 0))]
            )
            mine.values = torch.cat(
                [F.pad(mine.values, (0, 0, pad_self, 0)), F.pad(theirs.values, (0, 0, pad_other, 0))]
            )
