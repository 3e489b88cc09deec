"""Delta-CoMe (Ping et al., 2024): SVD of the delta, more bits for larger singular values.

    Δ ≈ Σ_i s_i u_i v_iᵀ,   u_i, v_i quantized to b_i bits, b_1 ≥ b_2 ≥ ... (0 bits = dropped)

Fine-tuning deltas have long-tailed spectra, so a few leading singular vectors carry most of the
change and deserve more precision than the many small ones.

Bit allocation (exactly, `allocate_bits`): each component costs b · (rows + cols) bits for its
u and v codes. The budget is `budget_bits` bits per ΔW entry, i.e. budget_bits · rows · cols bits
per matrix. Components are handed out in order of singular value: first the explicit `groups`
[(bits, count), ...], then `fill_bits`-bit components while the budget lasts, never more than
`rank` or min(rows, cols) components in all. The defaults reproduce the paper's released
configuration: 8 bits for the top 2, 3 bits for the next 32, 2 bits for the rest of a budget of
1 bit per entry (1/16 of fp16); for a 4096x4096 matrix this gives 2 / 32 / 968 components, the
numbers in the authors' run script. Components with numerically zero singular values (e.g. beyond
the rank of a LoRA product) are dropped, so a rank-r delta never spends bits on more than r.

Quantization: asymmetric round-to-nearest per group of `group_size` consecutive entries of each
u and v column (scale and minimum stored as fp16), the singular values themselves in fp32.
Deviation from the paper: it quantizes u and v with GPTQ, which needs calibration activations;
round-to-nearest keeps this training-free and data-free at some accuracy cost.

Stored fields: `bits` (uint8, one byte per run of equal bit width), `group_size`, and per run i: `g{i}.s`,
`g{i}.u` / `g{i}.v` (packed codes, column by column), `g{i}.u_scale`, `g{i}.u_zero`,
`g{i}.v_scale`, `g{i}.v_zero`. The report's ratio counts all of them.
"""

from __future__ import annotations

import math
from itertools import groupby

import torch
from pydantic import Field, field_validator

from deltatune.compress.base import Codec, Fields, MethodParams
from deltatune.compress.lowrank import SvdMethod, top_singular
from deltatune.compress.packing import pack_uint, unpack_uint


class DeltaComeParams(MethodParams):
    groups: list[tuple[int, int]] = [(8, 2), (3, 32)]  # (bits, count) for the leading components
    fill_bits: int = Field(2, ge=0, le=8)  # bits for the components after `groups`; 0 = none
    budget_bits: float | None = Field(1.0, gt=0.0)  # bits per ΔW entry for u/v codes; None = no cap
    rank: int | None = Field(None, ge=1)  # at most this many components
    group_size: int = Field(128, ge=1)  # entries of a u or v column sharing one scale and zero
    svd: SvdMethod = "auto"

    @field_validator("groups")
    @classmethod
    def _check_groups(cls, groups: list[tuple[int, int]]) -> list[tuple[int, int]]:
        for bits, count in groups:
            if not 1 <= bits <= 8 or count < 0:
                raise ValueError(f"group ({bits}, {count}): bits must be 1..8 and count >= 0")
        return groups


def allocate_bits(rows: int, cols: int, params: DeltaComeParams) -> list[int]:
    """Bits per singular component, largest singular value first (see the module docstring)."""
    limit = min(rows, cols, params.rank or rows)
    remaining = math.inf if params.budget_bits is None else params.budget_bits * rows * cols
    plan = [*params.groups, (params.fill_bits, limit)] if params.fill_bits else list(params.groups)
    bits_per_component: list[int] = []
    for bits, count in plan:
        affordable = remaining // (bits * (rows + cols)) if remaining != math.inf else count
        n = int(min(count, limit - len(bits_per_component), affordable))
        bits_per_component += [bits] * n
        remaining -= n * bits * (rows + cols)
    return bits_per_component


def quantize_columns(
    x: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [n, k] -> (codes [k, n] in [0, 2**bits), scale [k, G] fp16, zero [k, G] fp16), G = ceil(n / g)."""
    cols = x.T.float()
    n = cols.shape[1]
    n_groups = -(-n // group_size)
    # Pad each column with its own last entry: it lies in the last group, so no range grows.
    padded = torch.cat([cols, cols[:, -1:].expand(-1, n_groups * group_size - n)], dim=1)
    grouped = padded.view(cols.shape[0], n_groups, group_size)
    lo, hi = grouped.amin(dim=2), grouped.amax(dim=2)
    scale = ((hi - lo) / (2**bits - 1)).half()
    zero = lo.half()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: any scale works
    codes = torch.round((grouped - zero.float().unsqueeze(2)) / scale.float().unsqueeze(2))
    codes = codes.clamp(0, 2**bits - 1).view(cols.shape[0], -1)[:, :n]
    return codes.to(torch.int32), scale, zero


def dequantize_columns(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Inverse of quantize_columns up to rounding: [n, k] fp32."""
    n = codes.shape[1]
    expand = lambda t: t.float().repeat_interleave(group_size, dim=1)[:, :n]  # noqa: E731
    return (codes.float() * expand(scale) + expand(zero)).T


def encode_delta_come(delta: torch.Tensor, params: DeltaComeParams) -> Fields:
    rows, cols = delta.shape
    plan = allocate_bits(rows, cols, params)
    fields: Fields = {}
    if plan:
        u, s, v = top_singular(delta, len(plan), params.svd)
        tol = float(s[0]) * max(rows, cols) * torch.finfo(torch.float32).eps
        plan = plan[: int((s > tol).sum())]
    run_bits, start = [], 0
    for i, (bits, run) in enumerate(groupby(plan)):
        end = start + len(list(run))
        for name, vecs in (("u", u[:, start:end]), ("v", v[:, start:end])):
            codes, scale, zero = quantize_columns(vecs, bits, params.group_size)
            fields[f"g{i}.{name}"] = pack_uint(codes, bits)
            fields[f"g{i}.{name}_scale"], fields[f"g{i}.{name}_zero"] = scale, zero
        fields[f"g{i}.s"] = s[start:end].float().contiguous()
        run_bits.append(bits)
        start = end
    fields["bits"] = torch.tensor(run_bits, dtype=torch.uint8)
    fields["group_size"] = torch.tensor([params.group_size], dtype=torch.int32)
    return fields


def decode_delta_come(fields: Fields, shape: tuple[int, ...]) -> torch.Tensor:
    rows, cols = shape
    group = int(fields["group_size"])
    out = torch.zeros(rows, cols, dtype=torch.float32)
    for i, bits in enumerate(fields["bits"].tolist()):
        s = fields[f"g{i}.s"].float()
        vecs = {}
        for name, n in (("u", rows), ("v", cols)):
            codes = unpack_uint(fields[f"g{i}.{name}"], s.numel() * n, bits).view(s.numel(), n)
            scale, zero = fields[f"g{i}.{name}_scale"], fields[f"g{i}.{name}_zero"]
            vecs[name] = dequantize_columns(codes, scale, zero, group)
        out += (vecs["u"] * s) @ vecs["v"].T
    return out


DELTA_COME = Codec(
    "delta_come",
    DeltaComeParams,
    encode_delta_come,
    decode_delta_come,
    "SVD, mixed-precision singular vectors (8/3/2 bits by singular value)",
)
