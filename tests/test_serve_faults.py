"""Fault injection: one bad request, adapter or client never hurts another, and every request ends.

Poisons: a tiny temperature (1e-300, which overflowed the sampler), an adapter with NaN weights
(refused at load), an adapter with huge finite weights (its logits overflow to inf/NaN at run
time, so its rows must fail alone), a multi-megabyte prompt (tokenized off the event loop), bodies
over the size cap, out-of-range parameters, clients that disconnect, DELETE of an adapter with
requests queued for it, and startup errors. Oracles: single-adapter greedy generation with plain
transformers (`deltatune.train.evaluate.generate`), the same request run alone on the same server,
and what a client sees (status codes, the error's `param`, one line on stderr).
"""

from __future__ import annotations

import gc
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_serve import live_server
from transformers.utils import logging as hf_logging
from typer.testing import CliRunner

import deltatune
import deltatune.serve.app
from deltatune.cli import app as cli
from deltatune.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FormatError
from deltatune.models import load_model, load_tokenizer, tiny_llama
from deltatune.serve import Engine, SamplingParams, create_app
from deltatune.serve.lora_batch import RowAdapters
from deltatune.serve.pool import AdapterPool, UnknownAdapterError
from deltatune.train.evaluate import generate as reference_generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BASE = "tiny-base"
MAX_TOKENS = 8
PROMPTS = [[{"role": "user", "content": f"Fault case {k}: say something about {k}."}] for k in range(6)]
HUGE_PROMPT = "word " * 960_000  # 4.8 MB: seconds of tokenization, far past the 512-token context


def _poisoned(src: Path, dst: Path, poison) -> str:
    """A copy of adapter `src` whose tensors went through `poison(key, tensor)`; the first lora_A key."""
    dst.mkdir(parents=True)
    (dst / ADAPTER_CONFIG).write_text((src / ADAPTER_CONFIG).read_text())
    tensors = load_file(src / ADAPTER_WEIGHTS)
    save_file({k: poison(k, v.clone()) for k, v in tensors.items()}, dst / ADAPTER_WEIGHTS)
    return sorted(k for k in tensors if "lora_A" in k)[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faults")
    base = root / "base"
    tiny_llama(seed=0, initializer_range=0.2).save_pretrained(base)  # sharp attention: prompt-dependent
    load_tokenizer().save_pretrained(base)
    good = {
        "good-a": dict(r=4, lora_alpha=8, target_modules="all-linear"),
        "good-b": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    }
    paths = {}
    for i, (name, kw) in enumerate(good.items()):
        torch.manual_seed(40 + i)
        peft.get_peft_model(
            tiny_llama(seed=0), peft.LoraConfig(init_lora_weights=False, **kw)
        ).save_pretrained(root / name)
        paths[name] = root / name
    # finite but huge: x @ A.T @ B.T overflows fp32, so the logits of its rows are inf/NaN
    _poisoned(paths["good-a"], root / "huge", lambda k, t: t * 1e20)
    paths["huge"] = root / "huge"
    first = sorted(k for k in load_file(paths["good-a"] / ADAPTER_WEIGHTS) if "lora_A" in k)[0]
    nan_key = _poisoned(
        paths["good-a"],
        root / "nan",
        lambda k, t: t.index_fill_(0, torch.tensor([0]), float("nan")) if k == first else t,
    )
    paths["nan"] = root / "nan"
    allowed = root / "allowed"
    for name in ("nan", "good-b"):
        _poisoned(paths[name], allowed / name, lambda k, t: t)
    return {"root": root, "base": base, "adapters": paths, "nan_key": nan_key, "allowed": allowed}


@pytest.fixture(scope="module")
def tokenizer(workdir):
    return load_tokenizer(workdir["base"])


def _engine(workdir, tokenizer, names, **options) -> Engine:
    adapters = {n: workdir["adapters"][n] for n in names}
    return Engine(load_model(workdir["base"]), tokenizer, BASE, adapters, **options)


def _reference(workdir, tokenizer, adapter, prompts, max_tokens=MAX_TOKENS, **kw) -> list[str]:
    path = None if adapter is None else workdir["adapters"][adapter]
    model = deltatune.load(workdir["base"], adapter=path)
    return reference_generate(model, tokenizer, prompts, max_tokens, **kw)


def _wait_idle(engine: Engine, timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        stats = engine.stats()
        if stats["waiting"] == stats["running"] == 0:
            return stats
        time.sleep(0.01)
    raise AssertionError(f"the engine did not go idle: {engine.stats()}")


# --- the engine --------------------------------------------------------------------------------------


def test_non_finite_adapters_are_refused_at_load_naming_the_tensor(workdir, tokenizer):
    nan = workdir["adapters"]["nan"]
    with pytest.raises(FormatError) as err:
        _engine(workdir, tokenizer, ["nan"], autostart=False)
    assert str(nan / ADAPTER_WEIGHTS) in str(err.value) and workdir["nan_key"] in str(err.value)
    assert "non-finite" in str(err.value)
    engine = _engine(workdir, tokenizer, [], autostart=False)
    with pytest.raises(FormatError, match=workdir["nan_key"].replace(".", r"\.")):
        engine.load_adapter("late", nan)
    assert engine.adapters() == []


def test_poisoned_rows_fail_alone_and_every_request_ends(workdir, tokenizer):
    """A tiny temperature and a huge-weights adapter join a running batch: before, the first made
    every running row fail ("probability tensor contains inf") and itself never ended."""
    engine = _engine(workdir, tokenizer, ["good-a", "huge"])
    prompts = [engine.chat_prompt(p) for p in PROMPTS[:3]]
    long = SamplingParams(max_tokens=16, ignore_eos=True)
    try:
        running = [engine.submit(prompts[0], None, long), engine.submit(prompts[1], "good-a", long)]
        deadline = time.time() + 60
        while running[0].completion_tokens < 2 and time.time() < deadline:
            time.sleep(0.001)
        tiny = engine.submit(prompts[2], "good-a", SamplingParams(max_tokens=MAX_TOKENS, temperature=1e-300))
        bad = [
            engine.submit(prompts[0], "huge", SamplingParams(max_tokens=MAX_TOKENS)),
            engine.submit(prompts[1], "huge", SamplingParams(max_tokens=MAX_TOKENS, temperature=0.7, seed=3)),
        ]
        for req in [*running, tiny, *bad]:
            req.wait(30)
        stats = _wait_idle(engine)  # a request is done just before the scheduler drops its row
    finally:
        t0 = time.time()
        engine.shutdown()
        assert time.time() - t0 < 5
    for req, adapter, k in zip(running, [None, "good-a"], [0, 1], strict=True):
        assert req.error is None and req.completion_tokens == 16
        assert req.text == _reference(workdir, tokenizer, adapter, [PROMPTS[k]], 16, stop_token_ids=[])[0]
    assert tiny.error is None  # the limit of temperature -> 0 is greedy
    assert tiny.text == _reference(workdir, tokenizer, "good-a", [PROMPTS[2]])[0]
    for req in bad:
        assert req.text == "" and "not finite" in req.error and "'huge'" in req.error
    assert stats["requests_failed"] == 2
    engine.unload_adapter("huge")  # its holds were given back: the name can be loaded again at once
    engine.load_adapter("huge", workdir["adapters"]["huge"])


def test_an_interrupted_turn_leaves_no_request_behind(workdir, tokenizer, monkeypatch):
    """Ctrl-C / SIGTERM lands in the scheduler (serve() runs it on the main thread) while a request
    is between the queue and the batch: shutdown() still ends it and frees its adapter."""
    engine = _engine(workdir, tokenizer, ["good-a"], autostart=False)
    req = engine.submit(engine.chat_prompt(PROMPTS[0]), "good-a", SamplingParams(max_tokens=MAX_TOKENS))

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.pool, "acquire", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    engine.shutdown()
    assert req.done.is_set() and "shutting down" in req.error
    engine.unload_adapter("good-a")
    engine.load_adapter("good-a", workdir["adapters"]["good-a"])  # no claim was left behind


def test_unloading_an_adapter_lets_its_queued_requests_finish(workdir, tokenizer):
    engine = _engine(workdir, tokenizer, ["good-a"], max_batch=1, autostart=False)
    prompts = [engine.chat_prompt(p) for p in PROMPTS[:3]]
    queued = [engine.submit(p, "good-a", SamplingParams(max_tokens=MAX_TOKENS)) for p in prompts]
    engine.unload_adapter("good-a")
    assert engine.adapters() == []
    with pytest.raises(UnknownAdapterError):  # gone for new requests at once
        engine.submit(prompts[0], "good-a")
    with pytest.raises(ValueError, match="still finishing"):
        engine.load_adapter("good-a", workdir["adapters"]["good-a"])
    engine.start()
    try:
        for req in queued:
            req.wait(60)
    finally:
        engine.shutdown()
    expected = _reference(workdir, tokenizer, "good-a", PROMPTS[:3])
    assert [r.error for r in queued] == [None] * 3
    assert [r.text for r in queued] == expected
    engine.load_adapter("good-a", workdir["adapters"]["good-a"])  # freed after the last one
    assert engine.adapters() == ["good-a"]


def test_an_evicted_unloaded_adapter_is_read_back_for_its_claims(workdir):
    pool = AdapterPool(tiny_llama(seed=0), RowAdapters())
    pool.register("a", workdir["adapters"]["good-b"])
    budgeted = AdapterPool(tiny_llama(seed=0), RowAdapters(), budget_bytes=pool.used_bytes())
    budgeted.register("a", workdir["adapters"]["good-b"])
    budgeted.register("b", workdir["adapters"]["good-b"])  # evicts "a"
    assert list(budgeted.resident) == ["b"]
    budgeted.claim("a")
    budgeted.unregister("a")
    with pytest.raises(UnknownAdapterError):
        budgeted.claim("a")
    budgeted.acquire("a")  # the claim still reaches the file: read back, evicting "b"
    assert list(budgeted.resident) == ["a"]
    budgeted.release("a")
    budgeted.unclaim("a")
    assert budgeted.resident == {} and budgeted.names() == ["b"]
    budgeted.register("a", workdir["adapters"]["good-b"])


# --- the live server ---------------------------------------------------------------------------------


class HealthProbe:
    """GET /health every 20 ms on its own thread; records (sent_at, latency)."""

    def __init__(self, url: str):
        self.url, self.samples, self._stop = url, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                t0 = time.monotonic()
                assert client.get(self.url + "/health").status_code == 200
                self.samples.append((t0, time.monotonic() - t0))
                time.sleep(0.02)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def during(self, start: float, end: float) -> list[float]:
        return [lat for t, lat in self.samples if start <= t <= end]


@pytest.fixture(scope="module")
def server(workdir, tokenizer):
    engine = _engine(workdir, tokenizer, ["good-a", "good-b", "huge"], max_batch=4)
    app = create_app(engine, allowed_adapter_dirs=[workdir["allowed"]], max_body_bytes=8_000_000)
    gc.freeze()  # as serve() does after startup: full collections skip the test session's heap
    try:
        with live_server(app) as url:
            yield {"url": url, "engine": engine}
    finally:
        gc.unfreeze()
        engine.shutdown()


def _client(url: str, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=timeout)


def _chat(client, model, messages, **kw) -> str:
    kw = {"temperature": 0, "max_tokens": MAX_TOKENS, **kw}
    return client.chat.completions.create(model=model, messages=messages, **kw).choices[0].message.content


def test_health_stays_responsive_while_a_huge_prompt_is_tokenized(server):
    client = _client(server["url"])
    with HealthProbe(server["url"]) as probe:
        time.sleep(0.2)
        t0 = time.monotonic()
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": HUGE_PROMPT}])
        t1 = time.monotonic()
    assert "context" in err.value.body["message"]
    latencies = probe.during(t0, t1)
    assert len(latencies) >= 5, (t1 - t0, latencies)  # the probe really ran while the prompt was tokenized
    assert max(latencies) < 1.0, max(latencies)


def test_bodies_over_the_cap_get_413_and_nothing_else_happens(server):
    url = server["url"] + "/v1/completions"
    body = b'{"model": "tiny-base", "prompt": "' + b"x" * 8_000_001 + b'"}'
    before = server["engine"].stats()["requests_submitted"]
    declared = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)

    def chunks():  # no Content-Length: the cap counts what actually arrives
        for i in range(0, len(body), 1 << 20):
            yield body[i : i + (1 << 20)]

    streamed = httpx.post(url, content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    for resp in (declared, streamed):
        assert resp.status_code == 413, resp.text
        assert resp.json()["error"]["code"] == "request_too_large"
        assert "8000000" in resp.json()["error"]["message"]
    assert server["engine"].stats()["requests_submitted"] == before
    assert _chat(_client(server["url"]), BASE, PROMPTS[0])  # still serving


def test_out_of_range_parameters_name_themselves(server):
    client = _client(server["url"])
    for field, value in [("seed", 2**70), ("seed", -(2**64)), ("top_p", 0), ("max_tokens", 10**6)]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=BASE, messages=PROMPTS[0], **{field: value})
        assert err.value.body["param"] == field, (field, err.value.body)
    assert _chat(client, BASE, PROMPTS[0], seed=2**64 - 1, temperature=1.0)  # the largest seed is fine


def test_runtime_load_refuses_a_nan_adapter_naming_the_tensor(server, workdir):
    resp = httpx.post(
        server["url"] + "/v1/adapters",
        json={"name": "nan", "path": str(workdir["allowed"] / "nan")},
        timeout=60,
    )
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == "path" and workdir["nan_key"] in err["message"]
    assert "nan" not in server["engine"].adapters()


def test_a_non_streaming_client_that_disconnects_frees_its_row(workdir, tokenizer):
    engine = _engine(workdir, tokenizer, [])
    engine.model.register_forward_pre_hook(lambda *_: time.sleep(0.02))  # 300 tokens: >= 6 s
    try:
        with live_server(create_app(engine)) as url:
            with pytest.raises(openai.APITimeoutError):
                _chat(_client(url, timeout=0.5), BASE, PROMPTS[0], max_tokens=300)
            t0 = time.time()
            stats = _wait_idle(engine, timeout=20)
            assert time.time() - t0 < 2.0  # cancelled, not run to max_tokens
            assert stats["requests_cancelled"] == stats["requests_finished"] == 1
            assert stats["completion_tokens"] < 300
    finally:
        engine.shutdown()


def test_delete_with_requests_queued_for_the_adapter_never_500(workdir, tokenizer):
    engine = _engine(workdir, tokenizer, [], max_batch=1, autostart=False)
    app = create_app(engine, allowed_adapter_dirs=[workdir["allowed"]])
    with live_server(app) as url:
        add = {"name": "runtime", "path": str(workdir["allowed"] / "good-b")}
        assert httpx.post(url + "/v1/adapters", json=add, timeout=60).status_code == 200
        client = _client(url)
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(_chat, client, "runtime", PROMPTS[k]) for k in range(4)]
            deadline = time.time() + 30
            while engine.stats()["waiting"] < 4 and time.time() < deadline:
                time.sleep(0.01)
            assert httpx.delete(url + "/v1/adapters/runtime", timeout=60).json()["deleted"] is True
            with pytest.raises(openai.NotFoundError):  # gone for new requests
                _chat(client, "runtime", PROMPTS[0])
            again = httpx.post(url + "/v1/adapters", json=add, timeout=60)
            assert again.status_code == 409 and "still finishing" in again.json()["error"]["message"]
            engine.start()
            texts = [f.result() for f in futures]  # an error status would raise here
        assert texts == _reference(workdir, tokenizer, "good-b", PROMPTS[:4])
        assert httpx.post(url + "/v1/adapters", json=add, timeout=60).status_code == 200
    engine.shutdown()


def test_fault_storm(server, workdir):
    """Good requests beside every poison at once: each good one returns its text from running
    alone, each poisoned one gets its own error, every request ends, /health stays fast."""
    url, engine = server["url"], server["engine"]
    client = _client(url)
    good = [(m, PROMPTS[k]) for k, m in enumerate([BASE, "good-a", "good-b", "good-a", "good-b", BASE])]
    alone = [_chat(client, m, p) for m, p in good]
    greedy_a = _chat(client, "good-a", PROMPTS[5])
    base_stats = engine.stats()

    def expect_error(kind, fn, check=lambda e: True):
        try:
            fn()
        except kind as err:
            assert check(err), err
            return "refused"
        raise AssertionError(f"{fn} did not fail with {kind.__name__}")

    def disconnecting():
        with pytest.raises(openai.APITimeoutError):
            _chat(_client(url, timeout=0.3), BASE, PROMPTS[1], max_tokens=400)
        return "gone"

    def stream_then_close():
        with _client(url).chat.completions.create(
            model="good-b", messages=PROMPTS[2], max_tokens=400, temperature=0, stream=True
        ) as stream:
            next(iter(stream))
        return "gone"

    not_finite = lambda e: "not finite" in str(e)  # noqa: E731
    poisons = [
        lambda: _chat(client, "good-a", PROMPTS[5], temperature=1e-300),
        lambda: _chat(client, "good-a", PROMPTS[5], temperature=5e-324),
        lambda: expect_error(
            openai.InternalServerError, lambda: _chat(client, "huge", PROMPTS[0]), not_finite
        ),
        lambda: expect_error(
            openai.APIError, lambda: list(_chat_stream(client, "huge", PROMPTS[1])), not_finite
        ),
        lambda: expect_error(
            openai.BadRequestError,
            lambda: _chat(client, BASE, [{"role": "user", "content": HUGE_PROMPT}]),
        ),
        lambda: expect_error(
            openai.APIStatusError,
            lambda: _chat(client, BASE, [{"role": "user", "content": "y" * 8_100_000}]),
            lambda e: e.status_code == 413,
        ),
        lambda: expect_error(openai.BadRequestError, lambda: _chat(client, BASE, PROMPTS[0], seed=2**70)),
        lambda: expect_error(openai.BadRequestError, lambda: _chat(client, "good-a", PROMPTS[0], top_p=0)),
        lambda: expect_error(openai.NotFoundError, lambda: _chat(client, "nan", PROMPTS[0])),
        disconnecting,
        disconnecting,
        stream_then_close,
    ]
    with HealthProbe(url) as probe, ThreadPoolExecutor(len(good) + len(poisons)) as pool:
        t0 = time.monotonic()
        jobs = [pool.submit(fn) for fn in poisons[:3]]
        jobs += [pool.submit(_chat, client, m, p) for m, p in good]
        jobs += [pool.submit(fn) for fn in poisons[3:]]
        results = [job.result(timeout=120) for job in jobs]  # every request ends, in bounded time
        elapsed = time.monotonic() - t0
    assert results[:2] == [greedy_a, greedy_a]  # tiny temperatures sample the argmax
    assert results[3 : 3 + len(good)] == alone  # good requests: the same text as alone
    assert elapsed < 120
    latencies = probe.during(t0, t0 + elapsed)
    assert len(latencies) >= 10 and max(latencies) < 1.0, max(latencies)
    stats = _wait_idle(engine)
    new = {
        k: stats[k] - base_stats[k] for k in ("requests_submitted", "requests_failed", "requests_cancelled")
    }
    assert new["requests_failed"] == 2 and new["requests_cancelled"] == 3, new
    assert stats["requests_submitted"] == stats["requests_finished"] + stats["requests_failed"]
    # holds were released: the poisoned adapter can be deleted and added back at once
    assert httpx.delete(url + "/v1/adapters/huge", timeout=60).status_code == 200
    engine.load_adapter("huge", workdir["adapters"]["huge"])
    assert _chat(client, *good[1]) == alone[1]


def _chat_stream(client, model, messages):
    return client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=MAX_TOKENS, stream=True
    )


# --- startup -----------------------------------------------------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Startup checks that must fail before the model loads: loading it fails the test."""

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the startup check")

    monkeypatch.setattr(deltatune.serve.app.Engine, "from_pretrained", loaded)


def _one_line_exit_2(args: list[str], *expected: str) -> None:
    hf_logging.disable_progress_bar()  # as `deltatune.cli.main` does
    try:
        res = CliRunner().invoke(cli, args)
    finally:
        hf_logging.enable_progress_bar()
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output, res.output
    for text in expected:
        assert text in res.output, res.output


def test_startup_errors_are_one_line_before_the_model_loads(no_model_load):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        _one_line_exit_2(["serve", "--port", str(port)], f"127.0.0.1:{port}", "in use")
    finally:
        busy.close()
    _one_line_exit_2(["serve", "--port", "70000"], "--port 70000")
    _one_line_exit_2(["serve", "-o", "bogus=1"], "--option bogus: unknown engine option")
    _one_line_exit_2(["serve", "-o", "max_body_bytes=0"], "max_body_bytes")
    _one_line_exit_2(["serve", "--host", "no-such-host.invalid", "--port", "0"], "no-such-host.invalid")


def test_a_nan_adapter_at_startup_is_one_line(workdir, monkeypatch):
    def served(*args, **kwargs):
        raise AssertionError("a NaN adapter was loaded and served")

    monkeypatch.setattr(deltatune.serve.app, "create_app", served)
    nan = workdir["adapters"]["nan"]
    args = ["serve", "--base", str(workdir["base"]), "--adapter", f"bad={nan}", "--port", "0"]
    _one_line_exit_2(args, workdir["nan_key"], "non-finite")


def test_sigterm_with_requests_in_flight_stops_promptly(workdir):
    """Before, the HTTP thread waited (10 s) for handlers whose requests the stopped engine would
    never end; now the engine fails them first and every client gets an answer."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "deltatune", "serve", "--base", str(workdir["base"]), "--port", str(port)]
    proc = subprocess.Popen([*cmd, "-o", "max_batch=1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"model": "base", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}
        with ThreadPoolExecutor(6) as pool:
            futures = [
                pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60) for _ in range(6)
            ]
            while httpx.get(url + "/metrics", timeout=5).json()["waiting"] < 3:
                time.sleep(0.05)
            t0 = time.time()
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            stopped = time.time() - t0
            statuses = [f.result().status_code for f in futures]  # every client got an answer
    finally:
        if proc.poll() is None:
            proc.kill()
    assert stopped < 5, stopped
    assert all(s in (200, 503) for s in statuses) and 503 in statuses, statuses
    assert "Traceback" not in proc.stdout.read().decode()
