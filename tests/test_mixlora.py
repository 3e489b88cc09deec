"""MixLoRA / LoRAMoE (`method: mixlora`): the routed forward and the load-balancing loss against
hand-written formulas, training through the loop (aux loss, router statistics, accumulation),
save/load, and the refusals (merge, export, wrong base, bad config)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

import deltatune
from deltatune.cli import app
from deltatune.deltas import delta_layers, named_delta_parameters
from deltatune.deltas.base import RoutedMergeError, aux_loss
from deltatune.formats import FormatError
from deltatune.models import tiny_llama
from deltatune.route.mixlora import (
    PROJECTIONS,
    MixLoraConfig,
    MixLoraMLP,
    experts_per_layer,
)
from deltatune.train.config import ConfigError, build_config
from tests.test_train import FAST as TRAIN_FAST

VOCAB = 1024
FAST = dict(TRAIN_FAST, method="mixlora")


def tiny(seed=0, **kw):
    return tiny_llama(seed=seed, vocab_size=VOCAB, **kw).eval()


def randomize(model, std=0.1, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in named_delta_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=gen) * std)


def _mlp(routing, experts=3, top_k=2, coef=0.01, seed=0):
    torch.manual_seed(seed)
    base = tiny().model.layers[0].mlp
    cfg = MixLoraConfig(
        mixlora_experts=experts, mixlora_routing=routing, mixlora_top_k=top_k, mixlora_aux_coef=coef, lora_r=4
    )
    layer = MixLoraMLP(base, experts, cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a router that mixes (logits ~ 1), experts of the base MLP's size
        for name, p in layer.delta_parameters().items():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if name.startswith("router") else 0.05))
    return layer


def reference_forward(layer: MixLoraMLP, x: torch.Tensor, routing: str, top_k: int) -> torch.Tensor:
    """The formula token by token: Σ_k w_k · down_e(act(gate_e(x)) * up_e(x)), W_e = W + scale·B_e A_e."""
    base = layer.base_layer
    out = torch.zeros(x.shape[0], base.down_proj.out_features, dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = x[t].double()
        probs = (layer.router.weight.double() @ xt).softmax(dim=0)
        if routing == "topk":
            chosen = probs.argsort(descending=True)[:top_k].tolist()
            weights = probs[chosen] / probs[chosen].sum()
        else:
            chosen, weights = list(range(layer.experts)), probs
        for e, w in zip(chosen, weights, strict=True):
            w_e = {
                n: getattr(base, n).weight.double()
                + layer.scale * layer.lora_B[n][e].double() @ layer.lora_A[n][e].double()
                for n in PROJECTIONS
            }
            h = F.silu(w_e["gate_proj"] @ xt) * (w_e["up_proj"] @ xt)
            out[t] += w * (w_e["down_proj"] @ h)
    return out.float()


# --- the math ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("routing", ["topk", "soft"])
def test_forward_equals_the_formula(routing):
    layer = _mlp(routing).eval()
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(5))
    ours = layer(x)
    assert ours.shape == x.shape
    ref = reference_forward(layer, x.reshape(-1, 64), routing, top_k=2).reshape(x.shape)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    assert (ours - layer.base_layer(x)).abs().max() > 1e-2  # the experts do something
    layer.disabled = True
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)


@pytest.mark.parametrize("routing", ["topk", "soft"])
def test_aux_loss_and_counts_by_hand(routing):
    """coef·E·Σ f_i P_i with f_i = fraction of tokens whose top-k (soft: argmax) contains i."""
    coef, top_k = 0.05, 2
    layer = _mlp(routing, experts=4, top_k=top_k, coef=coef).train()
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(6))
    layer(x)
    tokens = x.reshape(-1, 64)
    n, experts = tokens.shape[0], 4
    f, p = [0.0] * experts, [0.0] * experts
    counts = [0] * experts
    for t in range(n):
        probs = (layer.router.weight.double() @ tokens[t].double()).softmax(dim=0).tolist()
        order = sorted(range(experts), key=lambda i: -probs[i])
        routed = order[:top_k] if routing == "topk" else order[:1]
        for i in range(experts):
            p[i] += probs[i] / n
            f[i] += (i in routed) / n
            counts[i] += i in routed
    expected = coef * experts * sum(fi * pi for fi, pi in zip(f, p, strict=True))
    assert layer.aux_loss.item() == pytest.approx(expected, rel=1e-5)
    assert layer.routed_tokens.tolist() == counts
    layer.eval()
    layer(x)  # eval forwards neither make an aux loss nor count
    assert layer.aux_loss is None and layer.routed_tokens.tolist() == counts


def test_aux_loss_sums_layers_and_is_none_without_a_router():
    model = deltatune.add_delta(tiny(), "mixlora", lora_r=4).train()
    ids = torch.randint(0, VOCAB, (2, 9))
    model(ids)
    layers = [m for m in delta_layers(model).values() if isinstance(m, MixLoraMLP)]
    torch.testing.assert_close(aux_loss(model), sum(m.aux_loss for m in layers))
    lora = deltatune.add_delta(tiny(), "lora", lora_r=4).train()
    lora(ids)
    assert aux_loss(lora) is None
    none = deltatune.add_delta(tiny(), "mixlora", lora_r=4, mixlora_aux_coef=0.0).train()
    none(ids)
    assert aux_loss(none) is None


def test_checkpointing_recompute_does_not_count_twice():
    model = deltatune.add_delta(tiny(), "mixlora", lora_r=4, mixlora_top_k=2).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, VOCAB, (2, 9))
    (model(ids).logits.sum() + aux_loss(model)).backward()
    for layer in (m for m in delta_layers(model).values() if isinstance(m, MixLoraMLP)):
        assert int(layer.routed_tokens.sum()) == 2 * 9 * 2  # tokens x top_k, once
        assert layer.router.weight.grad is not None


# --- experts per layer and config -------------------------------------------------------------------


def test_experts_per_layer_rules():
    assert experts_per_layer(4, "uniform", 3) == [4, 4, 4]
    assert experts_per_layer(8, "increasing", 4) == [4, 5, 7, 8]
    assert experts_per_layer(3, "increasing", 2) == [1, 3]
    assert experts_per_layer(8, "increasing", 1) == [8]
    assert experts_per_layer([2, 5], "uniform", 2) == [2, 5]
    model = deltatune.add_delta(
        tiny(num_hidden_layers=4), "mixlora", mixlora_experts=8, mixlora_expert_rule="increasing", lora_r=4
    )
    layers = [m for m in delta_layers(model).values() if isinstance(m, MixLoraMLP)]
    assert [m.experts for m in layers] == [4, 5, 7, 8]
    assert [m.lora_A["gate_proj"].shape[0] for m in layers] == [4, 5, 7, 8]
    model = deltatune.add_delta(tiny(), "mixlora", mixlora_experts=[1, 3], mixlora_top_k=1, lora_r=4)
    assert [m.router.out_features for m in delta_layers(model).values()] == [1, 3]
    with pytest.raises(ValueError, match="mixlora_experts lists 3 counts; the model has 2 MLP layers"):
        deltatune.add_delta(tiny(), "mixlora", mixlora_experts=[2, 2, 2], mixlora_top_k=1)


def test_bad_config_names_the_key():
    with pytest.raises(
        ConfigError, match="config key 'mixlora_top_k': .*mixlora_top_k=3 exceeds the 2 experts"
    ):
        build_config({"method": "mixlora", "mixlora_experts": 2, "mixlora_top_k": 3})
    with pytest.raises(ConfigError, match="config key 'mixlora_top_k': .*exceeds the 1 experts"):
        build_config({"method": "mixlora", "mixlora_experts": [1, 4]})  # the default top_k is 2
    with pytest.raises(ConfigError, match="config key 'mixlora_top_k': .*exceeds the 2 experts"):
        build_config(
            {
                "method": "mixlora",
                "mixlora_experts": 4,
                "mixlora_expert_rule": "increasing",
                "mixlora_top_k": 3,
            }
        )
    with pytest.raises(ConfigError, match="config key 'mixlora_expert_rule': .*mixlora_experts is a list"):
        build_config({"method": "mixlora", "mixlora_experts": [2, 2], "mixlora_expert_rule": "increasing"})
    with pytest.raises(ConfigError, match="config key 'mixlora_experts'"):
        build_config({"method": "mixlora", "mixlora_experts": 0})
    # soft routing uses every expert: top_k does not apply
    assert build_config({"method": "mixlora", "mixlora_experts": 1, "mixlora_routing": "soft"})


# --- save, load, refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [{}, {"mixlora_routing": "soft", "mixlora_attention": True}])
def test_save_load_round_trip_gives_identical_logits(extra, tmp_path):
    model = deltatune.add_delta(tiny(), "mixlora", lora_r=4, mixlora_experts=[2, 3], **extra)
    randomize(model)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    expected = model.eval()(ids).logits
    assert (expected - tiny()(ids).logits).abs().max() > 1e-3
    deltatune.save_delta(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["deltatune_method"] == "mixlora" and config["mixlora_experts"] == [2, 3]
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.1.mlp.lora_A.gate_proj"].shape == (3, 4, 64)
    assert tensors["base_model.model.model.layers.1.mlp.lora_B.down_proj"].shape == (3, 64, 4)
    assert tensors["base_model.model.model.layers.1.mlp.router.weight"].shape == (3, 64)
    assert tensors["base_model.model.model.layers.1.mlp.routed_tokens"].dtype == torch.int64
    loaded = deltatune.load(tiny(), adapter=tmp_path / "a")
    assert loaded.delta_method == "mixlora"
    assert torch.equal(loaded(ids).logits, expected)


def test_wrong_base_fails_naming_file_and_tensor(tmp_path):
    model = deltatune.add_delta(tiny(), "mixlora", lora_r=4)
    deltatune.save_delta(model, tmp_path / "a")
    other = tiny(hidden_size=32, intermediate_size=64)
    with pytest.raises(
        FormatError,
        match=r"adapter_model.safetensors: model\.layers\.0\.mlp\.router\.weight has shape \[4, 64\], "
        r"the model expects \[4, 32\]",
    ):
        deltatune.load(other, adapter=tmp_path / "a")


def test_merge_and_export_refuse(tmp_path, tiny_dir):
    model = deltatune.add_delta(tiny(), "mixlora", lora_r=4, mixlora_attention=True)
    with pytest.raises(RoutedMergeError, match="a routed delta cannot be folded into the weights"):
        deltatune.merge_delta(model)
    assert not any(layer.merged for layer in delta_layers(model).values())  # nothing half-merged
    assert isinstance(RoutedMergeError("x"), ValueError)
    saved = deltatune.add_delta(tiny_llama(), "mixlora", lora_r=4)
    deltatune.save_delta(saved, tmp_path / "a")
    res = CliRunner().invoke(
        app,
        [
            "export",
            str(tmp_path / "m"),
            "--model",
            str(tiny_dir),
            "--adapter",
            str(tmp_path / "a"),
            "--merge",
        ],
    )
    assert res.exit_code == 2 and "a routed delta cannot be folded into the weights" in res.output, res.output
    assert not (tmp_path / "m").exists()


# --- through the training loop ----------------------------------------------------------------------


def test_training_reduces_loss_and_writes_router_statistics(tmp_path, tiny_dir):
    out = tmp_path / "r"
    summary = deltatune.train(dict(FAST, model=str(tiny_dir), max_steps=25, output=str(out)))
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.8 * losses[0]
    aux = [r["aux_loss"] for r in log if "loss" in r]
    assert len(aux) == len(losses) and all(0 < a < 1 for a in aux)
    report = summary["delta_report"]
    assert report["experts_per_layer"] == [4, 4]
    tokens = 25 * FAST["batch_size"] * FAST["max_seq_len"] * 2  # steps x rows x tokens x top_k
    for path, load in report["router_load"].items():
        assert report["router_tokens"][path] == tokens
        assert len(load) == 4 and sum(load) == pytest.approx(1.0)
    assert json.loads((out / "summary.json").read_text())["delta_report"] == report
    assert (out / "router_load.png").stat().st_size > 1000
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["deltatune_report"]["router_load"] == report["router_load"]


def test_grad_accumulation_matches_one_big_batch_for_the_lm_part(tmp_path, tiny_dir):
    """With the aux loss off, splitting a step into micro-batches changes nothing (routing is per
    token). The load-balancing loss itself is a product of per-micro-batch means (f_i · P_i), so the
    mean of two halves' aux losses is not the aux loss of the whole batch: that part cannot match
    exactly, and the loop weights each micro-batch's aux by 1 / grad_accum."""
    runs = {}
    for bs, accum in [(4, 1), (2, 2)]:
        out = tmp_path / f"r{bs}"
        cfg = dict(FAST, model=str(tiny_dir), max_steps=3, batch_size=bs, grad_accum=accum, output=str(out))
        deltatune.train(dict(cfg, mixlora_aux_coef=0.0))
        runs[bs] = load_file(out / "adapter" / "adapter_model.safetensors")
    for k, v in runs[4].items():
        torch.testing.assert_close(runs[2][k], v, atol=2e-5, rtol=1e-4)


def test_activation_checkpointing_gives_the_same_training(tmp_path, tiny_dir):
    """The recomputed forward makes the same routing and aux loss and does not count tokens twice."""
    runs = {}
    for ckpt in (False, True):
        out = tmp_path / f"c{ckpt}"
        cfg = dict(FAST, model=str(tiny_dir), max_steps=3, lora_dropout=0.1, output=str(out))
        deltatune.train(dict(cfg, gradient_checkpointing=ckpt))
        runs[ckpt] = load_file(out / "adapter" / "adapter_model.safetensors")
    for k, v in runs[False].items():
        torch.testing.assert_close(runs[True][k], v, atol=1e-6, rtol=1e-5)


def test_ddp_two_processes_match_single_process(tmp_path, tiny_dir):
    """Experts that get no tokens on a rank still run (on an empty slice), so DDP finds every
    parameter in the graph. Router counts are per process: the saved ones are rank 0's tokens."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = [
        x
        for k, v in dict(FAST, model=tiny_dir, max_steps=4, mixlora_aux_coef=0.0).items()
        for x in (f"--{k.replace('_', '-')}", str(v))
    ]
    train = [sys.executable, "-m", "deltatune", "train", *flags]
    one = subprocess.run(
        [*train, "--grad-accum", "2", "--output", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stdout + one.stderr
    ddp = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537"]
    two = subprocess.run(
        [*ddp, *train[1:], "--output", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stdout + two.stderr
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    for k, v in a.items():
        if v.is_floating_point():
            torch.testing.assert_close(b[k], v, atol=1e-5, rtol=1e-4)
        else:
            assert int(b[k].sum()) * 2 == int(v.sum())
