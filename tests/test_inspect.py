"""`deltatune inspect`: spectra and similarities against dense SVDs computed here, on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deltatune.cli import app
from deltatune.formats.peft import read_lora
from deltatune.inspect import effective_rank, inspect_deltas, subspace_overlap, top_energy
from deltatune.models import load_tokenizer, tiny_llama

T = torch.tensor


def test_spectrum_formulas_by_hand():
    assert effective_rank(T([2.0, 2.0, 2.0, 2.0])) == pytest.approx(4.0)
    assert effective_rank(T([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    # p = (3/4, 1/4): exp(-(3/4 ln 3/4 + 1/4 ln 1/4))
    assert effective_rank(T([3.0, 1.0])) == pytest.approx(
        math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    )
    assert top_energy(T([3.0, 1.0]), 1) == pytest.approx(0.9)
    e = torch.eye(4)
    assert subspace_overlap(e[:, :2], e[:, :2]) == pytest.approx(1.0)
    assert subspace_overlap(e[:, :2], e[:, 2:]) == pytest.approx(0.0)
    # one shared direction of two: overlap 1/2
    assert subspace_overlap(e[:, :2], e[:, 1:3]) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def lora_trio(tmp_path_factory) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("inspect")
    base = root / "base"
    tiny_llama(seed=0, vocab_size=256).save_pretrained(base)
    load_tokenizer().save_pretrained(base)  # export --merge copies it
    paths = {"base": base}
    for seed, kwargs in ((1, {"r": 4}), (2, {"r": 6, "lora_alpha": 3, "use_rslora": True})):
        base_model = tiny_llama(seed=0, vocab_size=256)  # reseeds torch: the LoRA init is seeded after it
        torch.manual_seed(seed)
        model = get_peft_model(
            base_model,
            LoraConfig(init_lora_weights=False, target_modules=["q_proj", "down_proj"], **kwargs),
        )
        paths[f"a{seed}"] = root / f"a{seed}"
        model.save_pretrained(paths[f"a{seed}"])
    return paths


def dense(path: Path) -> dict[str, torch.Tensor]:
    """ΔW in float64 from the factors (a float32 product adds a noise floor to the spectrum)."""
    return {m: f.b.double() @ f.a.double() * f.scale for m, f in read_lora(path).modules.items()}


def test_lora_statistics_equal_dense_svds(lora_trio):
    report = inspect_deltas([lora_trio["a1"], lora_trio["a2"]], top_r=2)
    d1, d2 = dense(lora_trio["a1"]), dense(lora_trio["a2"])
    module = "model.layers.1.mlp.down_proj"
    s = torch.linalg.svdvals(d1[module])
    stats = report["deltas"][0]["per_module"][module]
    assert stats["norm"] == pytest.approx(float(d1[module].norm()), rel=1e-9)
    assert stats["effective_rank"] == pytest.approx(effective_rank(s), rel=1e-6)
    assert stats["top2_energy"] == pytest.approx(float(s[:2].square().sum() / s.square().sum()), rel=1e-6)
    total = [math.sqrt(sum(float(d.square().sum()) for d in ds.values())) for ds in (d1, d2)]
    assert report["deltas"][1]["norm"] == pytest.approx(total[1], rel=1e-9)
    dot = sum(float((d1[m] * d2[m]).sum()) for m in d1)
    assert report["cosine"][0][1] == pytest.approx(dot / (total[0] * total[1]), rel=1e-6)
    assert report["cosine"][0][0] == pytest.approx(1.0)
    u1 = torch.linalg.svd(d1[module])[0][:, :2]
    u2 = torch.linalg.svd(d2[module])[0][:, :2]
    overlaps = []
    for m in d1:
        a, b = torch.linalg.svd(d1[m])[0][:, :2], torch.linalg.svd(d2[m])[0][:, :2]
        overlaps.append(float((a.T @ b).square().sum()) / 2)
    assert report["subspace_overlap"][0][1] == pytest.approx(sum(overlaps) / len(overlaps), rel=1e-6)
    assert 0 <= subspace_overlap(u1, u2) <= 1


def test_full_fine_tune_with_base_equals_the_adapter_it_was_merged_from(lora_trio, tmp_path):
    from deltatune.export import export_merged

    merged = export_merged(str(lora_trio["base"]), lora_trio["a1"], tmp_path / "merged")
    from_adapter = inspect_deltas([lora_trio["a1"], lora_trio["a2"]], top_r=2)
    from_model = inspect_deltas([merged, lora_trio["a2"]], base=str(lora_trio["base"]), top_r=2)
    a, m = from_adapter["deltas"][0], from_model["deltas"][0]
    assert m["modules"] == a["modules"]
    assert m["norm"] == pytest.approx(a["norm"], rel=1e-5)  # fp32 weights: ΔW to ~1e-7 of W
    assert m["mean_effective_rank"] == pytest.approx(a["mean_effective_rank"], rel=1e-2)
    assert from_model["cosine"][0][1] == pytest.approx(from_adapter["cosine"][0][1], abs=1e-4)
    assert from_model["subspace_overlap"][0][1] == pytest.approx(
        from_adapter["subspace_overlap"][0][1], abs=1e-3
    )


def test_non_lora_adapter_uses_each_layers_dense_delta(lora_trio, tmp_path):
    import deltatune
    from deltatune.deltas.base import delta_layers
    from deltatune.formats.peft import save_delta

    torch.manual_seed(0)
    model = deltatune.add_delta(deltatune.load(lora_trio["base"]), "loha", target_modules=["q_proj"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    save_delta(model, tmp_path / "loha", base_model=str(lora_trio["base"]))
    report = inspect_deltas([tmp_path / "loha"])
    layer = delta_layers(model)["model.layers.0.self_attn.q_proj"]
    expected = float(layer.delta_weight().detach().double().norm())
    assert report["deltas"][0]["per_module"]["model.layers.0.self_attn.q_proj"]["norm"] == pytest.approx(
        expected, rel=1e-5
    )


def test_cli_writes_json_and_heat_map_and_refuses_bad_input(lora_trio, tmp_path):
    runner = CliRunner()
    out = tmp_path / "report"
    result = runner.invoke(app, ["inspect", str(lora_trio["a1"]), str(lora_trio["a2"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "inspect.json").read_text())
    assert len(report["cosine"]) == 2 and (out / "similarity.png").stat().st_size > 1000
    assert "subspace overlap" in result.output

    pickle = tmp_path / "adapter_model.bin"
    pickle.write_bytes(b"\x80\x04not really")
    result = runner.invoke(app, ["inspect", str(pickle), "--out", str(tmp_path / "r2")])
    assert result.exit_code == 2 and "pickles and are never loaded" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r2").exists()

    from peft import LoraConfig, get_peft_model

    wide = tmp_path / "wide"
    get_peft_model(
        tiny_llama(seed=0, vocab_size=256, hidden_size=32), LoraConfig(r=2, target_modules=["q_proj"])
    ).save_pretrained(wide)
    result = runner.invoke(app, ["inspect", str(lora_trio["a1"]), str(wide), "--out", str(tmp_path / "r3")])
    assert result.exit_code == 2 and "has different shapes across the deltas" in result.output
    assert not (tmp_path / "r3").exists()

    result = runner.invoke(app, ["inspect", str(lora_trio["base"]), "--out", str(tmp_path / "r4")])
    assert result.exit_code == 2 and "give --base BASE" in result.output


def test_lora_sparsity_counts_the_zeros_of_the_product():
    from deltatune.inspect import spectrum_of_factors

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 7, generator=gen), torch.randn(5, 3, generator=gen)
    a[:, [1, 4]] = 0  # two input columns unused
    b[2] = 0  # one output row untouched
    sp = spectrum_of_factors(a, b, 0.5)
    assert (sp.zeros, sp.numel) == (int(((b @ a) == 0).sum()), 35) == (2 * 5 + 7 - 2, 35)
    torch.testing.assert_close(sp.s, torch.linalg.svdvals(0.5 * b.double() @ a.double())[:3])
