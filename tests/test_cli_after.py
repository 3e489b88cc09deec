"""The after-training CLI verbs end to end on tiny models: extract -> compress -> decompress."""

import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import deltatune
from deltatune.cli import app
from deltatune.models import tiny_llama


def test_extract_compress_decompress_via_cli(tmp_path):
    base = tiny_llama(seed=0)
    base.save_pretrained(tmp_path / "base")
    tuned = tiny_llama(seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a rank-2 fine-tune of one projection
        w = tuned.model.layers[0].self_attn.q_proj.weight
        w += 0.1 * torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(2, w.shape[1], generator=gen)
    tuned.save_pretrained(tmp_path / "tuned")
    runner = CliRunner()

    res = runner.invoke(
        app,
        ["extract", str(tmp_path / "base"), str(tmp_path / "tuned"), str(tmp_path / "lora"), "--rank", "2"],
    )
    assert res.exit_code == 0, res.output
    ids = torch.randint(0, 49152, (1, 8))
    extracted = deltatune.load(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), adapter=tmp_path / "lora"
    )
    torch.testing.assert_close(extracted(ids).logits, tuned.eval()(ids).logits, atol=1e-4, rtol=0)

    res = runner.invoke(
        app,
        [
            "compress",
            str(tmp_path / "lora"),
            str(tmp_path / "small"),
            "--method",
            "compeft",
            "--param",
            "density=0.5",
        ],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["decompress", str(tmp_path / "small"), str(tmp_path / "back")])
    assert res.exit_code == 0 and (tmp_path / "back").is_dir(), res.output

    res = runner.invoke(app, ["compress", str(tmp_path / "lora"), str(tmp_path / "x"), "--method", "zip"])
    assert res.exit_code == 2 and "zip" in res.output
    res = runner.invoke(app, ["compress", str(tmp_path / "lora"), str(tmp_path / "y"), "--param", "density"])
    assert res.exit_code == 2 and "key=value" in res.output


def test_merge_cli_linear_and_bad_config(tmp_path):
    for seed in (0, 1):
        tiny_llama(seed=seed).save_pretrained(tmp_path / f"m{seed}")
    (tmp_path / "merge.yaml").write_text(
        f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'm0'}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {tmp_path / 'm1'}\n    parameters: {{weight: 0.5}}\ndtype: float32\n"
    )
    res = CliRunner().invoke(app, ["merge", str(tmp_path / "merge.yaml"), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    name = "model.layers.1.mlp.down_proj.weight"
    expected = 0.5 * a.state_dict()[name] + 0.5 * b.state_dict()[name]
    torch.testing.assert_close(merged.state_dict()[name], expected)
    (tmp_path / "bad.yaml").write_text("merge_method: lineer\nmodels: []\n")
    res = CliRunner().invoke(app, ["merge", str(tmp_path / "bad.yaml"), str(tmp_path / "out2")])
    assert res.exit_code == 2 and "merge_method" in res.output
