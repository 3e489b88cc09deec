"""Bad input gets one clear error naming the file, key or parameter at fault."""

import json

import peft
import pytest
import torch

from deltatune.compress import compress, decompress, extract_lora, load_delta_into
from deltatune.models import tiny_llama

VOCAB = 1000


def tiny(**kw):
    return tiny_llama(seed=0, vocab_size=VOCAB, **kw).eval()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("err") / "adapter"
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    peft.get_peft_model(tiny(), cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny().save_pretrained(root / "base")
    ft = tiny()
    with torch.no_grad():
        ft.model.layers[0].self_attn.q_proj.weight += 0.01
    ft.save_pretrained(root / "ft")
    return root


def corrupt(path):
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")


def test_missing_adapter_files_are_named(tmp_path, adapter):
    with pytest.raises(ValueError, match="nowhere"):
        compress(tmp_path / "nowhere", tmp_path / "out", "compeft")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="adapter_model.safetensors: missing"):
        compress(broken, tmp_path / "out", "compeft")


def test_corrupted_adapter_weights_are_named(tmp_path, adapter):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    corrupt(broken / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"broken/adapter_model\.safetensors: not a valid safetensors"):
        compress(broken, tmp_path / "out", "bitdelta")


def test_corrupted_model_weights_are_named(tmp_path, models):
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "config.json").write_text((models / "ft" / "config.json").read_text())
    corrupt(ft / "model.safetensors")
    with pytest.raises(ValueError, match=r"ft/model\.safetensors: not a valid safetensors"):
        compress((models / "base", ft), tmp_path / "out", "compeft")
    with pytest.raises(ValueError, match=r"ft/model\.safetensors"):
        extract_lora(models / "base", ft, tmp_path / "lora", rank=2)


def test_model_without_safetensors_is_named(tmp_path, models):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no model\.safetensors"):
        compress((models / "base", tmp_path / "empty"), tmp_path / "out", "compeft")


def test_unknown_method_and_bad_parameters(tmp_path, adapter):
    with pytest.raises(ValueError, match="unknown compression method 'gzip'; valid methods: compeft"):
        compress(adapter, tmp_path / "out", "gzip")
    with pytest.raises(ValueError, match="'delta_come'.*budget_bits"):
        compress(adapter, tmp_path / "out", "delta_come", budget_bits=-1)
    with pytest.raises(ValueError, match="lora_mode"):
        compress(adapter, tmp_path / "out", "compeft", lora_mode="sparse")
    with pytest.raises(ValueError, match="'compeft' takes no calibration data"):
        compress(adapter, tmp_path / "out", "compeft", calibration_data=torch.zeros(1, 4, dtype=torch.long))
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_full_model_dir_given_as_adapter(tmp_path, models):
    with pytest.raises(ValueError, match="full model: pass \\(base_dir, finetuned_dir\\)"):
        compress(models / "ft", tmp_path / "out", "compeft")


def test_corrupted_compressed_delta_is_named(tmp_path, adapter):
    compress(adapter, tmp_path / "c", "compeft")
    corrupt(tmp_path / "c" / "delta_compressed.safetensors")
    with pytest.raises(ValueError, match=r"c/delta_compressed\.safetensors: not a valid safetensors"):
        decompress(tmp_path / "c", tmp_path / "d")
    with pytest.raises(ValueError, match=r"delta_compressed\.safetensors"):
        load_delta_into(tiny(), tmp_path / "c")


def test_bad_compression_config_is_named(tmp_path, adapter):
    compress(adapter, tmp_path / "c", "compeft")
    config = json.loads((tmp_path / "c" / "compression_config.json").read_text())
    config["layout"] = "zip"
    (tmp_path / "c" / "compression_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"compression_config\.json: layout"):
        decompress(tmp_path / "c", tmp_path / "d")
    (tmp_path / "c" / "compression_config.json").unlink()
    with pytest.raises(ValueError, match=r"compression_config\.json: missing"):
        decompress(tmp_path / "c", tmp_path / "d")


def test_existing_output_is_not_overwritten_unless_asked(tmp_path, adapter):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="out already exists"):
        compress(adapter, tmp_path / "out", "compeft")
    assert (tmp_path / "out" / "keep.txt").is_file()
    compress(adapter, tmp_path / "out", "compeft", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert (tmp_path / "out" / "compression_config.json").is_file()


def test_delta_for_another_model_is_named(tmp_path, adapter):
    compress(adapter, tmp_path / "c", "bitdelta")
    with pytest.raises(ValueError, match="q_proj.weight' has shape"):
        load_delta_into(tiny(hidden_size=32, intermediate_size=64), tmp_path / "c")
