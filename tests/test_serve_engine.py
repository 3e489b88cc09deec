"""The serving engine without HTTP: per-row LoRA math, sampling helpers, the pool, continuous batching.

Oracles: the LoRA formula written out row by row, hand-computed nucleus probabilities, and
single-adapter greedy generation with transformers (`deltatune.train.evaluate.generate`).
"""

from __future__ import annotations

import time

import peft
import pytest
import torch
from torch import nn

import deltatune
from deltatune.formats import FormatError
from deltatune.models import load_tokenizer, tiny_llama
from deltatune.serve import Engine, SamplingParams
from deltatune.serve.lora_batch import MultiLoraLinear, RowAdapters
from deltatune.serve.pool import AdapterPool, PoolBusyError
from deltatune.serve.sampling import TextStream, choose_tokens, sample_row, top_p_filter
from deltatune.train.evaluate import generate as reference_generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = [[{"role": "user", "content": f"Tell me about the number {k}."}] for k in range(3)]


def tiny_base():
    """A tiny random Llama initialised 10x wider than usual: its attention is sharp enough that the
    output depends on the whole prompt, so a corrupted KV cache changes the text."""
    return tiny_llama(seed=0, initializer_range=0.2)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("engine-adapters")
    specs = {
        "wide": dict(r=8, lora_alpha=16, target_modules="all-linear"),
        "narrow": dict(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"], use_rslora=True),
        "attn": dict(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"]),
    }
    for i, (name, kw) in enumerate(specs.items()):
        torch.manual_seed(i)
        peft.get_peft_model(
            tiny_llama(seed=0), peft.LoraConfig(init_lora_weights=False, **kw)
        ).save_pretrained(root / name)
    torch.manual_seed(9)
    dora = peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, init_lora_weights=False)
    peft.get_peft_model(tiny_llama(seed=0), dora).save_pretrained(root / "dora")
    return {name: root / name for name in [*specs, "dora"]}


def _reference(tokenizer, adapter, prompts, max_tokens):
    return reference_generate(deltatune.load(tiny_base(), adapter=adapter), tokenizer, prompts, max_tokens)


def test_multi_lora_linear_matches_the_formula_row_by_row():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    routing = RowAdapters()
    layer = MultiLoraLinear(base, routing)
    loras = {1: (torch.randn(3, 6), torch.randn(5, 3), 0.5), 2: (torch.randn(1, 6), torch.randn(5, 1), 2.0)}
    for slot, (a, b, scale) in loras.items():
        layer.write_slot(slot, a, b, scale)
    x = torch.randn(4, 2, 6)  # 4 rows of 2 tokens (a prefill); ranks 3 and 1 share one padded stack
    slots = [2, 0, 1, 2]
    routing.set(slots)
    expected = base(x).clone()
    for row, slot in enumerate(slots):
        if slot:
            a, b, scale = loras[slot]
            expected[row] += scale * x[row] @ a.T @ b.T
    torch.testing.assert_close(layer(x), expected)
    routing.set([2, 1])  # one row per adapter: the rows line up with the gathered weights
    for row, slot in enumerate([2, 1]):
        a, b, scale = loras[slot]
        torch.testing.assert_close(layer(x[:2])[row], base(x[row]) + scale * x[row] @ a.T @ b.T)
    routing.set([1, 1, 1, 1])  # one adapter for all rows: the shared path
    a, b, scale = loras[1]
    torch.testing.assert_close(layer(x), base(x) + scale * x @ a.T @ b.T)
    routing.set([0, 0, 0, 0])
    torch.testing.assert_close(layer(x), base(x))
    layer.clear_slot(1)
    routing.set([1, 2, 1, 2])
    expected = base(x).clone()
    for row in (1, 3):
        expected[row] += 2.0 * x[row] @ loras[2][0].T @ loras[2][1].T
    torch.testing.assert_close(layer(x), expected)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    torch.testing.assert_close(top_p_filter(probs, 0.7), torch.tensor([0.0, 0.625, 0.0, 0.375]))
    torch.testing.assert_close(top_p_filter(probs, 0.5), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(top_p_filter(probs, 1.0), probs)


def test_tiny_temperatures_sample_the_argmax_and_bad_rows_fail_alone():
    logits = torch.tensor([[1.0, 3.0, 2.9, -5.0], [0.5, 0.1, 0.2, 0.0], [2.0, float("nan"), 0.0, 1.0]])
    for temperature in (1e-300, 5e-324, 1e-8):  # fp32 would round 1e-300 to 0 and divide 0 by 0
        params = SamplingParams(temperature=temperature, seed=1)
        gen = torch.Generator().manual_seed(0)
        assert [sample_row(logits[i], params, gen) for i in range(2)] == [1, 0]
    rows = [SamplingParams(temperature=1e-300), SamplingParams(), SamplingParams(temperature=0.5)]
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    tokens, failed = choose_tokens(logits, rows, gens)
    assert tokens[:2] == [1, 0] and list(failed) == [2] and "not finite" in failed[2]
    inf_row = torch.tensor([[0.0, float("inf"), 1.0]])  # inf is not finite either, greedy or not
    assert list(choose_tokens(inf_row, [SamplingParams()], gens[:1])[1]) == [0]


def test_text_stream_holds_back_possible_stop_strings(tokenizer):
    ids = tokenizer("Hello world. Stop here please", add_special_tokens=False).input_ids
    stream = TextStream(tokenizer, stop=("Stop",))
    deltas = [stream.push(t) for t in ids]
    assert "".join(deltas) == "Hello world. " and stream.stopped
    assert not any("Sto" in d for d in deltas)
    held = TextStream(tokenizer, stop=("worlds",))
    ids = tokenizer("Hello world", add_special_tokens=False).input_ids
    assert "".join(held.push(t) for t in ids) == "Hello " and held.finish() == "world"  # released at the end
    plain = TextStream(tokenizer)
    ids = tokenizer("Hello world. Stop here please", add_special_tokens=False).input_ids
    text = "".join(plain.push(t) for t in ids) + plain.finish()
    assert text == "Hello world. Stop here please"


def test_mixed_batch_greedy_equals_single_adapter_generate(tokenizer, adapters):
    names = ["wide", "narrow", "attn"]
    engine = Engine(tiny_base(), tokenizer, "base", {n: adapters[n] for n in names})
    try:
        jobs = [(p, a) for p in PROMPTS for a in [None, *names]]
        done = engine.generate(
            [engine.chat_prompt(p) for p, _ in jobs], [a for _, a in jobs], SamplingParams(max_tokens=8)
        )
    finally:
        engine.shutdown()
    expected = {name: _reference(tokenizer, adapters.get(name), PROMPTS, 8) for name in [None, *names]}
    for (prompt, name), req in zip(jobs, done, strict=True):
        assert req.error is None
        assert req.text == expected[name][PROMPTS.index(prompt)], name
    assert len({r.text for r in done}) >= 4  # each adapter changes the output


def test_requests_join_and_leave_between_decode_steps(tokenizer, adapters):
    engine = Engine(tiny_base(), tokenizer, "base", {"wide": adapters["wide"], "attn": adapters["attn"]})
    medium = PROMPTS[0] + [{"role": "assistant", "content": "Sure."}, {"role": "user", "content": "Go on."}]
    long = medium + [
        {"role": "assistant", "content": "It is a number."},
        {"role": "user", "content": "And more?"},
    ]
    # (prompt, adapter, max_tokens): the short one joins a wider batch, the long one a narrower batch
    jobs = [(medium, "wide", 24), (PROMPTS[1], "attn", 6), (long, None, 12)]

    def wait_for_tokens(req, n):
        deadline = time.time() + 60
        while req.completion_tokens < n and time.time() < deadline:
            time.sleep(0.0005)
        assert not req.done.is_set()  # the next request joins while this one is mid-decode

    try:
        requests = []
        for prompt, adapter, max_tokens in jobs:
            if requests:
                wait_for_tokens(requests[-1], 3)
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            requests.append(engine.submit(engine.chat_prompt(prompt), adapter, params))
        for r in requests:
            r.wait(120)
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert len({int(k) for k in stats["batch_size_histogram"]}) == 3  # 1, 2 and 3 rows at different steps
    for req, (prompt, adapter, max_tokens) in zip(requests, jobs, strict=True):
        assert req.completion_tokens == max_tokens
        model = deltatune.load(tiny_base(), adapter=adapters.get(adapter))
        assert req.text == reference_generate(model, tokenizer, [prompt], max_tokens, stop_token_ids=[])[0]


def test_lru_eviction_under_a_tiny_budget(tokenizer, adapters):
    model = tiny_base()
    one = AdapterPool(tiny_base(), RowAdapters())
    one.register("attn", adapters["attn"])
    budget = 2 * one.used_bytes()  # room for two "attn"-sized adapters
    pool = AdapterPool(model, RowAdapters(), budget_bytes=budget)
    with pytest.raises(FormatError, match="budget"):
        pool.register("wide", adapters["wide"])  # larger than the whole budget
    pool.register("a", adapters["attn"])
    pool.register("b", adapters["attn"])
    pool.register("c", adapters["attn"])
    assert list(pool.resident) == ["b", "c"] and pool.stats.evictions == 1
    pool.acquire("a")  # evicted: read back from disk, evicting the least recently used ("b")
    assert list(pool.resident) == ["c", "a"] and pool.stats.loads == 4
    pool.acquire("c")
    with pytest.raises(PoolBusyError):
        pool.acquire("b")  # both resident adapters are in use: nothing may be evicted
    pool.release("c")
    pool.acquire("b")
    assert set(pool.resident) == {"a", "b"}  # "a" is held, so "c" went


def test_engine_waits_for_pool_room_and_outputs_stay_right(tokenizer, adapters):
    budget = AdapterPool(tiny_base(), RowAdapters())
    budget.register("x", adapters["wide"])
    engine = Engine(  # no scheduler thread: generate() runs the loop on this thread
        tiny_base(), tokenizer, "base", {"wide": adapters["wide"], "attn": adapters["attn"]},
        adapter_budget_bytes=budget.used_bytes(), autostart=False,
    )  # fmt: skip
    try:
        done = engine.generate(
            [engine.chat_prompt(PROMPTS[0])] * 4,
            ["wide", "attn", "wide", "attn"],
            SamplingParams(max_tokens=6),
        )
        stats = engine.stats()["adapters"]
    finally:
        engine.shutdown()
    assert stats["evictions"] >= 1
    for req in done:
        assert req.error is None
        assert req.text == _reference(tokenizer, adapters[req.adapter], [PROMPTS[0]], 6)[0]


def test_refusals_name_the_problem(tokenizer, adapters):
    engine = Engine(tiny_base(), tokenizer, "base", autostart=False)
    with pytest.raises(FormatError, match="adapter_config.json.*dora.*cannot be served"):
        engine.load_adapter("d", adapters["dora"])
    with pytest.raises(ValueError, match="invalid adapter name"):
        engine.load_adapter("../up", adapters["wide"])
    with pytest.raises(ValueError, match="context"):
        engine.submit([1] * 500, None, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    req = engine.submit(engine.chat_prompt(PROMPTS[0]), None, SamplingParams(max_tokens=50))
    req.cancel()
    engine.start()
    assert req.wait(60).finish_reason == "cancelled"
    engine.shutdown()
