"""Pack tokenized samples into fixed-length rows without letting samples see each other.

Short chat samples (~60-100 tokens) padded to a common length waste most of a batch; packing
several whole samples into each row of `max_len` tokens removes that waste. Each sample goes into
the row whose free space fits it most tightly (best fit), visiting the samples in one of two orders:

- "shuffled" (training's default): a seeded random order. Rows are random mixtures of samples, like
  the random batches of a padded loader. Measured on the training benchmark's data: 95.9% of slots
  filled (vs 97.2%), and held-out loss 0.051 instead of 0.074 at the same steps, tokens and init.
- "longest_first" (best-fit decreasing, at most 11/9 of the optimal row count plus one): the densest,
  but it sorts samples into rows by length, so a row holds one long sample with short fillers or
  many short ones of a kind. Two such rows per step make steps of one kind of data; Adam then takes
  equal-sized steps on very different gradients, and the adapter generalises worse.

Both are deterministic for a given seed. A sample is never
split across rows; one longer than `max_len` keeps its first `max_len` tokens. A sample that keeps
no target token that way (a long prompt cut before its answer) is dropped and counted: trained on,
it would add only zero loss, and a batch of nothing else would have no gradient at all.

Isolation comes from the position ids, which restart at 0 at every sample (and at the padding that
fills the end of a row). Given position ids and no attention mask, transformers >= 5 builds a
block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`) - but only when there is
no KV cache, so the model must be called with `use_cache=False`: with the default `use_cache=True`
a cache object exists and the mask silently falls back to plain causal, letting samples attend to
earlier samples in the row (tests/test_data.py checks both facts).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss; otherwise labels[i] == input_ids[i] (not shifted)

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"sample has {len(self.input_ids)} input ids but {len(self.labels)} labels")


@dataclass
class PackStats:
    samples: int
    rows: int
    tokens: int  # sample tokens placed in rows (after truncation)
    target_tokens: int  # tokens with a label
    padding_tokens: int
    truncated_samples: int
    truncated_tokens: int  # tokens cut off the end of over-long samples
    dropped_samples: int = 0  # samples left out: truncation cut off every target token

    @property
    def efficiency(self) -> float:
        """Share of row slots holding real tokens: 1.0 means no padding."""
        slots = self.tokens + self.padding_tokens
        return self.tokens / slots if slots else 0.0


@dataclass
class PackedRows:
    input_ids: torch.Tensor  # [rows, max_len] long
    labels: torch.Tensor  # [rows, max_len] long, IGNORE_INDEX where no loss
    position_ids: torch.Tensor  # [rows, max_len] long, restarting at 0 at every sample and at the padding
    stats: PackStats


PACK_ORDERS = ("shuffled", "longest_first")


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of the items in each bin. Ties go to the lower index / the older bin, so the result is stable."""
    return best_fit(lengths, capacity, sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)))


def best_fit(lengths: list[int], capacity: int, order: list[int]) -> list[list[int]]:
    """Items visited in `order`, each into the bin whose free space fits it most tightly (ties: older bin)."""
    if any(n < 1 or n > capacity for n in lengths):
        raise ValueError(f"every length must be in [1, {capacity}]")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), kept sorted
    for i in order:
        pos = bisect.bisect_left(free, (lengths[i], -1))
        if pos < len(free):
            space, b = free.pop(pos)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (space - lengths[i], b))
    return bins


def pack(
    samples: list[Sample], max_len: int, pad_id: int, order: str = "longest_first", seed: int = 0
) -> PackedRows:
    """Pack whole samples into rows of `max_len` tokens (rows in packing order; shuffle them in training).

    `order`: "longest_first" (best-fit decreasing) or "shuffled" (best fit in a random order from `seed`).

    Label contract: labels are NOT shifted. `labels[r, i] == input_ids[r, i]` where token i is a target
    and IGNORE_INDEX (-100) elsewhere: prompt tokens, padding, and the FIRST token of every sample. The
    loss is the usual causal one, `cross_entropy(logits[:, :-1], labels[:, 1:])`, i.e. token i is
    predicted from position i-1. Because the first token of each sample has label -100, the only
    predictions that cross a sample boundary (last token of sample k -> first token of sample k+1) are
    ignored, so every counted prediction has its input and target in the same sample.

    Run the model as `model(input_ids=..., position_ids=..., use_cache=False)` and without an
    attention_mask, so transformers builds the block-diagonal mask from the restarting position ids.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if any(not s.input_ids for s in samples):
        raise ValueError("cannot pack an empty sample")
    kept = [s for s in samples if any(t != IGNORE_INDEX for t in s.labels[1:max_len])]
    dropped, samples = len(samples) - len(kept), kept
    lengths = [min(len(s.input_ids), max_len) for s in samples]
    truncated = [len(s.input_ids) - n for s, n in zip(samples, lengths, strict=True)]
    if order == "longest_first":
        bins = best_fit_decreasing(lengths, max_len)
    elif order == "shuffled":
        visit = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
        bins = best_fit(lengths, max_len, visit)
    else:
        raise ValueError(f"packing order must be one of {', '.join(PACK_ORDERS)}, got {order!r}")

    input_ids = torch.full((len(bins), max_len), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), max_len), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(bins), max_len), dtype=torch.long)
    for row, members in enumerate(bins):
        start = 0
        for i in members:
            n, end = lengths[i], start + lengths[i]
            input_ids[row, start:end] = torch.tensor(samples[i].input_ids[:n])
            labels[row, start:end] = torch.tensor(samples[i].labels[:n])
            labels[row, start] = IGNORE_INDEX
            position_ids[row, start:end] = torch.arange(n)
            start = end
        position_ids[row, start:] = torch.arange(max_len - start)

    tokens = sum(lengths)
    stats = PackStats(
        samples=len(samples),
        rows=len(bins),
        tokens=tokens,
        target_tokens=int((labels != IGNORE_INDEX).sum()),
        padding_tokens=len(bins) * max_len - tokens,
        truncated_samples=sum(t > 0 for t in truncated),
        truncated_tokens=sum(truncated),
        dropped_samples=dropped,
    )
    return PackedRows(input_ids, labels, position_ids, stats)
