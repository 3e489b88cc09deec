"""Bit packing: store signs, masks and small quantization codes in exactly the bits they need.

A boolean tensor becomes ceil(n / 8) bytes (numpy.packbits, little bit order). A b-bit code
(0 <= v < 2**b, b in 1..8) is split into its b bit planes, laid out value-major
(v0.bit0 .. v0.bit{b-1}, v1.bit0, ...) and packed the same way, so n codes take ceil(n * b / 8)
bytes. Both round-trips are exact; the element count is not stored here, callers know it from the
tensor shape they record.
"""

from __future__ import annotations

import numpy as np
import torch


def packed_size(count: int, bits: int = 1) -> int:
    """Bytes that `count` values of `bits` bits occupy once packed."""
    return (count * bits + 7) // 8


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Boolean tensor (any shape) -> uint8 tensor of ceil(numel / 8) bytes."""
    flat = bits.detach().reshape(-1).to(torch.bool).cpu().numpy()
    return torch.from_numpy(np.packbits(flat, bitorder="little"))


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of pack_bits: the first `count` bits as a flat boolean tensor."""
    if packed.dtype != torch.uint8 or packed.numel() != packed_size(count):
        raise ValueError(
            f"expected {packed_size(count)} packed uint8 bytes for {count} bits, got {packed.numel()}"
        )
    bits = np.unpackbits(packed.cpu().numpy(), count=count, bitorder="little")
    return torch.from_numpy(bits.astype(bool))


def pack_uint(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2**bits) -> uint8 bytes holding `bits` bits per code."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = values.detach().reshape(-1).to(torch.int32).cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    planes = (flat.unsqueeze(1) >> torch.arange(bits, dtype=torch.int32)) & 1
    return pack_bits(planes.to(torch.bool))


def unpack_uint(packed: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """Inverse of pack_uint: `count` codes as a flat int32 tensor."""
    planes = unpack_bits(packed, count * bits).view(count, bits).to(torch.int32)
    return (planes << torch.arange(bits, dtype=torch.int32)).sum(dim=1, dtype=torch.int32)
