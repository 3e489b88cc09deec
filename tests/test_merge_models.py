"""Full-model merges from mergekit YAML, with mergekit itself as the oracle (tiny random Llamas on disk)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from deltatune.formats import FormatError
from deltatune.merge.executor import run_merge
from deltatune.models import load_tokenizer, tiny_llama

VOCAB = 2048  # the embedding (131k entries) takes the sampled-threshold path of kth_smallest


def perturbed(base: torch.nn.Module, seed: int, common: dict[str, torch.Tensor]) -> torch.nn.Module:
    """base + a shared direction + model-specific noise: fine-tunes that partly agree, like real ones."""
    model = tiny_llama(seed=0, vocab_size=VOCAB)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(common[name] + 0.02 * torch.randn(param.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    base = tiny_llama(seed=0, vocab_size=VOCAB)
    gen = torch.Generator().manual_seed(99)
    common = {n: 0.02 * torch.randn(p.shape, generator=gen) for n, p in base.named_parameters()}
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    load_tokenizer().save_pretrained(paths["base"])
    for i in (1, 2, 3):
        paths[f"ft{i}"] = root / f"ft{i}"
        perturbed(base, i, common).save_pretrained(
            paths[f"ft{i}"], max_shard_size="200KB" if i == 3 else "5GB"
        )
    return paths


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def mergekit_merge(text: str, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mergekit_run

    options = MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False, random_seed=0)
    mergekit_run(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out), options)


def both(zoo: dict[str, Path], tmp_path: Path, template: str, **kwargs):
    text = template.format(**{k: str(v) for k, v in zoo.items()})
    config = tmp_path / "merge.yaml"
    config.write_text(text)
    mergekit_merge(text, tmp_path / "mergekit")
    report = run_merge(config, tmp_path / "ours", **kwargs)
    return read_all(tmp_path / "mergekit"), read_all(tmp_path / "ours"), report


# Configs as a mergekit user writes them (the base listed among the models, int8_mask, gradients...).
MERGEKIT_EXAMPLES = {
    "linear": """
models:
  - model: {ft1}
    parameters:
      weight: 1.0
  - model: {ft2}
    parameters:
      weight: 0.5
  - model: {ft3}
    parameters:
      weight: 0.3
merge_method: linear
dtype: float32
""",
    "task_arithmetic": """
base_model: {base}
models:
  - model: {ft1}
    parameters:
      weight: [0.2, 0.9]
  - model: {ft2}
    parameters:
      weight: 0.4
merge_method: task_arithmetic
parameters:
  lambda: 0.8
dtype: float32
""",
    "ties": """
models:
  - model: {base}
    # no parameters necessary for base model
  - model: {ft1}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {ft2}
    parameters:
      density: 0.5
      weight: 0.3
  - model: {ft3}
    parameters:
      density: [0.7, 0.3]
      weight: 0.2
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: float32
""",
    "breadcrumbs": """
models:
  - model: {ft1}
    parameters: {{weight: 0.6, density: 0.8, gamma: 0.05}}
  - model: {ft2}
    parameters: {{weight: 0.4, density: 0.7, gamma: 0.02}}
merge_method: breadcrumbs
base_model: {base}
dtype: float32
""",
    "breadcrumbs_ties": """
models:
  - model: {ft1}
    parameters: {{weight: 0.6, density: 0.8, gamma: 0.05}}
  - model: {ft2}
    parameters: {{weight: 0.4, density: 0.7, gamma: 0.02}}
merge_method: breadcrumbs_ties
base_model: {base}
parameters:
  normalize: true
dtype: float32
""",
    "slerp": """
models:
  - model: {base}
  - model: {ft1}
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    "model_stock": """
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
merge_method: model_stock
base_model: {base}
dtype: float32
""",
    "model_stock_filter_wise": """
models:
  - model: {ft1}
  - model: {ft2}
merge_method: model_stock
base_model: {base}
parameters:
  filter_wise: true
dtype: float32
""",
    "dare_ties_without_drop": """
models:
  - model: {base}
  - model: {ft1}
    parameters: {{weight: 0.5, density: 1.0}}
  - model: {ft2}
    parameters: {{weight: 0.5, density: 1.0}}
merge_method: dare_ties
base_model: {base}
parameters:
  int8_mask: true
out_dtype: bfloat16
""",
}


@pytest.mark.parametrize("name", MERGEKIT_EXAMPLES)
def test_mergekit_yaml_runs_unchanged_and_matches_mergekit(zoo, tmp_path, name):
    theirs, ours, report = both(zoo, tmp_path, MERGEKIT_EXAMPLES[name])
    assert theirs.keys() == ours.keys() and report.tensors == len(ours) and report.method in name
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)
    base = read_all(zoo["base"])
    assert any(not torch.equal(ours[k], base[k]) for k in base)  # a merge, not a copy


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "breadcrumbs_ties"])
def test_chunked_streaming_matches_mergekit(zoo, tmp_path, name, monkeypatch):
    """Big tensors are merged chunk by chunk after whole-tensor statistics; force that path here."""
    from deltatune.merge import executor, methods

    monkeypatch.setattr(executor, "CHUNK_ELEMENTS", 5000)
    monkeypatch.setattr(methods, "CHUNK", 3000)
    theirs, ours, _ = both(zoo, tmp_path, MERGEKIT_EXAMPLES[name])
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


def test_darex_q_rescales_by_one_over_q(zoo, tmp_path):
    text = f"""merge_method: dare_linear
base_model: {zoo["base"]}
models:
  - model: {zoo["ft1"]}
    parameters: {{weight: 1.0, density: 0.3, q: 0.6}}
dare_rescale: darex_q
"""
    (tmp_path / "merge.yaml").write_text(text)
    run_merge(tmp_path / "merge.yaml", tmp_path / "out")
    base, ft1, out = read_all(zoo["base"]), read_all(zoo["ft1"]), read_all(tmp_path / "out")
    name = "model.embed_tokens.weight"
    kept = out[name] != base[name]
    assert abs(kept.float().mean().item() - 0.3) < 3 * (0.21 / kept.numel()) ** 0.5
    torch.testing.assert_close(
        out[name][kept] - base[name][kept], (ft1[name] - base[name])[kept] / 0.6, rtol=1e-4, atol=1e-6
    )


def test_dare_differs_from_mergekit_only_in_the_documented_rescale(zoo, tmp_path):
    """mergekit rescales kept entries to keep the L1 norm; the paper (and we) divide by the density."""
    template = """
models:
  - model: {ft1}
    parameters: {{weight: 1.0, density: 0.4}}
merge_method: dare_linear
base_model: {base}
dtype: float32
"""
    theirs, ours, _ = both(zoo, tmp_path, template)
    base, ft1 = read_all(zoo["base"]), read_all(zoo["ft1"])
    name = "model.layers.0.mlp.up_proj.weight"
    delta = ft1[name] - base[name]
    for merged, rule in ((theirs[name], "l1"), (ours[name], "paper")):
        kept = merged != base[name]
        assert (
            abs(kept.float().mean().item() - 0.4) < 3 * (0.24 / kept.numel()) ** 0.5
        )  # both drop with p = 0.6
        factor = 1 / 0.4 if rule == "paper" else float(delta.abs().sum() / delta[kept].abs().sum())
        torch.testing.assert_close(
            merged[kept] - base[name][kept], delta[kept] * factor, rtol=1e-4, atol=1e-6
        )


def test_merged_model_loads_with_transformers_and_keeps_base_files(zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    theirs, ours, _ = both(
        zoo, tmp_path, MERGEKIT_EXAMPLES["ties"].replace("dtype: float32", "out_dtype: bfloat16")
    )
    out = tmp_path / "ours"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (
        model.dtype == torch.bfloat16 and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    )
    assert (
        "lm_head.weight" not in ours
        and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    )
    torch.testing.assert_close(model.model.embed_tokens.weight, ours["model.embed_tokens.weight"])
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    assert (
        AutoTokenizer.from_pretrained(out).vocab_size == AutoTokenizer.from_pretrained(zoo["base"]).vocab_size
    )
    assert (out / "generation_config.json").is_file()


def test_sharded_output_and_threads_give_identical_tensors(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    text = MERGEKIT_EXAMPLES["ties"].format(**{k: str(v) for k, v in zoo.items()})
    text = text.replace("merge_method: ties", "merge_method: dare_ties") + "seed: 7\n"
    (tmp_path / "a.yaml").write_text(text)
    (tmp_path / "b.yaml").write_text(text + "shard_size: 300KB\n")
    one = run_merge(tmp_path / "a.yaml", tmp_path / "one", threads=1)
    run_merge(tmp_path / "b.yaml", tmp_path / "sharded", threads=2)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and index["metadata"]["total_size"] == one.bytes_written
    a, b = read_all(tmp_path / "one"), read_all(tmp_path / "sharded")
    assert a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) for k in a
    )  # DARE masks do not depend on threads
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    torch.testing.assert_close(model.model.norm.weight, b["model.norm.weight"])


def test_lines_scales_layers_linearly(zoo, tmp_path):
    text = MERGEKIT_EXAMPLES["task_arithmetic"].format(**{k: str(v) for k, v in zoo.items()})
    text = text.replace("[0.2, 0.9]", "1.0").replace("0.4", "1.0").replace("lambda: 0.8", "lambda: 1.0")
    (tmp_path / "plain.yaml").write_text(text)
    (tmp_path / "lines.yaml").write_text(text + "lines: {alpha: 0.3, beta: 0.5}\n")
    run_merge(tmp_path / "plain.yaml", tmp_path / "plain")
    run_merge(tmp_path / "lines.yaml", tmp_path / "lines")
    base, plain, lines = read_all(zoo["base"]), read_all(tmp_path / "plain"), read_all(tmp_path / "lines")
    expected_scale = {"model.layers.0.mlp.up_proj.weight": 0.3, "model.layers.1.mlp.up_proj.weight": 0.8}
    expected_scale["model.embed_tokens.weight"] = 0.3  # outside the blocks: the first layer's scale
    for name, scale in expected_scale.items():
        torch.testing.assert_close(
            lines[name] - base[name], scale * (plain[name] - base[name]), rtol=1e-4, atol=1e-6
        )


def test_mismatched_or_missing_tensors_name_the_tensor_and_model(zoo, tmp_path):
    other = tmp_path / "wide"
    tiny_llama(seed=5, vocab_size=VOCAB, intermediate_size=96).save_pretrained(other)
    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {zoo['ft1']}\n    parameters: {{weight: 1}}\n"
                      f"  - model: {other}\n    parameters: {{weight: 1}}\n")  # fmt: skip
    with pytest.raises(
        FormatError, match=rf"tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape .* in {other}"
    ):
        run_merge(config, tmp_path / "out")
    gappy = tmp_path / "gappy"
    gappy.mkdir()
    tensors = read_all(zoo["ft2"])
    del tensors["model.layers.1.input_layernorm.weight"]
    save_file(tensors, gappy / "model.safetensors", metadata={"format": "pt"})
    (gappy / "config.json").write_text((zoo["ft2"] / "config.json").read_text())
    config.write_text(config.read_text().replace(str(other), str(gappy)))
    with pytest.raises(
        FormatError, match=rf"tensor model\.layers\.1\.input_layernorm\.weight is missing from {gappy}"
    ):
        run_merge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_models_of_different_depth_are_refused_in_either_order(zoo, tmp_path):
    deeper = tmp_path / "deeper"
    tiny_llama(seed=5, vocab_size=VOCAB, num_hidden_layers=3).save_pretrained(deeper)
    config = tmp_path / "merge.yaml"
    for first, second in ((zoo["ft1"], deeper), (deeper, zoo["ft1"])):
        config.write_text(f"merge_method: linear\nmodels:\n  - model: {first}\n    parameters: {{weight: 1}}\n"
                          f"  - model: {second}\n    parameters: {{weight: 1}}\n")  # fmt: skip
        with pytest.raises(FormatError, match=r"tensor model\.layers\.2\.\S+ (of|is missing from) "):
            run_merge(config, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_output_is_atomic(zoo, tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {zoo['ft1']}\n    parameters: {{weight: 1}}\n"
                      f"  - model: {zoo['ft2']}\n    parameters: {{weight: -1}}\n")  # fmt: skip
    with pytest.raises(ValueError, match="weights sum to zero"):  # fails inside the workers
        run_merge(config, tmp_path / "out", threads=2)
    assert list(tmp_path.iterdir()) == [config]  # no output, no temporary left behind
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        run_merge(config, tmp_path / "taken")
