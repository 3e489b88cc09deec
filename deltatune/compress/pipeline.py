"""compress: from a LoRA adapter or a full fine-tune to a compressed delta directory.

    source ──DeltaItem──► encode each part ──► (bitdelta + data: distill scales) ──► atomic write

A source yields one `DeltaItem` per changed weight, one at a time (full models are streamed
tensor by tensor from memory-mapped safetensors):

    PEFT LoRA adapter dir, lora_mode="dense"    item = ΔW = scale · B @ A     layout lora_dense
    PEFT LoRA adapter dir, lora_mode="factors"  item = A and B themselves      layout lora_factors
    (base_dir, finetuned_dir)                   item = finetuned - base        layout model

The chosen method encodes every 2-D part; other parts (norm and bias deltas) are stored raw in
fp32. "dense" follows the papers' view of a delta as ΔW; it is exact to load but a dense ΔW of a
low-rank adapter is larger than the adapter, so ratios against the adapter are modest.
"factors" compresses A and B directly (as ComPEFT does for LoRA), keeps the size advantage of the
factorisation and decompresses to a PEFT adapter again.

The layout decides what `decompress` writes back (see `deltatune.compress.decompress`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltatune.atomic import new_directory
from deltatune.compress.base import RAW, Codec, Fields, MethodParams, RawParams, fields_bytes
from deltatune.compress.calibrate import CalibrationData, calibrate_bitdelta
from deltatune.compress.container import (
    CompressionConfig,
    Layout,
    PartEntry,
    TensorEntry,
    decode_parts,
    dense_from_parts,
    dtype_name,
    entry_dense,
    field_key,
    write_config,
    write_fields,
)
from deltatune.compress.methods import CODECS, get_codec, validate_params
from deltatune.compress.reports import CompressionReport, TensorReport
from deltatune.formats import ADAPTER_CONFIG, MODEL_CONFIG, FormatError, read_json
from deltatune.formats.hf import ModelFiles, check_compatible
from deltatune.formats.peft import LoraFactors, read_lora

LORA_LAYOUTS: dict[str, Layout] = {"dense": "lora_dense", "factors": "lora_factors"}

Source = str | Path | tuple[str | Path, str | Path]


@dataclass
class DeltaItem:
    """One weight's change, as the tensors to store (fp32) plus what is needed to rebuild ΔW."""

    name: str
    parts: dict[str, torch.Tensor]
    dtype: torch.dtype
    source_bytes: int
    lora_scale: float | None = None
    transposed: bool = False

    def entry(self, codecs: dict[str, str], shape: list[int]) -> TensorEntry:
        parts = {p: PartEntry(codec=codecs[p], shape=list(t.shape)) for p, t in self.parts.items()}
        return TensorEntry(
            shape=shape,
            dtype=dtype_name(self.dtype),
            parts=parts,
            lora_scale=self.lora_scale,
            transposed=self.transposed,
        )

    def dense(self) -> torch.Tensor:
        return dense_from_parts(self.parts, self.lora_scale, self.transposed)


@dataclass
class OpenSource:
    layout: Layout
    base_model: str | None
    items: Iterator[DeltaItem]
    adapter_config: dict[str, Any] | None = None
    hf_config: dict[str, Any] | None = None
    unchanged: list[str] = field(default_factory=list)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def lora_items(modules: dict[str, LoraFactors], layout: Layout) -> Iterator[DeltaItem]:
    for path, m in modules.items():
        size, dtype = _nbytes(m.a) + _nbytes(m.b), m.a.dtype
        if layout == "lora_dense":
            yield DeltaItem(f"{path}.weight", {"delta": m.dense()}, dtype, size)
        else:
            parts = {"lora_A": m.a.float(), "lora_B": m.b.float()}
            yield DeltaItem(path, parts, dtype, size, lora_scale=m.scale, transposed=m.transposed)


def model_items(
    base: ModelFiles, finetuned: ModelFiles, stack: ExitStack, unchanged: list[str]
) -> Iterator[DeltaItem]:
    """finetuned - base per tensor; identical tensors go to `unchanged` and are not stored."""
    read_base, read_ft = stack.enter_context(base.reader()), stack.enter_context(finetuned.reader())
    for name in finetuned.names():
        b, f = read_base(name), read_ft(name)
        if not f.is_floating_point():
            if not torch.equal(b, f):
                raise FormatError(
                    f"{finetuned.tensors[name].file}: non-float tensor {name} differs from the base"
                )
            unchanged.append(name)
            continue
        delta = f.float() - b.float()
        if not torch.any(delta):
            unchanged.append(name)
            continue
        yield DeltaItem(name, {"delta": delta}, f.dtype, _nbytes(f))


def open_source(src: Source, lora_mode: str, stack: ExitStack) -> OpenSource:
    if lora_mode not in LORA_LAYOUTS:
        raise ValueError(f"lora_mode must be one of {sorted(LORA_LAYOUTS)}, got {lora_mode!r}")
    if isinstance(src, (tuple, list)):
        if len(src) != 2:
            raise ValueError("a full-model delta is given as (base_dir, finetuned_dir)")
        base_dir, ft_dir = Path(src[0]), Path(src[1])
        base, ft = ModelFiles(base_dir), ModelFiles(ft_dir)
        check_compatible(base, [ft], exact=True)
        hf_config = read_json(ft_dir / MODEL_CONFIG)
        unchanged: list[str] = []
        items = model_items(base, ft, stack, unchanged)
        return OpenSource("model", str(base_dir.resolve()), items, hf_config=hf_config, unchanged=unchanged)
    src = Path(src)
    if (src / MODEL_CONFIG).is_file() and not (src / ADAPTER_CONFIG).is_file():
        raise ValueError(
            f"{src} is a full model: pass (base_dir, finetuned_dir) to compress a full fine-tune"
        )
    adapter = read_lora(src, allow_fan_in_fan_out=True)
    layout = LORA_LAYOUTS[lora_mode]
    base_model = adapter.config.get("base_model_name_or_path")
    return OpenSource(layout, base_model, lora_items(adapter.modules, layout), adapter.config)


def encode_item(
    item: DeltaItem, target: torch.Tensor, codec: Codec, params: MethodParams
) -> tuple[TensorEntry, dict[str, Fields], TensorReport]:
    """Encode every part (the method on 2-D parts, raw fp32 on the rest) and measure the error."""
    fields, decoded, names = {}, {}, {}
    for part, tensor in item.parts.items():
        c, p = (codec, params) if tensor.ndim == 2 else (RAW, RawParams())
        fields[part] = c.encode(tensor, p)
        decoded[part] = c.decode(fields[part], tuple(tensor.shape))
        names[part] = c.name
    entry = item.entry(names, list(target.shape))
    row = TensorReport(
        name=item.name,
        shape=entry.shape,
        codec=next(iter(names.values())),
        source_bytes=item.source_bytes,
        stored_bytes=sum(fields_bytes(f) for f in fields.values()),
        norm=float(target.norm()),
        rel_error=relative_error(target, entry_dense(entry, decoded)),
    )
    return entry, fields, row


@dataclass
class Encoded:
    """Everything compress() produced before writing: entries, fields and report rows by tensor."""

    entries: dict[str, TensorEntry] = field(default_factory=dict)
    fields: dict[str, dict[str, Fields]] = field(default_factory=dict)
    rows: dict[str, TensorReport] = field(default_factory=dict)
    exact: dict[str, torch.Tensor] = field(default_factory=dict)  # kept only for calibration
    dense_bytes: int = 0

    def flat_fields(self) -> dict[str, torch.Tensor]:
        return {
            field_key(name, part, key): value
            for name, parts in self.fields.items()
            for part, fs in parts.items()
            for key, value in fs.items()
        }


def encode_source(source: OpenSource, codec: Codec, params: MethodParams, keep_exact: bool) -> Encoded:
    """Stream the source's items through the codec; only compressed fields stay in memory."""
    out = Encoded()
    for item in source.items:
        target = item.dense()
        entry, out.fields[item.name], out.rows[item.name] = encode_item(item, target, codec, params)
        out.entries[item.name] = entry
        out.dense_bytes += target.numel() * item.dtype.itemsize
        if keep_exact:
            out.exact[item.name] = target
    return out


def relative_error(exact: torch.Tensor, approx: torch.Tensor) -> float:
    norm = float(exact.norm())
    return float((exact - approx).norm()) / norm if norm > 0 else 0.0


# --- compress --------------------------------------------------------------------------------------------


def compress(
    src: Source,
    out: str | Path,
    method: str,
    *,
    lora_mode: str = "dense",
    calibration_data: CalibrationData | None = None,
    base: str | Path | None = None,
    overwrite: bool = False,
    **params: Any,
) -> CompressionReport:
    """Compress a LoRA adapter dir or a (base_dir, finetuned_dir) pair into the directory `out`.

    `params` are the method's (see each method module): e.g. density / scale / alpha for compeft,
    budget_bits / groups / fill_bits / rank / group_size for delta_come. `calibration_data` (token
    ids [n, t] or texts) turns on BitDelta's scale distillation against the base model (`base`, or
    the adapter's base_model_name_or_path, or the base_dir).
    """
    codec = get_codec(method)
    method_params = validate_params(codec, params)
    if calibration_data is not None and not codec.calibrated:
        calibrated = ", ".join(sorted(c.name for c in CODECS.values() if c.calibrated))
        raise ValueError(f"method {method!r} takes no calibration data (only: {calibrated})")
    calibrating = calibration_data is not None
    with ExitStack() as stack:
        source = open_source(src, lora_mode, stack)
        if calibrating and source.layout == "lora_factors":
            raise ValueError("calibration works on dense deltas: use lora_mode='dense'")
        encoded = encode_source(source, codec, method_params, keep_exact=calibrating)
    if not encoded.entries:
        raise FormatError(f"{src}: nothing to compress (the fine-tuned model equals the base)")
    calibration = None
    if calibrating:
        base_model = str(base) if base is not None else source.base_model
        calibration = calibrate_bitdelta(
            encoded.entries, encoded.fields, encoded.exact, base_model, calibration_data, method_params
        )
        for name, row in encoded.rows.items():  # the scales moved: measure again
            decoded = decode_parts(encoded.entries[name], encoded.fields[name], name)
            row.rel_error = relative_error(encoded.exact[name], entry_dense(encoded.entries[name], decoded))
    config = CompressionConfig(
        method=method,
        params=method_params.model_dump(),
        layout=source.layout,
        base_model=source.base_model,
        adapter_config=source.adapter_config,
        hf_config=source.hf_config,
        tensors=encoded.entries,
    )
    rows = list(encoded.rows.values())
    with new_directory(Path(out), overwrite) as tmp:
        file_bytes = write_fields(tmp, encoded.flat_fields())
        report = CompressionReport(
            method=method,
            params=config.params,
            layout=source.layout,
            out=str(out),
            tensors=rows,
            unchanged=source.unchanged,
            source_bytes=sum(r.source_bytes for r in rows),
            dense_bytes=encoded.dense_bytes,
            stored_bytes=sum(r.stored_bytes for r in rows),
            file_bytes=file_bytes,
            calibration=calibration,
        )
        config.report = report.model_dump()
        write_config(tmp, config)
    return report
