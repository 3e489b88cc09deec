"""The method zoo through the delta contract: merge/unmerge, save/reload, one training step, and the
behaviour each method promises, checked against hand-computed formulas on tiny random models."""

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune
from deltatune import attention
from deltatune.deltas import (
    FAMILIES,
    METHODS,
    delta_layers,
    delta_report,
    get_method,
    method_for_disk,
    named_delta_parameters,
    set_merged,
)
from deltatune.formats.peft import save_delta
from deltatune.models import load_tokenizer, tiny_llama
from deltatune.train.config import ConfigError, build_config
from deltatune.train.evaluate import generate
from deltatune.train.loop import CausalLMLoss

VOCAB = 1024
SMALL = {  # configs that fit the tiny model (and keep the tests fast)
    "vera": dict(vera_r=16),
    "oft": dict(oft_block_size=8),
    "boft": dict(boft_block_size=4, boft_butterfly_factor=2),
    "houlsby": dict(adapter_size=8),
    "parallel_adapter": dict(adapter_size=8),
    "prompt_tuning": dict(num_virtual_tokens=4, prompt_init="random"),
    "prefix_tuning": dict(num_virtual_tokens=4, prompt_init_text=None, prefix_projection_hidden=16),
    "ptuning_v2": dict(num_virtual_tokens=4, prompt_init_text=None),
    "graft": dict(graft_density=0.05),
    "diff_pruning": dict(diff_density=0.05),
}
UNMERGEABLE = {"houlsby", "parallel_adapter", "prompt_tuning", "prefix_tuning", "ptuning_v2", "mixlora"}
UNMERGEABLE |= {"arrow"}  # a routed delta has no single ΔW to fold
TRAINABLE = [n for n, m in METHODS.items() if getattr(m, "trainable", True)]  # arrow routes fixed adapters


def tiny(seed=0, **kw):
    return tiny_llama(seed=seed, vocab_size=VOCAB, **kw).eval()


def attach(method, model=None, **kw):
    small = arrow_library() if method == "arrow" else SMALL.get(method, {})
    return deltatune.add_delta(model if model is not None else tiny(), method, **{**small, **kw})


@functools.cache
def arrow_library() -> dict:
    """Arrow routes over existing LoRA adapters: two random ones, written once per test session."""
    root = Path(tempfile.mkdtemp(prefix="arrow-library-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    paths = []
    for seed in (1, 2):
        lora = deltatune.add_delta(tiny(), "lora", lora_r=2, target_modules=["q_proj", "v_proj"])
        randomize(lora, seed=seed)
        paths.append(save_delta(lora, root / f"lora{seed}"))
    return dict(arrow_adapters=paths, arrow_top_k=1)


def randomize(model, std=0.1, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in named_delta_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def test_registry_names_families_and_unknown_method():
    expected = {
        **dict.fromkeys(
            [
                "lora",
                "dora",
                "pissa",
                "olora",
                "vera",
                "loha",
                "lokr",
                "oft",
                "boft",
                "bitfit",
                "full",
                "diff_pruning",
                "graft",
                "layer_select",
            ],
            "weight",
        ),
        **dict.fromkeys(["ia3", "ssf", "houlsby", "parallel_adapter"], "activation"),
        **dict.fromkeys(["prompt_tuning", "prefix_tuning", "ptuning_v2"], "input"),
        **dict.fromkeys(["arrow", "mixlora"], "routed"),
    }
    assert list(METHODS) == list(expected) and expected == FAMILIES
    lora_plus = {"lora", "dora", "pissa", "olora", "mixlora"}
    assert {n for n, m in METHODS.items() if m.lora_plus_params} == lora_plus
    assert [n for n, m in METHODS.items() if m.servable] == [
        "lora",
        "arrow",
        "mixlora",
    ]  # DoRA is not plain LoRA
    assert [n for n, m in METHODS.items() if m.served_per_row] == ["arrow", "mixlora"]  # the routed deltas
    with pytest.raises(ValueError, match="unknown method 'lorra'; valid methods: lora, dora, pissa"):
        get_method("lorra")
    with pytest.raises(ConfigError, match="unknown method 'nope'; valid: lora, .*ptuning_v2"):
        build_config({"method": "nope"})
    with pytest.raises(ConfigError, match="'vera_r' does not apply to method 'lora'"):
        build_config({"method": "lora", "vera_r": 4})
    cfg = build_config({"method": "vera", "vera_r": 4, "target_modules": ["q_proj"]})
    assert cfg.delta_config().vera_r == 4


def test_shared_config_keys_mean_the_same():
    """A key two methods share must be one of the deliberately shared ones."""
    owners = {}
    for method in METHODS.values():
        for key in method.config_class.model_fields:
            owners.setdefault(key, set()).add(method.name)
    shared = {k for k, v in owners.items() if len(v) > 1}
    assert shared <= {
        "target_modules",  # peft's module selection
        "lora_r", "lora_alpha", "lora_dropout", "use_rslora", "lora_init",  # LoRA, DoRA, PiSSA, OLoRA
        "rank_pattern", "alpha_pattern",  # peft's per-module overrides
        "adapter_size", "adapter_act",  # bottleneck width and nonlinearity
        "num_virtual_tokens", "prompt_init_text", "prompt_tokenizer",  # virtual tokens and their text init
    }  # fmt: skip


@pytest.mark.parametrize("method", sorted(set(METHODS) - UNMERGEABLE))
def test_merged_equals_unmerged_and_unmerge_restores_base(method, ids, tmp_path):
    model = attach(method)
    randomize(model)
    model.eval()
    unmerged = model(ids).logits
    assert (unmerged - tiny()(ids).logits).abs().max() > 1e-3
    set_merged(model, True)
    merged = model(ids).logits
    set_merged(model, False)
    again = model(ids).logits
    for other in (merged, again):
        torch.testing.assert_close(other, unmerged, atol=1e-4, rtol=0)
    fresh = tiny().state_dict()
    for name, value in model.state_dict().items():
        base_name = name.replace(".base_layer", "")
        if base_name in fresh and ".base_layer." in name:
            torch.testing.assert_close(value, fresh[base_name], atol=1e-5, rtol=1e-5)
    save_delta(model, tmp_path / "a")
    reloaded = deltatune.load(tiny(), adapter=tmp_path / "a")
    assert reloaded.delta_method == ("lora" if method in ("pissa", "olora") else method)
    torch.testing.assert_close(reloaded(ids).logits, unmerged, atol=1e-4, rtol=0)
    folded = deltatune.merge_delta(model)
    assert not delta_layers(folded) and not hasattr(folded, "delta_method")
    torch.testing.assert_close(folded(ids).logits, unmerged, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", sorted(UNMERGEABLE))
def test_unmergeable_methods_say_so(method):
    model = attach(method)
    with pytest.raises((NotImplementedError, ValueError), match="cannot be merged"):  # routed: ValueError
        deltatune.merge_delta(model)


@pytest.mark.parametrize("method", TRAINABLE)
def test_one_training_step_moves_only_the_delta(method):
    """The training loop's contract: bf16 base, fp32 delta, autocast, the backbone-level loss, and
    the loop's packed attention (prefix methods fall back to SDPA with a block-diagonal mask)."""
    model = tiny().to(torch.bfloat16)
    assert attention.use_packed_attention(model)
    deltatune.add_delta(model, method, **SMALL.get(method, {}))
    params = named_delta_parameters(model)
    ups = get_method(method).lora_plus_params  # LoRA+ speeds up exactly the B factors, as it always did
    assert {n for n in params if any(u in n for u in ups)} == {n for n in params if ".lora_B." in n}
    for p in params.values():
        p.data = p.data.float()
    before = {n: p.detach().clone() for n, p in params.items()}
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(9), torch.arange(7)]).expand(2, -1)  # two packed samples per row
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = CausalLMLoss(model, chunk_tokens=16)(ids, positions, ids) / ids.numel()
    loss.backward()
    assert loss.isfinite()
    frozen = [
        n for n, p in model.named_parameters() if p.requires_grad and id(p) not in map(id, params.values())
    ]
    assert not frozen
    torch.optim.AdamW(params.values(), lr=1e-2).step()
    assert any((p - before[n]).abs().max() > 0 for n, p in params.items())


# --- weight deltas ------------------------------------------------------------------------------


def test_bitfit_and_ssf_fold_into_a_bias_the_base_did_not_have(ids):
    for method in ("bitfit", "ssf"):
        model = attach(method, target_modules=["q_proj"])
        randomize(model)
        layer = model.model.layers[0].self_attn.q_proj
        weight = layer.base_layer.weight.detach().clone()
        x = torch.randn(3, 64)
        if method == "bitfit":
            expected = x @ weight.T + layer.bitfit_bias
        else:
            expected = (x @ weight.T) * layer.ssf_scale + layer.ssf_shift
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
        layer.merge()
        assert layer.base_layer.bias is not None
        torch.testing.assert_close(layer.base_layer(x), expected, atol=1e-5, rtol=0)
        layer.unmerge()
        assert layer.base_layer.bias is None
        torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-6, rtol=0)


def test_full_delta_keeps_tied_embeddings_tied(ids, tmp_path):
    model = attach("full")
    randomize(model, std=0.02)
    params = named_delta_parameters(model)
    base_count = sum(p.numel() for p in tiny().parameters())
    assert sum(p.numel() for p in params.values()) == base_count  # one shared Δ for embed + lm_head
    assert "lm_head.weight_delta" not in params
    # independent check: a plain model whose weights were edited by hand
    edited = tiny()
    with torch.no_grad():
        for name, p in edited.named_parameters():
            p.add_(params[name.rsplit(".", 1)[0] + f".{name.rsplit('.', 1)[1]}_delta"])
    torch.testing.assert_close(model(ids).logits, edited(ids).logits, atol=1e-4, rtol=0)
    save_delta(model, tmp_path / "a")
    disk = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert sum(t.numel() for t in disk.values()) == base_count


def test_layer_select_trains_only_the_chosen_blocks():
    model = attach("layer_select", model=tiny(num_hidden_layers=4), select_layers=[0, -1])
    blocks = {int(name.split(".")[2]) for name in named_delta_parameters(model)}
    assert blocks == {0, 3}
    model = attach("layer_select", model=tiny(num_hidden_layers=4))  # top_half
    assert {int(name.split(".")[2]) for name in named_delta_parameters(model)} == {2, 3}
    with pytest.raises(ValueError, match="block index 9 is out of range"):
        attach("layer_select", model=tiny(), select_layers=[9])


def test_graft_keeps_the_top_fraction_and_reports_what_it_kept(ids, tmp_path):
    model = attach("graft", graft_density=0.02)
    randomize(model, std=0.05)
    dense = {
        n.removesuffix(".graft_delta"): p.detach().clone() for n, p in named_delta_parameters(model).items()
    }
    flat = torch.cat([d.flatten() for d in dense.values()])
    k = round(0.02 * flat.numel())
    top = flat.abs().topk(k).values
    model.eval()
    report = delta_report(model)
    assert report["entries_kept"] == k and report["fraction_kept"] == pytest.approx(k / flat.numel())
    assert report["score_kept"] == pytest.approx(float(top.sum() / flat.abs().sum()), rel=1e-5)
    assert report["energy_kept"] == pytest.approx(float((top**2).sum() / (flat**2).sum()), rel=1e-5)
    # eval mode uses the graft only: the base plus the kept entries, by hand
    threshold = top.min()
    edited = tiny()
    with torch.no_grad():
        for path, delta in dense.items():
            edited.get_submodule(path).weight.add_(delta * (delta.abs() >= threshold))
    torch.testing.assert_close(model(ids).logits, edited(ids).logits, atol=1e-4, rtol=0)
    # on disk: int32 indices + fp32 values, nothing dense, and the report in the config
    save_delta(model, tmp_path / "a")
    disk = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert {k.rsplit(".", 1)[1] for k in disk} == {"sparse_indices", "sparse_values"}
    assert sum(t.numel() for k, t in disk.items() if k.endswith("values")) == k
    assert all(t.dtype == torch.int32 for k, t in disk.items() if k.endswith("indices"))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["deltatune_method"] == "graft" and config["deltatune_report"]["entries_kept"] == k
    reloaded = deltatune.load(tiny(), adapter=tmp_path / "a")
    torch.testing.assert_close(reloaded(ids).logits, edited(ids).logits, atol=1e-4, rtol=0)
    # training mode still trains the dense delta
    model.train()
    assert (model(ids).logits - edited(ids).logits).abs().max() > 1e-3


def test_diff_pruning_adds_the_expected_l0_gradient(ids):
    weight = 1e-3
    model = attach("diff_pruning", target_modules=["q_proj"], diff_l0_weight=weight)
    randomize(model, std=0.5)
    layer = model.model.layers[0].self_attn.q_proj
    model.train()
    torch.manual_seed(0)
    model(ids).logits.sum().backward()
    with_penalty = layer.diff_logits.grad.clone()
    # the same forward (same noise) without the penalty, plus autograd of the explicit penalty
    model.zero_grad()
    for m in delta_layers(model).values():
        m.l0_weight = 0.0
    torch.manual_seed(0)
    model(ids).logits.sum().backward()
    logits = layer.diff_logits.detach().requires_grad_()
    penalty = weight * torch.sigmoid(logits - (2 / 3) * torch.log(torch.tensor(0.1 / 1.1))).sum()
    penalty.backward()
    torch.testing.assert_close(with_penalty, layer.diff_logits.grad + logits.grad, atol=1e-6, rtol=1e-5)


def test_diff_pruning_eval_mask_is_deterministic_and_projected(ids):
    model = attach("diff_pruning", diff_density=0.01)
    randomize(model, std=1.0)
    model.eval()
    first = model(ids).logits
    torch.testing.assert_close(model(ids).logits, first, atol=0, rtol=0)
    report = delta_report(model)
    assert report["fraction_kept"] <= 0.01 + 1e-6 and report["nonzero_fraction"] > 0.5


def test_vera_projections_are_shared_and_moved_once():
    model = attach("vera")
    layers = [m for m in delta_layers(model).values() if hasattr(m, "vera_lambda_b")]
    assert len({id(m._shared[0]) for m in layers}) == 1
    buffers = [n for n, _ in model.named_buffers() if "vera_" in n]
    assert buffers == ["vera_projections.vera_A", "vera_projections.vera_B"]


# --- input deltas -------------------------------------------------------------------------------


@pytest.mark.parametrize("packed_attention", [False, True])
@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "ptuning_v2"])
def test_prefix_sees_each_packed_sample_like_a_separate_one(method, packed_attention):
    """A packed row (restarting position ids) equals each sample run alone, prefix included, under
    SDPA and under the training loop's packed attention."""
    model = attach(method)
    if packed_attention:
        assert attention.use_packed_attention(model)
    randomize(model)
    a = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    b = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(5))
    row = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(6), torch.arange(5)])[None]
    layout = {"packed_layout": attention.packed_layout(positions)} if packed_attention else {}  # as the loop
    packed = model.base_model(input_ids=row, position_ids=positions, use_cache=False, **layout)
    alone = [model.base_model(input_ids=x, use_cache=False).last_hidden_state for x in (a, b)]
    torch.testing.assert_close(packed.last_hidden_state, torch.cat(alone, dim=1), atol=1e-5, rtol=0)
    plain = tiny().base_model(input_ids=a).last_hidden_state
    assert (alone[0] - plain).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_prefix_generation_batched_left_padded_equals_one_by_one(method):
    tokenizer = load_tokenizer()
    model = tiny_llama(seed=0).eval()  # the tokenizer's vocabulary
    deltatune.add_delta(model, method, num_virtual_tokens=4)  # text init from the default tokenizer
    randomize(model, std=0.3)
    prompts = ["2 + 2 =", "Reverse the words: apple river stone", "Hi"]
    batched = generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=3, stop_token_ids=[0])
    single = [
        generate(model, tokenizer, [p], max_new_tokens=5, batch_size=1, stop_token_ids=[0])[0]
        for p in prompts
    ]
    assert batched == single
    # the next-token scores of a left-padded row equal those of the row alone
    rows = [tokenizer(p)["input_ids"] for p in prompts[:2]]
    width = max(map(len, rows))
    padded = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    kw = dict(
        max_new_tokens=2, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True
    )
    together = model.generate(input_ids=padded, attention_mask=mask, **kw).scores
    for i, r in enumerate(rows):
        alone = model.generate(input_ids=torch.tensor([r]), **kw).scores
        for step in range(2):
            torch.testing.assert_close(together[step][i], alone[step][0], atol=1e-4, rtol=0)
    # greedy decoding with the cache follows the full forward's argmax
    ids = torch.tensor([tokenizer("2 + 2 =")["input_ids"]])
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    logits = model(out[:, :-1]).logits
    assert out[0, ids.shape[1] :].tolist() == logits[0, ids.shape[1] - 1 :].argmax(-1).tolist()


def test_text_initialised_prompt_is_the_texts_embeddings():
    model = tiny_llama(seed=0).eval()
    text = "Answer exactly."
    deltatune.add_delta(model, "prompt_tuning", num_virtual_tokens=7, prompt_init_text=text)
    ids = load_tokenizer()(text, add_special_tokens=False)["input_ids"]
    expected = model.get_input_embeddings().weight[(ids * 7)[:7]]
    torch.testing.assert_close(model.prompt_encoder.prompt_embeddings, expected)
    # the prefix methods start at that text's key/value states: the same logits as the text itself
    prefix = deltatune.add_delta(
        tiny_llama(seed=0).eval(), "ptuning_v2", num_virtual_tokens=len(ids), prompt_init_text=text
    )
    query = torch.tensor([[5, 6, 7]])
    expected = tiny_llama(seed=0).eval()(torch.cat([torch.tensor([ids]), query], dim=1)).logits[:, len(ids) :]
    torch.testing.assert_close(prefix(query).logits, expected, atol=1e-4, rtol=0)


def test_method_for_disk_picks_exactly_one_method():
    assert method_for_disk({"peft_type": "LORA"}).name == "lora"
    assert method_for_disk({"peft_type": "LORA", "use_dora": True}).name == "dora"
    assert method_for_disk({"peft_type": "PREFIX_TUNING", "prefix_projection": True}).name == "prefix_tuning"
    assert method_for_disk({"peft_type": "PREFIX_TUNING"}).name == "ptuning_v2"
    assert method_for_disk({"deltatune_method": "graft"}).name == "graft"
    with pytest.raises(ValueError, match="unknown method 'zzz'; valid methods"):
        method_for_disk({"deltatune_method": "zzz"})
    with pytest.raises(ValueError, match="peft_type 'XLORA' is not supported"):
        method_for_disk({"peft_type": "XLORA"})


def test_unsupported_peft_options_are_refused_by_name(tmp_path):
    from deltatune.formats import FormatError

    model = attach("oft", target_modules=["q_proj"])
    save_delta(model, tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "coft": True}))
    with pytest.raises(FormatError, match=r"adapter_config.json: coft=True is not supported"):
        deltatune.load(tiny(), adapter=tmp_path / "a")
    config_file.write_text(json.dumps({**config, "peft_version": "0.17.0"}))
    with pytest.raises(FormatError, match="predates peft 0.18.0"):
        deltatune.load(tiny(), adapter=tmp_path / "a")
    prefix = attach("ptuning_v2")
    save_delta(prefix, tmp_path / "p")
    config_file = tmp_path / "p" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "num_layers": 5, "token_dim": 32, "num_attention_heads": 2}))
    with pytest.raises(FormatError, match="prompt_embeddings has width 128, the config says 2·5·32"):
        deltatune.load(tiny(), adapter=tmp_path / "p")
