"""compress -> decompress round trips for LoRA adapters and full fine-tunes, checked against peft,
plain transformers and hand-counted sizes."""

import json
import math

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from deltatune.compress import compress, decompress, format_report, load_delta_into
from deltatune.models import tiny_llama

VOCAB = 1000
LOSSY = ["compeft", "bitdelta", "delta_come"]


def tiny():
    return tiny_llama(seed=0, vocab_size=VOCAB).eval()


def add_low_rank_delta(model, rank=4, scale=0.02, noise=1e-3, seed=1):
    """A 'fine-tune': known low-rank + noise change on every linear weight, and a changed final norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                out, inp = p.shape
                p += (
                    scale
                    * torch.randn(out, rank, generator=g)
                    @ torch.randn(rank, inp, generator=g)
                    / math.sqrt(rank)
                )
                p += noise * torch.randn(out, inp, generator=g)
        model.model.norm.weight += 0.01 * torch.randn(model.model.norm.weight.shape, generator=g)
    return model


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    tiny().save_pretrained(root / "base")
    add_low_rank_delta(tiny()).save_pretrained(root / "ft")
    return root / "base", root / "ft"


def make_adapter(path, use_rslora=False):
    model = peft.get_peft_model(
        tiny(),
        peft.LoraConfig(
            r=4, lora_alpha=8, use_rslora=use_rslora, target_modules="all-linear", init_lora_weights=False
        ),
    )
    model.save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter") / "a"
    model = make_adapter(path)
    exact = {f"{n}.weight": m.get_delta_weight("default").detach() for n, m in _lora_layers(model)}
    return path, model, exact


def _lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return [(n.removeprefix(prefix), m) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]


def logits_with(path, ids):
    model = tiny()
    load_delta_into(model, path)
    return model(ids).logits


# --- LoRA adapters ------------------------------------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lossless_lora_round_trip_matches_peft(tmp_path, ids, use_rslora):
    peft_model = make_adapter(tmp_path / "a", use_rslora)
    compress(tmp_path / "a", tmp_path / "c", "raw")
    decompress(tmp_path / "c", tmp_path / "d")
    expected = peft_model(ids).logits
    assert (expected - tiny()(ids).logits).abs().max() > 1e-2  # the adapter is not a no-op
    torch.testing.assert_close(logits_with(tmp_path / "d", ids), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits_with(tmp_path / "c", ids), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", LOSSY)
def test_lora_dense_round_trip(tmp_path, ids, adapter, method):
    path, _, exact = adapter
    report = compress(path, tmp_path / "c", method)
    assert report.ratio > 1 and report.dense_ratio > report.ratio  # a dense ΔW is larger than A and B
    decompress(tmp_path / "c", tmp_path / "d")
    config = json.loads((tmp_path / "d" / "delta_config.json").read_text())
    assert config["format"] == "deltatune.dense_delta" and config["compressed_with"] == method
    dense = load_file(tmp_path / "d" / "delta_model.safetensors")
    assert set(dense) == set(exact)  # <module>.weight for every LoRA module
    for row in report.tensors:  # the reported error is the error of what decompress wrote, vs peft's ΔW
        want = float((dense[row.name] - exact[row.name]).norm() / exact[row.name].norm())
        assert row.rel_error == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert row.rel_error < 1.0
    torch.testing.assert_close(
        logits_with(tmp_path / "c", ids), logits_with(tmp_path / "d", ids), atol=1e-5, rtol=0
    )
    assert method in format_report(report)


@pytest.mark.parametrize("method", LOSSY)
def test_lora_factors_round_trip_loads_in_peft(tmp_path, ids, adapter, method):
    path, _, _ = adapter
    report = compress(path, tmp_path / "c", method, lora_mode="factors")
    assert report.layout == "lora_factors" and report.ratio > 4
    decompress(tmp_path / "c", tmp_path / "d")
    restored = peft.PeftModel.from_pretrained(tiny(), tmp_path / "d").eval()
    torch.testing.assert_close(restored(ids).logits, logits_with(tmp_path / "c", ids), atol=1e-5, rtol=0)


def test_compeft_factors_sizes_by_hand(tmp_path, adapter):
    path, peft_model, _ = adapter
    report = compress(path, tmp_path / "c", "compeft", lora_mode="factors", density=0.25)
    tensors = load_file(path / "adapter_model.safetensors")
    expected = 0
    for t in tensors.values():  # per factor: fp32 scale + 1 sign bit per kept entry + 1 mask bit per entry
        n = t.numel()
        expected += 4 + math.ceil(round(0.25 * n) / 8) + math.ceil(n / 8)
    assert report.stored_bytes == expected
    assert report.source_bytes == sum(t.numel() * 4 for t in tensors.values())


# --- full models ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", LOSSY)
def test_full_model_round_trip_loads_in_transformers(tmp_path, ids, full, method):
    base_dir, ft_dir = full
    report = compress((base_dir, ft_dir), tmp_path / "c", method)
    assert report.ratio > 10 and report.layout == "model"
    assert "model.embed_tokens.weight" in report.unchanged  # untouched tensors are not stored
    assert {r.name: r.codec for r in report.tensors}["model.norm.weight"] == "raw"  # 1-D: stored as is
    decompress(tmp_path / "c", tmp_path / "d")
    assert (tmp_path / "d" / "generation_config.json").is_file()
    restored = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    torch.testing.assert_close(restored(ids).logits, logits_with(tmp_path / "c", ids), atol=1e-5, rtol=0)
    base = tiny().state_dict()
    for row in report.tensors:  # reported error = error of the decompressed weights vs the fine-tune
        ft = load_file(ft_dir / "model.safetensors")[row.name]
        got = restored.state_dict()[row.name] - base[row.name]
        want = ft - base[row.name]
        assert row.rel_error == pytest.approx(float((got - want).norm() / want.norm()), rel=1e-3, abs=1e-5)


def test_lossless_full_model_round_trip_equals_the_fine_tune(tmp_path, ids, full):
    base_dir, ft_dir = full
    report = compress((base_dir, ft_dir), tmp_path / "c", "raw")
    assert report.ratio == 1.0 and report.rel_error == 0.0
    decompress(tmp_path / "c", tmp_path / "d")
    restored = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    finetuned = AutoModelForCausalLM.from_pretrained(ft_dir).eval()
    torch.testing.assert_close(restored(ids).logits, finetuned(ids).logits, atol=1e-5, rtol=0)


def test_sharded_checkpoints_are_read(tmp_path, ids, full):
    base_dir, ft_dir = full
    AutoModelForCausalLM.from_pretrained(ft_dir).save_pretrained(tmp_path / "ft", max_shard_size="100KB")
    assert (tmp_path / "ft" / "model.safetensors.index.json").is_file()
    compress((base_dir, tmp_path / "ft"), tmp_path / "c", "raw")
    decompress(tmp_path / "c", tmp_path / "d")
    restored = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    finetuned = AutoModelForCausalLM.from_pretrained(ft_dir).eval()
    torch.testing.assert_close(restored(ids).logits, finetuned(ids).logits, atol=1e-5, rtol=0)


def test_bitdelta_calibration_lowers_the_logit_error(tmp_path, full):
    base_dir, ft_dir = full
    data = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(9))
    plain = compress((base_dir, ft_dir), tmp_path / "plain", "bitdelta")
    tuned = compress(
        (base_dir, ft_dir),
        tmp_path / "tuned",
        "bitdelta",
        calibration_data=data,
        calibration_steps=10,
        calibration_lr=1e-4,
        calibration_batch_size=4,
    )
    finetuned = AutoModelForCausalLM.from_pretrained(ft_dir).eval()
    target = finetuned(data).logits.detach()

    @torch.no_grad()
    def mse(compressed):  # independent of the report: decompress, load with transformers, compare logits
        decompress(compressed, tmp_path / f"{compressed.name}_d")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / f"{compressed.name}_d").eval()
        return float((model(data).logits - target).pow(2).mean())

    assert mse(tmp_path / "tuned") < mse(tmp_path / "plain")
    assert tuned.calibration["after"] < tuned.calibration["before"]
    assert plain.calibration is None
    scales = [r for r in tuned.tensors if r.codec == "bitdelta"]
    assert len(scales) == 14
