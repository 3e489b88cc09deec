"""The OpenAI wire format: request schemas (pydantic), response and chunk shapes, the error body.

Only what the engine can honour is accepted: `n` must be 1, and fields the engine does not
implement are refused by name (400) when set to anything but their neutral value, rather than
silently ignored. Unknown extra fields are ignored, as OpenAI's own server does, so newer clients
keep working.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deltatune.serve.sampling import SamplingParams

MAX_STOP_STRINGS = 4


class APIError(Exception):
    """An error that becomes {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"stop must be up to {MAX_STOP_STRINGS} non-empty strings")
        return stops

    @field_validator("presence_penalty", "frequency_penalty", "logprobs")
    @classmethod
    def _unsupported(cls, v, info):
        if v not in (None, False, 0, 0.0):
            raise ValueError(f"{info.field_name} is not supported by this server")
        return v

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self.stop),
        )


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_template_message(self) -> dict[str, str]:
        """{"role", "content"} with text parts joined; 'developer' is the newer name of 'system'."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = Field(False, description="not supported")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str]) -> list[str]:
        prompts = [v] if isinstance(v, str) else list(v)
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompt must be a non-empty string or a non-empty list of non-empty strings")
        return prompts

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class AdapterLoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str


# --- responses ------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_card(name: str, parent: str | None, created: int) -> dict[str, Any]:
    card = {"id": name, "object": "model", "created": created, "owned_by": "deltatune"}
    if parent is not None:
        card["parent"] = parent
    return card


def chat_response(rid: str, model: str, choices: list[tuple[str, str]], use: dict) -> dict[str, Any]:
    """choices: (text, finish_reason) per choice index."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
                "logprobs": None,
            }
            for i, (text, reason) in enumerate(choices)
        ],
        "usage": use,
    }


def chat_chunk(rid: str, model: str, index: int, delta: dict, finish_reason: str | None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def completion_response(rid: str, model: str, choices: list[tuple[str, str]], use: dict) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": text, "finish_reason": reason, "logprobs": None}
            for i, (text, reason) in enumerate(choices)
        ],
        "usage": use,
    }


def completion_chunk(
    rid: str, model: str, index: int, text: str, finish_reason: str | None
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}],
    }


def usage_chunk(rid: str, model: str, obj: str, use: dict) -> dict[str, Any]:
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": use,
    }
