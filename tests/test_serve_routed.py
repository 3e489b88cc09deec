"""Routed deltas in the batched engine: Arrow and MixLoRA rows beside plain LoRA rows.

Oracle: greedy generation with the delta attached on its own (`deltatune generate`'s path,
`deltatune.train.evaluate.generate`), per row of one mixed batch, and the official `openai`
client against a live server on 127.0.0.1.
"""

from __future__ import annotations

import openai
import peft
import pytest
import torch

import deltatune
from deltatune.deltas import named_delta_parameters
from deltatune.models import load_tokenizer, tiny_llama
from deltatune.serve import Engine, SamplingParams, create_app
from deltatune.train.evaluate import generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = [[{"role": "user", "content": f"Tell me about the number {k}."}] for k in range(3)]


def base():
    return tiny_llama(seed=0, initializer_range=0.2)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def deltas(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("routed")
    library = []
    for i in range(3):
        model = base()  # tiny_llama reseeds: seed each adapter after building its base
        torch.manual_seed(10 + i)
        config = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
        )
        peft.get_peft_model(model, config).save_pretrained(root / f"lora{i}")
        library.append(str(root / f"lora{i}"))
    arrow = deltatune.add_delta(base(), "arrow", arrow_adapters=library, arrow_top_k=2)
    deltatune.save_delta(arrow, root / "arrow")
    mix = deltatune.add_delta(base(), "mixlora", lora_r=4, mixlora_experts=3, mixlora_attention=True)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in named_delta_parameters(mix).items():
            if "lora_B" in name or "router" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    deltatune.save_delta(mix, root / "mixlora")
    return {"lora0": root / "lora0", "arrow": root / "arrow", "mixlora": root / "mixlora"}


@pytest.mark.parametrize("prepack", [True, False])
def test_mixed_batch_with_routed_rows_equals_each_delta_alone(tok, deltas, prepack):
    engine = Engine(base(), tok, "base", deltas, autostart=False, prepack=prepack)
    try:
        jobs = [(p, a) for p in PROMPTS for a in [None, "lora0", "arrow", "mixlora"]]
        done = engine.generate(
            [engine.chat_prompt(p) for p, _ in jobs], [a for _, a in jobs], SamplingParams(max_tokens=8)
        )
        resident = engine.stats()["adapters"]["resident"]
    finally:
        engine.shutdown()
    expected = {
        a: generate(deltatune.load(base(), adapter=deltas.get(a)), tok, PROMPTS, 8)
        for a in [None, "lora0", "arrow", "mixlora"]
    }
    assert len({tuple(v) for v in expected.values()}) == 4  # every delta changes the text
    for (prompt, adapter), req in zip(jobs, done, strict=True):
        assert req.error is None
        assert req.text == expected[adapter][PROMPTS.index(prompt)], adapter
    assert set(resident) == set(deltas)


def test_routed_deltas_unload_and_reload(tok, deltas):
    engine = Engine(base(), tok, "base", {"arrow": deltas["arrow"]}, autostart=False)
    try:
        first = engine.generate([engine.chat_prompt(PROMPTS[0])], ["arrow"], SamplingParams(max_tokens=6))[
            0
        ].text
        engine.unload_adapter("arrow")
        assert not engine.pool.rows.layers  # its hooks are gone with it
        plain = engine.generate([engine.chat_prompt(PROMPTS[0])], [None], SamplingParams(max_tokens=6))[
            0
        ].text
        engine.load_adapter("arrow2", deltas["arrow"])
        again = engine.generate([engine.chat_prompt(PROMPTS[0])], ["arrow2"], SamplingParams(max_tokens=6))[
            0
        ].text
    finally:
        engine.shutdown()
    assert first == again != plain


def test_openai_client_gets_routed_deltas(tok, deltas):
    from tests.test_serve import live_server

    engine = Engine(base(), tok, "base", deltas, max_batch=8)
    try:
        with live_server(create_app(engine)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
            assert {"arrow", "mixlora"} <= {m.id for m in client.models.list().data}
            for name in ("arrow", "mixlora"):
                resp = client.chat.completions.create(
                    model=name, messages=PROMPTS[1], temperature=0, max_tokens=8
                )
                expected = generate(deltatune.load(base(), adapter=deltas[name]), tok, [PROMPTS[1]], 8)[0]
                assert resp.choices[0].message.content == expected
    finally:
        engine.shutdown()
