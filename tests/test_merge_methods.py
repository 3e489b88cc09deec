"""Merge math against hand-computed expectations, one method at a time (small tensors, no files)."""

from __future__ import annotations

import math

import pytest
import torch

from deltatune.merge import methods
from deltatune.merge.methods import (
    breadcrumbs_keep_mask,
    flat_slicer,
    kth_smallest,
    linear,
    lines_scale,
    magnitude_keep_mask,
    model_stock,
    slerp,
    task_arithmetic,
    ties,
)
from deltatune.merge.registry import METHODS

T = torch.tensor


def gen(seed: int):
    return lambda i: torch.Generator().manual_seed(seed * 1000 + i)


def test_linear_is_weighted_mean_or_sum():
    a, b = T([1.0, 2.0]), T([3.0, 6.0])
    # (1*1 + 3*3) / 4 = 2.5 and (1*2 + 3*6) / 4 = 5
    torch.testing.assert_close(linear(None, [a, b], weight=[1.0, 3.0]), T([2.5, 5.0]))
    torch.testing.assert_close(linear(None, [a, b], weight=[1.0, 3.0], normalize=False), T([10.0, 20.0]))
    with pytest.raises(ValueError, match="sum to zero"):
        linear(None, [a, b], weight=[1.0, -1.0])


def test_task_arithmetic_scales_the_weighted_sum_of_task_vectors():
    base = T([1.0, 1.0])
    x1, x2 = T([2.0, 0.0]), T([1.0, 3.0])  # task vectors [1, -1] and [0, 2]
    # base + 0.5 * (2*[1,-1] + 1*[0,2]) = [1,1] + 0.5*[2,0] = [2, 1]
    got = task_arithmetic(base, [x1, x2], weight=[2.0, 1.0], lam=0.5)
    torch.testing.assert_close(got, T([2.0, 1.0]))
    # normalize divides by the weight sum 3; LiNeS layer_scale multiplies like lambda
    got = task_arithmetic(base, [x1, x2], weight=[2.0, 1.0], normalize=True, layer_scale=3.0)
    torch.testing.assert_close(got, T([3.0, 1.0]))


# The 2x3 TIES case worked by hand (base = 1 everywhere):
#   d1 = [[1, -2, .5], [3, -.2, .1]]  top-3 |d1|: 3, 2, 1  -> [[1, -2, 0], [3, 0, 0]]
#   d2 = [[-4, 1, .3], [2, .6, -.05]] top-3 |d2|: 4, 2, 1  -> [[-4, 1, 0], [2, 0, 0]]
D1 = T([[1.0, -2.0, 0.5], [3.0, -0.2, 0.1]])
D2 = T([[-4.0, 1.0, 0.3], [2.0, 0.6, -0.05]])


def test_ties_trim_elect_disjoint_mean_by_hand():
    base = torch.ones(2, 3)
    # weights 1, 1: sum [[-3, -1, 0], [5, 0, 0]] -> signs [[-, -, 0], [+, 0, 0]]
    # (0,0): only d2=-4 agrees -> -4; (0,1): only d1=-2 -> -2; (0,2): sign 0 -> 0; (1,0): (3+2)/2 = 2.5
    got = ties(base, [base + D1, base + D2], weight=[1.0, 1.0], density=[0.5, 0.5])
    torch.testing.assert_close(got, base + T([[-4.0, -2.0, 0.0], [2.5, 0.0, 0.0]]))
    # weights 2, 1 and lambda 0.5: weighted d1 = [[2, -4, 0], [6, 0, 0]]; sum [[-2, -3, 0], [8, 0, 0]]
    # (0,0): d2 -4 / w 1 = -4; (0,1): d1 -4 / w 2 = -2; (1,0): (6 + 2) / (2 + 1) = 8/3; times 0.5
    got = ties(base, [base + D1, base + D2], weight=[2.0, 1.0], density=[0.5, 0.5], lam=0.5)
    torch.testing.assert_close(got, base + 0.5 * T([[-4.0, -2.0, 0.0], [8 / 3, 0.0, 0.0]]))
    # normalize off: the agreeing weighted deltas are summed: (1,0) = 6 + 2 = 8
    got = ties(base, [base + D1, base + D2], weight=[2.0, 1.0], density=[0.5, 0.5], normalize=False)
    torch.testing.assert_close(got, base + T([[-4.0, -4.0, 0.0], [8.0, 0.0, 0.0]]))


def test_magnitude_mask_keeps_top_k_and_at_least_one():
    d = T([0.1, -0.5, 0.3, 0.9, -0.2])
    assert magnitude_keep_mask(d, 0.4).tolist() == [False, True, False, True, False]
    assert magnitude_keep_mask(d, 0.01).tolist() == [False, False, False, True, False]
    assert magnitude_keep_mask(d, 1.0).all() and not magnitude_keep_mask(d, 0.0).any()


def test_breadcrumbs_drops_top_gamma_and_bottom():
    d = torch.linspace(0.1, 1.0, 10) * T([1, -1] * 5)
    # n=10, density .6 -> keep 6; gamma .2 -> drop the 2 largest; the bottom 2 go too: keep |d| in .3 ... .8
    keep = breadcrumbs_keep_mask(d, 0.6, 0.2)
    assert torch.allclose(d.abs()[keep], torch.linspace(0.3, 0.8, 6))
    got = METHODS["breadcrumbs"].fn(torch.zeros(10), [d], weight=[2.0], density=[0.6], gamma=[0.2])
    torch.testing.assert_close(got, torch.where(keep, 2 * d, 0))


def test_breadcrumbs_with_gamma_times_numel_below_one_keeps_the_top():
    # gamma * n = 0.5 < 1: nothing is an outlier; older mergekit zeroed the whole delta here.
    d = torch.linspace(0.1, 1.0, 10)
    keep = breadcrumbs_keep_mask(d, 0.6, 0.05)
    assert torch.allclose(d[keep], torch.linspace(0.5, 1.0, 6))


def test_breadcrumbs_ties_elects_signs_after_masking():
    base = torch.zeros(4)
    x1, x2 = T([1.0, 2.0, -3.0, 0.5]), T([-2.0, 1.0, -1.0, 4.0])
    # density .75, gamma .25: keep the 3 middle-to-large... n_keep=3, n_top=1, n_bot=0 -> drop only the largest
    # x1 keeps [1, 2, 0, .5] (drops -3); x2 keeps [-2, 1, -1, 0] (drops 4)
    # sum [-1, 3, -1, .5] -> signs [-, +, -, +]; disjoint means: [-2, 1.5, -1, .5]
    got = METHODS["breadcrumbs_ties"].fn(
        base, [x1, x2], weight=[1.0, 1.0], density=[0.75, 0.75], gamma=[0.25, 0.25], normalize=True
    )
    torch.testing.assert_close(got, T([-2.0, 1.5, -1.0, 0.5]))


def test_dare_keeps_density_and_is_unbiased():
    n, density = 100_000, 0.3
    torch.manual_seed(0)
    base, delta = torch.randn(n), torch.randn(n)
    fn = METHODS["dare_linear"].fn
    got = fn(base, [base + delta], weight=[1.0], density=[density], generator=gen(1)) - base
    kept = got != 0
    sigma = math.sqrt(density * (1 - density) / n)
    assert abs(kept.float().mean().item() - density) < 3 * sigma
    # kept entries are rescaled by exactly 1/(1-p) = 1/density
    torch.testing.assert_close(got[kept], delta[kept] / density, rtol=1e-5, atol=1e-6)
    # E[result] = delta: the sum's deviation is within 3 sigma of its binomial spread
    spread = math.sqrt(float((delta**2).sum()) * (1 - density) / density)
    assert abs(float(got.sum() - delta.sum())) < 3 * spread
    # reproducible from the seed; another seed draws another mask
    again = fn(base, [base + delta], weight=[1.0], density=[density], generator=gen(1)) - base
    other = fn(base, [base + delta], weight=[1.0], density=[density], generator=gen(2)) - base
    assert torch.equal(got, again) and not torch.equal(got, other)


def test_dare_rescale_options():
    base, delta = torch.zeros(10_000), torch.randn(10_000)
    fn = METHODS["dare_linear"].fn
    darex = fn(base, [delta], weight=[1.0], density=[0.2], generator=gen(3), q=[0.5])
    kept = darex != 0
    torch.testing.assert_close(darex[kept], delta[kept] / 0.5)  # DAREx-q: 1/q instead of 1/(1-p)
    plain = fn(base, [delta], weight=[1.0], density=[0.2], generator=gen(3), rescale=False)
    torch.testing.assert_close(plain, torch.where(kept, delta, 0))  # same mask, no rescale
    assert torch.equal(fn(base, [delta], weight=[1.0], density=[1.0], generator=gen(3)), delta)


def test_dare_ties_elects_after_drop():
    base = torch.zeros(50_000)
    x1, x2 = torch.full((50_000,), 1.0), torch.full((50_000,), -3.0)
    got = METHODS["dare_ties"].fn(base, [x1, x2], weight=[1.0, 1.0], density=[0.5, 0.5], generator=gen(4))
    # each entry: where x2 survives (rescaled to -6) its sign wins; else x1's 2 if it survived; else 0
    assert set(torch.unique(got).tolist()) <= {-6.0, 2.0, 0.0}
    assert abs((got == -6.0).float().mean().item() - 0.5) < 0.01
    assert abs((got == 2.0).float().mean().item() - 0.25) < 0.01


def test_model_stock_interpolation_ratio():
    base = T([0.0, 0.0])
    # orthogonal task vectors: cos 0 -> t = 0 -> the base
    torch.testing.assert_close(model_stock(base, [T([1.0, 0.0]), T([0.0, 1.0])]), base)
    # identical directions: cos 1 -> t = 2*1/(1+1) = 1 -> the average
    torch.testing.assert_close(model_stock(base, [T([1.0, 1.0]), T([3.0, 3.0])]), T([2.0, 2.0]))
    # cos 45deg = .70711 -> t = 2c/(1+c) = .82843; average offset [1, .5]
    torch.testing.assert_close(model_stock(base, [T([1.0, 0.0]), T([1.0, 1.0])]), T([0.82843, 0.41421]))
    # filter_wise: one t per row
    rows = model_stock(
        torch.zeros(2, 2), [T([[1.0, 0.0], [1.0, 1.0]]), T([[0.0, 1.0], [3.0, 3.0]])], filter_wise=True
    )
    torch.testing.assert_close(rows, T([[0.0, 0.0], [2.0, 2.0]]))


def test_slerp_follows_the_arc_and_falls_back_to_lerp():
    got = slerp(T([1.0, 0.0]), [T([0.0, 1.0])], t=0.5)
    torch.testing.assert_close(got, T([math.sqrt(0.5), math.sqrt(0.5)]))
    got = slerp(T([1.0, 0.0]), [T([0.0, 2.0])], t=1 / 3)  # theta = 90deg: sin(60)/1 and sin(30)/1
    torch.testing.assert_close(got, T([math.sin(math.pi / 3), 2 * math.sin(math.pi / 6)]))
    torch.testing.assert_close(slerp(T([1.0, 0.0]), [T([2.0, 0.0])], t=0.25), T([1.25, 0.0]))


def test_lines_scale_grows_linearly_with_depth():
    assert lines_scale(0, 30, 0.2, 0.6) == pytest.approx(0.2)
    assert lines_scale(29, 30, 0.2, 0.6) == pytest.approx(0.8)
    assert lines_scale(10, 21, 0.2, 0.6) == pytest.approx(0.5)
    assert lines_scale(None, 30, 0.2, 0.6) == pytest.approx(0.2)


@pytest.mark.parametrize("n", [1_000, 150_000])
def test_kth_smallest_is_exact(n, monkeypatch):
    monkeypatch.setattr(methods, "CHUNK", 20_000)  # several streaming chunks
    torch.manual_seed(n)
    values = torch.randn(n).abs()
    values[: n // 3] = 0.0  # many ties
    for k in (1, n // 3, n // 3 + 1, n // 2, n - 1, n):
        assert kth_smallest(flat_slicer(values), n, k) == torch.kthvalue(values, k).values.item()
    ordered = torch.sort(values).values  # a layout the strided sample brackets badly
    assert kth_smallest(flat_slicer(ordered), n, n // 2) == torch.kthvalue(ordered, n // 2).values.item()


@pytest.mark.parametrize(
    "method", ["linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties"]
)
def test_chunked_application_equals_whole_tensor(method, monkeypatch):
    """What the executor does for big tensors: statistics on the whole, then the function on chunks."""
    monkeypatch.setattr(methods, "CHUNK", 7_000)
    torch.manual_seed(1)
    base = torch.randn(100, 1000)
    tensors = [base + torch.randn(100, 1000) * 0.1 for _ in range(3)]
    spec = METHODS[method]
    kwargs = {
        p.arg: ([0.6, 0.3, 0.5] if p.name == "density" else [0.5, 1.0, 2.0])
        for p in spec.params
        if p.per_model
    }
    kwargs |= {"gamma": [0.01, 0.02, 0.0]} if "gamma" in kwargs else {}
    kwargs |= {"generator": gen(5)} if spec.random else {}
    kwargs.pop("q", None)
    whole = spec.fn(base, tensors, **kwargs)
    flat = [t.reshape(-1) for t in tensors]
    kwargs |= spec.statistics(base.reshape(-1), flat, **kwargs)
    parts = [
        spec.fn(base.reshape(-1)[i : i + 30_000], [t[i : i + 30_000] for t in flat], **kwargs)
        for i in range(0, 100_000, 30_000)
    ]
    torch.testing.assert_close(torch.cat(parts).reshape(100, 1000), whole, rtol=0, atol=0)
