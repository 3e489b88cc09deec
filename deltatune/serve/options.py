"""The `-o key=value` options of `deltatune serve`, in three layers, each a pydantic model that
validates before anything loads: EngineOptions (what `Engine(...)` takes: batching, adapter memory,
routers), LoadOptions (plus how `Engine.from_pretrained` loads the base model) and ServeOptions
(plus the HTTP layer's own limits, used by `serve/app.py`). Kept apart from engine.py so that the
CLI's help and checks need neither the scheduler nor the web stack.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_BODY_BYTES = 4 << 20  # ~1M tokens of text: far past any context, small for memory


class EngineOptions(BaseModel):
    """How an Engine batches and holds adapters: the keyword options of `Engine(...)`."""

    model_config = ConfigDict(extra="forbid")

    max_batch: int = Field(32, ge=1, description="rows decoded together")
    max_queue: int = Field(256, ge=1, description="waiting requests before new ones are refused (503)")
    adapter_budget_bytes: int | None = Field(
        None, description="adapter weight bytes kept loaded, idle ones evicted LRU-first (default: no limit)"
    )
    prepack: bool = Field(True, description="oneDNN-packed linear weights: 2-3x faster on CPU, 2x memory")
    router_layer: int = Field(4, ge=1, description="decoder blocks a request router runs to pick an adapter")
    router_examples: int = Field(16, ge=1, description="example prompts per adapter for a router's prototype")


class LoadOptions(EngineOptions):
    """EngineOptions plus how `Engine.from_pretrained` loads the base model (`deltatune serve -o`)."""

    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="base model dtype")
    device: str = Field("cpu", description="cpu, cuda, cuda:1, ...")
    model_name: str | None = Field(None, description="base model name in the API (default: from its path)")


class ServeOptions(LoadOptions):
    """LoadOptions plus the HTTP layer's own limits (`deltatune serve -o key=value`)."""

    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES, ge=1, description="largest request body accepted; larger ones get 413"
    )
