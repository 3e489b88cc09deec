"""Look inside deltas before merging them: spectra per module, and how much tasks overlap.

    deltatune inspect A1 A2 A3 [--base BASE] [--top-r 16] [--out DIR]

For each delta and each changed 2-D weight (module) it reports the Frobenius norm of ΔW, the
effective rank (exp of the entropy of the normalised singular values, Roy & Vetterli 2007: 1 for a
rank-1 update, r for r equal singular values), the share of energy (Σσ²) in the top-r singular
values, and the sparsity (share of exact zeros). Across deltas it reports two task-similarity
matrices: the cosine of the flattened ΔW (over all modules together) and the subspace overlap of
the top-r left singular vectors, ‖U_iᵀ U_j‖²_F / r averaged over modules (1: the same directions,
0: orthogonal, r/d for random ones). High overlap with a low or negative cosine is where merges
interfere: both tasks write to the same directions, differently.

Deltas are read module by module and never held whole: a PEFT LoRA from its factors (the SVD of
s·B·A via QR of the thin factors, exact and cheap), any other PEFT method as the dense ΔW of its
layers on the base model, a full fine-tune as finetuned - base per tensor (`--base`; token
embeddings and the output head are skipped: their rows are tokens, not directions), with a
randomized SVD for the top vectors. The deltas are walked together in module order, so only one
module of each is in memory at a time. Writes inspect.json and similarity.png (matplotlib).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deltatune.formats import ADAPTER_CONFIG, MODEL_CONFIG, FormatError

# ---------------------------------------------------------------------------------------------------
# Pure math over one module's delta


@dataclass
class ModuleSpectrum:
    """ΔW of one module as U diag(s) Vh (top vectors only when the delta is dense)."""

    u: Tensor  # [out, k] top left singular vectors
    s: Tensor  # every singular value, descending
    vh: Tensor  # [k, in]
    zeros: int  # exact zeros in ΔW
    numel: int
    dense: Tensor | None = None  # kept for exact inner products when the factors are truncated


def effective_rank(s: Tensor) -> float:
    """exp(H(p)), p = σ / Σσ: the number of equally strong directions the spectrum amounts to."""
    p = s.double() / s.double().sum() if float(s.sum()) > 0 else None
    if p is None:
        return 0.0
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def top_energy(s: Tensor, r: int) -> float:
    """Σ_{i≤r} σ_i² / Σ σ_i²."""
    total = float(s.double().square().sum())
    return float(s[:r].double().square().sum()) / total if total > 0 else 0.0


def subspace_overlap(u1: Tensor, u2: Tensor) -> float:
    """‖U1ᵀ U2‖²_F / k for orthonormal columns, k the smaller count: 1 = same subspace."""
    k = min(u1.shape[1], u2.shape[1])
    return float((u1[:, :k].T.double() @ u2[:, :k].double()).square().sum()) / k if k else 0.0


def inner(x: ModuleSpectrum, y: ModuleSpectrum) -> float:
    """⟨ΔW_x, ΔW_y⟩ (Frobenius). Factors are exact only without `dense` (LoRA): with two of them
    the product is formed in the r-dimensional spaces; a dense delta meets the other's product."""
    if x.dense is None and y.dense is None:
        uu = x.u.T.double() @ y.u.double()
        vv = y.vh.double() @ x.vh.T.double()
        return float(((x.s.double()[:, None] * uu) * (vv.T * y.s.double())).sum())

    def full(z: ModuleSpectrum) -> Tensor:
        return z.dense if z.dense is not None else (z.u.double() * z.s.double()) @ z.vh.double()

    return float((full(x) * full(y)).sum())


def spectrum_of_factors(a: Tensor, b: Tensor, scale: float) -> ModuleSpectrum:
    """Exact thin SVD of scale·B·A through QR of the factors: no dense [out, in] product or SVD.

    Its zeros are the structural ones: the rows of a zero row of B and the columns of a zero column
    of A (an exact 0.0 by cancellation elsewhere is not counted)."""
    qb, rb = torch.linalg.qr(b.double() * scale)
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    zero_rows, zero_cols = int((~b.any(dim=1)).sum()), int((~a.any(dim=0)).sum())
    out, n_in = b.shape[0], a.shape[1]
    zeros = zero_rows * n_in + zero_cols * out - zero_rows * zero_cols
    return ModuleSpectrum(qb @ u, s, vh @ qa.T, zeros, out * n_in)


def spectrum_of_dense(delta: Tensor, top_r: int) -> ModuleSpectrum:
    """Full spectrum (svdvals) and top-r vectors by randomized SVD (torch.svd_lowrank) when it pays."""
    d = delta.double()
    s = torch.linalg.svdvals(d)
    k = min(top_r, min(d.shape))
    if k * 4 < min(d.shape):
        u, _, v = torch.svd_lowrank(d, q=min(k + 8, min(d.shape)), niter=4)
        u, vh = u[:, :k], v[:, :k].T
    else:
        u, _, vh = torch.linalg.svd(d, full_matrices=False)
        u, vh = u[:, :k], vh[:k]
    return ModuleSpectrum(u, s, vh, int((d == 0).sum()), d.numel(), dense=d)


# ---------------------------------------------------------------------------------------------------
# Reading deltas module by module


def _lora_modules(path: Path) -> Iterator[tuple[str, ModuleSpectrum]] | None:
    from deltatune.formats.peft import read_adapter, read_lora

    adapter = read_adapter(path)
    if adapter.method.name != "lora":
        return None
    lora = read_lora(path)
    return ((m, spectrum_of_factors(f.a, f.b, f.scale)) for m, f in sorted(lora.modules.items()))


def _method_modules(path: Path, base: str | None, top_r: int) -> Iterator[tuple[str, ModuleSpectrum]]:
    """Any other PEFT method: attach it to the base and take each layer's dense ΔW."""
    import deltatune
    from deltatune.deltas.base import delta_layers
    from deltatune.formats import read_json

    base = base or read_json(path / ADAPTER_CONFIG).get("base_model_name_or_path") or "default"
    model = deltatune.load(base, path)
    for name, layer in sorted(delta_layers(model).items()):
        with torch.no_grad():
            dw = layer.delta_weight()
        if dw is not None and dw.dim() == 2:
            yield name, spectrum_of_dense(dw.detach(), top_r)


def _model_modules(path: Path, base: Path, top_r: int) -> Iterator[tuple[str, ModuleSpectrum]]:
    """A full fine-tune: finetuned - base for every 2-D tensor, one tensor at a time."""
    from deltatune.formats.hf import ModelFiles, check_compatible, token_indexed

    ref, ft = ModelFiles(base), ModelFiles(path)
    check_compatible(ref, [ft], exact=True)
    names = sorted(
        (n.removesuffix(".weight"), n)
        for n, info in ref.tensors.items()
        if len(info.shape) == 2 and not token_indexed(n)
    )
    with ref.reader() as read_base, ft.reader() as read_ft:
        for module, name in names:
            delta = read_ft(ft.source_name(name)).double() - read_base(name).double()
            if bool(delta.any()):
                yield module, spectrum_of_dense(delta, top_r)


def delta_modules(path: Path, base: str | None, top_r: int) -> Iterator[tuple[str, ModuleSpectrum]]:
    """(module, spectrum) pairs of one delta, whatever its kind."""
    if path.is_file():
        raise FormatError(f"{path}: expected an adapter or model directory (safetensors); files such "
                          "as .bin or .pt are pickles and are never loaded")  # fmt: skip
    if (path / ADAPTER_CONFIG).is_file():
        return _lora_modules(path) or _method_modules(path, base, top_r)
    if (path / MODEL_CONFIG).is_file():
        if base is None:
            raise FormatError(f"{path} is a full model: give --base BASE to inspect finetuned - base")
        from deltatune.models import resolve

        return _model_modules(path, resolve(base), top_r)
    raise FormatError(f"{path}: no {ADAPTER_CONFIG} or {MODEL_CONFIG} (not an adapter or a model directory)")


# ---------------------------------------------------------------------------------------------------
# The report


@dataclass
class _Totals:
    sq_norm: float = 0.0
    zeros: int = 0
    numel: int = 0
    modules: dict[str, dict[str, float]] = field(default_factory=dict)


def inspect_deltas(paths: list[Path], base: str | None = None, top_r: int = 16) -> dict[str, Any]:
    """Per-module and total statistics of each delta and the pairwise similarity matrices."""
    names = [str(p) for p in paths]
    iters = [delta_modules(Path(p), base, top_r) for p in paths]  # each sorted by module name
    heads = [next(it, None) for it in iters]
    totals = [_Totals() for _ in paths]
    n = len(paths)
    dots = [[0.0] * n for _ in range(n)]
    overlap_sum, overlap_count = [[0.0] * n for _ in range(n)], [[0] * n for _ in range(n)]
    while any(h is not None for h in heads):  # a merge-join: one module of every delta at a time
        module = min(h[0] for h in heads if h is not None)
        present = [(i, h[1]) for i, h in enumerate(heads) if h is not None and h[0] == module]
        for i, _ in present:
            heads[i] = next(iters[i], None)
        shapes = {(sp.u.shape[0], sp.vh.shape[1]) for _, sp in present}
        if len(shapes) > 1:
            raise FormatError(f"module {module} has different shapes across the deltas: {sorted(shapes)}")
        for i, sp in present:
            t = totals[i]
            sq = float(sp.s.double().square().sum())
            t.sq_norm += sq
            t.zeros += sp.zeros
            t.numel += sp.numel
            t.modules[module] = {
                "norm": math.sqrt(sq),
                "effective_rank": effective_rank(sp.s),
                f"top{top_r}_energy": top_energy(sp.s, top_r),
                "sparsity": sp.zeros / sp.numel,
            }
        for a, (i, x) in enumerate(present):
            for j, y in present[a:]:
                dots[i][j] = dots[j][i] = dots[i][j] + inner(x, y)
                if i != j:
                    k = min(top_r, x.u.shape[1], y.u.shape[1])
                    value = subspace_overlap(x.u[:, :k], y.u[:, :k])
                    overlap_sum[i][j] += value
                    overlap_sum[j][i] += value
                    overlap_count[i][j] += 1
                    overlap_count[j][i] += 1
    cosine = [[dots[i][j] / math.sqrt(dots[i][i] * dots[j][j]) if dots[i][i] * dots[j][j] > 0 else 0.0
               for j in range(n)] for i in range(n)]  # fmt: skip
    overlap = [[1.0 if i == j else (overlap_sum[i][j] / overlap_count[i][j] if overlap_count[i][j] else 0.0)
                for j in range(n)] for i in range(n)]  # fmt: skip
    deltas = []
    for name, t in zip(names, totals, strict=True):
        stats = list(t.modules.values())
        deltas.append({
            "path": name,
            "modules": len(stats),
            "norm": math.sqrt(t.sq_norm),
            "mean_effective_rank": sum(s["effective_rank"] for s in stats) / max(len(stats), 1),
            f"mean_top{top_r}_energy": sum(s[f"top{top_r}_energy"] for s in stats) / max(len(stats), 1),
            "sparsity": t.zeros / t.numel if t.numel else 0.0,
            "per_module": t.modules,
        })  # fmt: skip
    return {"top_r": top_r, "deltas": deltas, "cosine": cosine, "subspace_overlap": overlap}


def label(path: str | Path) -> str:
    """A short name for a delta: its directory, or the run directory for a run's adapter/."""
    path = Path(path)
    return path.parent.name if path.name == "adapter" and path.parent.name else path.name


def plot_similarity(report: dict[str, Any], path: Path) -> None:
    """Two heat maps side by side: cosine of ΔW and top-r subspace overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label(d["path"]) for d in report["deltas"]]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(labels), 2.5 + 0.6 * len(labels)))
    for ax, key, title, (lo, hi) in (
        (axes[0], "cosine", "cosine of ΔW", (-1, 1)),
        (axes[1], "subspace_overlap", f"top-{report['top_r']} subspace overlap", (0, 1)),
    ):
        values = report[key]
        im = ax.imshow(values, vmin=lo, vmax=hi, cmap="RdBu_r" if lo < 0 else "viridis")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if key != "cosine" else "k")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
