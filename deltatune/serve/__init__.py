"""Serving many adapters from one base model: a batched multi-LoRA engine and an OpenAI-compatible app.

    lora_batch.py   per-row LoRA on top of one shared base projection (gathered, batched matmuls)
    pool.py         registered / resident adapters, slots, byte budget, LRU eviction
    kv.py           the running batch's left-padded KV cache: join, leave, step
    sampling.py     greedy / temperature / top-p / seed, incremental text with stop strings
    options.py      the `-o` options: EngineOptions < LoadOptions < ServeOptions (pydantic)
    engine.py       the scheduler thread: continuous batching
    protocol.py     OpenAI request schemas, response and chunk shapes, the error body
    app.py          FastAPI routes, auth, SSE streaming; `serve()` runs it under uvicorn

The web layer (fastapi, uvicorn) is imported only when `create_app` or `serve` is first used, so
the engine works without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deltatune.serve.engine import Engine, EngineOverloadedError, Request
from deltatune.serve.sampling import SamplingParams

if TYPE_CHECKING:
    from deltatune.serve.app import create_app, serve

__all__ = ["Engine", "EngineOverloadedError", "Request", "SamplingParams", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in ("create_app", "serve"):
        from deltatune.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'deltatune.serve' has no attribute {name!r}")
