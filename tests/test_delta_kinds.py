"""Every delta deltatune writes loads everywhere: PEFT adapters, dense deltas, compressed containers.

The lifecycle a user runs: train a LoRA -> `compress` -> `decompress` -> `eval --adapter`, or
`eval --adapter` straight on the compressed directory. Oracles: the decoded ΔW added to the base
weights by hand (fp32), the SVD error formula, and transformers reading the exported directory.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import deltatune
from deltatune.cli import app
from deltatune.compress import compress, decompress
from deltatune.formats import FormatError
from deltatune.formats.dense import read_dense_delta
from deltatune.formats.peft import read_lora, save_delta
from deltatune.models import load_tokenizer, tiny_llama
from deltatune.serve import Engine, SamplingParams
from deltatune.train.evaluate import generate

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.tensor([[1, 17, 256, 4000, 9, 31, 77, 5]])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny base model dir (with the default tokenizer), a LoRA on it, and its compressed forms."""
    root = tmp_path_factory.mktemp("kinds")
    tiny_llama(seed=0, initializer_range=0.2).save_pretrained(root / "base")
    load_tokenizer().save_pretrained(root / "base")
    model = deltatune.add_delta(tiny_llama(seed=0), "lora", lora_r=4, lora_alpha=8, target_modules=TARGETS)
    torch.manual_seed(3)
    for name, p in deltatune.deltas.named_delta_parameters(model).items():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # a LoRA that changes the output
    save_delta(model, root / "lora")
    compress(root / "lora", root / "cmp", "raw")  # dense layout, exact
    compress(root / "lora", root / "cmp_q", "compeft", density=0.5)  # dense layout, lossy
    compress(root / "lora", root / "cmp_f", "compeft", lora_mode="factors", density=0.5)
    decompress(root / "cmp_q", root / "dec_q")  # a dense delta directory
    return root


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def by_hand(base_dir, dense_dir) -> torch.Tensor:
    """Base weights + ΔW (read from the dense delta file), in fp32, without deltatune's loader."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    deltas = load_file(dense_dir / "delta_model.safetensors")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, delta in deltas.items():
            params[name] += delta.float()
    return logits(model.eval())


def test_compressed_then_decompressed_lora_evaluates(dirs):
    runner = CliRunner()
    data = dirs / "eval.jsonl"
    data.write_text(
        "\n".join(json.dumps({"prompt": f"say {k}", "completion": str(k)}) for k in range(3)) + "\n"
    )
    for adapter in ("dec_q", "cmp_q", "cmp_f", "lora"):
        res = runner.invoke(
            app,
            ["eval", "--model", str(dirs / "base"), "--adapter", str(dirs / adapter), "--data", str(data)],
        )
        assert res.exit_code == 0, (adapter, res.output)
        assert "exact match:" in res.output
    res = runner.invoke(
        app, ["generate", "hi", "--model", str(dirs / "base"), "--adapter", str(dirs / "cmp_q")]
    )
    assert res.exit_code == 0, res.output


def test_compressed_dir_loads_without_decompressing(dirs):
    base = logits(deltatune.load(str(dirs / "base")))
    expected = by_hand(dirs / "base", dirs / "dec_q")
    from_compressed = logits(deltatune.load(str(dirs / "base"), adapter=dirs / "cmp_q"))
    from_dense = logits(deltatune.load(str(dirs / "base"), adapter=dirs / "dec_q"))
    torch.testing.assert_close(from_compressed, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_dense, expected, atol=1e-5, rtol=0)
    assert (from_compressed - base).abs().max() > 1e-2  # the delta is not a no-op
    # lossless compression of the same LoRA equals the LoRA attached as a delta
    attached = logits(deltatune.load(str(dirs / "base"), adapter=dirs / "lora"))
    torch.testing.assert_close(
        logits(deltatune.load(str(dirs / "base"), adapter=dirs / "cmp")), attached, atol=1e-5, rtol=0
    )


def test_decompress_to_peft_lora_by_svd(dirs, tmp_path):
    _, dense = read_dense_delta(dirs / "dec_q")
    for rank in (4, 2):
        out = decompress(dirs / "cmp_q", tmp_path / f"r{rank}", rank=rank)
        adapter = read_lora(out)
        report = json.loads((out / "adapter_config.json").read_text())["deltatune_report"]
        for module, factors in adapter.modules.items():
            delta = dense[f"{module}.weight"].double()
            s = torch.linalg.svdvals(delta)
            want = float((s[rank:].square().sum() / s.square().sum()).sqrt())
            got = float((factors.dense().double() - delta).norm() / delta.norm())
            assert report["svd_relative_errors"][f"{module}.weight"] == pytest.approx(want, abs=1e-6)
            assert got == pytest.approx(want, abs=1e-5)
            assert factors.a.shape[0] == rank
    # a lossless container of a rank-4 LoRA comes back exactly at rank 4: the LoRA's own logits
    exact = logits(
        deltatune.load(str(dirs / "base"), adapter=decompress(dirs / "cmp", tmp_path / "x4", rank=4))
    )
    attached = logits(deltatune.load(str(dirs / "base"), adapter=dirs / "lora"))
    torch.testing.assert_close(exact, attached, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="rank 2 applies to LoRA deltas in the dense layout"):
        decompress(dirs / "cmp_f", tmp_path / "bad", rank=2)
    res = CliRunner().invoke(app, ["decompress", str(dirs / "cmp_q"), str(tmp_path / "cli"), "--rank", "3"])
    assert res.exit_code == 0, res.output
    assert "rank 3" in res.output and read_lora(tmp_path / "cli").modules


def test_export_merge_accepts_every_kind(dirs, tmp_path):
    expected = by_hand(dirs / "base", dirs / "dec_q")
    for kind in ("dec_q", "cmp_q"):
        res = CliRunner().invoke(
            app,
            [
                "export",
                str(tmp_path / kind),
                "--model",
                str(dirs / "base"),
                "--adapter",
                str(dirs / kind),
                "--merge",
            ],
        )
        assert res.exit_code == 0, res.output
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / kind, dtype=torch.float32).eval()
        torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)


def test_serve_batches_compressed_factors_and_refuses_dense(dirs):
    tok = load_tokenizer(str(dirs / "base"))
    prompts = [[{"role": "user", "content": "Tell me about the number 7."}]]
    engine = Engine(deltatune.load(str(dirs / "base")), tok, "base", {"cf": dirs / "cmp_f"}, autostart=False)
    try:
        done = engine.generate([engine.chat_prompt(prompts[0])], ["cf"], SamplingParams(max_tokens=8))
        with pytest.raises(FormatError, match="delta_config.json: a dense delta cannot be batched"):
            engine.load_adapter("dense", dirs / "dec_q")
        with pytest.raises(
            FormatError, match="compression_config.json: layout 'lora_dense' holds no LoRA factors"
        ):
            engine.load_adapter("cq", dirs / "cmp_q")
    finally:
        engine.shutdown()
    reference = generate(deltatune.load(str(dirs / "base"), adapter=dirs / "cmp_f"), tok, prompts, 8)
    assert done[0].error is None
    assert done[0].text == reference[0]


def test_a_dir_merge_accepts_is_one_compress_accepts(tmp_path):
    """Single file, sharded with an index, and shards without an index: merge and compress agree."""
    base, tuned = tiny_llama(seed=0), tiny_llama(seed=0)
    with torch.no_grad():
        tuned.model.layers[0].mlp.up_proj.weight.add_(0.01)
    layouts = {"single": {}, "sharded": {"max_shard_size": "200KB"}}
    runner = CliRunner()
    for name, kw in layouts.items():
        base.save_pretrained(tmp_path / f"{name}-base", **kw)
        tuned.save_pretrained(tmp_path / f"{name}-tuned", **kw)
    assert (tmp_path / "sharded-tuned" / "model.safetensors.index.json").is_file()
    for d in ("base", "tuned"):  # shards without an index: any *.safetensors
        src = tmp_path / f"sharded-{d}"
        dst = tmp_path / f"noindex-{d}"
        dst.mkdir()
        for f in src.iterdir():
            if f.name != "model.safetensors.index.json":
                (dst / f.name).write_bytes(f.read_bytes())
    for name in ("single", "sharded", "noindex"):
        config = tmp_path / f"{name}.yaml"
        config.write_text(
            f"merge_method: task_arithmetic\nbase_model: {tmp_path / f'{name}-base'}\n"
            f"models:\n  - model: {tmp_path / f'{name}-tuned'}\n    parameters: {{weight: 1.0}}\ndtype: float32\n"
        )
        res = runner.invoke(app, ["merge", str(config), str(tmp_path / f"{name}-merged")])
        assert res.exit_code == 0, (name, res.output)
        res = runner.invoke(
            app,
            [
                "compress",
                str(tmp_path / f"{name}-tuned"),
                str(tmp_path / f"{name}-cmp"),
                "--base",
                str(tmp_path / f"{name}-base"),
            ],
        )
        assert res.exit_code == 0, (name, res.output)
        stored = json.loads((tmp_path / f"{name}-cmp" / "compression_config.json").read_text())["tensors"]
        assert list(stored) == ["model.layers.0.mlp.up_proj.weight"]
