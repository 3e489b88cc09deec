"""Arrow routing over a library of LoRA adapters (deltatune/route/arrow.py).

Oracles: peft's `create_arrow_model` for the logits, the routing formula written out token by token,
the SVD of the dense ΔW for the prototypes; plus save/load, the `route` verb and every refusal.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import peft
import pytest
import torch
from peft import ArrowConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.arrow import create_arrow_model
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

import deltatune
from deltatune.cli import app
from deltatune.deltas import delta_layers, named_delta_parameters
from deltatune.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FormatError
from deltatune.formats.peft import read_lora, save_delta
from deltatune.models import tiny_llama
from deltatune.route import ArrowLinear, arrow_coefficients, gen_know_sub, top_right_singular_vector
from deltatune.train.config import ConfigError, build_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB = 1024
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
runner = CliRunner()


def tiny(**kw) -> nn.Module:
    return tiny_llama(seed=0, vocab_size=VOCAB, **kw).eval()


def write_lora(path, seed: int, r: int = 4, targets=TARGETS, base=None, gap: float = 4.0):
    """A random peft LoRA (B != 0) whose every ΔW = B A has a clear spectral gap: rank direction 0 of
    A and of B is scaled by `gap`, so σ1 ≫ σ2 and peft's 15 power-iteration steps converge."""
    model = base if base is not None else tiny()
    torch.manual_seed(seed)  # after building the base: tiny_llama reseeds the global generator
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
    lora = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for module in lora.modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                module.lora_A["default"].weight[0] *= gap
                module.lora_B["default"].weight[:, 0] *= gap
    lora.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("arrow-library")
    return {
        "task": [write_lora(root / f"task{i}", seed=i) for i in range(3)],
        "general": [write_lora(root / f"general{i}", seed=10 + i) for i in range(2)],
        "narrow": write_lora(root / "narrow", seed=5, r=2),
    }


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def arrow(adapters, top_k: int = 2, **kw) -> nn.Module:
    return deltatune.add_delta(tiny(), "arrow", arrow_adapters=adapters, arrow_top_k=top_k, **kw)


# --- the oracle: peft ---------------------------------------------------------------------------------


CASES = [(k, gks, 1.0) for gks in (False, True) for k in (1, 2, 3)] + [(2, False, 0.5)]


@pytest.mark.parametrize(("top_k", "gks", "temperature"), CASES, ids=lambda v: str(v))
def test_equals_peft_create_arrow_model(library, ids, top_k, gks, temperature):
    """Same three adapters, same base: peft's routed logits equal ours in fp32 (atol 1e-4).

    peft's prototypes come from 15 power-iteration steps from a random start, ours from an exact SVD;
    they agree because every test adapter's ΔW has a clear spectral gap (see `write_lora`). Without
    the gap, power iteration has not converged and the two differ by ~0.5 in the logits."""
    task, general = library["task"], library["general"] if gks else []
    config = ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=0, use_gks=gks)
    theirs = create_arrow_model(tiny(), [str(p) for p in task], config, [str(p) for p in general] or None)
    ours = arrow(task, top_k, arrow_temperature=temperature, arrow_general_adapters=general)
    routed = logits(ours, ids)
    torch.testing.assert_close(routed, logits(theirs.eval(), ids), atol=1e-4, rtol=0)
    assert (routed - logits(tiny(), ids)).abs().max() > 1e-2
    for path in task:  # a mix, not any one adapter
        assert (routed - logits(deltatune.load(tiny(), adapter=path), ids)).abs().max() > 1e-2


# --- the math ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 6, 5), (8, 6, 5), (1, 7, 3)], ids=["thin", "r>in,out", "rank1"])
def test_top_right_singular_vector_is_the_svd_one(shape):
    r, inp, out = shape
    gen = torch.Generator().manual_seed(r)
    a, b = torch.randn(r, inp, generator=gen), torch.randn(out, r, generator=gen)
    expected = torch.linalg.svd((b @ a).double())[2][0]
    v = top_right_singular_vector(a, b)
    assert v.dtype == torch.float32 and v.shape == (inp,)
    torch.testing.assert_close(v.double().abs(), expected.abs(), atol=1e-6, rtol=0)
    assert abs(float(v.double() @ expected)) == pytest.approx(1.0, abs=1e-6)
    assert v[v.abs().argmax()] > 0  # the sign is fixed, and irrelevant to |x · v|


def test_arrow_coefficients_keep_top_k_and_sum_to_one():
    gen = torch.Generator().manual_seed(0)
    x, protos = torch.randn(7, 6, generator=gen), torch.randn(4, 6, generator=gen)
    coeff = arrow_coefficients(x, protos, top_k=2, temperature=0.5)
    assert coeff.shape == (7, 4) and ((coeff > 0).sum(-1) == 2).all()
    torch.testing.assert_close(coeff.sum(-1), torch.ones(7))
    scores = (x @ protos.T).abs()
    assert torch.equal(coeff > 0, scores >= scores.topk(2, dim=-1).values[:, -1:])
    torch.testing.assert_close(arrow_coefficients(x, -protos, 2, 0.5), coeff)  # sign-free


def test_gen_know_sub_shifts_a_and_b_by_the_general_means():
    gen = torch.Generator().manual_seed(0)
    pair = lambda: (torch.randn(2, 6, generator=gen), torch.randn(5, 2, generator=gen))  # noqa: E731
    task, general = [pair(), pair()], [pair(), pair()]
    mean_a, mean_b = (general[0][0] + general[1][0]) / 2, (general[0][1] + general[1][1]) / 2
    for (a, b), (sa, sb) in zip(task, gen_know_sub(task, general), strict=True):
        torch.testing.assert_close(sa, a - mean_a)
        torch.testing.assert_close(sb, b - mean_b)


def formula(x, base, factors, scales, top_k, temperature):
    """The Arrow output written out token by token, prototypes from the SVD of the dense ΔW."""
    protos = [torch.linalg.svd((b @ a).double())[2][0].float() for a, b in factors]
    rows = []
    for tok in x.reshape(-1, x.shape[-1]):
        scores = [abs(float(tok @ v)) for v in protos]
        kept = sorted(range(len(scores)), key=lambda i: -scores[i])[:top_k]
        weights = [math.exp(scores[i] / temperature) for i in kept]
        row = base(tok).clone()
        for i, w in zip(kept, weights, strict=True):
            row += w / sum(weights) * scales[i] * (b_a(factors[i]) @ tok)
        rows.append(row)
    return torch.stack(rows).reshape(*x.shape[:-1], -1)


def b_a(factors):
    a, b = factors
    return b @ a


def test_mixed_ranks_pad_and_equal_the_formula():
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(6, 5)
    factors = [(torch.randn(r, 6, generator=gen), torch.randn(5, r, generator=gen)) for r in (2, 4, 3)]
    scales = [0.5, 2.0, 1.5]
    layer = ArrowLinear.from_factors(base, factors, scales, top_k=2, temperature=0.7)
    assert layer.a_stack.shape == (3, 4, 6) and layer.b_stack.shape == (3, 5, 4)
    x = torch.randn(3, 4, 6, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), formula(x, base, factors, scales, 2, 0.7), atol=1e-5, rtol=0)
    assert layer.delta_weight() is None


def test_mixed_rank_library_on_a_model_equals_the_formula(library):
    paths = [library["narrow"], *library["task"][:2]]  # ranks 2, 4, 4
    model = arrow(paths, top_k=2)
    path = "model.layers.1.self_attn.v_proj"
    layer = model.get_submodule(path)
    assert isinstance(layer, ArrowLinear) and layer.a_stack.shape[1] == 4
    loras = [read_lora(p).modules[path] for p in paths]
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(2))
    expected = formula(x, layer.base_layer, [(f.a, f.b) for f in loras], [f.scale for f in loras], 2, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


# --- as a delta ----------------------------------------------------------------------------------


def test_nothing_trains_and_disable_gives_the_base(library, ids):
    model = arrow(library["task"])
    assert named_delta_parameters(model) == {}
    assert not any(p.requires_grad for p in model.parameters())
    assert set(delta_layers(model)) == set(read_lora(library["task"][0]).modules)
    with deltatune.disable_delta(model):
        torch.testing.assert_close(logits(model, ids), logits(tiny(), ids), atol=0, rtol=0)
    with pytest.raises(ConfigError, match="'arrow' has nothing to train"):
        build_config({"method": "arrow", "arrow_adapters": [str(p) for p in library["task"]]})


def test_bf16_base_and_autocast_stay_close_to_fp32(library, ids):
    """top_k = E, so the mix is continuous: with fewer, a bf16 near-tie can flip a token's top-k and
    the difference is a different routing, not rounding."""
    reference = logits(arrow(library["task"], top_k=3), ids)
    bf16_base = tiny().to(torch.bfloat16)  # attached to a bf16 base: the buffers stay fp32
    fp32_buffers = deltatune.add_delta(bf16_base, "arrow", arrow_adapters=library["task"], arrow_top_k=3)
    for model in (arrow(library["task"], top_k=3).to(torch.bfloat16), fp32_buffers):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = logits(model, ids).float()
        assert (low - reference).abs().max() < 0.1 and (low - reference).abs().mean() < 0.01
    assert next(iter(delta_layers(fp32_buffers).values())).a_stack.dtype == torch.float32


def test_save_and_load_round_trip_without_the_sources(library, ids, tmp_path):
    sources = [shutil.copytree(p, tmp_path / "src" / p.name) for p in [library["narrow"], *library["task"]]]
    model = arrow(sources, top_k=3, arrow_temperature=0.5, arrow_general_adapters=[])
    expected = logits(model, ids)
    save_delta(model, tmp_path / "routed", base_model="tiny")
    shutil.rmtree(tmp_path / "src")  # a saved Arrow delta is self-contained
    config = json.loads((tmp_path / "routed" / ADAPTER_CONFIG).read_text())
    assert config["deltatune_method"] == "arrow" and config["arrow_top_k"] == 3
    assert config["arrow_temperature"] == 0.5 and config["arrow_adapters"] == [str(p) for p in sources]
    tensors = load_file(tmp_path / "routed" / ADAPTER_WEIGHTS)
    key = "base_model.model.model.layers.0.mlp.up_proj."
    assert tensors[key + "a_stack"].shape == (4, 4, 64) and tensors[key + "b_stack"].shape == (4, 128, 4)
    assert tensors[key + "scales"].shape == (4,) and tensors[key + "prototypes"].shape == (4, 64)
    loaded = deltatune.load(tiny(), adapter=tmp_path / "routed")
    assert loaded.delta_method == "arrow"
    torch.testing.assert_close(logits(loaded, ids), expected, atol=0, rtol=0)
    save_delta(loaded, tmp_path / "again")  # a loaded Arrow delta saves again
    torch.testing.assert_close(logits(deltatune.load(tiny(), adapter=tmp_path / "again"), ids), expected)
    with pytest.raises(FormatError, match="has shape"):
        deltatune.load(tiny(hidden_size=32), adapter=tmp_path / "routed")


def test_merge_refuses_a_routed_delta(library):
    model = arrow(library["task"])
    with pytest.raises(ValueError, match="a routed delta cannot be folded into the weights"):
        deltatune.merge_delta(model)
    assert all(isinstance(m, ArrowLinear) for m in delta_layers(model).values())  # nothing changed


# --- refusals --------------------------------------------------------------------------------------


def test_bad_libraries_are_refused_naming_the_adapter_and_module(library, tmp_path):
    task = library["task"]
    small = write_lora(tmp_path / "small", seed=7, base=tiny(hidden_size=32))
    with pytest.raises(FormatError, match=rf"adapter {re.escape(str(small))}: module model\.layers\.0\.\S+ "
                       r"maps \d+ -> \d+, the base layer \d+ -> \d+"):  # fmt: skip
        arrow([task[0], small])
    deep = write_lora(tmp_path / "deep", seed=9, base=tiny(num_hidden_layers=3))
    with pytest.raises(
        FormatError, match=rf"adapter {re.escape(str(deep))}: module model\.layers\.2\.\S+ is not in"
    ):
        arrow([deep], top_k=1)
    fewer = write_lora(tmp_path / "fewer", seed=8, targets=["q_proj", "v_proj"])
    with pytest.raises(
        FormatError, match=rf"adapter {re.escape(str(fewer))}: does not target \S+_proj, which adapter "
    ):
        arrow([task[0], fewer])
    with pytest.raises(ValueError, match=r"arrow_top_k=4 is larger than the number of adapters \(3\)"):
        arrow(task, top_k=4)
    with pytest.raises(ValueError, match="arrow_adapters: .* give at least one"):
        deltatune.add_delta(tiny(), "arrow")
    with pytest.raises(FormatError, match="GenKnowSub subtracts factors"):
        arrow([task[0], library["narrow"]], arrow_general_adapters=library["general"])
    conv = shutil.copytree(task[1], tmp_path / "conv1d")
    config = json.loads((conv / ADAPTER_CONFIG).read_text())
    (conv / ADAPTER_CONFIG).write_text(json.dumps({**config, "fan_in_fan_out": True}))
    with pytest.raises(FormatError, match=rf"adapter {re.escape(str(conv))}: fan_in_fan_out=True"):
        arrow([task[0], conv])


def test_route_cli_writes_a_delta_that_loads_and_export_refuses(library, ids, tmp_path):
    tiny().save_pretrained(tmp_path / "base")
    flags = [arg for p in library["task"] for arg in ("--adapter", str(p))]
    gks = [arg for p in library["general"] for arg in ("--general", str(p))]
    args = ["route", str(tmp_path / "routed"), *flags, *gks, "--top-k", "2", "--temperature", "0.5"]
    res = runner.invoke(app, [*args, "--model", str(tmp_path / "base")])
    assert res.exit_code == 0, res.output
    expected = arrow(library["task"], 2, arrow_temperature=0.5, arrow_general_adapters=library["general"])
    loaded = deltatune.load(tiny(), adapter=tmp_path / "routed")
    torch.testing.assert_close(logits(loaded, ids), logits(expected, ids), atol=0, rtol=0)

    res = runner.invoke(app, [*args, "--model", str(tmp_path / "base")])  # OUT is taken now
    assert res.exit_code == 2 and "already exists" in res.output
    small = write_lora(tmp_path / "small", seed=7, base=tiny(hidden_size=32))
    bad = ["route", str(tmp_path / "bad"), *flags, "--adapter", str(small), "--model", str(tmp_path / "base")]
    res = runner.invoke(app, bad)
    assert res.exit_code == 2 and f"adapter {small}: module model.layers.0." in res.output, res.output
    assert not (tmp_path / "bad").exists()
    res = runner.invoke(app, ["route", str(tmp_path / "bad"), *flags, "--top-k", "5"])  # before loading
    assert res.exit_code == 2 and "arrow_top_k=5" in res.output, res.output

    export = ["export", str(tmp_path / "merged"), "--model", str(tmp_path / "base")]
    res = runner.invoke(app, [*export, "--adapter", str(tmp_path / "routed"), "--merge"])
    assert res.exit_code == 2 and "cannot be folded into the weights" in res.output, res.output
    assert not (tmp_path / "merged").exists()
