"""What compression and extraction report, and how the CLI prints it.

Reports are pydantic models so they serialise into the compressed directory's config and into
benchmark JSON unchanged. Size ratios count tensor bytes only, on both sides: every stored field
(signs, masks, indices, codes, scales, zero points, raw tensors) against the source tensors
(the adapter's A and B for LoRA inputs, the changed tensors in the fine-tuned dtype for full
models); file headers and JSON are left out on both sides. `file_bytes` is the compressed file's
size on disk, header included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, computed_field


class TensorReport(BaseModel):
    name: str
    shape: list[int]
    codec: str  # the method, or "raw" for tensors it does not apply to
    source_bytes: int
    stored_bytes: int
    norm: float  # ||ΔW||_F
    rel_error: float  # ||ΔW - ΔŴ||_F / ||ΔW||_F


class CompressionReport(BaseModel):
    method: str
    params: dict[str, Any]
    layout: str
    out: str
    tensors: list[TensorReport]
    unchanged: list[str] = []  # tensors of a full model identical to the base (nothing stored)
    source_bytes: int
    dense_bytes: int  # ΔW of every tensor as a dense tensor in the source dtype
    stored_bytes: int
    file_bytes: int
    calibration: dict[str, float] | None = None  # logit MSE before / after BitDelta distillation

    @computed_field
    @property
    def ratio(self) -> float:
        return self.source_bytes / max(self.stored_bytes, 1)

    @computed_field
    @property
    def dense_ratio(self) -> float:
        return self.dense_bytes / max(self.stored_bytes, 1)

    @computed_field
    @property
    def rel_error(self) -> float:
        """Relative error of all deltas taken together (Frobenius norms summed in quadrature)."""
        total = sum(t.norm**2 for t in self.tensors)
        err = sum((t.rel_error * t.norm) ** 2 for t in self.tensors)
        return math.sqrt(err / total) if total > 0 else 0.0


class ModuleExtraction(BaseModel):
    name: str
    shape: list[int]
    energy: float  # Σ top-r σ² / Σ σ²
    rel_error: float  # ||ΔW - B A||_F / ||ΔW||_F


class SkippedTensor(BaseModel):
    name: str
    reason: str
    rel_change: float  # ||finetuned - base||_F / ||base||_F


class ExtractionReport(BaseModel):
    out: str
    rank: int
    modules: list[ModuleExtraction]
    skipped: list[SkippedTensor]
    adapter_bytes: int

    @computed_field
    @property
    def mean_energy(self) -> float:
        return sum(m.energy for m in self.modules) / max(len(self.modules), 1)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _format_compression(report: CompressionReport, max_rows: int) -> str:
    lines = [
        f"{report.method} ({report.layout}) -> {report.out}",
        f"  params: {report.params}",
        f"  size: {_mib(report.source_bytes)} -> {_mib(report.stored_bytes)}  ratio {report.ratio:.1f}x"
        f"  (vs dense ΔW {report.dense_ratio:.1f}x), file {_mib(report.file_bytes)}",
        f"  relative error, all tensors: {report.rel_error:.4f}",
    ]
    if report.calibration:
        lines.append(
            "  calibration logit MSE: " + ", ".join(f"{k} {v:.4g}" for k, v in report.calibration.items())
        )
    worst = sorted(report.tensors, key=lambda t: -t.rel_error)[:max_rows]
    lines.append(f"  worst {len(worst)} of {len(report.tensors)} tensors:")
    lines += [
        f"    {t.name:<60} {t.codec:<10} {t.source_bytes / max(t.stored_bytes, 1):6.1f}x  err {t.rel_error:.4f}"
        for t in worst
    ]
    if report.unchanged:
        lines.append(f"  unchanged (not stored): {len(report.unchanged)} tensors")
    return "\n".join(lines)


def _format_extraction(report: ExtractionReport, max_rows: int) -> str:
    lines = [
        f"LoRA rank {report.rank} -> {report.out} ({_mib(report.adapter_bytes)})",
        f"  {len(report.modules)} modules, mean captured energy {report.mean_energy:.4f}",
    ]
    worst = sorted(report.modules, key=lambda m: m.energy)[:max_rows]
    lines += [f"    {m.name:<60} energy {m.energy:.4f}  err {m.rel_error:.4f}" for m in worst]
    if report.skipped:
        lines.append(f"  skipped {len(report.skipped)} changed tensors that are not LoRA targets:")
        lines += [f"    {s.name:<60} {s.reason}  (rel. change {s.rel_change:.2e})" for s in report.skipped]
    return "\n".join(lines)


FORMATTERS: dict[type, Callable[[Any, int], str]] = {
    CompressionReport: _format_compression,
    ExtractionReport: _format_extraction,
}


def format_report(report: CompressionReport | ExtractionReport, max_rows: int = 10) -> str:
    """Human-readable summary for the CLI."""
    try:
        return FORMATTERS[type(report)](report, max_rows)
    except KeyError:
        raise TypeError(f"no formatter for {type(report).__name__}") from None
