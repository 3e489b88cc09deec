"""Merges in the singular-vector space of the task updates: TSV-M, Iso-C, Iso-CTS and KnOTS.

Summing task vectors d_i = x_i - base (task arithmetic) lets a few shared directions dominate the
spectrum of each layer's update, and the directions only one task uses drown in the others'. These
methods work per 2-D weight on the SVD of the task updates instead:

    TSV-M   (Gargiulo et al., CVPR 2025)   keep the top 1/T of each d_i's spectrum, concatenate the
            U and V pieces, whiten them (polar factor U⊥ = P Qᵀ of the concatenation) and rebuild
            U⊥ Σ V⊥ᵀ: the tasks' directions no longer overlap.
    Iso-C   (Marczak et al., ICML 2025)    SVD of Σ_i d_i, every singular value replaced by their
            mean: an isotropic spectrum, so no direction dominates.
    Iso-CTS (same paper)                    the top `common_space_fraction` of Σ_i d_i's directions,
            plus each task's own top directions orthogonal to them, whitened, spectrum flattened.
    KnOTS   (Stoica et al., ICLR 2025)      SVD of the side-by-side [d_1 … d_T] = U Σ [V_1ᵀ … V_Tᵀ]:
            the V_i live in one aligned basis, so an existing method (TIES, DARE, task arithmetic)
            merges them there and the result is U Σ V_mergedᵀ. `knots_space(fn)` wraps any method.

TSV-M, Iso-C and Iso-CTS are invariant under rotations of the row and column spaces (they use only
SVDs, projections and polar factors), so a LoRA merge runs them on the small coordinates of the
ΔW_i in the span of the adapters' factors and lifts the result back: exact, and no dense SVD of an
[out, in] matrix. KnOTS is not (its inner method is elementwise in the V coordinates).

Tensors that are not 2-D (norms, biases), and 2-D ones whose rows are tokens (embeddings, output
head: `as_matrix=False`, set by the executor from the name, as fusion-bench's LLM variant excludes
them), get base + lambda * mean_i d_i, as in the reference code (fusion-bench). Difference from fusion-bench, deliberate: spectra are cut at their numerical rank
(singular values at rounding-noise level, σ ≤ σ_max · max(m, n) · eps, are zero). For full-rank task updates this changes
nothing; for low-rank ones (LoRA products, where most singular values are exactly zero) it keeps
Iso-C's mean over the directions the tasks actually use instead of spreading it over arbitrary
null-space directions, and keeps TSV-M's whitening from mixing in null-space vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from deltatune.merge.methods import task_vectors


def numerical_rank(s: Tensor, shape: Sequence[int]) -> int:
    """How many singular values (descending) of a matrix of `shape` are above rounding noise:
    σ > σ_max · max(shape) · eps(dtype), numpy's matrix_rank tolerance."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > s[0] * max(shape) * torch.finfo(s.dtype).eps).sum())


def svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD; retried in float64 when LAPACK's float32 routine fails to converge (it does on
    the near-rank-deficient residuals of Iso-CTS on a 135M model's projections)."""
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
        return u.to(x.dtype), s.to(x.dtype), vh.to(x.dtype)


def polar(x: Tensor) -> Tensor:
    """The closest matrix with orthonormal columns (rows if wide): P Qᵀ from x = P S Qᵀ.

    In float64: the concatenated pieces are often nearly rank-deficient, where float32's SVD can
    fail to converge (seen on a 135M model's projections)."""
    p, _, qh = torch.linalg.svd(x.double(), full_matrices=False)
    return (p @ qh).to(x.dtype)


def _mean_update(base: Tensor, deltas: list[Tensor], lam: float) -> Tensor:
    return base.to(deltas[0].dtype) + lam * torch.stack(deltas).mean(dim=0)


def tsv_m(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    lam: float = 1.0,
    shape: tuple[int, int] | None = None,
    as_matrix: bool = True,
) -> Tensor:
    """TSV-M: base + lam * U⊥ Σ V⊥ᵀ from each task's top 1/T singular triplets, whitened.

    `shape` is the full weight's shape when the inputs are its coordinates in a smaller subspace
    (deltatune.merge.adapters does that for LoRA): the 1/T share is of min(shape)."""
    deltas = task_vectors(base, tensors)
    if base.dim() != 2 or not as_matrix:
        return _mean_update(base, deltas, lam)
    keep = max(1, int(min(shape or base.shape) * (1 / len(deltas))))  # fusion-bench's rounding
    us, ss, vhs = [], [], []
    for d in deltas:
        u, s, vh = svd(d)
        k = min(keep, numerical_rank(s, d.shape))
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    s_cat = torch.cat(ss)
    if s_cat.numel() == 0:
        return base.to(deltas[0].dtype).clone()
    u_white, vh_white = polar(torch.cat(us, dim=1)), polar(torch.cat(vhs, dim=0))
    return base.to(s_cat.dtype) + lam * (u_white * s_cat) @ vh_white


def iso_c(base: Tensor, tensors: Sequence[Tensor], *, lam: float = 1.0, as_matrix: bool = True) -> Tensor:
    """Iso-C: base + lam * U diag(mean σ) Vᵀ, with U, σ, V from the SVD of Σ_i d_i."""
    deltas = task_vectors(base, tensors)
    if base.dim() != 2 or not as_matrix:
        return _mean_update(base, deltas, lam)
    u, s, vh = svd(torch.stack(deltas).sum(dim=0))
    r = numerical_rank(s, base.shape)
    return base.to(s.dtype) + lam * float(s[:r].mean() if r else 0.0) * (u[:, :r] @ vh[:r])


def iso_cts(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    lam: float = 1.0,
    common_space_fraction: float = 0.8,
    as_matrix: bool = True,
) -> Tensor:
    """Iso-CTS: the common top subspace of Σ_i d_i plus task-specific directions, isotropic.

    Of the r directions (r = rank of the sum), int(r * fraction) come from the sum; the rest are
    split equally between the tasks, each taking the top singular vectors of its own update with
    the common subspace projected out. The pieces are whitened and all get the mean singular value.
    """
    deltas = task_vectors(base, tensors)
    if base.dim() != 2 or not as_matrix:
        return _mean_update(base, deltas, lam)
    n = len(deltas)
    u, s, vh = svd(torch.stack(deltas).sum(dim=0))
    r = numerical_rank(s, base.shape)
    if r == 0:
        return base.to(s.dtype).clone()
    per_task = min(round((r - int(r * common_space_fraction)) / n), r // n)  # never a negative common
    common = r - per_task * n
    u_common = u[:, :common]
    us, ss, vhs = [u_common], [s[:common]], [vh[:common]]
    for d in deltas:
        u_t, s_t, vh_t = svd(d - u_common @ (u_common.T @ d))
        us.append(u_t[:, :per_task])  # the order of the pieces does not change U⊥ V⊥ᵀ
        ss.append(s_t[:per_task])
        vhs.append(vh_t[:per_task])
    sigma = float(torch.cat(ss).mean())
    u_white, vh_white = polar(torch.cat(us, dim=1)), polar(torch.cat(vhs, dim=0))
    return base.to(s.dtype) + lam * sigma * (u_white @ vh_white)


def knots_alignment(deltas: Sequence[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """U, Σ and the per-task V_iᵀ of [d_1 … d_T] = U Σ [V_1ᵀ … V_Tᵀ] (numerical rank kept)."""
    concat = torch.cat(list(deltas), dim=1)
    u, s, vh = svd(concat)
    r = numerical_rank(s, concat.shape)
    return u[:, :r], s[:r], list(torch.split(vh[:r], deltas[0].shape[1], dim=1))


def knots_space(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Run a task-vector method `fn` on the KnOTS-aligned V_i of each 2-D tensor.

    The method sees a zero base and the V_iᵀ as its inputs, with all its parameters (weights,
    densities, lambda, LiNeS scale); its output V_mergedᵀ becomes base + U Σ V_mergedᵀ. Other
    tensors go to `fn` unchanged. With task arithmetic this is exactly task arithmetic (the map
    V ↦ U Σ V is linear), which the tests check.
    """

    def merged(base: Tensor, tensors: Sequence[Tensor], as_matrix: bool = True, **kwargs) -> Tensor:
        if base.dim() != 2 or not as_matrix:
            return fn(base, tensors, **kwargs)
        u, s, vhs = knots_alignment(task_vectors(base, tensors))
        if s.numel() == 0:
            return base.to(u.dtype).clone()
        v_merged = fn(torch.zeros_like(vhs[0]), vhs, **kwargs)
        return base.to(u.dtype) + (u * s) @ v_merged

    merged.__doc__ = f"{fn.__doc__ or ''}\n\nApplied in KnOTS space (deltatune.merge.spectral.knots_space)."
    return merged
