"""Turn records into token ids and loss labels, using the tokenizer's own chat template.

Four record formats, detected by their key (a registry, first match wins):

    {"messages": [{"role", "content"}, ...]}     chat: loss on each assistant message + its end-of-turn token
    {"instruction", "input"?, "output"}          alpaca: becomes a user/assistant chat
    {"prompt", "completion"}                     raw text, no template: loss on the completion + EOS
    {"text"}                                     raw text: loss on every token + EOS

Where the assistant tokens are is found without knowing the template: the conversation is rendered
prefix by prefix (messages[:k] with the generation prompt, then messages[:k+1]); each rendering must
extend the previous one, and the text each step adds is tokenized on its own. The assistant step is
"content + end-of-turn + whatever the template puts after it" (ChatML: "\\n"); its target ends at the
first end-of-turn token. Tokenizing each step separately also means the training tokens are exactly
the ones the model sees at generation time: prompt rendered with the generation prompt, then the answer.

Labels are not shifted: labels[i] == input_ids[i] where token i is a target, -100 elsewhere. The first
token of a sample is never a target (nothing in the sample predicts it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deltatune.data.packing import IGNORE_INDEX, Sample
from deltatune.data.readers import DataError, Record, read_records
from deltatune.data.tasks import Split, examples

SENTINEL = "Deltatune-sentinel-answer"


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRecord(_Strict):
    messages: list[Message] = Field(min_length=1)


class AlpacaRecord(_Strict):
    instruction: str = Field(min_length=1)
    input: str = ""
    output: str


class PromptCompletionRecord(_Strict):
    prompt: str = Field(min_length=1)
    completion: str = Field(min_length=1)


class TextRecord(_Strict):
    text: str = Field(min_length=1)


@dataclass(frozen=True)
class Chat:
    """A conversation to render with the chat template."""

    messages: list[dict[str, str]]


@dataclass(frozen=True)
class RawText:
    """Text used as-is: `prompt` (may be empty) is context, `completion` is the target."""

    prompt: str
    completion: str


def _chat(r: ChatRecord) -> Chat:
    if not any(m.role == "assistant" for m in r.messages):
        raise DataError("chat has no assistant message, so nothing to learn")
    return Chat([m.model_dump() for m in r.messages])


def _alpaca(r: AlpacaRecord) -> Chat:
    user = f"{r.instruction}\n\n{r.input}" if r.input else r.instruction
    return Chat([{"role": "user", "content": user}, {"role": "assistant", "content": r.output}])


# detection key -> (schema, conversion); the order is the detection priority
FORMATS: dict[str, tuple[type[BaseModel], Callable[[Any], Chat | RawText]]] = {
    "messages": (ChatRecord, _chat),
    "instruction": (AlpacaRecord, _alpaca),
    "prompt": (PromptCompletionRecord, lambda r: RawText(r.prompt, r.completion)),
    "text": (TextRecord, lambda r: RawText("", r.text)),
}


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "record"
        parts.append(f"{loc}: {'missing' if e['type'] == 'missing' else e['msg']}")
    return "; ".join(parts)


def parse_record(record: Record) -> Chat | RawText:
    """Detect the record's format and validate it; errors say which field is wrong (not where: see callers)."""
    key = next((k for k in FORMATS if k in record), None)
    if key is None:
        raise DataError(
            f"unknown record format (keys: {', '.join(sorted(record)) or 'none'}); expected one of: "
            "'messages' (chat), 'instruction'+'output' (alpaca), 'prompt'+'completion', 'text'"
        )
    schema, convert = FORMATS[key]
    try:
        return convert(schema.model_validate(record))
    except ValidationError as err:
        raise DataError(f"bad {key!r} record: {_describe(err)}") from None


def render_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The tokenizer's own chat template as text; the empty conversation renders as nothing."""
    if not messages and not add_generation_prompt:
        return ""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template; use 'prompt'/'completion' or 'text' records for this model"
        )
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # noqa: BLE001 - templates raise arbitrary jinja exceptions
        raise DataError(f"chat template failed on this conversation: {err}") from None


def chat_segments(tokenizer, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """Split the rendered chat into (text, is_assistant_turn) pieces that concatenate to the full rendering."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for k, message in enumerate(messages):
        steps = [(messages[:k], True, False)] if message["role"] == "assistant" else []
        steps.append((messages[: k + 1], False, message["role"] == "assistant"))
        for prefix, generation_prompt, is_target in steps:
            text = render_chat(tokenizer, prefix, generation_prompt)
            if not text.startswith(done):
                raise DataError(
                    f"the chat template is not prefix-consistent at message {k} ({message['role']}): "
                    "rendering more messages changed the text of earlier ones, so assistant tokens "
                    "cannot be located"
                )
            segments.append((text[len(done) :], is_target))
            done = text
    return segments


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return ids


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus the chat template's end-of-turn token (the first special token after an assistant message)."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": SENTINEL}]
    try:
        text, _ = chat_segments(tokenizer, chat)[-1]
    except DataError:
        return ids
    tail = text.split(SENTINEL, 1)[-1]
    special = _special_ids(tokenizer)
    for token_id in tokenizer(tail, add_special_tokens=False).input_ids:
        if token_id in special:
            if token_id not in ids:
                ids.append(token_id)
            break
    return ids


def encode_text(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens).input_ids)


def _target_until_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """Labels for an assistant step: its tokens up to and including the first stop token, then nothing."""
    end = next((i + 1 for i, t in enumerate(ids) if t in stop_ids), len(ids))
    return ids[:end] + [IGNORE_INDEX] * (len(ids) - end)


def _chat_sample(tokenizer, chat: Chat, stop_ids: list[int]) -> Sample:
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_target in chat_segments(tokenizer, chat.messages):
        ids = encode_text(tokenizer, text)
        input_ids += ids
        labels += _target_until_stop(ids, stop_ids) if is_target else [IGNORE_INDEX] * len(ids)
    return Sample(input_ids, labels)


def _raw_sample(tokenizer, raw: RawText) -> Sample:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token, so a raw-text completion cannot be terminated")
    prompt = encode_text(tokenizer, raw.prompt, add_special_tokens=True)  # BOS, for tokenizers that use one
    completion = encode_text(tokenizer, raw.completion) + [tokenizer.eos_token_id]
    return Sample(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)


def _finish(sample: Sample, train_on_prompt: bool) -> Sample:
    labels = list(sample.input_ids) if train_on_prompt else sample.labels
    if not sample.input_ids:
        raise DataError("record produced no tokens")
    return Sample(sample.input_ids, [IGNORE_INDEX] + labels[1:])


def _to_sample(record: Record, tokenizer, train_on_prompt: bool, stop_ids: list[int]) -> Sample:
    parsed = parse_record(record)
    sample = (
        _chat_sample(tokenizer, parsed, stop_ids)
        if isinstance(parsed, Chat)
        else _raw_sample(tokenizer, parsed)
    )
    return _finish(sample, train_on_prompt)


def to_sample(record: dict, tokenizer, train_on_prompt: bool = False) -> Sample:
    """One record -> token ids and labels; the format is detected from the record's keys."""
    return _to_sample(record, tokenizer, train_on_prompt, stop_token_ids(tokenizer))


def load_samples(path, tokenizer, train_on_prompt: bool = False) -> list[Sample]:
    """Read a data file and tokenize every record; an error names the file and line of the bad record."""
    stop_ids = stop_token_ids(tokenizer)
    samples = []
    for record, where in read_records(path):
        try:
            samples.append(_to_sample(record, tokenizer, train_on_prompt, stop_ids))
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
    return samples


def task_samples(
    task: str, split: Split, n: int, tokenizer, seed: int = 0, **difficulty: int
) -> list[Sample]:
    """A built-in task's examples as chat samples (loss on the answer and its end-of-turn token)."""
    stop_ids = stop_token_ids(tokenizer)
    return [
        _to_sample({"messages": ex.messages()}, tokenizer, False, stop_ids)
        for ex in examples(task, split, n, seed=seed, **difficulty)
    ]


Prompt = str | list[dict[str, str]]  # messages -> chat template + generation prompt; str -> raw


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt, the same way training tokenizes the context before a target."""
    if isinstance(prompt, str):
        return encode_text(tokenizer, prompt, add_special_tokens=True)
    return encode_text(tokenizer, render_chat(tokenizer, prompt, add_generation_prompt=True))


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align token rows: (input_ids, attention_mask), both [len(rows), longest]."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask
