"""Quantized frozen bases (deltatune/quant/): the formats against hand-written references, the layer
against a dense one, training and resuming over NF4, PEFT interop, merged export, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import deltatune
from deltatune.cli import app
from deltatune.quant import (
    Int8Linear,
    Nf4Linear,
    QuantizedWeightError,
    base_weight_bytes,
    dequantize_model,
    parameter_count,
    quantize_model,
)
from tests.test_train import FAST, _flags, assert_sigkill_resume_matches_uninterrupted

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The 16 NF4 levels of the QLoRA paper (Appendix E), typed in: an independent copy of the format.
NF4 = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0]
)  # fmt: skip


def _linear(out_f=96, in_f=256, seed=0, bias=False):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
        lin.weight[3, 7] = 0.3  # an outlier: its block's scale is large, the rest of its row is not
    return lin


# --- the formats ----------------------------------------------------------------------------------


def test_nf4_codes_are_the_nearest_levels_and_error_is_within_the_bound():
    lin = _linear()
    w = lin.weight.detach().reshape(-1, 64)  # NF4 blocks: 64 consecutive weights of the flat tensor
    deq = Nf4Linear(lin).dequantize(torch.float32).reshape(-1, 64)
    absmax = w.abs().amax(1, keepdim=True)
    stored_absmax = deq.abs().amax(1, keepdim=True)  # the ±1 level holds the block's scale
    levels = deq / stored_absmax
    # every dequantized weight is an NF4 level times its block's (double-quantized) scale
    assert (levels[..., None] - NF4).abs().amin(-1).max() < 1e-6
    # the level is the nearest one to w / absmax (scales are double-quantized after choosing codes)
    nearest = NF4[((w / absmax)[..., None] - NF4).abs().argmin(-1)]
    chosen = NF4[(levels[..., None] - NF4).abs().argmin(-1)]
    assert torch.equal(nearest, chosen)
    # double quantization: 8-bit scales in groups of 256 blocks, error under 1% of the group's max
    assert ((stored_absmax - absmax).abs() <= 0.01 * absmax.max()).all()
    half_gap = (NF4[1:] - NF4[:-1]).max() / 2
    bound = absmax * half_gap + (stored_absmax - absmax).abs() + 1e-7
    assert ((deq - w).abs() <= bound).all()
    assert (deq - w).abs().max() > 0  # it is lossy: not an identity in disguise


def test_int8_is_rowwise_absmax_rounding_within_half_a_step():
    lin = _linear()
    w = lin.weight.detach()
    layer = Int8Linear(lin)
    row_absmax = w.abs().amax(1, keepdim=True)
    codes = torch.round(w * 127 / row_absmax)  # LLM.int8()'s weight format, by hand
    assert torch.equal(layer.codes.float(), codes)
    deq = layer.dequantize(torch.float32)
    torch.testing.assert_close(deq, codes * row_absmax / 127, atol=1e-8, rtol=0)
    assert ((deq - w).abs() <= row_absmax / 254 + 1e-8).all()


@pytest.mark.parametrize("kind", [Nf4Linear, Int8Linear])
def test_quantized_linear_equals_dense_linear_with_its_weights(kind):
    lin = _linear(bias=True)
    layer = kind(lin)
    dense = nn.Linear(256, 96)
    with torch.no_grad():
        dense.weight.copy_(layer.dequantize(torch.float32))
        dense.bias.copy_(lin.bias)
    x = torch.randn(3, 5, 256, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, ref = layer(x), dense(x2)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = layer(x)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), ref.detach(), atol=0.05, rtol=0.02)
    assert not any(p.requires_grad for p in layer.parameters())


def test_weight_reads_dequantized_and_refuses_writes():
    layer = Nf4Linear(_linear())
    w = layer.weight
    assert w.shape == (96, 256) and w.dtype == torch.float32
    torch.testing.assert_close(w * 2, layer.dequantize() * 2)
    other = torch.zeros(96, 256)
    other.copy_(w)  # copying out of it is a read
    for write in (lambda: w.add_(1.0), lambda: w.copy_(other), lambda: w.__iadd__(other)):
        with pytest.raises(QuantizedWeightError, match="stored quantized"):
            write()
    with pytest.raises(QuantizedWeightError):
        layer.weight = other


def test_nf4_base_bytes_and_parameter_count():
    """SmolLM2's FFN shape: NF4 with double-quantized scales stores 4.127 bits per weight."""
    model = nn.Sequential(nn.Linear(576, 1536, bias=False))
    bf16 = base_weight_bytes(model.to(torch.bfloat16))["linear"]
    n = parameter_count(model)
    quantize_model(model, "nf4")
    nf4 = base_weight_bytes(model)["linear"]
    assert parameter_count(model) == n == 576 * 1536
    assert 4.0 / 16 < nf4 / bf16 <= 0.27  # the target is 0.3x
    int8 = base_weight_bytes(quantize_model(nn.Sequential(nn.Linear(576, 1536, bias=False)), "int8"))
    assert int8["linear"] == 576 * 1536 + 1536 * 4


def test_quantize_model_keeps_the_head_and_dequantize_restores_plain_linears(tiny_model, input_ids):
    ref = tiny_model(input_ids).logits
    quantize_model(tiny_model, "int8")
    layers = [m for m in tiny_model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down per block; lm_head (tied) stays dense
    assert type(tiny_model.lm_head) is nn.Linear
    quantized = tiny_model(input_ids).logits
    dequantize_model(tiny_model)
    assert not any(isinstance(m, Int8Linear) for m in tiny_model.modules())
    torch.testing.assert_close(tiny_model(input_ids).logits, quantized, atol=1e-5, rtol=0)
    assert (quantized - ref).abs().max() > 0


# --- methods over a quantized base ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dora", "pissa", "oft", "full"])
def test_methods_that_need_the_dense_base_are_refused_naming_them(method, tmp_path, tiny_dir):
    out = tmp_path / "r"
    res = CliRunner().invoke(
        app,
        ["train", "--model", str(tiny_dir), "--method", method, "--quantize", "nf4", "--output", str(out)],
    )
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and f"method '{method}'" in lines[0] and "'quantize'" in lines[0], res.output
    assert "Traceback" not in res.output and not out.exists()


def test_lora_over_nf4_trains_and_is_a_plain_peft_adapter(tmp_path, tiny_dir, input_ids):
    cfg = dict(FAST, model=str(tiny_dir), max_steps=25, output=str(tmp_path / "r"), quantize="nf4", lora_r=8)
    summary = deltatune.train(cfg)
    log = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.8 * losses[0]
    dense_bytes = base_weight_bytes(AutoModelForCausalLM.from_pretrained(tiny_dir))["linear"]
    assert summary["quantize"] == "nf4"
    assert summary["base_linear_weight_bytes"] < 0.2 * dense_bytes  # vs fp32 here
    adapter = tmp_path / "r" / "adapter"
    disk = json.loads((adapter / "adapter_config.json").read_text())
    assert disk["peft_type"] == "LORA" and set(load_file(adapter / "adapter_model.safetensors")) == {
        f"base_model.model.model.layers.{i}.{m}.lora_{ab}.weight"
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        for ab in "AB"
    }  # fmt: skip
    from peft import PeftModel

    # peft on the full-precision base == deltatune on the full-precision base
    peft_fp = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), adapter).eval()
    ours_fp = deltatune.load(str(tiny_dir), adapter=adapter)
    with torch.no_grad():
        torch.testing.assert_close(peft_fp(input_ids).logits, ours_fp(input_ids).logits, atol=1e-5, rtol=0)
        # and the adapter learned something: it changes the base's outputs
        base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
        assert (ours_fp(input_ids).logits - base(input_ids).logits).abs().max() > 0.1


def test_peft_on_a_bitsandbytes_4bit_base_matches_ours(tmp_path, tiny_dir, input_ids):
    """transformers' bitsandbytes loader stores the same NF4 codes (double quant, fp32 source), so peft
    over it is an independent implementation of the very model deltatune trains."""
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    _random_lora(tiny_dir, tmp_path / "a", seed=0)
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(
        tiny_dir, quantization_config=bnb, device_map="cpu", dtype=torch.float32
    )
    for m in base.modules():  # bnb's fused CPU inference kernel runs in bf16; compare its fp32 path
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    peft_q = PeftModel.from_pretrained(base, tmp_path / "a").eval()
    ours = deltatune.load(str(tiny_dir), adapter=tmp_path / "a", quantize="nf4")
    full = deltatune.load(str(tiny_dir), adapter=tmp_path / "a")
    with torch.no_grad():
        theirs, mine, dense = peft_q(input_ids).logits, ours(input_ids).logits, full(input_ids).logits
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    assert (mine - dense).abs().max() > 1e-2  # the base really is quantized on both sides


def _random_lora(tiny_dir, out, seed: int) -> None:
    """A rank-4 LoRA on the tiny model with nonzero B (a fresh one is a no-op), saved to `out`."""
    torch.manual_seed(seed)
    model = deltatune.add_delta(AutoModelForCausalLM.from_pretrained(tiny_dir), "lora", lora_r=4)
    with torch.no_grad():
        for p in deltatune.deltas.named_delta_parameters(model).values():
            p.add_(0.05 * torch.randn_like(p))
    deltatune.save_delta(model, out)


def test_sigkill_then_resume_over_nf4_matches_uninterrupted(tmp_path, tiny_dir):
    flags = _flags(dict(FAST, model=tiny_dir, max_steps=12, save_every=2, quantize="nf4"))
    assert_sigkill_resume_matches_uninterrupted(tmp_path, flags, "step-000004")


# --- export over a quantized base ---------------------------------------------------------------------


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_merged_export_over_a_quantized_base_merges_into_the_dequantized_weights(
    quantize, tmp_path, tiny_dir
):
    _random_lora(tiny_dir, tmp_path / "a", seed=1)
    res = CliRunner().invoke(
        app,
        ["export", str(tmp_path / "m"), "--model", str(tiny_dir), "--adapter", str(tmp_path / "a"), "--merge",
         "--quantize", quantize],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    merged = load_file(tmp_path / "m" / "model.safetensors")
    adapter = load_file(tmp_path / "a" / "adapter_model.safetensors")
    scale = 32.0 / 4  # lora_alpha / r
    original = AutoModelForCausalLM.from_pretrained(tiny_dir)
    fmt = {"nf4": Nf4Linear, "int8": Int8Linear}[quantize]
    checked = 0
    for name, module in original.named_modules():
        key = f"base_model.model.{name}.lora_A.weight"
        if key not in adapter:
            continue
        by_hand = fmt(module).dequantize(torch.float32) + scale * (
            adapter[key.replace("lora_A", "lora_B")] @ adapter[key]
        )
        torch.testing.assert_close(merged[f"{name}.weight"], by_hand, atol=1e-6, rtol=0)
        assert (merged[f"{name}.weight"] - (module.weight + scale * adapter[key.replace("lora_A", "lora_B")] @ adapter[key])).abs().max() > 0  # fmt: skip
        checked += 1
    assert checked == 14
    # the same merged model through the public API: merge_delta dequantizes before merging
    loaded = deltatune.load(str(tiny_dir), adapter=tmp_path / "a", quantize=quantize)
    plain = deltatune.merge_delta(loaded)
    torch.testing.assert_close(
        plain.state_dict()["model.layers.0.mlp.up_proj.weight"], merged["model.layers.0.mlp.up_proj.weight"]
    )


def test_load_refuses_a_dense_base_method_over_a_quantized_base(tmp_path, tiny_dir):
    model = deltatune.add_delta(AutoModelForCausalLM.from_pretrained(tiny_dir), "dora", lora_r=4)
    deltatune.save_delta(model, tmp_path / "a")
    with pytest.raises(ValueError, match="method 'dora'"):
        deltatune.load(str(tiny_dir), adapter=tmp_path / "a", quantize="nf4")
    res = CliRunner().invoke(
        app,
        ["export", str(tmp_path / "m"), "--model", str(tiny_dir), "--adapter", str(tmp_path / "a"), "--merge",
         "--quantize", "int8"],
    )  # fmt: skip
    assert res.exit_code == 2 and "method 'dora'" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


QUANTIZABLE = [n for n, m in deltatune.deltas.METHODS.items() if m.trainable and not m.dense_base]


@pytest.mark.parametrize("method", QUANTIZABLE)
def test_every_method_without_dense_base_trains_over_nf4(method, tiny_model, input_ids):
    """One forward and backward of each remaining method over an NF4 base: gradients reach the
    delta, and its output equals the same delta over the dequantized (dense) base."""
    quantize_model(tiny_model, "nf4")
    torch.manual_seed(0)
    deltatune.add_delta(tiny_model, method)
    params = deltatune.deltas.named_delta_parameters(tiny_model)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.01 * torch.randn_like(p))
    loss = tiny_model(input_ids, labels=input_ids).loss
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    tiny_model.eval()  # deterministic forwards (diff pruning samples its gates in training)
    with torch.no_grad():
        quantized = tiny_model(input_ids).logits
        dense = dequantize_model(tiny_model)(input_ids).logits
    torch.testing.assert_close(quantized, dense, atol=1e-4, rtol=0)
