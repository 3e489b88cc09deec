"""The OpenAI-compatible HTTP server around an Engine (FastAPI + uvicorn).

    GET  /health                      liveness, never needs a key
    GET  /v1/models[/{id}]            the base model and every registered adapter
    POST /v1/chat/completions         chat template applied; `model` = base name or adapter name
    POST /v1/completions              raw text prompts
    POST /v1/adapters                 {"name", "path"}: load at runtime (only under --allow-adapter-dir)
    DELETE /v1/adapters/{name}        unload: gone at once for new requests; the ones already
                                      accepted (queued or running) still finish with it
    GET  /metrics                     requests, tokens, batch sizes, adapters, responses by status

Streaming uses server-sent events with OpenAI's chunk shapes and a final `data: [DONE]`. The engine
runs on its own thread and reports through a callback; `_EventQueue` hops those events onto the
event loop with `call_soon_threadsafe`, so no request ties up a worker thread while it waits.

Every failure answers with OpenAI's error body {"error": {message, type, param, code}}: 400 for bad
parameters (pydantic errors name the parameter), 401 for a wrong API key, 403 for a path outside the
allow-list, 404 for an unknown model, 409 for a name clash, 413 for a body over `max_body_bytes`,
503 when the queue is full or the server is stopping, 500 for a request whose generation failed
(non-finite logits: that request alone). Handlers never let an exception escape, so the server
keeps serving after any bad request.

The event loop only routes: prompts are tokenized on worker threads (a multi-megabyte prompt takes
seconds, and the tokenizer releases the GIL), so /health and other requests stay responsive. A
non-streaming client that disconnects cancels its generation, as a streaming one does: a task
waits for the ASGI disconnect message beside the engine's events.

Security: the key is compared in constant time on every route but /health; adapter names must match
`ADAPTER_NAME`; a runtime load resolves the path (symlinks included) and refuses anything whose
directory or files land outside the allowed directories; only safetensors is ever read.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltatune.formats import DELTA_FILES, FormatError
from deltatune.serve import protocol as p
from deltatune.serve.engine import Engine, EngineClosedError, EngineOverloadedError, Event
from deltatune.serve.engine import Request as EngineRequest
from deltatune.serve.options import DEFAULT_MAX_BODY_BYTES
from deltatune.serve.pool import UnknownAdapterError, validate_adapter_name
from deltatune.serve.protocol import APIError
from deltatune.serve.router import example_prompts

log = logging.getLogger("deltatune.serve")
DEFAULT_CHAT_MAX_TOKENS = 512  # when the request names none (capped by the context left)
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CLIENT_GONE = 499  # nginx's status for "client closed the request" (counted, never delivered)


class StartupError(ValueError):
    """The server cannot start (port in use, bad address): one line from the CLI, exit 2."""


class _EventQueue:
    """Engine events (scheduler thread) -> an asyncio.Queue on the server's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def __call__(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class _Guard:
    """ASGI middleware: the API key on every route but /health, the body size cap (413, read here in
    full before any route sees it, so a route never parses more than the cap), and responses
    counted by status."""

    def __init__(self, app, api_key: str | None, counts: Counter, max_body_bytes: int):
        self.app, self.api_key, self.counts, self.max_body = app, api_key, counts, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key is not None and scope["path"] != "/health" and not self._authorized(scope):
            self.counts[401] += 1
            body = p.error_body(
                "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key"
            )
            return await JSONResponse(body, status_code=401)(scope, receive, send)
        body = await self._read_body(scope, receive)
        if body is None:
            self.counts[413] += 1
            message = f"the request body is larger than {self.max_body} bytes (max_body_bytes)"
            error = p.error_body(message, "invalid_request_error", None, "request_too_large")
            return await JSONResponse(error, status_code=413)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counts[message["status"]] += 1
            await send(message)

        await self.app(scope, replay, counting_send)

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None as soon as it passes the cap (declared or actually sent)."""
        declared = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.max_body:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)  # the client left; the route will see the disconnect
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )


def _param(loc: Sequence) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def allowed_path(raw: str, roots: list[Path]) -> Path:
    """Resolve an adapter path (relative ones against the first allowed root) and check the allow-list."""
    if not roots:
        raise APIError(
            403,
            "runtime adapter loading is disabled; start the server with --allow-adapter-dir DIR",
            "permission_error",
            "path",
            "adapter_loading_disabled",
        )
    if "\x00" in raw or not raw.strip():
        raise APIError(400, "path must be a non-empty directory path", param="path", code="invalid_path")
    path = Path(raw).expanduser()
    path = (path if path.is_absolute() else roots[0] / path).resolve()
    targets = [path, *((path / name).resolve() for name in DELTA_FILES)]  # every file a reader opens
    if not all(any(t.is_relative_to(root) for root in roots) for t in targets):
        raise APIError(
            403,
            f"adapter path {raw!r} is outside the allowed adapter directories",
            "permission_error",
            "path",
            "path_not_allowed",
        )
    return path


def create_app(
    engine: Engine,
    api_key: str | None = None,
    allowed_adapter_dirs: Sequence[str | Path] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The FastAPI app serving `engine`; the engine's lifecycle stays with the caller."""
    roots = []
    for d in allowed_adapter_dirs:
        root = Path(d).expanduser().resolve()
        if not root.is_dir():
            raise ValueError(f"--allow-adapter-dir {d}: not a directory")
        roots.append(root)
    counts: Counter = Counter()
    started = time.time()
    app = FastAPI(title="deltatune serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, api_key=api_key, counts=counts, max_body_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(
                p.error_body("the request body is not valid JSON", "invalid_request_error"), 400
            )
        param = _param(first.get("loc", ()))
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        body = p.error_body(
            f"{param}: {msg}" if param else msg, "invalid_request_error", param, "invalid_value"
        )
        return JSONResponse(body, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(
            p.error_body(str(err.detail), "invalid_request_error", None, code), err.status_code
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception):
        log.exception("unexpected error")
        return JSONResponse(p.error_body(f"internal error: {type(err).__name__}", "server_error"), 500)

    def adapter_for(model: str) -> str | None:
        if model == engine.model_name:
            return None
        if model in engine.pool or model in engine.routers:
            return model  # a router picks the adapter per request, in engine.submit_many
        raise APIError(404, f"The model {model!r} does not exist", param="model", code="model_not_found")

    def submit(
        req: p._Request, prompts: list[list[int]], events: _EventQueue, max_tokens: int | None, default: int
    ):
        adapter = adapter_for(req.model)
        items = []
        for ids in prompts:
            room = (engine.max_model_len or 1 << 30) - len(ids)
            limit = max_tokens if max_tokens is not None else min(default, room)
            if limit < 1:
                raise APIError(
                    400,
                    f"the prompt ({len(ids)} tokens) fills the model's context",
                    param="messages" if isinstance(req, p.ChatCompletionRequest) else "prompt",
                )
            items.append((ids, adapter, sampling(req, limit)))
        try:
            return engine.submit_many(items, on_event=events)
        except UnknownAdapterError as err:
            raise APIError(
                404, f"The model {req.model!r} does not exist", param="model", code="model_not_found"
            ) from err
        except (EngineOverloadedError, EngineClosedError) as err:
            raise APIError(503, str(err), "server_error", None, "overloaded") from err
        except ValueError as err:  # ParamError names the parameter
            raise APIError(400, str(err), param=getattr(err, "param", None)) from err

    def sampling(req: p._Request, limit: int):
        try:
            return req.sampling(limit)
        except ValueError as err:
            raise APIError(400, str(err), param=getattr(err, "param", None)) from err

    async def routed(submit_fn, req, *args):
        """Submit; a router's pick runs a (short) forward, so it runs off the event loop."""
        if req.model in engine.routers:
            return await run_in_threadpool(submit_fn, req, *args)
        return submit_fn(req, *args)

    async def watch_disconnect(http: Request, events: _EventQueue) -> None:
        """Put None in the event queue when the client goes away (the body is read: the next ASGI
        message is the disconnect, or comes when the response is complete)."""
        while (await http.receive())["type"] != "http.disconnect":
            pass
        events.queue.put_nowait(None)

    async def finished(requests: list[EngineRequest], events: _EventQueue, http: Request) -> bool:
        """Wait until every request has ended (a failed one becomes a 500); False when the client
        disconnected first: its generation is cancelled, freeing the rows."""
        watcher = asyncio.ensure_future(watch_disconnect(http, events))
        try:
            pending = len(requests)
            while pending:
                event = await events.queue.get()
                if event is None:
                    return False
                pending -= bool(event.finish_reason or event.error)
        finally:
            watcher.cancel()
            for r in requests:
                r.cancel()  # no-op for finished ones; stops generation if the client went away
        failed = next((r.error for r in requests if r.error), None)
        if failed:  # failed by a stopping engine: 503, the request itself was fine
            raise APIError(500 if engine.alive else 503, failed, "server_error")
        return True

    def usage_of(requests: list[EngineRequest]) -> dict:
        return p.usage(sum(len(r.prompt_ids) for r in requests), sum(r.completion_tokens for r in requests))

    async def stream(requests, events, first_chunks, chunk, final_usage) -> AsyncIterator[str]:
        index = {r.id: i for i, r in enumerate(requests)}
        try:
            for c in first_chunks:
                yield _sse(c)
            pending = len(requests)
            while pending:
                ev = await events.queue.get()
                if ev.error:
                    yield _sse(p.error_body(ev.error, "server_error"))
                    break
                if ev.delta:
                    yield _sse(chunk(index[ev.request_id], ev.delta, None))
                if ev.finish_reason:
                    pending -= 1
                    yield _sse(chunk(index[ev.request_id], None, ev.finish_reason))
            else:
                if final_usage is not None:
                    yield _sse(final_usage())
                yield "data: [DONE]\n\n"
        finally:
            for r in requests:
                r.cancel()

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "down"}, status_code=503)
        return {"status": "ok", "model": engine.model_name}

    @app.get("/v1/models")
    async def models():
        cards = [p.model_card(engine.model_name, None, int(started))]
        cards += [p.model_card(n, engine.model_name, int(started)) for n in engine.adapters()]
        for name, router in engine.routers.items():
            cards.append(p.model_card(name, engine.model_name, int(started)) | {"routes_to": router.adapters})
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        adapter = adapter_for(name)
        return p.model_card(name, None if adapter is None else engine.model_name, int(started))

    @app.post("/v1/chat/completions")
    async def chat(req: p.ChatCompletionRequest, http: Request):
        messages = [m.as_template_message() for m in req.messages]
        try:
            ids = await run_in_threadpool(engine.chat_prompt, messages)
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from err
        events = _EventQueue()
        requests = await routed(
            submit, req, [ids], events, req.requested_max_tokens(), DEFAULT_CHAT_MAX_TOKENS
        )
        rid = p.new_id("chatcmpl")
        if req.stream:

            def chunk(i, text, reason):
                return p.chat_chunk(rid, req.model, i, {} if text is None else {"content": text}, reason)

            first = [p.chat_chunk(rid, req.model, 0, {"role": "assistant", "content": ""}, None)]
            final = (
                (lambda: p.usage_chunk(rid, req.model, "chat.completion.chunk", usage_of(requests)))
                if req.include_usage
                else None
            )
            return _sse_response(stream(requests, events, first, chunk, final), requests)
        if not await finished(requests, events, http):
            return Response(status_code=CLIENT_GONE)
        choices = [(r.text, r.finish_reason) for r in requests]
        return _routed_json(p.chat_response(rid, req.model, choices, usage_of(requests)), requests)

    @app.post("/v1/completions")
    async def completions(req: p.CompletionRequest, http: Request):
        events = _EventQueue()
        prompts = await run_in_threadpool(lambda: [engine.text_prompt(text) for text in req.prompt])
        requests = await routed(
            submit, req, prompts, events, req.requested_max_tokens(), DEFAULT_COMPLETION_MAX_TOKENS
        )
        rid = p.new_id("cmpl")
        if req.stream:

            def chunk(i, text, reason):
                return p.completion_chunk(rid, req.model, i, text or "", reason)

            final = (
                (lambda: p.usage_chunk(rid, req.model, "text_completion", usage_of(requests)))
                if req.include_usage
                else None
            )
            return _sse_response(stream(requests, events, [], chunk, final), requests)
        if not await finished(requests, events, http):
            return Response(status_code=CLIENT_GONE)
        choices = [(r.text, r.finish_reason) for r in requests]
        return _routed_json(p.completion_response(rid, req.model, choices, usage_of(requests)), requests)

    @app.post("/v1/adapters")
    async def load_adapter(req: p.AdapterLoadRequest):
        path = allowed_path(req.path, roots)
        try:
            validate_adapter_name(req.name)
        except ValueError as err:
            raise APIError(400, str(err), param="name", code="invalid_adapter_name") from err
        if req.name == engine.model_name or req.name in engine.pool:
            raise APIError(
                409, f"a model named {req.name!r} is already loaded", param="name", code="model_exists"
            )
        try:
            await run_in_threadpool(engine.load_adapter, req.name, path)
        except FormatError as err:
            raise APIError(400, str(err), param="path", code="invalid_adapter") from err
        except ValueError as err:  # a concurrent load of the same name won
            raise APIError(409, str(err), param="name", code="model_exists") from err
        return p.model_card(req.name, engine.model_name, int(time.time()))

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        """Gone at once for new requests (404); requests already accepted for it, queued or running,
        still finish with it, and its memory is freed after the last (re-adding the name until
        then answers 409). Deferring beats failing them: they were accepted with a valid model."""
        try:
            engine.unload_adapter(name)
        except UnknownAdapterError as err:
            raise APIError(
                404, f"no adapter named {name!r} is loaded", param="name", code="model_not_found"
            ) from err
        return {"id": name, "object": "model", "deleted": True}

    @app.get("/metrics")
    async def metrics():
        data = engine.stats()
        data["http_responses"] = {str(k): v for k, v in sorted(counts.items())}
        data["uptime_s"] = round(time.time() - started, 3)
        return data

    return app


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


ADAPTER_HEADER = "x-deltatune-adapter"  # the adapter(s) a router chose, one per choice, comma-separated


def _routed_headers(requests: list[EngineRequest]) -> dict[str, str]:
    return {ADAPTER_HEADER: ",".join(r.adapter or "" for r in requests)} if requests[0].router else {}


def _routed_json(body: dict, requests: list[EngineRequest]) -> JSONResponse:
    """The response, with the adapter a router chose per choice (`choices[i].adapter`) and as a header."""
    if requests[0].router:
        for choice, r in zip(body["choices"], requests, strict=True):
            choice["adapter"] = r.adapter
    return JSONResponse(body, headers=_routed_headers(requests))


def _sse_response(chunks: AsyncIterator[str], requests: list[EngineRequest]) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", **_routed_headers(requests)}
    return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, made before the model loads so that a busy port or a bad
    address fails at once, as one line (StartupError), not after a minute of loading."""
    if not 0 <= port <= 65535:
        raise StartupError(f"port {port} is not a TCP port (0-65535)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise StartupError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine, a listener not
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def serve(
    base: str,
    adapters: dict[str, Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    allowed_adapter_dirs: Sequence[str | Path] = (),
    routers: dict[str, dict[str, str | None]] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    **engine_options,
) -> None:
    """Load the base model and adapters, then serve until interrupted (blocks).

    `routers`: served name -> {adapter: its example prompts, as `task:NAME` or a data file, or
    None for all of them: then the router uses Arrow's prototypes (serve/router.py)}.

    The engine's scheduler runs on this (the main) thread and uvicorn on a second one: torch work
    then stays on one thread, which keeps OpenMP fast (see `Engine.run`). The port is bound first
    (a busy one fails before the model loads). On Ctrl-C or SIGTERM the engine stops first, so
    every request still in flight gets its error and the HTTP server's graceful stop has nothing
    left to wait for."""
    import uvicorn

    sock = listen(host, port)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use it", host)
    try:
        engine = Engine.from_pretrained(base, adapters, autostart=False, **engine_options)
        for name, specs in (routers or {}).items():
            n = engine.options.router_examples
            shots = {a: example_prompts(spec, n) for a, spec in specs.items() if spec is not None}
            engine.add_router(name, list(specs), shots or None)
        app = create_app(engine, api_key, allowed_adapter_dirs, max_body_bytes)
    except BaseException:
        sock.close()
        raise
    gc.freeze()  # startup objects (~600k) leave the collector's view: a full pass took 0.3-0.6 s here
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    web = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="deltatune-http", daemon=True)
    if threading.current_thread() is threading.main_thread():  # SIGTERM: the same clean stop as Ctrl-C
        signal.signal(signal.SIGTERM, _interrupt)
    web.start()
    try:
        engine.run(until=lambda: not web.is_alive())
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        engine.shutdown()  # fails what is still queued or running: their handlers answer now
        web.join(10)
        sock.close()
    if not server.started:
        raise StartupError(f"the HTTP server could not start on {host}:{port} (see the log above)")
