"""The method zoo against peft 0.21: adapters cross in both directions with equal logits (fp32).

For each method peft implements, our saved adapter loads in peft and peft's loads here, with random
(non-zero) weights so the adapter is not a no-op. PiSSA/OLoRA are checked against peft's own
conversion to a plain LoRA (`path_initial_model_for_weight_conversion`).
"""

import peft
import pytest
import torch
from peft.tuners.boft import layer as peft_boft

import deltatune
from deltatune.deltas import METHODS, named_delta_parameters
from deltatune.deltas.boft import butterfly_permutation
from deltatune.formats.peft import save_delta
from deltatune.models import tiny_llama

VOCAB = 1024
TARGETS = ["q_proj", "v_proj", "down_proj"]
OURS = {  # method -> small-model config
    "vera": dict(vera_r=8, target_modules=TARGETS),
    "loha": dict(loha_r=4, loha_alpha=8, target_modules=TARGETS),
    "lokr": dict(lokr_r=2, lokr_alpha=4, target_modules=TARGETS),
    "oft": dict(oft_block_size=8, target_modules=TARGETS),
    "boft": dict(boft_block_size=4, target_modules=TARGETS),
    "ia3": dict(),
    "prompt_tuning": dict(num_virtual_tokens=5, prompt_init="random"),
    "prefix_tuning": dict(num_virtual_tokens=5, prompt_init_text=None, prefix_projection_hidden=16),
    "ptuning_v2": dict(num_virtual_tokens=5, prompt_init_text=None),
}
THEIRS = {  # case -> (peft config, the method it loads as)
    "vera": (lambda: peft.VeraConfig(r=8, target_modules=TARGETS, init_weights=False), "vera"),
    "loha": (lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False), "loha"),
    "lokr": (
        lambda: peft.LoKrConfig(
            r=2,
            alpha=4,
            target_modules=TARGETS,
            init_weights=False,
            decompose_both=True,
            rank_pattern={"down_proj": 16},
        ),
        "lokr",
    ),
    "oft": (lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=TARGETS, init_weights=False), "oft"),
    "oft_exact": (
        lambda: peft.OFTConfig(
            r=0, oft_block_size=8, target_modules=TARGETS, init_weights=False, use_cayley_neumann=False
        ),
        "oft",
    ),
    "boft": (lambda: peft.BOFTConfig(boft_block_size=4, target_modules=TARGETS, init_weights=False), "boft"),
    "ia3": (lambda: peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False), "ia3"),
    "prompt_tuning": (
        lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        "prompt_tuning",
    ),
    "prefix": (lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5), "ptuning_v2"),
    "prefix_projection": (
        lambda: peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=16
        ),
        "prefix_tuning",
    ),
}
PROMPT_LIKE = {"prompt_tuning"}  # peft returns logits for the virtual tokens too


def tiny():
    return tiny_llama(seed=0, vocab_size=VOCAB).eval()


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def randomize(model, seed=3, std=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in named_delta_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=gen) * std)


def peft_logits(model, ids, n_virtual=0, **kw):
    return model(input_ids=ids, **kw).logits[:, n_virtual:]


@pytest.mark.parametrize("method", OURS)
def test_our_adapter_loads_in_peft(method, tmp_path, ids):
    model = deltatune.add_delta(tiny(), method, **OURS[method])
    randomize(model)
    ours = model(ids).logits
    assert (ours - tiny()(ids).logits).abs().max() > 1e-2
    save_delta(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(tiny(), tmp_path / "a").eval()
    n_virtual = model.prompt_encoder.num_virtual_tokens if method in PROMPT_LIKE else 0
    torch.testing.assert_close(peft_logits(theirs, ids, n_virtual), ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", THEIRS)
def test_peft_adapter_loads_here(case, tmp_path, ids):
    make_config, method = THEIRS[case]
    torch.manual_seed(5)
    theirs = peft.get_peft_model(tiny(), make_config()).eval()  # random weights: init_weights=False
    n_virtual = 5 if method in PROMPT_LIKE else 0
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one row
    expected = peft_logits(theirs, ids, n_virtual, attention_mask=mask)
    theirs.save_pretrained(tmp_path / "p")
    ours = deltatune.load(tiny(), adapter=tmp_path / "p")
    assert ours.delta_method == method
    got = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[1], expected[1], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[0, 3:], expected[0, 3:], atol=1e-4, rtol=0)
    assert (got - tiny()(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_pissa_olora_match_peft_init_and_conversion(method, tmp_path, ids):
    r, alpha = 4, 8
    ours = deltatune.add_delta(tiny(), method, lora_r=r, lora_alpha=alpha, target_modules=TARGETS)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=method)
    theirs = peft.get_peft_model(tiny(), cfg).eval()
    theirs.save_pretrained(tmp_path / "init")  # the initial adapter peft's conversion needs
    # the same initial factors, and both start as the base model
    for path, layer in deltatune.deltas.delta_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(path)
        torch.testing.assert_close(layer.lora_A0, peft_layer.lora_A["default"].weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.lora_B0, peft_layer.lora_B["default"].weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours(ids).logits, tiny()(ids).logits, atol=1e-4, rtol=0)
    # "train" both the same way
    steps = {}
    for name, p in named_delta_parameters(ours).items():
        steps[name] = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(steps))) * 0.1
    with torch.no_grad():
        for name, p in named_delta_parameters(ours).items():
            p.add_(steps[name])
            path, _, leaf = name.rpartition(".lora_")
            peft_param = theirs.base_model.model.get_submodule(path).get_submodule(
                f"lora_{leaf.split('.')[0]}"
            )
            peft_param["default"].weight.add_(steps[name])
    expected = theirs(ids).logits
    torch.testing.assert_close(ours(ids).logits, expected, atol=1e-4, rtol=0)
    # peft's conversion to a plain LoRA on the original base, loaded here
    theirs.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    converted = deltatune.load(tiny(), adapter=tmp_path / "peft")
    assert converted.delta_method == "lora"
    torch.testing.assert_close(converted(ids).logits, expected, atol=1e-4, rtol=0)
    # ours saved, loaded in peft on the original base
    save_delta(ours, tmp_path / "ours")
    in_peft = peft.PeftModel.from_pretrained(tiny(), tmp_path / "ours").eval()
    torch.testing.assert_close(in_peft(ids).logits, expected, atol=1e-4, rtol=0)


def test_boft_butterfly_matches_peft(ids, tmp_path, monkeypatch):
    """peft runs butterfly factors > 1 only with its CUDA block-diagonal kernel; stand in a plain
    torch.block_diag for that kernel so peft's own permutation and product logic is the oracle."""
    layer = peft_boft.BOFTLayer.__new__(peft_boft.BOFTLayer)
    for n, blocks, half, levels in [(64, 8, 2, 1), (64, 4, 4, 1), (128, 16, 2, 2), (64, 16, 1, 2)]:
        assert (
            butterfly_permutation(n, blocks, half, levels).tolist()
            == layer.block_butterfly_perm(n, blocks, half, levels).tolist()
        )

    class BlockDiag:
        @staticmethod
        def forward(x):
            return [torch.stack([torch.block_diag(*b) for b in x])]

    monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: BlockDiag)
    cfg = peft.BOFTConfig(
        boft_block_size=4, boft_n_butterfly_factor=2, target_modules=TARGETS, init_weights=False
    )
    torch.manual_seed(7)
    theirs = peft.get_peft_model(tiny(), cfg).eval()
    assert theirs.base_model.model.model.layers[0].self_attn.q_proj.boft_R["default"].shape[0] == 2
    theirs.save_pretrained(tmp_path / "p")
    ours = deltatune.load(tiny(), adapter=tmp_path / "p")
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=0)


def test_every_peft_type_we_write_is_one_peft_reads():
    written = {m.peft_type for m in METHODS.values() if m.peft_type}
    assert written <= {t.value for t in peft.PeftType}
