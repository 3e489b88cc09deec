"""ComPEFT (Yadav et al., 2023): keep the top-k entries of a delta by magnitude, then ternarize.

    Δ̂ = s · sign(Δ) ⊙ m,   m = 1 on the k = round(density · numel) largest |Δ|, 0 elsewhere

The scale s follows the paper: s = α · std(Δ), the (unbiased) standard deviation of the *original*
delta, with α a hyperparameter the paper tunes per task (its code calls it `replace_factor`).
`scale="mean_kept"` instead uses the mean magnitude of the kept entries, the least-squares optimal
scale for a fixed support and signs (the STC baseline the paper compares against); use it when
there is no validation set to tune α on. Deviation from the paper: the paper flattens the whole
update into one vector with one k and one σ; here k and s are per tensor (per-matrix scales fit
layers whose deltas differ in size, and cost 4 bytes each).

Stored fields: `scale` (fp32 scalar), `signs` (1 bit per kept entry, in index order) and the kept
positions as whichever is smaller: `mask` (1 bit per entry) or `indices` (int32, 4 bytes per kept
entry; smaller when density < ~3%). At density 0.1 an fp32 delta shrinks ~29x.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from deltatune.compress.base import Codec, Fields, MethodParams
from deltatune.compress.packing import pack_bits, packed_size, unpack_bits


class CompeftParams(MethodParams):
    density: float = Field(0.1, gt=0.0, le=1.0)  # fraction of entries kept
    scale: Literal["std", "mean_kept"] = "std"
    alpha: float = Field(1.0, gt=0.0)  # multiplies std(Δ) when scale="std"


def keep_count(numel: int, nonzero: int, density: float) -> int:
    """How many entries survive: round(density · numel), at least 1, never a zero entry."""
    return min(max(1, round(density * numel)), nonzero)


def top_k_positions(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the k largest magnitudes, ascending (ties go to torch.topk's choice)."""
    return torch.topk(flat.abs(), k, sorted=False).indices.sort().values


def ternary_scale(delta: torch.Tensor, kept: torch.Tensor, params: CompeftParams) -> float:
    if params.scale == "std":
        return params.alpha * float(delta.std()) if delta.numel() > 1 else float(delta.abs().sum())
    return float(kept.abs().mean())


def encode_compeft(delta: torch.Tensor, params: CompeftParams) -> Fields:
    flat = delta.reshape(-1).float()
    k = keep_count(flat.numel(), int(torch.count_nonzero(flat)), params.density)
    positions = top_k_positions(flat, k) if k else torch.zeros(0, dtype=torch.long)
    kept = flat[positions]
    fields = {
        "scale": torch.tensor([ternary_scale(flat, kept, params) if k else 0.0], dtype=torch.float32),
        "signs": pack_bits(kept > 0),
    }
    if packed_size(flat.numel()) <= 4 * k or flat.numel() >= 2**31:
        mask = torch.zeros(flat.numel(), dtype=torch.bool)
        mask[positions] = True
        fields["mask"] = pack_bits(mask)
    else:
        fields["indices"] = positions.to(torch.int32)
    return fields


def decode_compeft(fields: Fields, shape: tuple[int, ...]) -> torch.Tensor:
    numel = torch.Size(shape).numel()
    if "mask" in fields:
        positions = torch.nonzero(unpack_bits(fields["mask"], numel)).reshape(-1)
    else:
        positions = fields["indices"].long()
    signs = unpack_bits(fields["signs"], positions.numel()).float() * 2 - 1
    out = torch.zeros(numel, dtype=torch.float32)
    out[positions] = fields["scale"].float() * signs
    return out.reshape(shape)


COMPEFT = Codec(
    "compeft", CompeftParams, encode_compeft, decode_compeft, "top-k by magnitude, ternary sign x scale"
)
