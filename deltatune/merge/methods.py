"""Merge math: one small pure function per method, over the tensors of one parameter.

Every method sees the same narrow slice of the problem: the base model's tensor (or None), the
input models' tensors for that same parameter name, and parameters already resolved for this
tensor (a list with one value per input model for per-model parameters such as `weight`, one value
for shared ones such as `normalize`). Keeping the math this narrow is what lets the executor stream
a model tensor by tensor, and it is what the formula tests check by hand.

The task-vector methods share one shape. With task vectors d_i = x_i - base:

    merged = base + lambda * layer_scale * combine_i( w_i * sparsify(d_i) )

where `sparsify` is identity (task arithmetic), magnitude top-k (TIES trim), random drop-and-rescale
(DARE) or outlier-and-small removal (Model Breadcrumbs), and `combine` is a plain sum or the TIES
sign election with a disjoint (weighted) mean. `layer_scale` is LiNeS: it grows linearly with depth.

The registry `METHODS` (deltatune.merge.registry) is keyed by mergekit's `merge_method` names, with mergekit's parameter names
and defaults, so a mergekit YAML resolves to the same numbers. Deliberate differences from mergekit:

- DARE rescales the kept entries by 1/density, i.e. 1/(1-p) as in the DARE paper, which keeps every
  entry unbiased (E[result] = delta); mergekit instead rescales each task vector so that its L1 norm
  is unchanged, a data-dependent factor. DAREx-q (`dare_rescale: darex_q`) rescales by 1/q.
- DARE draws its masks from a torch.Generator seeded per (seed, tensor name, model index), so a
  merge is reproducible regardless of thread scheduling; mergekit uses the global RNG.
- Breadcrumbs keeps the magnitude ranks [n_bottom, n_bottom + n_keep) as the paper describes.
  mergekit has been reported to zero the whole task vector when gamma * numel < 1 (no outlier to
  drop); we keep the top entries then (tested), and so does the mergekit 0.1.5 that tests run against.
- TIES elects the sign of the weighted sum as the paper's sgn(): where the sum is exactly zero no
  model agrees and the merged delta is 0 (mergekit picks +). Trimming and election are per tensor
  (as in mergekit); the TIES paper trims over the whole flattened model.
- Magnitude thresholds keep every entry tied with the k-th largest magnitude, so with exact ties
  slightly more than k entries can survive (mergekit's argsort breaks ties arbitrarily).
- All arithmetic is float32 (float64 if an input is float64) whatever `dtype` says; mergekit computes
  in `dtype`. Results are cast to the output dtype once, at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import reduce
from typing import Any

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------------
# Small helpers


def work_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32: never do the math in half precision."""
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


Slicer = Callable[[slice], Tensor]  # values of a flat array, computed lazily for a slice of it
CHUNK = 1 << 18  # elements per chunk when a pass streams over a big tensor (1 MB of float32)


def flat_slicer(values: Tensor) -> Slicer:
    flat = values.reshape(-1)
    return lambda part: flat[part]


def delta_slicer(base: Tensor, x: Tensor) -> Slicer:
    """|x - base| for any slice, computed on demand: thresholds never need the whole delta at once."""
    base_flat, x_flat = base.reshape(-1), x.reshape(-1)
    dtype = work_dtype(base, x)
    return lambda part: (x_flat[part].to(dtype) - base_flat[part].to(dtype)).abs_()


def kth_smallest(values: Slicer, n: int, k: int) -> float:
    """Exact k-th smallest (1-based) of n lazily computed values, without materialising them all.

    A strided sample brackets the answer; one streaming pass counts the values below the bracket
    and keeps those inside it, and only those go through kthvalue. If the bracket misses (possible
    for adversarial layouts) it falls back to a full kthvalue, so the answer is always exact: the
    sample only decides how fast it is (~5x faster than torch.kthvalue on a 28M-entry tensor).
    """
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range for {n} values")
    if n <= 1 << 16:
        return float(torch.kthvalue(values(slice(0, n)), k).values)
    sample = values(slice(0, n, n // min(1 << 16, n >> 5)))
    m = sample.numel()
    q = k / n
    margin = 5.0 * math.sqrt(q * (1 - q) / m) + 2.0 / m
    lo_rank, hi_rank = math.floor((q - margin) * m), math.ceil((q + margin) * m)
    lo = float(torch.kthvalue(sample, lo_rank).values) if lo_rank >= 1 else -math.inf
    hi = float(torch.kthvalue(sample, hi_rank).values) if hi_rank <= m else math.inf
    below, inside = 0, []
    for start in range(0, n, CHUNK):
        chunk = values(slice(start, min(start + CHUNK, n)))
        at_least_lo = chunk >= lo
        below += chunk.numel() - int(torch.count_nonzero(at_least_lo))
        inside.append(chunk[at_least_lo.logical_and_(chunk <= hi)])
    candidates = torch.cat(inside)
    if below < k <= below + candidates.numel():
        return float(torch.kthvalue(candidates, k - below).values)
    return float(torch.kthvalue(values(slice(0, n)), k).values)


def lines_scale(layer: int | None, num_layers: int, alpha: float, beta: float) -> float:
    """LiNeS: lambda grows linearly from alpha (first layer) to alpha + beta (last layer).

    Tensors outside the repeated blocks (embeddings, final norm, head) get alpha, the value of the
    shallowest layer, as in the LiNeS reference code for parameters outside the blocks.
    """
    if layer is None or num_layers <= 1:
        return alpha
    return alpha + beta * layer / (num_layers - 1)


# ---------------------------------------------------------------------------------------------------
# Sparsifiers: per-tensor magnitude bounds (computed once, over the whole tensor), then keep-masks


def magnitude_bounds(delta: Slicer, n: int, density: float) -> tuple[float, float]:
    """TIES trim: |d| within the bounds is the top `density` fraction (at least one entry, as mergekit)."""
    if density >= 1:
        return -math.inf, math.inf
    if density <= 0 or n == 0:
        return math.inf, math.inf
    k = max(1, int(density * n))
    return kth_smallest(delta, n, n - k + 1), math.inf


def breadcrumbs_bounds(delta: Slicer, n: int, density: float, gamma: float) -> tuple[float, float]:
    """Model Breadcrumbs: drop the `gamma` largest-magnitude outliers and the smallest entries.

    Counting follows mergekit's parameters: n_keep = int(density * n) entries survive, n_top =
    int(gamma * n) of the largest are dropped first, and the rest of the drop comes from the bottom:
    the kept magnitude ranks (ascending) are [n_bottom, n_bottom + n_keep).
    """
    if density >= 1:
        return -math.inf, math.inf
    n_keep = int(density * n)
    if n_keep <= 0:
        return math.inf, math.inf
    n_bottom = max(0, n - n_keep - int(gamma * n))
    lo = kth_smallest(delta, n, n_bottom + 1) if n_bottom > 0 else -math.inf
    return lo, kth_smallest(delta, n, n_bottom + n_keep)


def trimmed(delta: Tensor, bounds: tuple[float, float]) -> Tensor:
    """delta with every entry outside lo <= |d| <= hi set to 0 (entries equal to a bound are kept).

    Arithmetic instead of boolean masks: on CPU, masked_fill/where cost ~30x a fused elementwise op.
    hardshrink zeroes |d| <= lambda, so lambda is the largest float below lo.
    """
    lo, hi = bounds
    if lo > 0:
        below = torch.nextafter(
            torch.tensor(lo, dtype=delta.dtype), torch.tensor(-math.inf, dtype=delta.dtype)
        )
        delta = torch.nn.functional.hardshrink(delta, float(below))
    if hi < math.inf:
        delta = delta.mul_(delta.abs().le_(hi))
    return delta


def magnitude_keep_mask(delta: Tensor, density: float) -> Tensor:
    """Which (nonzero) entries the TIES trim keeps."""
    return trimmed(delta.clone(), magnitude_bounds(flat_slicer(delta.abs()), delta.numel(), density)) != 0


def breadcrumbs_keep_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Which (nonzero) entries the Breadcrumbs mask keeps."""
    bounds = breadcrumbs_bounds(flat_slicer(delta.abs()), delta.numel(), density, gamma)
    return trimmed(delta.clone(), bounds) != 0


def dare_keep_mask(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE drop: 1.0 with probability `density`, else 0.0, independently per entry."""
    return torch.empty(delta.shape, dtype=delta.dtype).bernoulli_(density, generator=generator)


def dare_rescale_factor(density: float, q: float | None, rescale: bool) -> float:
    """1/(1-p) = 1/density as in the DARE paper; 1/q for DAREx-q; 1 when rescaling is off."""
    if not rescale:
        return 1.0
    return 1.0 / q if q is not None else 1.0 / density


# ---------------------------------------------------------------------------------------------------
# Combining task vectors


def task_vectors(base: Tensor, tensors: Sequence[Tensor]) -> list[Tensor]:
    """Fresh float32/64 differences x_i - base (safe to modify in place)."""
    dtype = work_dtype(base, *tensors)
    base_w = base.to(dtype)
    return [x.to(dtype) - base_w for x in tensors]


def combine_task_vectors(
    base: Tensor,
    deltas: list[Tensor],
    weight: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
    layer_scale: float,
) -> Tensor:
    """base + lam * layer_scale * (sum or TIES disjoint mean) of weighted task vectors.

    With `consensus`, the elected sign is sgn(S), S = sum_i w_i d_i; model i contributes where
    w_i d_i has that sign, i.e. where w_i d_i S > 0 (which also excludes trimmed zeros and S = 0),
    and `normalize` divides by the sum of the contributing weights: the TIES disjoint mean. Without
    it, `normalize` divides by sum_i w_i (skipped when that is ~0, as mergekit). `deltas` are reused.
    """
    scale = lam * layer_scale
    if not consensus:
        merged = deltas[0].mul_(weight[0])
        for d, w in zip(deltas[1:], weight[1:], strict=True):
            merged.add_(d, alpha=w)
        total = float(sum(weight))
        if normalize and abs(total) >= 1e-8:
            scale /= total
        return torch.add(base.to(merged.dtype), merged, alpha=scale)
    elected = torch.mul(deltas[0], weight[0])
    for d, w in zip(deltas[1:], weight[1:], strict=True):
        elected.add_(d, alpha=w)
    merged = torch.zeros_like(elected)
    divisor = torch.zeros_like(elected) if normalize else None
    for d, w in zip(deltas, weight, strict=True):
        if w == 0:
            continue
        agree = torch.mul(d, elected)
        agree = agree.gt_(0) if w > 0 else agree.lt_(0)  # 1.0 where w*d has the elected sign, else 0.0
        merged.addcmul_(d, agree, value=w)
        if divisor is not None:
            divisor.add_(agree, alpha=w)
    if divisor is not None:
        if min(weight) > 0:  # a nonzero divisor is >= the smallest weight; zero ones have merged == 0
            divisor.clamp_(min=min(weight) / 2)
        else:
            divisor.masked_fill_(divisor == 0, 1)
        merged.div_(divisor)
    return torch.add(base.to(merged.dtype), merged, alpha=scale)


# ---------------------------------------------------------------------------------------------------
# The methods (signature: base, tensors, **resolved parameters) -> merged tensor in the work dtype


def linear(
    base: Tensor | None, tensors: Sequence[Tensor], *, weight: Sequence[float], normalize: bool = True
) -> Tensor:
    """Model soup: sum_i w_i x_i, divided by sum_i w_i when `normalize` (Wortsman et al. 2022)."""
    dtype = work_dtype(*tensors)
    total = float(sum(weight))
    if normalize and abs(total) < 1e-8:
        raise ValueError("linear merge with normalize: the weights sum to zero; set normalize: false")
    scale = 1 / total if normalize else 1.0  # folded into the weights: one pass per input
    merged = torch.mul(tensors[0].to(dtype), weight[0] * scale)
    for x, w in zip(tensors[1:], weight[1:], strict=True):
        merged.add_(x.to(dtype), alpha=w * scale)
    return merged


def task_arithmetic(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    weight: Sequence[float],
    normalize: bool = False,
    lam: float = 1.0,
    layer_scale: float = 1.0,
) -> Tensor:
    """base + lambda * sum_i w_i (x_i - base) (Ilharco et al. 2023)."""
    deltas = task_vectors(base, tensors)
    return combine_task_vectors(
        base, deltas, weight, consensus=False, normalize=normalize, lam=lam, layer_scale=layer_scale
    )


def ties(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    normalize: bool = True,
    lam: float = 1.0,
    layer_scale: float = 1.0,
    bounds: Sequence[tuple[float, float]] | None = None,
) -> Tensor:
    """TIES (Yadav et al. 2023): trim to top-k magnitude, elect sign by sum, disjoint mean.

    `bounds` (from `ties_statistics` on the whole tensors) lets the executor call this on chunks.
    """
    bounds = bounds or ties_statistics(base, tensors, density=density)["bounds"]
    deltas = [trimmed(d, b) for d, b in zip(task_vectors(base, tensors), bounds, strict=True)]
    return combine_task_vectors(
        base, deltas, weight, consensus=True, normalize=normalize, lam=lam, layer_scale=layer_scale
    )


def dare(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    consensus: bool,
    weight: Sequence[float],
    density: Sequence[float],
    generator: Callable[[int], torch.Generator],
    q: Sequence[float | None] | None = None,
    rescale: bool = True,
    normalize: bool = False,
    lam: float = 1.0,
    layer_scale: float = 1.0,
) -> Tensor:
    """DARE (Yu et al. 2024): drop each delta entry with p = 1 - density, rescale by 1/(1-p).

    Then sum (`dare_linear`) or TIES-elect (`dare_ties`, consensus=True). `generator(i)` returns the
    seeded generator for input model i. With `q` (DAREx-q, Deng et al. 2025) the rescale is 1/q_i
    instead; the paper tunes q on a batch of data, here it is a parameter. Called chunk by chunk,
    each model's generator continues where the previous chunk left it.
    """
    deltas = task_vectors(base, tensors)
    for i, (d, rho) in enumerate(zip(deltas, density, strict=True)):
        if rho >= 1:
            continue
        if rho <= 0:
            d.zero_()
            continue
        d.mul_(
            dare_keep_mask(d, rho, generator(i)).mul_(
                dare_rescale_factor(rho, None if q is None else q[i], rescale)
            )
        )
    return combine_task_vectors(
        base, deltas, weight, consensus=consensus, normalize=normalize, lam=lam, layer_scale=layer_scale
    )


def breadcrumbs(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    consensus: bool,
    weight: Sequence[float],
    density: Sequence[float],
    gamma: Sequence[float],
    normalize: bool = False,
    lam: float = 1.0,
    layer_scale: float = 1.0,
    bounds: Sequence[tuple[float, float]] | None = None,
) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024): mask outliers and small deltas, then combine.

    consensus=False sums (`breadcrumbs`); consensus=True adds the TIES sign election
    (mergekit's `breadcrumbs_ties`). `bounds` as in `ties`.
    """
    bounds = bounds or breadcrumbs_statistics(base, tensors, density=density, gamma=gamma)["bounds"]
    deltas = [trimmed(d, b) for d, b in zip(task_vectors(base, tensors), bounds, strict=True)]
    return combine_task_vectors(
        base, deltas, weight, consensus=consensus, normalize=normalize, lam=lam, layer_scale=layer_scale
    )


# ---------------------------------------------------------------------------------------------------
# Whole-tensor statistics: what a method needs before it can run on chunks of a tensor.
# Each returns extra keyword arguments for the method; called with the full (flat) tensors.


def no_statistics(base: Tensor | None, tensors: Sequence[Tensor], **params: Any) -> dict[str, Any]:
    return {}


def ties_statistics(
    base: Tensor, tensors: Sequence[Tensor], *, density: Sequence[float], **_: Any
) -> dict[str, Any]:
    n = base.numel()
    return {
        "bounds": [
            magnitude_bounds(delta_slicer(base, x), n, rho) for x, rho in zip(tensors, density, strict=True)
        ]
    }


def breadcrumbs_statistics(
    base: Tensor, tensors: Sequence[Tensor], *, density: Sequence[float], gamma: Sequence[float], **_: Any
) -> dict[str, Any]:
    n = base.numel()
    return {
        "bounds": [
            breadcrumbs_bounds(delta_slicer(base, x), n, rho, g)
            for x, rho, g in zip(tensors, density, gamma, strict=True)
        ]
    }


def dare_statistics(
    base: Tensor, tensors: Sequence[Tensor], *, generator: Callable[[int], torch.Generator], **_: Any
) -> dict[str, Any]:
    """One generator per model for the whole tensor, so consecutive chunks draw consecutive masks."""
    generators = [generator(i) for i in range(len(tensors))]
    return {"generator": generators.__getitem__}


def model_stock(base: Tensor, tensors: Sequence[Tensor], *, filter_wise: bool = False) -> Tensor:
    """Model Stock (Jang et al. 2024): interpolate base -> average with t = N cos / (1 + (N-1) cos).

    cos is the mean pairwise cosine between task vectors, over the whole tensor or, with
    `filter_wise`, per row (last dimension). Where 1 + (N-1) cos is ~0 the base is kept.
    """
    dtype = work_dtype(base, *tensors)
    w0 = base.to(dtype)

    def flat(x: Tensor) -> Tensor:  # rows over which one cosine (and one t) is computed
        return x.reshape(-1, x.shape[-1]) if filter_wise and x.dim() > 1 else x.reshape(1, -1)

    offsets = [flat(x.to(dtype) - w0) for x in tensors]
    norms = [o.norm(dim=-1) for o in offsets]
    cosines = [
        ((offsets[i] * offsets[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
        for i in range(len(offsets))
        for j in range(i + 1, len(offsets))
    ]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(tensors)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1, denominator))
    mean_offset = reduce(torch.add, offsets) / n
    return (flat(w0) + t * mean_offset).reshape(base.shape)


def slerp(base: Tensor, tensors: Sequence[Tensor], *, t: float, dot_threshold: float = 0.9995) -> Tensor:
    """Spherical interpolation from base (t=0) to the other model (t=1), over the flattened tensor.

    Nearly colinear tensors (|cos| > 0.9995) fall back to linear interpolation, as in mergekit.
    """
    dtype = work_dtype(base, *tensors)
    v0, v1 = base.to(dtype), tensors[0].to(dtype)
    n0, n1 = float(v0.norm()), float(v1.norm())
    n0, n1 = (n0 if n0 > 1e-8 else 1.0), (n1 if n1 > 1e-8 else 1.0)
    dot = max(-1.0, min(1.0, float((v0.reshape(-1).double() @ v1.reshape(-1).double()) / (n0 * n1))))
    if abs(dot) > dot_threshold:
        c0, c1 = 1 - t, t
    else:
        theta = math.acos(dot)
        c0, c1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return torch.add(v0.mul(c0), v1, alpha=c1)
