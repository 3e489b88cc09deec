"""BitDelta (Liu et al., 2024): a delta as one sign bit per entry times one scale per matrix.

    Δ̂ = s · sign(Δ),   s = mean |Δ|

For fixed signs, mean |Δ| is the scale that minimises ||Δ - s · sign(Δ)||_F (the paper's init).
Zero entries get sign +1 (one bit cannot say "zero"). Stored fields: `signs` (1 bit per entry,
numpy.packbits) and `scale` (fp32 scalar): an fp32 delta shrinks ~32x, a bf16 one ~16x.

Scale distillation (the paper's second step): the signs stay frozen and only the per-matrix scales
train, so that the compressed model's logits match the fine-tuned model's on a few batches,
    min_s  mean over tokens of || z_finetuned(x) - z_{base + s·sign}(x) ||²
with Adam (paper: lr 1e-4, 200 steps, batch 4). Both models are the base model evaluated with
`torch.func.functional_call` on substituted weights, so only the base model, the exact deltas and
the signs are in memory; the fine-tuned teacher is base + exact delta.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import nn

from deltatune.compress.base import Codec, Fields, MethodParams
from deltatune.compress.packing import pack_bits, unpack_bits


class BitDeltaParams(MethodParams):
    # Used only when compress() is given calibration data.
    calibration_steps: int = Field(200, ge=1)
    calibration_lr: float = Field(1e-4, gt=0.0)
    calibration_batch_size: int = Field(4, ge=1)


def sign_scale(delta: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(signs as a bool tensor, True = +1; the L2-optimal scale mean |Δ|)."""
    return delta >= 0, float(delta.abs().mean())


def encode_bitdelta(delta: torch.Tensor, params: BitDeltaParams) -> Fields:
    positive, scale = sign_scale(delta.float())
    return {"signs": pack_bits(positive), "scale": torch.tensor([scale], dtype=torch.float32)}


def signs_of(fields: Fields, shape: tuple[int, ...]) -> torch.Tensor:
    """The stored signs as a ±1 fp32 tensor of the given shape."""
    bits = unpack_bits(fields["signs"], torch.Size(shape).numel())
    return (bits.float() * 2 - 1).reshape(shape)


def decode_bitdelta(fields: Fields, shape: tuple[int, ...]) -> torch.Tensor:
    return fields["scale"].float() * signs_of(fields, shape)


BITDELTA = Codec(
    "bitdelta",
    BitDeltaParams,
    encode_bitdelta,
    decode_bitdelta,
    "1-bit signs x per-matrix scale",
    calibrated=True,
)


# --- scale distillation ---------------------------------------------------------------------------

Batch = dict[str, torch.Tensor]  # input_ids [b, t] and optionally attention_mask [b, t]


def _logits(model: nn.Module, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    return torch.func.functional_call(model, params, args=(), kwargs=dict(batch)).logits.float()


def masked_logit_mse(student: torch.Tensor, teacher: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean squared logit difference over the non-padding positions."""
    per_token = (student - teacher).pow(2).mean(dim=-1)
    mask = batch.get("attention_mask")
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def logit_mse(
    model: nn.Module,
    teacher_deltas: dict[str, torch.Tensor],
    student_deltas: dict[str, torch.Tensor],
    batches: Sequence[Batch],
) -> float:
    """Mean over batches of the logit MSE between base+teacher and base+student deltas."""
    base = dict(model.named_parameters())
    with torch.no_grad():
        losses = []
        for batch in batches:
            teacher = _logits(model, {n: base[n] + d for n, d in teacher_deltas.items()}, batch)
            student = _logits(model, {n: base[n] + d for n, d in student_deltas.items()}, batch)
            losses.append(float(masked_logit_mse(student, teacher, batch)))
    return sum(losses) / len(losses)


def distill_scales(
    model: nn.Module,
    exact: dict[str, torch.Tensor],
    signs: dict[str, torch.Tensor],
    scales: dict[str, float],
    fixed: dict[str, torch.Tensor],
    batches: Sequence[Batch],
    steps: int,
    lr: float,
) -> dict[str, float]:
    """Train per-matrix scales so base + s·sign (+ fixed deltas) matches base + exact deltas.

    `exact`: teacher deltas for every changed parameter; `signs`: ±1 tensors of the parameters
    whose scales train; `fixed`: the stored (not trained) deltas of the other parameters. Returns
    the new scales. The model's own parameters are left untouched.
    """
    missing = sorted((set(signs) | set(fixed)) - set(exact))
    if missing:
        raise ValueError(f"no exact delta for {missing[0]}")
    base = {n: p.detach() for n, p in model.named_parameters()}
    trainable = {n: torch.tensor(float(s), requires_grad=True) for n, s in scales.items()}
    optimizer = torch.optim.Adam(trainable.values(), lr=lr)
    was_training = model.training
    model.eval()
    try:
        for step in range(steps):
            batch = batches[step % len(batches)]
            with torch.no_grad():
                teacher = _logits(model, {n: base[n] + d for n, d in exact.items()}, batch)
            student_params = {n: base[n] + d for n, d in fixed.items()}
            student_params.update({n: base[n] + trainable[n] * s for n, s in signs.items()})
            loss = masked_logit_mse(_logits(model, student_params, batch), teacher, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        model.train(was_training)
    return {n: float(t.detach()) for n, t in trainable.items()}
