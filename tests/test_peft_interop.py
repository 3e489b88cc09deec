"""Adapters cross between deltatune and peft with equal logits, in both directions."""

import json

import peft
import pytest
import torch

import deltatune
from deltatune.formats import FormatError
from deltatune.formats.peft import save_delta
from deltatune.models import tiny_llama

CASES = {
    "lora": dict(method="lora", lora_r=4, lora_alpha=8, use_rslora=False),
    "rslora": dict(method="lora", lora_r=4, lora_alpha=8, use_rslora=True),
    "dora": dict(method="dora", lora_r=4, lora_alpha=8, use_rslora=False),
}


def _randomize_delta(model, seed=3):
    """Make B (and the magnitude) nonzero so the adapter is not a no-op."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in deltatune.deltas.named_delta_parameters(model).items():
            p.add_(torch.randn(p.shape, generator=gen) * (0.05 if "magnitude" in name else 0.2))


@pytest.mark.parametrize("case", CASES)
def test_our_adapter_loads_in_peft(case, tmp_path, input_ids):
    kw = dict(CASES[case])
    model = deltatune.add_delta(tiny_llama(seed=0).eval(), kw.pop("method"), **kw)
    _randomize_delta(model)
    ours = model(input_ids).logits
    save_delta(model, tmp_path / "a")
    base_logits = tiny_llama(seed=0).eval()(input_ids).logits
    assert (ours - base_logits).abs().max() > 1e-2  # the adapter changes the output

    theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0).eval(), tmp_path / "a")
    cfg = theirs.peft_config["default"]
    assert cfg.use_dora == (case == "dora") and cfg.use_rslora == (case == "rslora")
    torch.testing.assert_close(theirs(input_ids).logits, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_here(case, tmp_path, input_ids):
    kw = CASES[case]
    cfg = peft.LoraConfig(
        r=kw["lora_r"],
        lora_alpha=kw["lora_alpha"],
        use_rslora=kw["use_rslora"],
        use_dora=kw["method"] == "dora",
        target_modules="all-linear",
        init_lora_weights=False,  # random nonzero B
    )
    torch.manual_seed(5)
    theirs = peft.get_peft_model(tiny_llama(seed=0).eval(), cfg).eval()
    expected = theirs(input_ids).logits
    theirs.save_pretrained(tmp_path / "p")

    ours = deltatune.load(tiny_llama(seed=0).eval(), adapter=tmp_path / "p")
    assert ours.delta_method == kw["method"]
    torch.testing.assert_close(ours(input_ids).logits, expected, atol=1e-4, rtol=0)


def test_peft_rank_and_alpha_patterns(tmp_path, input_ids):
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 3},
        init_lora_weights=False,
    )
    torch.manual_seed(6)
    theirs = peft.get_peft_model(tiny_llama(seed=0).eval(), cfg).eval()
    theirs.save_pretrained(tmp_path / "p")
    ours = deltatune.load(tiny_llama(seed=0).eval(), adapter=tmp_path / "p")
    torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_unmerged_merged_unmerged_reloaded_agree(case, tmp_path, input_ids):
    kw = dict(CASES[case])
    model = deltatune.add_delta(tiny_llama(seed=0).eval(), kw.pop("method"), **kw)
    _randomize_delta(model)
    unmerged = model(input_ids).logits
    deltatune.deltas.set_merged(model, True)
    merged = model(input_ids).logits
    deltatune.deltas.set_merged(model, False)
    again = model(input_ids).logits
    save_delta(model, tmp_path / "a")
    reloaded = deltatune.load(tiny_llama(seed=0).eval(), adapter=tmp_path / "a")(input_ids).logits
    folded = deltatune.merge_delta(model)(input_ids).logits
    for other in (merged, again, reloaded, folded):
        torch.testing.assert_close(other, unmerged, atol=1e-4, rtol=0)
    assert not any(isinstance(m, deltatune.deltas.DeltaLayer) for m in model.modules())
    base = tiny_llama(seed=0).eval()
    deltatune.deltas.set_merged(reloaded_model := deltatune.load(base, adapter=tmp_path / "a"), True)
    deltatune.deltas.set_merged(reloaded_model, False)
    for name, layer in deltatune.deltas.delta_layers(reloaded_model).items():
        fresh = tiny_llama(seed=0).get_submodule(name).weight
        torch.testing.assert_close(layer.base_layer.weight, fresh, atol=1e-5, rtol=0)


def test_bad_adapters_name_the_file(tmp_path):
    model = deltatune.add_delta(tiny_llama(seed=0), "lora", lora_r=4)
    save_delta(model, tmp_path / "a")
    # corrupt weights
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(FormatError, match="adapter_model.safetensors"):
        deltatune.load(tiny_llama(seed=0), adapter=tmp_path / "a")
    # shape mismatch: adapter made for a wider model
    wide = deltatune.add_delta(tiny_llama(seed=0, hidden_size=128, intermediate_size=256), "lora", lora_r=4)
    save_delta(wide, tmp_path / "w")
    with pytest.raises(FormatError, match=r"adapter_model.safetensors: .*lora_A.weight has shape \[4, 128\]"):
        deltatune.load(tiny_llama(seed=0), adapter=tmp_path / "w")
    # a module the model does not have
    deep = deltatune.add_delta(tiny_llama(seed=0, num_hidden_layers=3), "lora", lora_r=4)
    save_delta(deep, tmp_path / "d")
    with pytest.raises(FormatError, match="does not fit this model|matches no module"):
        deltatune.load(tiny_llama(seed=0), adapter=tmp_path / "d")
    # unknown peft type, bad JSON, missing dir, pickle only
    save_delta(model, tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
    (tmp_path / "t" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "XLORA"}))
    with pytest.raises(FormatError, match="adapter_config.json: peft_type 'XLORA' is not supported"):
        deltatune.load(tiny_llama(seed=0), adapter=tmp_path / "t")
    (tmp_path / "t" / "adapter_config.json").write_text("{not json")
    with pytest.raises(FormatError, match="adapter_config.json: invalid JSON at line 1"):
        deltatune.load(tiny_llama(seed=0), adapter=tmp_path / "t")
    with pytest.raises(FormatError, match="adapter directory not found"):
        deltatune.load(tiny_llama(seed=0), adapter=tmp_path / "nope")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_config.json").write_text("{}")
    (tmp_path / "b" / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(FormatError, match="never loaded"):
        deltatune.load(tiny_llama(seed=0), adapter=tmp_path / "b")
