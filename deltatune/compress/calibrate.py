"""BitDelta scale distillation wired to real inputs: the base model, calibration data, stored fields.

The math lives in `deltatune.compress.bitdelta` (pure functions over a model and tensors); this
module loads the base model (`deltatune.models.load_model`: a directory, "default" or a cached hub
id), turns calibration data into batches (token-id tensors as they are, texts through the base
model's tokenizer), and writes the distilled scales back into the encoded fields.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deltatune.compress.base import Fields
from deltatune.compress.bitdelta import Batch, BitDeltaParams, distill_scales, logit_mse, signs_of
from deltatune.compress.container import TensorEntry
from deltatune.compress.methods import get_codec
from deltatune.formats import FormatError

MAX_CALIBRATION_TOKENS = 512

CalibrationData = torch.Tensor | Sequence[str]


def calibration_batches(data: CalibrationData, batch_size: int, base_model: str | None) -> list[Batch]:
    """Token-id tensors [n, t] are used as they are; texts are tokenized with the base model's tokenizer."""
    if isinstance(data, torch.Tensor):
        if data.ndim != 2 or data.is_floating_point() or data.shape[0] == 0:
            raise ValueError(
                f"calibration token ids must be an integer tensor [n, t], got {list(data.shape)}"
            )
        return [{"input_ids": chunk} for chunk in data.long().split(batch_size)]
    from deltatune.models import load_tokenizer

    texts = list(data)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("calibration data must be token ids or a non-empty list of strings")
    tokenizer = load_tokenizer(base_model)
    enc = tokenizer(
        texts, return_tensors="pt", padding=True, truncation=True, max_length=MAX_CALIBRATION_TOKENS
    )
    return [
        {"input_ids": ids, "attention_mask": mask}
        for ids, mask in zip(
            enc["input_ids"].split(batch_size), enc["attention_mask"].split(batch_size), strict=True
        )
    ]


def calibrate_bitdelta(
    entries: dict[str, TensorEntry],
    fields: dict[str, dict[str, Fields]],
    exact: dict[str, torch.Tensor],
    base_model: str | None,
    data: CalibrationData,
    params: BitDeltaParams,
) -> dict[str, float]:
    """Distill the per-matrix scales in `fields` in place; returns the logit MSE before and after."""
    from deltatune.models import load_model

    if base_model is None:
        raise ValueError("calibration needs the base model: pass base=... (the adapter names none)")
    model = load_model(base_model, dtype=torch.float32).eval()
    known = dict(model.named_parameters())
    for name in exact:
        if name not in known:
            raise FormatError(
                f"calibration: delta {name!r} matches no parameter of the base model {base_model}"
            )
    batches = calibration_batches(data, params.calibration_batch_size, base_model)
    signs, scales, fixed = {}, {}, {}
    for name, entry in entries.items():
        f = fields[name]["delta"]
        if entry.parts["delta"].codec == "bitdelta":
            signs[name], scales[name] = signs_of(f, tuple(entry.shape)), float(f["scale"])
        else:
            fixed[name] = get_codec(entry.parts["delta"].codec).decode(f, tuple(entry.shape))

    def student(s: dict[str, float]) -> dict[str, torch.Tensor]:
        return {**fixed, **{n: s[n] * signs[n] for n in signs}}

    before = logit_mse(model, exact, student(scales), batches)
    new = distill_scales(
        model, exact, signs, scales, fixed, batches, params.calibration_steps, params.calibration_lr
    )
    for name, value in new.items():
        fields[name]["delta"]["scale"] = torch.tensor([value], dtype=torch.float32)
    return {"before": before, "after": logit_mse(model, exact, student(new), batches)}
