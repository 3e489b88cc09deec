"""Compression and extraction on the real default model (SmolLM2-135M) with a synthetic fine-tune."""

import math

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltatune.compress import compress, decompress, extract_lora
from deltatune.models import load_model, resolve

pytestmark = pytest.mark.integration

TARGETS = ("q_proj", "v_proj")


@pytest.fixture(scope="module")
def finetune(tmp_path_factory):
    """Rank-8 changes to q_proj and v_proj of the first two blocks, plus a changed final norm."""
    model = load_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in (0, 1):
            attn = model.model.layers[i].self_attn
            for name in TARGETS:
                w = getattr(attn, name).weight
                out, inp = w.shape
                w += 0.02 * torch.randn(out, 8, generator=g) @ torch.randn(8, inp, generator=g) / math.sqrt(8)
        model.model.norm.weight += 0.01
    path = tmp_path_factory.mktemp("real") / "ft"
    model.save_pretrained(path)
    ids = AutoTokenizer.from_pretrained(resolve())(
        ["The capital of France is"], return_tensors="pt"
    ).input_ids
    return path, ids, model.eval()(ids).logits.detach()


def test_extracted_lora_reproduces_the_fine_tune(tmp_path, finetune):
    ft_dir, ids, target = finetune
    report = extract_lora(resolve(), ft_dir, tmp_path / "lora", rank=8)
    assert len(report.modules) == 4 and all(m.energy > 1 - 1e-5 for m in report.modules)
    assert [s.name for s in report.skipped] == ["model.norm.weight"]
    extracted = peft.PeftModel.from_pretrained(load_model(), tmp_path / "lora").eval()
    # The norm change is no LoRA target: the oracle is the fine-tune with the base's final norm.
    expected = AutoModelForCausalLM.from_pretrained(ft_dir).eval()
    with torch.no_grad():
        expected.model.norm.weight.copy_(load_model().model.norm.weight)
        torch.testing.assert_close(extracted(ids).logits, expected(ids).logits, atol=1e-3, rtol=0)
        assert (expected(ids).logits - target).abs().max() > 1e-2  # the skipped norm change mattered


def test_bitdelta_decompressed_model_loads_and_is_closer_than_the_base(tmp_path, finetune):
    ft_dir, ids, target = finetune
    report = compress((resolve(), ft_dir), tmp_path / "c", "bitdelta")
    assert len(report.tensors) == 5 and report.ratio > 20  # 4 matrices + the norm stored raw
    decompress(tmp_path / "c", tmp_path / "d")
    assert AutoTokenizer.from_pretrained(tmp_path / "d")("hi").input_ids  # tokenizer copied from the base
    restored = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    base = load_model().eval()
    with torch.no_grad():
        err_restored = (restored(ids).logits - target).pow(2).mean()
        err_base = (base(ids).logits - target).pow(2).mean()
    assert err_restored < err_base
