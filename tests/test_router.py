"""Request-level routing: a served name that picks one adapter per request from its prompt.

Oracles: transformers' own hidden states (`output_hidden_states=True`) for the pooled routing
signal, the cosine rule written out by hand, single-adapter greedy generation for the routed text,
and the official `openai` client against a live server on 127.0.0.1.
"""

from __future__ import annotations

import openai
import peft
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import deltatune
from deltatune.cli import app
from deltatune.data.tasks import examples
from deltatune.data.tokenize import left_pad, prompt_ids
from deltatune.models import load_tokenizer, tiny_llama
from deltatune.serve import Engine, SamplingParams, create_app
from deltatune.serve.router import build_router, example_prompts, pooled_states
from deltatune.train.evaluate import generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SKILLS = {"rev": "reversal", "add": "addition"}


def base():
    return tiny_llama(seed=0, initializer_range=0.2)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("router")
    for i, name in enumerate(SKILLS):
        model = base()  # tiny_llama reseeds the global generator: seed the adapter after it
        torch.manual_seed(i)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        peft.get_peft_model(model, config).save_pretrained(root / name)
    return {name: root / name for name in SKILLS}


def test_pooled_states_equal_transformers_hidden_states(tok):
    model = tiny_llama(seed=0, initializer_range=0.2, num_hidden_layers=3).eval()  # the last is normed
    rows = [prompt_ids(tok, ex.messages(with_answer=False)) for ex in examples("reversal", "test", 3)]
    rows[1] = rows[1][:9]  # ragged: left padding must not leak into the mean
    ids, mask = left_pad(rows, 0)
    for layer in (1, 2):
        with torch.no_grad():
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                output_hidden_states=True,
            )
            hidden = out.hidden_states[layer]
        expected = torch.stack([hidden[i, mask[i].bool()].mean(0) for i in range(len(rows))])
        torch.testing.assert_close(pooled_states(model, rows, 0, layer), expected, atol=1e-5, rtol=1e-5)


def test_router_picks_the_skill_of_held_out_prompts(tok):
    model = base().eval()
    shots = {a: example_prompts(f"task:{t}", 8) for a, t in SKILLS.items()}
    router = build_router(model, tok, "skills", shots, layer=2)
    # the rule by hand: centred prototypes, cosine, argmax
    protos = torch.stack(
        [pooled_states(model, [prompt_ids(tok, p) for p in shots[a]], 0, 2).mean(0) for a in SKILLS]
    )
    center = protos.mean(0)
    for adapter, task in SKILLS.items():
        held_out = [ex.messages(with_answer=False) for ex in examples(task, "test", 20)]
        states = pooled_states(model, [prompt_ids(tok, p) for p in held_out], 0, 2)
        by_hand = (F.normalize(states - center, dim=-1) @ F.normalize(protos - center, dim=-1).T).argmax(-1)
        assert router.choose(states) == [list(SKILLS)[i] for i in by_hand.tolist()]
        assert router.choose(states) == [adapter] * len(held_out)
    with pytest.raises(ValueError, match="at least two adapters"):
        build_router(model, tok, "one", {"rev": shots["rev"]})


def test_engine_routes_each_request_and_generates_like_the_chosen_adapter(tok, adapters):
    engine = Engine(base(), tok, "base", adapters, autostart=False)
    try:
        engine.add_router(
            "skills", list(SKILLS), {a: example_prompts(f"task:{t}", 8) for a, t in SKILLS.items()}
        )
        prompts = {
            a: [ex.messages(with_answer=False) for ex in examples(t, "test", 3)] for a, t in SKILLS.items()
        }
        jobs = [(p, a) for a, ps in prompts.items() for p in ps]
        done = engine.generate(
            [engine.chat_prompt(p) for p, _ in jobs], ["skills"] * len(jobs), SamplingParams(max_tokens=6)
        )
        with pytest.raises(ValueError, match="already served"):
            engine.add_router("rev", ["rev", "add"], {"rev": [], "add": []})
        with pytest.raises(ValueError, match="routed to by a router"):
            engine.unload_adapter("rev")
    finally:
        engine.shutdown()
    outputs = {
        a: generate(deltatune.load(base(), adapter=adapters[a]), tok, [p for p, _ in jobs], 6) for a in SKILLS
    }
    assert outputs["rev"] != outputs["add"]  # the choice of adapter shows in the text
    for i, ((_, adapter), req) in enumerate(zip(jobs, done, strict=True)):
        assert req.error is None and req.router == "skills" and req.adapter == adapter
        assert req.text == outputs[adapter][i]


def test_openai_client_sees_the_router_and_the_chosen_adapter(tok, adapters, tmp_path):
    from tests.test_serve import live_server

    engine = Engine(base(), tok, "base", adapters, max_batch=8)
    engine.add_router("skills", list(SKILLS), {a: example_prompts(f"task:{t}", 8) for a, t in SKILLS.items()})
    try:
        with live_server(create_app(engine)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
            cards = {m.id: m for m in client.models.list().data}
            assert cards["skills"].model_extra["routes_to"] == list(SKILLS)
            question = examples("addition", "test", 1)[0].messages(with_answer=False)
            raw = client.chat.completions.with_raw_response.create(
                model="skills", messages=question, temperature=0, max_tokens=6
            )
            resp = raw.parse()
            assert raw.headers["x-deltatune-adapter"] == "add"
            assert resp.choices[0].model_extra["adapter"] == "add"
            direct = client.chat.completions.create(
                model="add", messages=question, temperature=0, max_tokens=6
            )
            assert resp.choices[0].message.content == direct.choices[0].message.content
            with client.chat.completions.with_streaming_response.create(
                model="skills", messages=question, temperature=0, max_tokens=6, stream=True
            ) as streamed:
                assert streamed.headers["x-deltatune-adapter"] == "add"
                text = "".join(c.choices[0].delta.content or "" for c in streamed.parse() if c.choices)
            assert text == direct.choices[0].message.content
    finally:
        engine.shutdown()


def test_arrow_router_pools_arrow_scores_over_the_prompt(tok, adapters):
    """The data-free router: |cos(x, v_i)| of Arrow's prototypes, averaged over the prompt's tokens
    and the adapters' modules in the first blocks, written out here with transformers' hidden states."""
    from deltatune.formats.peft import read_lora
    from deltatune.route.arrow import top_right_singular_vector
    from deltatune.serve.router import arrow_router

    model = base().eval()
    library = {a: read_lora(adapters[a]) for a in SKILLS}
    router = arrow_router("skills", library, layer=1)
    assert router.prototypes and all(".layers.0." in p for p in router.prototypes)
    prompts = [ex.messages(with_answer=False) for t in SKILLS.values() for ex in examples(t, "test", 3)]
    rows = [prompt_ids(tok, p) for p in prompts]
    inputs = {}

    def keep(path):
        def hook(_module, args, _output):
            inputs[path] = args[0]  # returns None: the output stays as it is

        return hook

    hooks = [model.get_submodule(p).register_forward_hook(keep(p)) for p in router.prototypes]
    expected = []
    for ids in rows:
        inputs.clear()
        with torch.no_grad():
            model(torch.tensor([ids]))
        total = sum(
            (
                F.normalize(inputs[p][0], dim=-1)
                @ torch.stack(
                    [
                        top_right_singular_vector(library[a].modules[p].a, library[a].modules[p].b)
                        for a in SKILLS
                    ]
                ).T
            )
            .abs()
            .mean(0)
            for p in router.prototypes
        )
        expected.append(list(SKILLS)[int(total.argmax())])
    for h in hooks:
        h.remove()
    assert router.route(model, rows, 0) == expected
    engine = Engine(base(), tok, "base", adapters, autostart=False, router_layer=1)
    try:
        engine.add_router("free", list(SKILLS))  # no examples: Arrow's prototypes
        done = engine.generate(rows, ["free"] * len(rows), SamplingParams(max_tokens=4))
    finally:
        engine.shutdown()
    assert [r.adapter for r in done] == expected
    assert all(r.error is None and r.router == "free" for r in done)


def test_cli_router_without_examples_names_the_adapter(monkeypatch):
    monkeypatch.setattr("deltatune.serve.app.serve", lambda *a, **k: pytest.fail("must not load a model"))
    res = CliRunner().invoke(
        app,
        [
            "serve",
            "--adapter",
            "a=x",
            "--adapter",
            "b=y",
            "--router",
            "r=a,b",
            "--router-examples",
            "a=task:reversal",
        ],
    )
    assert res.exit_code == 2
    assert "--router r: adapter 'b' needs example prompts" in res.output
