"""AdaMerging: λ learned on unlabelled prompts, written as a task-arithmetic merge mergekit can rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from deltatune.formats.peft import read_lora
from deltatune.merge.adamerging import mean_entropy
from deltatune.merge.config import MergeConfigError, parse_config
from deltatune.merge.executor import run_merge
from deltatune.merge.inputs import layer_index
from deltatune.models import load_tokenizer, tiny_llama

OPTIONS = "adamerging: {prompts: ['task:addition', 'task:kv_lookup'], prompts_per_source: 4, batch_size: 8, steps: 6, lr: 0.05}\n"


def test_mean_entropy_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.5, 0.0 + 1e-30], [1.0, 1e-30, 1e-30]]))
    assert float(mean_entropy(logits)) == pytest.approx((2 * 0.5 * 0.6931471805599453 + 0.0) / 2, abs=1e-6)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adamerging")
    paths = {"base": root / "base"}
    tiny_llama(seed=0, initializer_range=0.3).save_pretrained(paths["base"])
    load_tokenizer().save_pretrained(paths["base"])
    for seed in (1, 2):
        lora_base = tiny_llama(seed=0, initializer_range=0.3)  # reseeds torch: seed the LoRA after it
        torch.manual_seed(seed)
        model = get_peft_model(lora_base, LoraConfig(r=4, init_lora_weights=False))
        model.peft_config["default"].base_model_name_or_path = str(paths["base"])
        paths[f"a{seed}"] = root / f"a{seed}"
        model.save_pretrained(paths[f"a{seed}"])
        full = tiny_llama(seed=0, initializer_range=0.3)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in full.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        paths[f"ft{seed}"] = root / f"ft{seed}"
        full.save_pretrained(paths[f"ft{seed}"])
    return paths


def test_adapters_learn_coefficients_that_lower_entropy_and_merge_exactly(setup, tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"merge_method: adamerging\nmodels:\n  - model: {setup['a1']}\n  - model: {setup['a2']}\n{OPTIONS}"
    )
    run_merge(config, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "adamerging.json").read_text())
    lam = torch.tensor(record["coefficients"])
    assert lam.shape == (2, 3) and bool(((lam >= 0) & (lam <= 1)).all())
    curve = record["entropy"]
    assert len(curve) == 6 and curve[-1] < curve[0]  # one batch, repeated: entropy goes down
    # the first entropy is the merged model at λ = init, computed here by adding 0.3 ΔW by hand
    import deltatune
    from deltatune.data.tokenize import left_pad, prompt_ids
    from deltatune.serve.router import example_prompts

    model = deltatune.load(setup["base"])
    deltas = [read_lora(setup[k]).modules for k in ("a1", "a2")]
    with torch.no_grad():
        for name, module in model.named_modules():
            if name in deltas[0]:
                module.weight += 0.3 * (deltas[0][name].dense() + deltas[1][name].dense())
    tok = load_tokenizer(setup["base"])
    rows = [prompt_ids(tok, p) for s in ("task:addition", "task:kv_lookup") for p in example_prompts(s, 4)]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    ids, mask = left_pad([rows[i] for i in order], tok.pad_token_id)
    with torch.no_grad():
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        ).logits
    assert float(mean_entropy(logits[:, -1])) == pytest.approx(curve[0], rel=1e-4)
    # the written adapter is Σ_i λ[i, layer] ΔW_i, exactly (stacked ranks)
    merged = read_lora(tmp_path / "out").modules
    for module, f in merged.items():
        layer = layer_index(module)
        expected = sum(lam[i, layer] * deltas[i][module].dense() for i in range(2))
        torch.testing.assert_close(f.dense(), expected, rtol=1e-4, atol=1e-6)


def test_full_models_merge_equals_mergekit_running_the_written_config(setup, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mergekit_run

    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: adamerging\nbase_model: {setup['base']}\nmodels:\n"
                      f"  - model: {setup['ft1']}\n  - model: {setup['ft2']}\n{OPTIONS.replace('steps: 6', 'steps: 2')}")  # fmt: skip
    run_merge(config, tmp_path / "out")
    written = yaml.safe_load((tmp_path / "out" / "adamerging.yaml").read_text())
    options = MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False)
    mergekit_run(
        MergeConfiguration.model_validate(written | {"dtype": "float32"}), str(tmp_path / "mk"), options
    )
    ours, theirs = (
        load_file(tmp_path / "out" / "model.safetensors"),
        load_file(tmp_path / "mk" / "model.safetensors"),
    )
    for name, t in theirs.items():
        torch.testing.assert_close(ours[name], t, rtol=1e-5, atol=1e-6, msg=name)
    lam = json.loads((tmp_path / "out" / "adamerging.json").read_text())["coefficients"]
    assert len({round(v, 6) for row in lam for v in row}) > 1  # per-layer values moved apart


def test_adamerging_config_errors():
    base = "models:\n  - model: a\n  - model: b\n"
    with pytest.raises(MergeConfigError, match="merge_method adamerging and the 'adamerging:' block"):
        parse_config("merge_method: adamerging\n" + base)
    with pytest.raises(MergeConfigError, match="merge_method adamerging and the 'adamerging:' block"):
        parse_config("merge_method: ties\n" + base + "adamerging: {prompts: [task:addition]}\n")
    with pytest.raises(MergeConfigError, match=r"adamerging\.stepz: unknown key 'stepz'"):
        parse_config(
            "merge_method: adamerging\n" + base + "adamerging: {prompts: [task:addition], stepz: 3}\n"
        )
