import json

import pytest
import torch

from deltatune.data import DataError
from deltatune.data.tasks import TASKS, examples
from deltatune.data.tokenize import prompt_ids
from deltatune.models import load_tokenizer, tiny_llama
from deltatune.train.evaluate import (
    EvalItem,
    eval_items_from_file,
    eval_items_from_task,
    exact_match_score,
    generate,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    # Untied head: a tied random model mostly repeats "\n", which would make comparisons vacuous.
    return tiny_llama(seed=3, tie_word_embeddings=False).eval()


def mixed_prompts() -> list:
    chats = [
        item.prompt for item in eval_items_from_task("addition", 2) + eval_items_from_task("reversal", 2)
    ]
    return chats + ["The capital of France is", "Once upon a time there was a very small"]


def greedy_reference(model, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding by hand, one full forward per token: the oracle for `generate`."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-steps:]


def test_batched_equals_unbatched(model, tok):
    prompts = mixed_prompts()
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=4)
    alone = [generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert len(set(batched)) >= 4  # the prompts really lead to different continuations


def test_generate_is_greedy_and_stops_at_stop_tokens(model, tok):
    prompt = eval_items_from_task("kv_lookup", 1)[0].prompt
    reference = greedy_reference(model, prompt_ids(tok, prompt), steps=6)
    assert generate(model, tok, [prompt], max_new_tokens=6)[0] == tok.decode(
        reference, skip_special_tokens=True
    )
    k = next(i for i in range(2, 6) if reference[i] not in reference[:i])
    stopped = generate(model, tok, [prompt], max_new_tokens=6, stop_token_ids=[reference[k]])
    assert stopped == [tok.decode(reference[:k], skip_special_tokens=True)]


def test_generate_restores_training_mode(tok):
    model = tiny_llama(seed=3, tie_word_embeddings=False).train()
    generate(model, tok, ["Hello"], max_new_tokens=2)
    assert model.training


def test_exact_match_score_counts_matches(model, tok):
    prompts = mixed_prompts()[:4]
    predictions = generate(model, tok, prompts, max_new_tokens=5)
    # Two items whose answer is what the model says (up to case and a trailing period), two that are not.
    items = [
        EvalItem(prompts[0], predictions[0].upper() + "."),
        EvalItem(prompts[1], predictions[1]),
        EvalItem(prompts[2], predictions[2] + " extra"),
        EvalItem(prompts[3], "definitely not this"),
    ]
    result = exact_match_score(model, tok, items, max_new_tokens=5, batch_size=3)
    assert result["n"] == 4
    assert result["predictions"] == predictions
    assert result["correct"] == [True, True, False, False]
    assert result["exact_match"] == 0.5


def test_eval_items_from_task_are_the_test_split():
    for task in TASKS:
        items = eval_items_from_task(task, 5, seed=2)
        expected = examples(task, "test", 5, seed=2)
        assert [(i.prompt, i.answer) for i in items] == [
            (e.messages(with_answer=False), e.answer) for e in expected
        ]


def test_eval_items_from_file(tmp_path):
    chat = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
    path = tmp_path / "eval.jsonl"
    records = [
        {"messages": chat},
        {"instruction": "Add.", "input": "2 2", "output": "4"},
        {"prompt": "2+2=", "completion": "4"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records))
    items = eval_items_from_file(path)
    assert items == [
        EvalItem(chat[:4], "A2"),
        EvalItem([{"role": "user", "content": "Add.\n\n2 2"}], "4"),
        EvalItem("2+2=", "4"),
    ]
    path.write_text(json.dumps(records[0]) + "\n" + json.dumps({"text": "no answer here"}) + "\n")
    with pytest.raises(DataError, match=r"eval\.jsonl:2: .*no separate answer"):
        eval_items_from_file(path)
    path.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"eval\.jsonl:1: .*no prompt"):
        eval_items_from_file(path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generate_on_cuda_matches_unbatched(tok):
    model = tiny_llama(seed=3, tie_word_embeddings=False).eval().cuda()
    prompts = mixed_prompts()
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=4)
    assert batched == [generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]


@pytest.mark.integration
def test_default_model_base_exact_match_runs():
    from deltatune.models import load_model

    model, tok = load_model(), load_tokenizer()
    for task in TASKS:
        result = exact_match_score(
            model, tok, eval_items_from_task(task, 20), max_new_tokens=8, batch_size=20
        )
        assert result["n"] == 20 and 0.0 <= result["exact_match"] <= 1.0
        assert all(isinstance(p, str) for p in result["predictions"])
