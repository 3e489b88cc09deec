"""The OpenAI-compatible server, driven by the official `openai` client against a live uvicorn server.

Oracle: single-adapter greedy generation with plain transformers + the adapter loaded on its own
(`deltatune.train.evaluate.generate`, what `deltatune generate` runs). The adapters are made by peft with
random A and B (and one by deltatune itself), with different ranks, targets, alpha, rsLoRA and a
rank_pattern, so a mixed batch has to get every row's own low-rank update right.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import peft
import pytest
import torch
import uvicorn

import deltatune
from deltatune.models import load_model, load_tokenizer, tiny_llama
from deltatune.serve import Engine, create_app
from deltatune.train.evaluate import generate as reference_generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KEY = "test-key-123"
BASE = "tiny-base"
MAX_TOKENS = 10
ADAPTERS = {  # name -> peft LoraConfig kwargs
    "a0-all-r4": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "a1-qv-r8-rs": dict(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "a2-down-o-r2": dict(r=2, lora_alpha=7, target_modules=["down_proj", "o_proj"]),
    "a3-all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
    "a4-mlp-r1": dict(r=1, lora_alpha=2, target_modules=["gate_proj", "up_proj"]),
    "a5-qk-pattern": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], rank_pattern={"k_proj": 2}),
    "a6-all-r6-rs": dict(r=6, lora_alpha=6, target_modules="all-linear", use_rslora=True),
}
OURS = "a7-deltatune"  # made with deltatune.add_delta + save_delta
PROMPTS = [[{"role": "user", "content": f"Question {k}: what is {k} plus {k + 1}?"}] for k in range(8)]


def _make_adapters(root: Path) -> dict[str, Path]:
    paths = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        model = peft.get_peft_model(tiny_llama(seed=0), peft.LoraConfig(init_lora_weights=False, **kw))
        model.save_pretrained(root / name)
        paths[name] = root / name
    model = deltatune.add_delta(
        tiny_llama(seed=0), "lora", lora_r=3, lora_alpha=6, target_modules=["q_proj", "o_proj"]
    )
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in deltatune.deltas.named_delta_parameters(model).items():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    deltatune.save_delta(model, root / OURS)
    paths[OURS] = root / OURS
    return paths


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serve")
    base = root / "base"
    tiny_llama(seed=0, initializer_range=0.2).save_pretrained(base)  # sharp attention: prompt-dependent text
    load_tokenizer().save_pretrained(base)
    allowed = root / "allowed"
    allowed.mkdir()
    return {"root": root, "base": base, "allowed": allowed, "adapters": _make_adapters(root / "adapters")}


class References:
    """Greedy outputs of the single-adapter model, computed on first use."""

    def __init__(self, workdir: dict):
        self.base, self.tokenizer = workdir["base"], load_tokenizer(workdir["base"])
        self.cache: dict = {}

    def __call__(self, adapter: Path | None, prompts: list, max_tokens: int = MAX_TOKENS) -> list[str]:
        key = (str(adapter), repr(prompts), max_tokens)
        if key not in self.cache:
            model = deltatune.load(self.base, adapter=adapter)
            self.cache[key] = reference_generate(model, self.tokenizer, prompts, max_new_tokens=max_tokens)
        return self.cache[key]


@pytest.fixture(scope="module")
def reference(workdir) -> References:
    return References(workdir)


@contextmanager
def live_server(app):
    """uvicorn on 127.0.0.1 in a thread, on a socket bound to a free port before it starts."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def server(workdir):
    base = workdir["base"]
    engine = Engine(load_model(base), load_tokenizer(base), BASE, workdir["adapters"], max_batch=16)
    app = create_app(engine, api_key=KEY, allowed_adapter_dirs=[workdir["allowed"]])
    with live_server(app) as url:
        yield {"url": url, "engine": engine}
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _chat(client, model: str, messages, **kw) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=MAX_TOKENS, **kw
    )


def _http(server, method: str, path: str, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server["url"] + path, headers=headers, timeout=60, **kw)


def _assert_error(
    resp: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


# --- tests ------------------------------------------------------------------------------------------


def test_models_lists_base_and_adapters(client, workdir):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE, *workdir["adapters"]}
    assert all(getattr(models[name], "parent", None) == BASE for name in workdir["adapters"])
    assert client.models.retrieve(OURS).id == OURS


def test_chat_per_adapter_equals_single_adapter_generate(client, workdir, reference):
    prompt = PROMPTS[0]
    outputs = {None: _chat(client, BASE, prompt).choices[0].message.content}
    assert outputs[None] == reference(None, [prompt])[0]
    for name, path in workdir["adapters"].items():
        reply = _chat(client, name, prompt)
        assert reply.choices[0].message.content == reference(path, [prompt])[0], name
        assert reply.usage.completion_tokens >= 1 and reply.model == name
        outputs[name] = reply.choices[0].message.content
    assert len(set(outputs.values())) >= 7  # the adapters really change the output


def test_64_concurrent_requests_over_8_adapters(client, server, workdir, reference):
    names = list(workdir["adapters"])
    jobs = [(names[i % 8], PROMPTS[i // 8]) for i in range(64)]
    with ThreadPoolExecutor(64) as pool:
        replies = list(pool.map(lambda job: _chat(client, job[0], job[1]), jobs))
    expected = {name: reference(workdir["adapters"][name], PROMPTS) for name in names}
    for (name, prompt), reply in zip(jobs, replies, strict=True):
        assert reply.choices[0].message.content == expected[name][PROMPTS.index(prompt)], (name, prompt)
    histogram = server["engine"].stats()["batch_size_histogram"]
    assert max(int(size) for size in histogram) > 1  # rows of different adapters shared decode steps


def test_streaming_chunks_concatenate_to_the_full_text(client):
    for model in (BASE, OURS, "a3-all-r16"):
        full = _chat(client, model, PROMPTS[1]).choices[0].message.content
        chunks = list(_chat(client, model, PROMPTS[1], stream=True, stream_options={"include_usage": True}))
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_completions_raw_prompt_and_stream(client, workdir, reference):
    text = "The capital of France is"
    expected = reference(workdir["adapters"]["a0-all-r4"], [text])[0]
    reply = client.completions.create(model="a0-all-r4", prompt=text, temperature=0, max_tokens=MAX_TOKENS)
    assert reply.choices[0].text == expected and reply.object == "text_completion"
    stream = client.completions.create(
        model="a0-all-r4", prompt=text, temperature=0, max_tokens=MAX_TOKENS, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == expected


def test_stop_strings_cut_the_text(client, workdir, reference):
    full = reference(workdir["adapters"][OURS], [PROMPTS[2]])[0]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3
    cut = full[: full.index(stop)]
    reply = _chat(client, OURS, PROMPTS[2], stop=[stop])
    assert reply.choices[0].message.content == cut and reply.choices[0].finish_reason == "stop"
    chunks = _chat(client, OURS, PROMPTS[2], stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut


def test_sampling_seed_and_top_p(client, workdir, reference):
    kw = dict(model="a3-all-r16", messages=PROMPTS[3], max_tokens=MAX_TOKENS)
    first = client.chat.completions.create(temperature=1.0, seed=11, **kw).choices[0].message.content
    again = client.chat.completions.create(temperature=1.0, seed=11, **kw).choices[0].message.content
    assert first == again
    others = {
        client.chat.completions.create(temperature=1.0, seed=s, **kw).choices[0].message.content
        for s in (1, 2, 3)
    }
    assert len(others | {first}) > 1
    # a nucleus this small keeps only the most likely token: sampling becomes greedy
    nucleus = (
        client.chat.completions.create(temperature=1.0, top_p=1e-6, seed=5, **kw).choices[0].message.content
    )
    assert nucleus == reference(workdir["adapters"]["a3-all-r16"], [PROMPTS[3]])[0]


def test_bad_requests_get_openai_errors_and_the_server_survives(client, server):
    with pytest.raises(openai.NotFoundError) as err:
        _chat(client, "no-such-model", PROMPTS[0])
    assert err.value.status_code == 404 and err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=BASE, messages=PROMPTS[0], temperature=5)
    assert err.value.body["param"] == "temperature"
    bad_key = openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad_key.models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=BASE, messages=PROMPTS[0], n=2)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=BASE, messages=[])
    assert err.value.body["param"] == "messages"

    _assert_error(_http(server, "POST", "/v1/chat/completions", content=b"{not json"), 400)
    _assert_error(
        _http(
            server,
            "POST",
            "/v1/chat/completions",
            json={"model": BASE, "messages": [{"role": "wizard", "content": "x"}]},
        ),
        400,
        "messages[0].role",
    )
    _assert_error(
        _http(server, "POST", "/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 100000}),
        400,
        "max_tokens",
    )
    _assert_error(
        _http(
            server, "POST", "/v1/chat/completions", json={"model": BASE, "messages": PROMPTS[0], "top_p": 0}
        ),
        400,
        "top_p",
    )
    _assert_error(_http(server, "GET", "/v1/nowhere"), 404)
    _assert_error(_http(server, "GET", "/metrics", key=None), 401)
    assert _http(server, "GET", "/health", key=None).json()["status"] == "ok"

    assert _chat(client, BASE, PROMPTS[0]).choices[0].message.content  # still serving


def test_runtime_load_and_unload(client, server, workdir, reference):
    allowed = workdir["allowed"]
    source = workdir["adapters"]["a1-qv-r8-rs"]
    (allowed / "mine").mkdir()
    for f in source.iterdir():
        (allowed / "mine" / f.name).write_bytes(f.read_bytes())
    resp = _http(server, "POST", "/v1/adapters", json={"name": "runtime-one", "path": str(allowed / "mine")})
    assert resp.status_code == 200, resp.text
    assert "runtime-one" in {m.id for m in client.models.list().data}
    assert (
        _chat(client, "runtime-one", PROMPTS[4]).choices[0].message.content
        == reference(source, [PROMPTS[4]])[0]
    )
    _assert_error(
        _http(server, "POST", "/v1/adapters", json={"name": "runtime-one", "path": "mine"}), 409, "name"
    )

    assert _http(server, "DELETE", "/v1/adapters/runtime-one").json()["deleted"] is True
    assert "runtime-one" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        _chat(client, "runtime-one", PROMPTS[4])
    _assert_error(_http(server, "DELETE", "/v1/adapters/runtime-one"), 404)
    # relative paths resolve inside the first allowed directory
    assert (
        _http(server, "POST", "/v1/adapters", json={"name": "runtime-two", "path": "mine"}).status_code == 200
    )
    assert _http(server, "DELETE", "/v1/adapters/runtime-two").status_code == 200


def test_runtime_load_refuses_unsafe_paths_and_names(server, workdir):
    allowed, outside = workdir["allowed"], workdir["adapters"]["a0-all-r4"]
    post = lambda name, path: _http(server, "POST", "/v1/adapters", json={"name": name, "path": str(path)})  # noqa: E731
    _assert_error(post("x1", outside), 403, "path", "path_not_allowed")
    _assert_error(post("x2", allowed / ".." / "adapters" / "a0-all-r4"), 403, "path", "path_not_allowed")
    (allowed / "link").symlink_to(outside, target_is_directory=True)
    _assert_error(post("x3", allowed / "link"), 403, "path", "path_not_allowed")
    (allowed / "sneaky").mkdir()
    (allowed / "sneaky" / "adapter_config.json").write_text((outside / "adapter_config.json").read_text())
    os.symlink(outside / "adapter_model.safetensors", allowed / "sneaky" / "adapter_model.safetensors")
    _assert_error(post("x4", allowed / "sneaky"), 403, "path", "path_not_allowed")
    (allowed / "pickled").mkdir()
    (allowed / "pickled" / "adapter_config.json").write_text((outside / "adapter_config.json").read_text())
    (allowed / "pickled" / "adapter_model.bin").write_bytes(b"not loaded")
    err = _assert_error(post("pickled", allowed / "pickled"), 400, "path", "invalid_adapter")
    assert "pickle" in err["message"]
    (allowed / "ok").mkdir()
    for f in outside.iterdir():
        (allowed / "ok" / f.name).write_bytes(f.read_bytes())
    for bad_name in ("../evil", "has space", "", "-lead", "x" * 65, BASE):
        _assert_error(post(bad_name, allowed / "ok"), 409 if bad_name == BASE else 400, "name")
    assert "pickled" not in server["engine"].adapters()


def test_metrics_report_requests_tokens_batches_adapters(server):
    data = _http(server, "GET", "/metrics").json()
    assert data["requests_finished"] >= 64 and data["completion_tokens"] >= 64
    assert data["mean_batch_size"] >= 1 and data["batch_size_histogram"]
    assert set(data["adapters"]["resident"]) >= {"a0-all-r4", OURS}
    assert data["http_responses"]["200"] >= 64


def test_full_queue_answers_503_then_recovers(workdir):
    base = workdir["base"]
    engine = Engine(load_model(base), load_tokenizer(base), BASE, max_batch=1, max_queue=2, autostart=False)
    with live_server(create_app(engine)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(_chat, client, BASE, PROMPTS[k]) for k in range(2)]
            deadline = time.time() + 30
            while engine.stats()["waiting"] < 2 and time.time() < deadline:
                time.sleep(0.01)
            with pytest.raises(openai.InternalServerError) as err:
                _chat(client, BASE, PROMPTS[2])
            assert err.value.status_code == 503 and err.value.body["code"] == "overloaded"
            engine.start()
            assert all(f.result().choices[0].message.content for f in waiting)
        assert _chat(client, BASE, PROMPTS[2]).choices[0].finish_reason in ("stop", "length")
    engine.shutdown()
