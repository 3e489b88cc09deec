"""Truncated SVD of a weight delta, exact for small matrices and randomized for large ones.

Both LoRA extraction and Delta-CoMe need only the top-k singular triplets of ΔW. An exact SVD costs
O(m n min(m, n)); the randomized range finder (Halko et al., `torch.svd_lowrank`) costs
O(m n (k + p)) per power iteration and is accurate when the spectrum decays, which is what
fine-tuning deltas look like. "auto" picks exact when the matrix is small or k is a large share of
its rank, where the randomized method saves nothing (measured here on a 1536 x 576 matrix: exact
0.24 s, randomized with k + p = 18 0.02 s, with k + p = 200 0.25 s).
"""

from __future__ import annotations

from typing import Literal

import torch

SvdMethod = Literal["auto", "exact", "randomized"]

EXACT_MAX_DIM = 256  # min(m, n) at or below which "auto" always uses the exact SVD (cheap anyway)
OVERSAMPLE = 10  # extra random directions for the randomized range finder
POWER_ITERATIONS = 4  # subspace iterations; sharpen a slowly decaying spectrum


def top_singular(
    matrix: torch.Tensor, k: int, method: SvdMethod = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [m, k], S [k], V [n, k]) with matrix ≈ U diag(S) V^T; k is capped at min(m, n)."""
    if matrix.ndim != 2:
        raise ValueError(f"SVD needs a 2-D matrix, got shape {list(matrix.shape)}")
    full = min(matrix.shape)
    k = min(k, full)
    m = matrix.float()
    small = full <= EXACT_MAX_DIM or 4 * (k + OVERSAMPLE) > full
    use_exact = method == "exact" or (method == "auto" and small)
    if use_exact:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :k], s[:k], vh[:k].T
    u, s, v = torch.svd_lowrank(m, q=min(k + OVERSAMPLE, full), niter=POWER_ITERATIONS)
    return u[:, :k], s[:k], v[:, :k]
