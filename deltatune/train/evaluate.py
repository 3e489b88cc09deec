"""Exact-match evaluation by batched greedy generation.

An item is a prompt (a chat, rendered with the tokenizer's chat template and its generation prompt,
or raw text) and the one right answer. Prompts are tokenized exactly as training tokenizes them
(deltatune.data.tokenize), left-padded into batches so every row ends where generation starts, and
decoded greedily until EOS or the template's end-of-turn token. Prompts are batched in order of
length, which keeps padding small; left padding plus the attention mask makes a batched prediction
equal to the unbatched one (tests/test_evaluate.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig

from deltatune.data.readers import DataError, read_records
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


def cut_at_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """The generated tokens before the first stop token (generate pads finished rows after it)."""
    return next((ids[:i] for i, t in enumerate(ids) if t in stop_ids), ids)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[Prompt],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    stop_token_ids: list[int] | None = None,
) -> list[str]:
    """Greedy completions, one per prompt, without the stop token; runs on the model's device."""
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
    outputs: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            input_ids, attention_mask = left_pad([encoded[i] for i in batch], pad_id)
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
            )
            for i, row in zip(batch, out[:, input_ids.shape[1] :].tolist(), strict=True):
                outputs[i] = tokenizer.decode(cut_at_stop(row, stops), skip_special_tokens=True)
    finally:
        model.train(was_training)
    return outputs


def _default_stops(tokenizer) -> list[int]:
    stops = stop_token_ids(tokenizer)
    if not stops:
        raise ValueError("the tokenizer has no EOS or end-of-turn token; pass stop_token_ids")
    return stops


def exact_match_score(
    model, tokenizer, items: list[EvalItem], max_new_tokens: int = 32, batch_size: int = 16
) -> dict:
    """{"exact_match": fraction correct, "n", "predictions", "correct"} under `tasks.exact_match`."""
    if not items:
        raise ValueError("no evaluation items")
    predictions = generate(model, tokenizer, [it.prompt for it in items], max_new_tokens, batch_size)
    correct = [exact_match(p, it.answer) for p, it in zip(predictions, items, strict=True)]
    return {
        "exact_match": sum(correct) / len(items),
        "n": len(items),
        "predictions": predictions,
        "correct": correct,
    }
