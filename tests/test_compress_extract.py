"""LoRA extraction from a full fine-tune: exact recovery of a known low-rank delta, checked with peft
and an independent numpy SVD."""

import json
import math

import numpy as np
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

import deltatune
from deltatune.compress import extract_lora, format_report
from deltatune.compress.extract import lora_factors
from deltatune.models import tiny_llama

VOCAB = 1000


def tiny():
    return tiny_llama(seed=0, vocab_size=VOCAB).eval()


def add_rank_r_delta(model, rank, seed=1, skip=()):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name and not any(s in name for s in skip):
                out, inp = p.shape
                p += (
                    0.05
                    * torch.randn(out, rank, generator=g)
                    @ torch.randn(rank, inp, generator=g)
                    / math.sqrt(rank)
                )
    return model


@pytest.fixture(scope="module")
def rank4(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    tiny().save_pretrained(root / "base")
    add_rank_r_delta(tiny(), 4).save_pretrained(root / "ft")
    return root


def test_rank_4_fine_tune_is_recovered_exactly_and_loads_in_peft(rank4, tmp_path):
    report = extract_lora(rank4 / "base", rank4 / "ft", tmp_path / "lora", rank=4)
    assert len(report.modules) == 14 and not report.skipped  # 7 linear layers x 2 blocks
    for m in report.modules:
        assert m.energy == pytest.approx(1.0, abs=1e-6) and m.rel_error < 1e-4
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4
    assert sorted(config["target_modules"]) == sorted(m.name for m in report.modules)

    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    finetuned = AutoModelForCausalLM.from_pretrained(rank4 / "ft").eval()
    extracted = peft.PeftModel.from_pretrained(tiny(), tmp_path / "lora").eval()
    expected = finetuned(ids).logits
    assert (expected - tiny()(ids).logits).abs().max() > 1e-2  # the fine-tune changed the output
    torch.testing.assert_close(extracted(ids).logits, expected, atol=1e-4, rtol=0)
    ours = deltatune.load(tiny(), adapter=tmp_path / "lora")  # and with deltatune's own loader
    torch.testing.assert_close(ours(ids).logits, expected, atol=1e-4, rtol=0)
    assert "mean captured energy 1.0000" in format_report(report)


def test_captured_energy_matches_an_independent_svd():
    g = torch.Generator().manual_seed(4)
    delta = torch.randn(48, 6, generator=g) @ torch.randn(6, 80, generator=g) + 0.01 * torch.randn(
        48, 80, generator=g
    )
    a, b, energy = lora_factors(delta, 2, svd="exact")
    s = np.linalg.svd(delta.double().numpy(), compute_uv=False)
    assert energy == pytest.approx((s[:2] ** 2).sum() / (s**2).sum(), rel=1e-5)
    rel_error = float((delta - b @ a).norm() / delta.norm())
    assert rel_error == pytest.approx(math.sqrt((s[2:] ** 2).sum() / (s**2).sum()), rel=1e-4)  # Eckart-Young
    assert torch.allclose(a @ a.T, (b.T @ b), atol=1e-4)  # √S split evenly: AAᵀ = BᵀB = diag(S)


def test_randomized_svd_agrees_with_exact_on_a_low_rank_delta():
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(300, 8, generator=g) @ torch.randn(8, 200, generator=g)
    a1, b1, e1 = lora_factors(delta, 8, svd="exact")
    a2, b2, e2 = lora_factors(delta, 8, svd="randomized")
    assert e1 == pytest.approx(e2, abs=1e-5)
    torch.testing.assert_close(b2 @ a2, b1 @ a1, atol=1e-4, rtol=0)


def test_rank_above_the_matrix_rank_is_zero_padded():
    delta = torch.randn(3, 5, generator=torch.Generator().manual_seed(6))
    a, b, energy = lora_factors(delta, 4)
    assert a.shape == (4, 5) and b.shape == (3, 4) and energy == pytest.approx(1.0)
    torch.testing.assert_close(b @ a, delta, atol=1e-5, rtol=0)


def test_non_targets_are_reported_as_skipped(tmp_path):
    ft = add_rank_r_delta(tiny(), 2, skip=("k_proj",))
    with torch.no_grad():
        ft.model.embed_tokens.weight[:10] += 0.1
        ft.model.norm.weight += 0.05
    tiny().save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    report = extract_lora(
        tmp_path / "base", tmp_path / "ft", tmp_path / "lora", rank=2, targets=["q_proj", "v_proj"]
    )
    assert sorted(m.name.rsplit(".", 1)[-1] for m in report.modules) == ["q_proj"] * 2 + ["v_proj"] * 2
    skipped = {s.name for s in report.skipped}
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.mlp.up_proj.weight"} <= skipped
    assert "model.layers.0.self_attn.k_proj.weight" not in skipped  # unchanged: nothing to report
    assert all(s.rel_change > 0 for s in report.skipped)
