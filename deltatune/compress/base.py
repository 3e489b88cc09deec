"""What a compression method is: validated parameters, encode, decode. Plus the `raw` method.

A method turns one fp32 delta tensor into a few named tensors ("fields") that are stored as they
are, and back. Every field is a real tensor in the output file, so the size ratio is simply the sum
of the fields' bytes; nothing hides in JSON. Decoding needs only the fields and the shape: the
fields describe themselves (which bits, which positions), so a file decodes without the
parameters that made it.

`raw` stores the tensor in a float dtype. It is the baseline for ratios (float16 halves an fp32
delta) and the codec for tensors the matrix methods do not apply to (norm and bias deltas).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict


class MethodParams(BaseModel):
    """Base of every method's parameters: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


Fields = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Codec:
    name: str
    params: type[MethodParams]
    encode: Callable[[torch.Tensor, Any], Fields]  # (fp32 delta, params) -> stored fields
    decode: Callable[[Fields, tuple[int, ...]], torch.Tensor]  # (fields, shape) -> fp32 delta
    summary: str
    calibrated: bool = False  # compress() can refine it with a model and data (BitDelta's scale distillation)


def fields_bytes(fields: Fields) -> int:
    """Every stored byte of an encoded tensor."""
    return sum(t.numel() * t.element_size() for t in fields.values())


class RawParams(MethodParams):
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


def encode_raw(delta: torch.Tensor, params: RawParams) -> Fields:
    return {"values": delta.to(getattr(torch, params.dtype)).contiguous()}


def decode_raw(fields: Fields, shape: tuple[int, ...]) -> torch.Tensor:
    return fields["values"].float().reshape(shape)


RAW = Codec("raw", RawParams, encode_raw, decode_raw, "uncompressed, optionally cast to float16/bfloat16")
