"""LoRA adapter merges: exact by stacking ranks, or SVD-truncated with the true error reported; peft as oracle."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from deltatune.formats import FormatError
from deltatune.formats.peft import read_lora
from deltatune.merge.executor import run_merge
from deltatune.merge.registry import METHODS
from deltatune.models import tiny_llama

VOCAB = 256
ADAPTERS = {  # different ranks, alphas, rsLoRA and target modules, so stacking and padding are exercised
    "a1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "a2": dict(r=6, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "up_proj"]),
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adapters")
    paths = {}
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed + 10)
        model = get_peft_model(
            tiny_llama(seed=0, vocab_size=VOCAB), LoraConfig(init_lora_weights=False, **kwargs)
        )
        paths[name] = root / name
        model.save_pretrained(paths[name])
    return paths


def dense_deltas(path: Path) -> dict[str, torch.Tensor]:
    return {m: f.dense() for m, f in read_lora(path).modules.items()}


def write_config(
    tmp_path: Path, adapters: dict[str, Path], method: str, extra: str = "", density: bool = False
) -> Path:
    more = ", density: 0.5" if density else ""
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"merge_method: {method}\nmodels:\n"
        f"  - model: {adapters['a1']}\n    parameters: {{weight: 0.7{more}}}\n"
        f"  - model: {adapters['a2']}\n    parameters: {{weight: 0.3{more}}}\n" + extra
    )
    return config


def expected_linear(adapters: dict[str, Path], c1: float, c2: float) -> dict[str, torch.Tensor]:
    d1, d2 = dense_deltas(adapters["a1"]), dense_deltas(adapters["a2"])
    zero = torch.zeros_like(next(iter(d1.values())))
    return {
        m: c1 * d1.get(m, torch.zeros_like(d2.get(m, zero))) + c2 * d2.get(m, 0)
        for m in sorted(d1.keys() | d2.keys())
    }


def test_factors_read_back_match_peft_delta_weight(adapters):
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(seed=0, vocab_size=VOCAB), adapters["a2"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    ours = read_lora(adapters["a2"]).modules["model.layers.0.self_attn.q_proj"].dense()
    torch.testing.assert_close(ours, layer.get_delta_weight("default"), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("method", "c1", "c2"), [("linear", 0.7, 0.3), ("task_arithmetic", 0.7 * 0.5, 0.3 * 0.5)]
)
def test_exact_merge_equals_weighted_sum_of_deltas_and_loads_in_peft(adapters, tmp_path, method, c1, c2):
    from peft import PeftModel

    extra = "parameters: {lambda: 0.5}\n" if method == "task_arithmetic" else ""
    config = write_config(tmp_path, adapters, method, extra)
    report = run_merge(config, tmp_path / "merged")
    assert report.kind == "adapter" and report.rank == 10 and report.svd_errors == {}  # 4 + 6 stacked, exact
    expected = expected_linear(adapters, c1, c2)
    merged = dense_deltas(tmp_path / "merged")
    assert merged.keys() == expected.keys()
    for module, delta in expected.items():
        torch.testing.assert_close(merged[module], delta, atol=1e-5, rtol=1e-5, msg=module)

    # peft loads it, and its logits are those of the base with the weighted deltas folded in
    base = tiny_llama(seed=0, vocab_size=VOCAB)
    folded = copy.deepcopy(base)
    with torch.no_grad():
        for module, delta in expected.items():
            folded.get_submodule(module).weight += delta
    tokens = torch.tensor([[3, 14, 15, 92, 65]])
    logits = PeftModel.from_pretrained(base, tmp_path / "merged").eval()(tokens).logits
    torch.testing.assert_close(logits, folded.eval()(tokens).logits, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(logits, tiny_llama(seed=0, vocab_size=VOCAB).eval()(tokens).logits, atol=1e-3)
    config_out = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert config_out["r"] == config_out["lora_alpha"] == 10 and not config_out["use_rslora"]


def test_merged_adapter_loads_with_deltatune(adapters, tmp_path):
    import deltatune

    config = write_config(tmp_path, adapters, "linear")
    run_merge(config, tmp_path / "merged")
    expected = expected_linear(adapters, 0.7, 0.3)
    folded = tiny_llama(seed=0, vocab_size=VOCAB)
    with torch.no_grad():
        for module, delta in expected.items():
            folded.get_submodule(module).weight += delta
    tokens = torch.tensor([[3, 14, 15, 92, 65]])
    model = deltatune.load(tiny_llama(seed=0, vocab_size=VOCAB), adapter=tmp_path / "merged")
    torch.testing.assert_close(model(tokens).logits, folded.eval()(tokens).logits, atol=1e-5, rtol=1e-4)


def true_relative_error(got: dict[str, torch.Tensor], target: dict[str, torch.Tensor], module: str) -> float:
    return float((got[module].double() - target[module].double()).norm() / target[module].double().norm())


def test_svd_truncation_reports_the_true_error(adapters, tmp_path):
    config = write_config(tmp_path, adapters, "linear", "rank: 3\n")
    report = run_merge(config, tmp_path / "merged")
    expected, merged = expected_linear(adapters, 0.7, 0.3), dense_deltas(tmp_path / "merged")
    assert report.rank == 3 and report.svd_errors.keys() == expected.keys()
    for module, error in report.svd_errors.items():
        assert 0 < error < 1
        assert error == pytest.approx(true_relative_error(merged, expected, module), rel=1e-4, abs=1e-6)
    # a rank that holds everything is exact: error 0
    q_proj = "model.layers.0.self_attn.q_proj"
    config.write_text(config.read_text().replace("rank: 3", "rank: 10"))
    report = run_merge(config, tmp_path / "full")
    assert report.svd_errors[q_proj] == pytest.approx(0, abs=1e-6)


def test_ties_on_adapters_merges_dense_deltas_then_factors_them(adapters, tmp_path):
    report = run_merge(
        write_config(tmp_path, adapters, "ties", "rank: 8\n", density=True), tmp_path / "merged"
    )
    d1, d2 = dense_deltas(adapters["a1"]), dense_deltas(adapters["a2"])
    merged = dense_deltas(tmp_path / "merged")
    module = "model.layers.1.self_attn.q_proj"  # present in both adapters
    zero = torch.zeros_like(d1[module])
    target = {
        module: METHODS["ties"].fn(zero, [d1[module], d2[module]], weight=[0.7, 0.3], density=[0.5, 0.5])
    }
    assert report.svd_errors[module] == pytest.approx(true_relative_error(merged, target, module), rel=1e-4)
    assert report.svd_errors[module] > 0.01  # a trimmed delta is not low rank any more


def test_adapter_merges_refuse_what_they_cannot_do(adapters, tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: slerp\nbase_model: {adapters['a1']}\nmodels:\n  - model: {adapters['a2']}\n"
                      "parameters: {t: 0.5}\n")  # fmt: skip
    with pytest.raises(ValueError, match="slerp interpolates weights, not deltas"):
        run_merge(config, tmp_path / "out")
    dora = tmp_path / "dora"
    dora.mkdir()
    for file in adapters["a1"].iterdir():
        (dora / file.name).write_bytes(file.read_bytes())
    settings = json.loads((dora / "adapter_config.json").read_text()) | {"use_dora": True}
    (dora / "adapter_config.json").write_text(json.dumps(settings))
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {dora}\n    parameters: {{weight: 1}}\n")
    with pytest.raises(FormatError, match=rf"adapter {dora}: use_dora=True is not supported"):
        run_merge(config, tmp_path / "out")
