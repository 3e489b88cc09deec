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

    res = runner.invoke(app, ["extract", str(tmp_path / "base"), str(tmp_path / "tuned"), str(tmp_path / "lora"),
                              "--rank", "2"])
    assert res.exit_code == 0, res.output
    ids = torch.randint(0, 49152, (1, 8))
    extracted = deltatune.load(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), adapter=tmp_path / "lora")
    torch.testing.assert_close(extracted(ids).logits, tuned.eval()(ids).logits, atol=1e-4, rtol=0)

    res = runner.invoke(app, ["compress", str(tmp_path / "lora"), str(tmp_path / "small"), "--method", "compeft",
                              "--param", "density=0.5"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["decompress", str(tmp_path / "small"), str(tmp_path / "back")])
    assert res.exit_code == 0 and (tmp_path / "back").is_dir(), res.output

    res = runner.invoke(app, ["compress", str(tmp_path / "lora"), str(tmp_path / "x"), "--method", "zip"])
    assert res.exit_code == 2 and "zip" in res.output
    res = runner.invoke(app, ["compress", str(tmp_path / "lora"), str(tmp_path / "y"), "--param", "density"])
    assert res.exit_code == 2 and "key=value" in res.output
