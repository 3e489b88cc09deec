"""TSV-M, Iso-C, Iso-CTS and KnOTS: hand-computed cases, fusion-bench's tensors, and the YAML path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from deltatune.formats.peft import read_lora
from deltatune.merge.config import parse_config
from deltatune.merge.executor import run_merge
from deltatune.merge.methods import task_arithmetic, ties
from deltatune.merge.spectral import iso_c, iso_cts, knots_space, tsv_m

T = torch.tensor
D = torch.diag


def test_iso_c_flattens_the_spectrum_of_the_sum_to_its_mean():
    base = torch.ones(2, 2)
    d1, d2 = D(T([3.0, 0.0])), D(T([0.0, 1.0]))
    # sum = diag(3, 1): singular values 3 and 1, mean 2 -> 2 * I; lambda scales it
    torch.testing.assert_close(iso_c(base, [base + d1, base + d2]), base + 2 * torch.eye(2))
    torch.testing.assert_close(iso_c(base, [base + d1, base + d2], lam=0.5), base + torch.eye(2))
    # a rank-1 sum keeps rank 1: the mean is over the nonzero singular values only
    torch.testing.assert_close(
        iso_c(torch.zeros(2, 2), [D(T([3.0, 0.0])), D(T([1.0, 0.0]))]), D(T([4.0, 0.0]))
    )
    # 1-D tensors: the mean task vector
    torch.testing.assert_close(iso_c(T([1.0, 1.0]), [T([3.0, 1.0]), T([1.0, 3.0])]), T([2.0, 2.0]))


def test_tsv_keeps_each_tasks_top_share_and_whitens():
    zero = torch.zeros(4, 4)
    # orthogonal tasks: whitening changes nothing, each task keeps its top 4/2 = 2 directions
    d1, d2 = (
        D(T([5.0, 0.0, 2.0, 0.0])) + 0.5 * torch.outer(T([0.0, 0, 0, 1]), T([0.0, 0, 0, 1])),
        D(T([0.0, 3.0, 0.0, 0.0])),
    )
    # d1 = diag(5, 0, 2, 0.5): its top 2 are 5 (e1) and 2 (e3), 0.5 is dropped; d2 = 3 e2
    torch.testing.assert_close(tsv_m(zero, [d1, d2]), D(T([5.0, 3.0, 2.0, 0.0])))
    # two tasks along the same direction: after whitening both pieces are orthogonal, so the
    # result has singular values 2 and 1 (one per task), not the summed 3
    a, b = 2 * torch.outer(T([1.0, 0.0]), T([1.0, 0.0])), torch.outer(T([1.0, 0.0]), T([1.0, 0.0]))
    merged = tsv_m(torch.zeros(2, 2), [a, b])
    torch.testing.assert_close(torch.linalg.svdvals(merged), T([2.0, 1.0]))


def test_iso_cts_common_and_task_specific_directions():
    zero = torch.zeros(4, 4)
    d1, d2 = D(T([5.0, 0.0, 1.0, 3.0])), D(T([0.0, 2.0, 0.0, 0.0]))
    # sum = diag(5, 2, 1, 3): rank 4, fraction 0.5 -> common e1 (5), e4 (3); one direction per task
    # from what is left: d1 -> e3 (1), d2 -> e2 (2). Mean of 5, 3, 1, 2 = 2.75 on all four.
    torch.testing.assert_close(iso_cts(zero, [d1, d2], common_space_fraction=0.5), 2.75 * torch.eye(4))
    # fraction 0.5 with a rank-3 sum: common e1 only, then each task's own top direction
    d1, d2 = D(T([5.0, 0.0, 0.0, 0.0])) + D(T([0.0, 0.0, 0.0, 1.0])), D(T([0.0, 0.0, 2.0, 0.0]))
    torch.testing.assert_close(
        iso_cts(zero, [d1, d2], common_space_fraction=0.5), (5.0 + 1.0 + 2.0) / 3 * D(T([1.0, 0.0, 1.0, 1.0]))
    )
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=gen)
    xs = [base + torch.randn(6, 5, generator=gen) for _ in range(3)]
    # with the whole spectrum common, Iso-CTS is Iso-C
    torch.testing.assert_close(iso_cts(base, xs, common_space_fraction=1.0), iso_c(base, xs))


def test_knots_of_task_arithmetic_is_task_arithmetic_and_ties_elects_in_the_aligned_basis():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(5, 7, generator=gen)
    xs = [base + torch.randn(5, 7, generator=gen) for _ in range(3)]
    kw = dict(weight=[0.5, 1.0, 2.0], lam=0.7)
    torch.testing.assert_close(knots_space(task_arithmetic)(base, xs, **kw), task_arithmetic(base, xs, **kw))
    # opposite tasks along one direction: [d1 d2] = [[1, 0, -1, 0], [0, 0, 0, 0]] = u sqrt(2) [v1 v2]
    # with v1 = (1/sqrt2, 0), v2 = (-1/sqrt2, 0). TIES (weights 1, 0.5) elects + and keeps v1 alone:
    # the merged update is u sqrt(2) v1 = e1 e1^T.
    zero = torch.zeros(2, 2)
    d1, d2 = D(T([1.0, 0.0])), D(T([-1.0, 0.0]))
    got = knots_space(ties)(zero, [d1, d2], weight=[1.0, 0.5], density=[1.0, 1.0])
    torch.testing.assert_close(got, D(T([1.0, 0.0])))
    # 1-D tensors go to the method unchanged
    torch.testing.assert_close(
        knots_space(ties)(
            T([0.0, 0.0]), [T([1.0, -2.0]), T([3.0, 1.0])], weight=[1.0, 1.0], density=[1.0, 1.0]
        ),
        ties(T([0.0, 0.0]), [T([1.0, -2.0]), T([3.0, 1.0])], weight=[1.0, 1.0], density=[1.0, 1.0]),
    )


def test_matches_fusion_bench_tensors():
    pytest.importorskip("fusion_bench", reason="fusion-bench is a test-only peer")
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c as fb_iso_c
    from fusion_bench.method.isotropic_merging.iso_utils import iso_cts as fb_iso_cts
    from fusion_bench.method.knots.knots_utils import subspace_alignment
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction

    gen = torch.Generator().manual_seed(2)
    shapes = {"w": (12, 9), "v": (8, 15), "norm": (9,)}
    base = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    models = [
        {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in base.items()}
        for _ in range(3)
    ]
    tvs = [{k: m[k] - base[k] for k in base} for m in models]
    fb = {
        "tsv": compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu"),
        "iso_c": fb_iso_c(tvs, accelerator="cpu"),
        "iso_cts": fb_iso_cts(tvs, common_space_fraction=0.8, accelerator="cpu"),
    }
    ours = {"tsv": tsv_m, "iso_c": iso_c, "iso_cts": iso_cts}
    for name, fn in ours.items():
        for key in base:
            got = fn(base[key], [m[key] for m in models]) - base[key]
            torch.testing.assert_close(got, fb[name][key], rtol=1e-9, atol=1e-9, msg=f"{name} {key}")
    # KnOTS: the same aligned basis (up to the signs an SVD may pick), hence the same TIES merge
    u, s, vhs = subspace_alignment([t["w"] for t in tvs], eps=1e-12)
    v_merged = ties(torch.zeros_like(vhs[0]), list(vhs), weight=[1.0] * 3, density=[0.5] * 3)
    expected = base["w"] + (u * s) @ v_merged
    got = knots_space(ties)(base["w"], [m["w"] for m in models], weight=[1.0] * 3, density=[0.5] * 3)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    from deltatune.models import tiny_llama

    root = tmp_path_factory.mktemp("spectral")
    paths = {}
    for name, seed in (("base", 0), ("ft1", 1), ("ft2", 2)):
        model = tiny_llama(seed=0, vocab_size=256)
        if seed:
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=gen))
        paths[name] = root / name
        model.save_pretrained(paths[name])
    return paths


@pytest.mark.parametrize("method, extra", [("tsv", ""), ("iso_c", "parameters: {lambda: 0.8}\n"),
                                           ("iso_cts", "parameters: {common_space_fraction: 0.6}\n"),
                                           ("ties", "knots: true\nparameters: {weight: 1.0, density: 0.5}\n")])  # fmt: skip
def test_full_model_merges_from_yaml_apply_the_method_per_tensor(zoo, tmp_path, method, extra):
    from safetensors.torch import load_file

    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: {method}\nbase_model: {zoo['base']}\nmodels:\n"
                      f"  - model: {zoo['ft1']}\n  - model: {zoo['ft2']}\n{extra}")  # fmt: skip
    run_merge(config, tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    base, ft1, ft2 = (load_file(zoo[k] / "model.safetensors") for k in ("base", "ft1", "ft2"))
    cfg = parse_config(config.read_text())
    name = "model.layers.1.mlp.down_proj.weight"
    kwargs = {"iso_c": {"lam": 0.8}, "iso_cts": {"common_space_fraction": 0.6},
              "ties": {"weight": [1.0, 1.0], "density": [0.5, 0.5]}}.get(method, {})  # fmt: skip
    expected = cfg.spec.fn(base[name], [ft1[name], ft2[name]], **kwargs)
    torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    emb = "model.embed_tokens.weight"  # token rows: the mean update, not an SVD (as fusion-bench's LLM code)
    if method != "ties":
        lam = kwargs.get("lam", 1.0)
        torch.testing.assert_close(merged[emb], base[emb] + lam * (ft1[emb] + ft2[emb] - 2 * base[emb]) / 2)
    if method == "ties":  # KnOTS-TIES is not plain TIES
        assert not torch.allclose(merged[name], ties(base[name], [ft1[name], ft2[name]], **kwargs), atol=1e-4)


def test_adapter_merge_is_the_method_on_the_lora_products_and_exact_at_the_summed_rank(tmp_path):
    from peft import LoraConfig, get_peft_model

    from deltatune.models import tiny_llama

    paths = []
    for seed in (1, 2):
        base = tiny_llama(seed=0, vocab_size=256)  # reseeds torch: the LoRA init is seeded after it
        torch.manual_seed(seed)
        model = get_peft_model(base, LoraConfig(r=4, init_lora_weights=False))
        paths.append(tmp_path / f"a{seed}")
        model.save_pretrained(paths[-1])
    for method in ("tsv", "iso_c", "iso_cts"):
        config = tmp_path / f"{method}.yaml"
        config.write_text(f"merge_method: {method}\nmodels:\n  - model: {paths[0]}\n  - model: {paths[1]}\n")
        report = run_merge(config, tmp_path / method)
        assert report.rank == 8 and max(report.svd_errors.values()) < 1e-5  # rank-8 result: exact
        inputs = [read_lora(p).modules for p in paths]
        merged = read_lora(tmp_path / method).modules
        fn = {"tsv": tsv_m, "iso_c": iso_c, "iso_cts": iso_cts}[method]
        for module, factors in merged.items():
            exact = [m[module].b.double() @ m[module].a.double() * m[module].scale for m in inputs]
            expected = fn(torch.zeros(factors.dense().shape, dtype=torch.float64), exact).float()
            torch.testing.assert_close(factors.dense(), expected, rtol=1e-4, atol=1e-5)
    assert math.isfinite(report.seconds)


def test_knots_needs_a_task_vector_method():
    with pytest.raises(
        ValueError, match=r"knots: KnOTS aligns task vectors; it applies to .*ties.*, not model_stock"
    ):
        parse_config("merge_method: model_stock\nknots: true\nmodels:\n  - model: a\n  - model: b\n")
