"""Exact-match evaluation by batched greedy generation.

An item is a prompt (a chat, rendered with the tokenizer's chat template and its generation prompt,
or raw text) and the one right answer. Prompts are tokenized exactly as training tokenizes them
(deltatune.data.tokenize), left-padded into batches so every row ends where generation starts, and
decoded greedily until EOS or the template's end-of-turn token. Prompts are batched in order of
length, which keeps padding small; left padding plus the attention mask makes a batched prediction
equal to the unbatched one (tests/test_evaluate.py checks it).

Every pass shows a tqdm bar on stderr (items/s, ETA). HF's greedy loop marks a row finished at its
first stop token and pads it from then on, and the batch ends when every row has finished, so a
batch costs its longest answer, not `max_new_tokens` (tests/test_cost.py counts the forwards). The
first generated token's probability is captured by a logits processor (no extra forward, no stored
logits): it is the confidence that calibration (train/cost.py) scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from deltatune.data.readers import DataError, Record, read_records
from deltatune.data.tasks import exact_match, examples
from deltatune.data.tokenize import Chat, Prompt, left_pad, parse_record, prompt_ids, stop_token_ids


@dataclass
class EvalItem:
    prompt: Prompt  # messages -> chat template with the generation prompt; str -> raw text
    answer: str


def eval_items_from_task(task: str, n: int, seed: int = 0, **difficulty: int) -> list[EvalItem]:
    """The task's test split as evaluation items (disjoint from anything `examples(..., "train")` gives)."""
    return [
        EvalItem(ex.messages(with_answer=False), ex.answer)
        for ex in examples(task, "test", n, seed=seed, **difficulty)
    ]


def _item_from_record(record: dict) -> EvalItem:
    parsed = parse_record(record)
    if isinstance(parsed, Chat):
        last = max(i for i, m in enumerate(parsed.messages) if m["role"] == "assistant")
        if last == 0:
            raise DataError("the only assistant message comes first, so there is no prompt to evaluate")
        return EvalItem(parsed.messages[:last], parsed.messages[last]["content"])
    if not parsed.prompt:
        raise DataError("a plain 'text' record has no separate answer to evaluate")
    return EvalItem(parsed.prompt, parsed.completion)


def eval_items_from_file(path: str | Path) -> list[EvalItem]:
    """Chat records (the last assistant message is the answer), alpaca, or prompt/completion records."""
    items = []
    for record, where in read_records(path):
        try:
            items.append(_item_from_record(record))
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
    return items


def _prompt_from_record(record: Record) -> Prompt:
    if "messages" in record:  # validated as a chat (an empty answer stands in for the one to generate)
        if not isinstance(record["messages"], list):
            raise DataError("'messages' must be a list of {role, content} messages")
        chat = parse_record({"messages": [*record["messages"], {"role": "assistant", "content": ""}]})
        messages = chat.messages[:-1]
        while messages and messages[-1]["role"] == "assistant":  # a full chat: answer its last question
            messages = messages[:-1]
        if not messages:
            raise DataError("a prompt chat needs a user (or system) message")
        return messages
    if "instruction" in record:
        return parse_record({"output": "", **record}).messages[:-1]
    if isinstance(record.get("prompt"), str) and record["prompt"]:
        return record["prompt"]
    raise DataError(
        f"not a prompt record (keys: {', '.join(sorted(record)) or 'none'}); expected 'messages' (chat, "
        "answered after its last user message), 'instruction' (+ 'input'), or 'prompt' (raw text)"
    )


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts to answer (general questions, rehearsal prompts): chat, alpaca or raw-prompt records;
    an answer the record carries is ignored. An error names the file and line."""
    prompts = []
    for record, where in read_records(path):
        try:
            prompts.append(_prompt_from_record(record))
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def cut_at_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """The generated tokens before the first stop token (generate pads finished rows after it)."""
    return next((ids[:i] for i, t in enumerate(ids) if t in stop_ids), ids)


@dataclass
class Generation:
    text: str  # the greedy completion, without the stop token
    first_token_prob: float  # the probability the model gave its first generated token (its greedy choice)
    finished: bool  # a stop token ended it within max_new_tokens


class _FirstStepProbability(LogitsProcessor):
    """Records max softmax(logits) of the first decoding step; leaves the scores unchanged."""

    def __init__(self) -> None:
        self.probs: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.probs is None:
            self.probs = torch.softmax(scores.float(), dim=-1).max(dim=-1).values.cpu()
        return scores


@torch.no_grad()
def generations(
    model,
    tokenizer,
    prompts: list[Prompt],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    stop_token_ids: list[int] | None = None,
    desc: str = "generate",
    progress: bool = True,
) -> list[Generation]:
    """Greedy completions with their first-token probability, batched by prompt length (KV cache)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stops = list(stop_token_ids) if stop_token_ids is not None else _default_stops(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stops, pad_token_id=pad_id
    )
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    outputs: list[Generation | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(encoded), desc=desc, unit="item", disable=not progress or not encoded)
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            input_ids, attention_mask = left_pad([encoded[i] for i in batch], pad_id)
            first = _FirstStepProbability()
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                logits_processor=LogitsProcessorList([first]),
            )
            rows = out[:, input_ids.shape[1] :].tolist()
            for i, row, prob in zip(batch, rows, first.probs.tolist(), strict=True):
                kept = cut_at_stop(row, stops)
                text = tokenizer.decode(kept, skip_special_tokens=True)
                outputs[i] = Generation(text, prob, len(kept) < len(row))
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return outputs  # type: ignore[return-value]


def generate(
    model,
    tokenizer,
    prompts: list[Prompt],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    stop_token_ids: list[int] | None = None,
    desc: str = "generate",
    progress: bool = True,
) -> list[str]:
    """Greedy completions, one per prompt, without the stop token; runs on the model's device."""
    found = generations(model, tokenizer, prompts, max_new_tokens, batch_size, stop_token_ids, desc, progress)
    return [g.text for g in found]


def _default_stops(tokenizer) -> list[int]:
    stops = stop_token_ids(tokenizer)
    if not stops:
        raise ValueError("the tokenizer has no EOS or end-of-turn token; pass stop_token_ids")
    return stops


def exact_match_score(
    model,
    tokenizer,
    items: list[EvalItem],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    desc: str = "exact match",
    progress: bool = True,
) -> dict:
    """{"exact_match": fraction correct, "n", "predictions", "correct", "confidence"} under
    `tasks.exact_match`; "confidence" is each answer's first-token probability (for calibration)."""
    if not items:
        raise ValueError("no evaluation items")
    found = generations(
        model,
        tokenizer,
        [it.prompt for it in items],
        max_new_tokens,
        batch_size,
        desc=desc,
        progress=progress,
    )
    predictions = [g.text for g in found]
    correct = [exact_match(p, it.answer) for p, it in zip(predictions, items, strict=True)]
    return {
        "exact_match": sum(correct) / len(items),
        "n": len(items),
        "predictions": predictions,
        "correct": correct,
        "confidence": [g.first_token_prob for g in found],
    }
