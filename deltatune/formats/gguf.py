"""GGUF files for llama.cpp (and ollama, LM Studio, ...): a merged model written with the `gguf`
package's writer, tensor name map and quantizers, in llama.cpp's layout.

    write_gguf(model, tokenizer, "out.gguf", "q8_0")

What goes in, as llama.cpp's own convert_hf_to_gguf.py writes it for a Llama:
    metadata    architecture ("llama"), context length, widths, block count, heads, KV heads,
                RoPE base and dimension, RMSNorm epsilon, file type, quantization version
    tokenizer   byte-level BPE ("gpt2"): tokens as the tokenizer spells them, token types (special
                added tokens CONTROL, other added tokens USER_DEFINED, padding rows UNUSED), merges,
                bos/eos/unk/pad ids, add_bos, the chat template, and the pre-tokenizer name
    tensors     names from gguf's tensor map; Q and K projection rows permuted from HF's rotate-half
                order into the interleaved pairs llama.cpp's RoPE reads (`permute_qk`); a tied output
                head is not written (readers tie it back when `output.weight` is absent)

Tensor types per --gguf-type: 1-D tensors (norms) are always F32. f16 writes every matrix in F16;
q8_0 in Q8_0; q4_0 puts the block matrices in Q4_0 and keeps the token embedding (which is also the
output head when tied) in Q8_0, as the default model's own Q4_1 file does. A matrix whose rows are
not a whole number of 32-value blocks falls back to F16, as llama.cpp's converter does.

The pre-tokenizer name (`tokenizer.ggml.pre`) tells llama.cpp how to split text before BPE; it is
not in the tokenizer files. llama.cpp's converter recognises it by hashing the tokenizer's output on
a test text; we take it from the base model's own GGUF when it came from one (the default model's
is "smollm"), recognise plain GPT-2 byte-level splitting, and otherwise ask for it by name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deltatune.formats import FormatError, atomic_write

GGUF_TYPES = ("f16", "q8_0", "q4_0")
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM"}  # HF model_type -> the class we export


def _gguf():
    import gguf

    return gguf


def check_gguf_type(gguf_type: str) -> None:
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"--gguf-type: unknown type {gguf_type!r}; valid: {', '.join(GGUF_TYPES)}")


def check_architecture(model_type: str | None, where: str = "the model") -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())
        raise ValueError(
            f"GGUF export does not support {where}'s architecture {model_type!r}; supported: {supported}"
        )


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF Llama's Q/K rows (per head: the first halves of all rotary pairs, then the second halves)
    in llama.cpp's order (per head: pairs interleaved), as convert_hf_to_gguf.py's `permute`."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def read_tokenizer_pre(path: str | os.PathLike) -> str | None:
    """`tokenizer.ggml.pre` of an existing GGUF file, or None when it has none."""
    field = _gguf().GGUFReader(path).fields.get("tokenizer.ggml.pre")
    return None if field is None else str(field.contents())


def _tensor_types(gguf_type: str) -> tuple[Any, Any, Any]:
    """(matrix type, token-embedding type, file type) for a --gguf-type."""
    q, ft = _gguf().GGMLQuantizationType, _gguf().LlamaFileType
    return {
        "f16": (q.F16, q.F16, ft.MOSTLY_F16),
        "q8_0": (q.Q8_0, q.Q8_0, ft.MOSTLY_Q8_0),
        "q4_0": (q.Q4_0, q.Q8_0, ft.MOSTLY_Q4_0),
    }[gguf_type]


def _encode(array: np.ndarray, qtype: Any) -> tuple[np.ndarray, Any]:
    """The bytes (or f16/f32 array) to store for one tensor, and its GGML type."""
    gguf = _gguf()
    kinds = gguf.GGMLQuantizationType
    if array.ndim == 1 or qtype == kinds.F32:
        return array.astype(np.float32), kinds.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if qtype == kinds.F16 or array.shape[-1] % block:
        return array.astype(np.float16), kinds.F16
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"GGUF export supports default RoPE only; this model has rope_type {rope_type!r}")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("the model config has no rope_theta")
    return float(theta)


def _add_metadata(writer: Any, config: Any, file_type: Any, name: str) -> None:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(_gguf().GGML_QUANT_VERSION)


def detect_pre(tokenizer: Any) -> str | None:
    """llama.cpp's pre-tokenizer name for splitting we can recognise from tokenizer.json alone."""
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # GPT-2's own split regex inside ByteLevel
    return None


def tokenizer_fields(tokenizer: Any, vocab_size: int, pre: str | None = None) -> dict[str, Any]:
    """The tokenizer as llama.cpp's 'gpt2' vocabulary: tokens, types, merges, pre-tokenizer name."""
    token_type = _gguf().TokenType
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model, decoder = backend.get("model") or {}, (backend.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise ValueError(
            "GGUF export supports byte-level BPE tokenizers (llama.cpp's 'gpt2' vocabulary); "
            f"this tokenizer is {model.get('type')!r} with decoder {decoder!r}"
        )
    pre = pre or detect_pre(tokenizer)
    if pre is None:
        raise ValueError(
            "the tokenizer's pre-tokenizer is not one deltatune recognises; pass tokenizer_pre= "
            "(llama.cpp's name for it, e.g. 'llama-bpe', 'qwen2', 'smollm')"
        )
    n = len(tokenizer)
    if n > vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens but the model's vocabulary only {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    types = [
        (token_type.CONTROL if added[i].special else token_type.USER_DEFINED)
        if i in added
        else token_type.NORMAL
        for i in range(n)
    ]
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]  # embedding rows past the tokenizer
    types += [token_type.UNUSED] * (vocab_size - n)
    ids = {kind: getattr(tokenizer, f"{kind}_token_id", None) for kind in ("bos", "eos", "unk", "pad")}
    return {
        "pre": pre,
        "tokens": tokens,
        "types": types,
        "merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
        "ids": {k: v for k, v in ids.items() if v is not None},
        "add_bos": bool(getattr(tokenizer, "add_bos_token", False)),
        "add_eos": bool(getattr(tokenizer, "add_eos_token", False)),
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }


def _add_tokenizer(writer: Any, fields: dict[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    for kind, token_id in fields["ids"].items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(fields["add_bos"])
    writer.add_add_eos_token(fields["add_eos"])
    writer.add_add_space_prefix(False)
    if fields["chat_template"] is not None:
        writer.add_chat_template(fields["chat_template"])


def _tensors(model: nn.Module, gguf_type: str) -> list[tuple[str, np.ndarray, Any]]:
    """(GGUF name, data, GGML type) for every tensor, in state-dict order."""
    gguf = _gguf()
    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    matrix_type, embed_type, _ = _tensor_types(gguf_type)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    biased = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None]
    if biased:
        raise ValueError(
            f"GGUF export: {biased[0]} has a bias (a merged bias delta such as bitfit or ssf adds "
            "them), which transformers' GGUF reader for llama drops; export it with --format hf"
        )
    out = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise FormatError(f"GGUF export: no llama.cpp tensor name for {hf_name}")
        data = tensor.detach().to("cpu", torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute_qk(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_qk(data, config.num_key_value_heads)
        qtype = embed_type if gguf_name == "token_embd.weight" else matrix_type
        out.append((gguf_name, *_encode(data, qtype)))
    return out


def write_gguf(
    model: nn.Module,
    tokenizer: Any,
    path: str | os.PathLike,
    gguf_type: str = "f16",
    tokenizer_pre: str | None = None,
    name: str | None = None,
) -> Path:
    """Write `model` (a plain, merged LlamaForCausalLM) and its tokenizer as one GGUF file; the file
    appears whole or not at all (temp file + rename)."""
    check_gguf_type(gguf_type)
    config = model.config
    check_architecture(getattr(config, "model_type", None))
    path = Path(path)
    gguf = _gguf()
    # every check that can fail runs before the file is opened
    vocab = tokenizer_fields(tokenizer, config.vocab_size, tokenizer_pre)
    tensors = _tensors(model, gguf_type)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        try:
            _add_metadata(writer, config, _tensor_types(gguf_type)[2], name or path.stem)
            _add_tokenizer(writer, vocab)
            for tensor_name, data, qtype in tensors:
                writer.add_tensor(tensor_name, data, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    atomic_write(path, write)
    return path
