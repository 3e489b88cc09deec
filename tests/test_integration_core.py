"""Integration tier: the real default model (SmolLM2-135M-Instruct), offline."""

import peft
import pytest
import torch

import deltatune
from deltatune.models import load_model, load_tokenizer, resolve

pytestmark = pytest.mark.integration


def test_default_model_is_offline_llama():
    path = resolve()
    assert (path / "model.safetensors").is_file()
    model = load_model()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tok = load_tokenizer()
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith(
        "<|im_start|>"
    )


def test_uncached_hub_id_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="not in the local HF cache"):
        resolve("nobody/no-such-model-xyz")


def test_real_model_adapter_roundtrip_with_peft(tmp_path):
    model = deltatune.add_delta(load_model().eval(), "lora", lora_r=8, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for p in deltatune.deltas.named_delta_parameters(model).values():
            p.normal_(0, 0.02)
    ids = load_tokenizer()("The capital of France is", return_tensors="pt").input_ids
    ours = model(ids).logits
    deltatune.save_delta(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(load_model().eval(), tmp_path / "a")(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_short_lora_run_beats_the_base_model(tmp_path):
    """A shortened main job: LoRA on word reversal must gain at least 30 exact-match points."""
    summary = deltatune.train(
        dict(
            task="reversal",
            max_steps=25,
            train_samples=400,
            eval_samples=40,
            save_every=0,
            output=str(tmp_path / "run"),
        )
    )
    res = summary["eval"]["reversal"]
    assert res["after"] - res["before"] >= 0.30, res
