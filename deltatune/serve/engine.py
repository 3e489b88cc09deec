"""Continuous batching over one base model with many LoRA adapters.

One scheduler loop owns the model (`Engine.run`: on the main thread under `deltatune serve`, or on
a background thread after `start()`). Each turn it

    1. admits waiting requests up to `max_batch` running rows: each takes a hold on its adapter in
       the pool (loading it from disk if it was evicted; a request whose adapter cannot fit yet
       because running requests hold the budget waits for a later turn);
    2. prefills the admitted group in one forward (left-padded, `logits_to_keep=1`) into a fresh
       `DynamicCache`, samples each row's first token, and merges the group into the running batch;
    3. runs one decode step for every running row together and samples the next tokens;
    4. drops rows that finished (stop token, stop string, max_tokens, cancelled) from the batch.

So requests join and leave between decode steps. Every request ends, finished or failed, and gives
its adapter back to the pool: a row whose logits are not finite, or whose sampling fails, fails
alone (the batch goes on without it); an error in a whole forward fails the rows of that forward,
those being admitted included; `shutdown()` fails whatever is still queued, admitted or running.
A request claims its adapter when it is submitted, so unloading the adapter meanwhile lets the
queued requests still run with it (see serve/pool.py). The KV cache layout (one left-padded
DynamicCache, a 2-D mask and per-row positions; merged on join, re-packed on leave) is described in
`serve/kv.py`; it was chosen over one cache per request because transformers' attention then runs
once per layer for the whole batch, and over a preallocated static cache because CPU serving here
favours small, exact tensors over padding to a maximum length. Which adapter each row uses is set
in the shared `RowAdapters` whenever the batch composition changes; every wrapped linear adds its
per-row low-rank part (see `serve/lora_batch.py`).

With `prepack=True` (the default) every linear layer, the output head included, also keeps its
weight in oneDNN's blocked layout and runs through it: on this project's AMD CPUs that is 2-3x
faster than `F.linear` at serving batch sizes, for a second copy of the linear weights in memory.
It changes results by float rounding only (as batching itself does).

Prompts are tokenized exactly as `deltatune generate` does (`deltatune.data.tokenize.prompt_ids`), and
generation stops at the same tokens (EOS plus the chat template's end-of-turn token), so greedy
output for a request equals `deltatune generate` with that adapter. Results reach the caller through
an `on_event` callback (called on the scheduler thread; it must not block) and `Request.wait()`.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from deltatune.data.tokenize import Prompt, left_pad, prompt_ids, stop_token_ids
from deltatune.formats.peft import read_lora
from deltatune.serve.kv import BatchKV, prefill_positions
from deltatune.serve.lora_batch import RowAdapters
from deltatune.serve.options import DTYPES, EngineOptions
from deltatune.serve.pool import AdapterPool, PoolBusyError, UnknownAdapterError, validate_adapter_name
from deltatune.serve.router import RequestRouter, arrow_router, build_router
from deltatune.serve.sampling import ParamError, SamplingParams, TextStream, choose_tokens, make_generator


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; the caller should retry later (HTTP 503)."""


class EngineClosedError(RuntimeError):
    """The engine is shutting down and takes no new requests."""


@dataclass
class Event:
    """Something happened to a request: new text, the end (with its reason), or an error."""

    request_id: int
    delta: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    error: str | None = None


_request_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    on_event: Callable[[Event], None] | None = None
    router: str | None = None  # the router that chose `adapter`, if one did
    id: int = field(default_factory=lambda: next(_request_ids))
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False
    slot: int = 0
    last_token: int = -1
    claimed: bool = False  # holds a claim on `adapter` in the pool (given back when it ends)
    created: float = field(default_factory=time.time)
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.generator = make_generator(self.params.seed)
        self.stream: TextStream | None = None

    def cancel(self) -> None:
        """Stop generating for this request at the next step (a client went away)."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> Request:
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish in {timeout} s")
        return self


@dataclass
class EngineMetrics:
    requests_submitted: int = 0
    requests_finished: int = 0
    requests_failed: int = 0
    requests_rejected: int = 0
    requests_cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_forwards: int = 0
    decode_steps: int = 0
    batch_sizes: Counter = field(default_factory=Counter)  # decode steps by number of rows

    def snapshot(self) -> dict:
        steps = sum(self.batch_sizes.values())
        rows = sum(size * n for size, n in self.batch_sizes.items())
        data = {k: v for k, v in self.__dict__.items() if k != "batch_sizes"}
        data["batch_size_histogram"] = {str(k): v for k, v in sorted(self.batch_sizes.items())}
        data["mean_batch_size"] = rows / steps if steps else 0.0
        return data


class Engine:
    """Owns the model, the adapter pool and the scheduler loop; `submit` is thread-safe.

    `options` are EngineOptions keys (validated there). autostart: run the scheduler on a
    background thread now (False: call `run()` yourself, or let `generate()` drive it).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        model_name: str = "base",
        adapters: dict[str, str | Path] | None = None,
        autostart: bool = True,
        **options: Any,
    ):
        self.options = opts = EngineOptions(**options)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_batch, self.max_queue = opts.max_batch, opts.max_queue
        self.device = next(model.parameters()).device
        self.max_model_len = getattr(model.config, "max_position_embeddings", None)
        self.stop_ids = frozenset(stop_token_ids(tokenizer))
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.stop_ids, default=0)
        self.routing = RowAdapters()
        self.routers: dict[str, RequestRouter] = {}
        self.pool = AdapterPool(self.model, self.routing, opts.adapter_budget_bytes, opts.prepack)
        if opts.prepack:
            self.pool.wrap_all_linear()
        for name, path in (adapters or {}).items():
            self.load_adapter(name, path)
        self.metrics = EngineMetrics()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._admitting: list[Request] = []  # taken from the queue this turn, not yet running
        self._kv: BatchKV | None = None
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._running_loops = 0
        if autostart:
            self.start()

    @classmethod
    def from_pretrained(
        cls,
        base: str | Path | None = None,
        adapters: dict[str, str | Path] | None = None,
        dtype: torch.dtype | str = torch.float32,
        device: str = "cpu",
        model_name: str | None = None,
        autostart: bool = True,
        **options,
    ) -> Engine:
        """Load the base model and tokenizer (see deltatune.models) and register `adapters`."""
        from deltatune.models import load_model, load_tokenizer, resolve

        EngineOptions(**options)  # a bad option fails before the model loads
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        model = load_model(base, dtype=dtype, device=device)
        name = model_name or resolve(base).name
        return cls(model, load_tokenizer(base), name, adapters, autostart, **options)

    # --- adapters -------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str | Path) -> None:
        if name == self.model_name:
            raise ValueError(f"adapter name {name!r} is the base model's name")
        self.pool.register(name, path)

    def unload_adapter(self, name: str) -> None:
        if any(name in r.adapters for r in self.routers.values()):
            raise ValueError(f"adapter {name!r} is routed to by a router; remove the router first")
        self.pool.unregister(name)

    def add_router(
        self, name: str, adapters: list[str], examples: dict[str, list[Prompt]] | None = None
    ) -> RequestRouter:
        """Serve `name` as a request-level router over `adapters` (serve/router.py): a centroid
        router when each adapter has a few example prompts of its skill, else Arrow's prototypes."""
        validate_adapter_name(name)
        if name == self.model_name or name in self.pool or name in self.routers:
            raise ValueError(f"a model named {name!r} is already served")
        unknown = [a for a in adapters if a not in self.pool]
        if unknown:
            raise UnknownAdapterError(unknown[0])
        layer = self.options.router_layer
        if examples is None:
            router = arrow_router(name, {a: read_lora(self.pool.paths[a]) for a in adapters}, layer)
        else:
            with self._base_rows():
                router = build_router(
                    self.model, self.tokenizer, name, {a: examples[a] for a in adapters}, layer
                )
        self.routers[name] = router
        return router

    def route(self, router: str, prompt: list[int]) -> str:
        """The adapter `router` picks for `prompt`."""
        with self._base_rows():
            return self.routers[router].route(self.model, [prompt], self.pad_id)[0]

    @contextlib.contextmanager
    def _base_rows(self):
        """Run a base-model forward between the scheduler's steps, then restore its routing."""
        with self.pool.lock:
            saved = self.routing.slots or []
            self.routing.set([])
            try:
                yield
            finally:
                self.routing.set(saved)

    def adapters(self) -> list[str]:
        return self.pool.names()

    # --- prompts --------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation under the chat template, ready for the assistant's turn."""
        return prompt_ids(self.tokenizer, messages)

    def text_prompt(self, text: str) -> list[int]:
        return prompt_ids(self.tokenizer, text)

    # --- requests -------------------------------------------------------------------------------
    def submit(
        self,
        prompt: list[int],
        adapter: str | None = None,
        params: SamplingParams | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> Request:
        """Queue one request; raises UnknownAdapterError, ValueError or EngineOverloadedError."""
        return self.submit_many([(prompt, adapter, params or SamplingParams())], on_event)[0]

    def submit_many(
        self,
        items: list[tuple[list[int], str | None, SamplingParams]],
        on_event: Callable[[Event], None] | None = None,
    ) -> list[Request]:
        """Queue several requests at once (all or none), so the scheduler can prefill them together."""
        requests = [self._new_request(p, a, s, on_event) for p, a, s in items]
        try:
            for req in requests:  # the adapter stays for these requests even if it is unloaded now
                if req.adapter is not None:
                    self.pool.claim(req.adapter)
                    req.claimed = True
            with self._cv:
                if self._closing:
                    raise EngineClosedError("the engine is shutting down")
                if len(self._waiting) + len(requests) > self.max_queue:
                    self.metrics.requests_rejected += len(requests)
                    raise EngineOverloadedError(
                        f"the server is overloaded ({len(self._waiting)} requests waiting); retry later"
                    )
                self._waiting.extend(requests)
                self.metrics.requests_submitted += len(requests)
                self._cv.notify()
        except BaseException:
            for req in requests:
                self._release(req)
            raise
        return requests

    def generate(
        self, prompts: list[list[int]], adapters: list[str | None], params: SamplingParams
    ) -> list[Request]:
        """Submit a batch and wait for all of it (tests, benchmarks). Without a scheduler running
        elsewhere, the calling thread runs it (the fast place: see `run`)."""
        requests = self.submit_many([(p, a, params) for p, a in zip(prompts, adapters, strict=True)])
        if self._thread is None and not self._running_loops:
            self.run(until=lambda: all(r.done.is_set() for r in requests))
        return [r.wait() for r in requests]

    def _new_request(self, prompt, adapter, params, on_event) -> Request:
        router = adapter if adapter in self.routers else None
        if router is not None and prompt:
            adapter = self.route(router, prompt)
        if adapter is not None and adapter not in self.pool:
            raise UnknownAdapterError(adapter)
        if not prompt:
            raise ParamError("the prompt is empty", "prompt")
        if self.max_model_len is not None and len(prompt) + params.max_tokens > self.max_model_len:
            raise ParamError(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"the model's context of {self.max_model_len} tokens",
                "max_tokens",
            )
        req = Request(list(prompt), adapter, params, on_event, router)
        req.stream = TextStream(self.tokenizer, params.stop)
        return req

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the scheduler on a background thread (convenient; `run` in the main thread is faster)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.run, name="deltatune-engine", daemon=True)
            self._thread.start()

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """The scheduler loop in the calling thread, until `shutdown()` or, when idle, `until()`.

        Best called from the thread that does the process's other torch work (`serve()` runs it on
        the main thread and HTTP on a second one): once a second thread has its own OpenMP team,
        libgomp throttles spin-waiting and every parallel region pays a wake-up; measured here,
        decode steps ran 25-50% slower on a second thread.
        """
        self._running_loops += 1
        try:
            while self._turn(until):
                pass
        finally:
            self._running_loops -= 1

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the scheduler; requests still waiting, being admitted or running end with an error."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cv:
            pending = [*self._running, *self._admitting, *self._waiting]
            self._running, self._admitting, self._kv = [], [], None
            self._waiting.clear()
        for req in pending:
            self._fail(req, "the server is shutting down")

    @property
    def alive(self) -> bool:
        """Whether a scheduler loop is running (on any thread)."""
        return self._running_loops > 0

    def stats(self) -> dict:
        with self._cv:
            data = self.metrics.snapshot()
            data["waiting"], data["running"] = len(self._waiting), len(self._running)
        data["adapters"] = self.pool.describe()
        return data

    # --- the scheduler --------------------------------------------------------------------------
    def _turn(self, until: Callable[[], bool] | None) -> bool:
        """One turn: admit and prefill newcomers, one decode step. False when the loop should end."""
        with self._cv:
            while not self._closing and not self._running and not self._admissible():
                if until is not None and until():
                    return False
                self._cv.wait(timeout=0.5 if until is None else 0.01)
            if self._closing:
                return False
            candidates = self._admitting = self._take_waiting()
        try:
            with torch.inference_mode():
                group = self._admit(candidates)
                if group:
                    self._prefill(group)
                if self._running:
                    self._decode_step()
                elif candidates and not group:
                    time.sleep(0.01)  # everything waits for pool room: do not spin
        except Exception as err:  # noqa: BLE001 - one bad step must not kill the server
            for req in [*self._running, *candidates]:  # a request always ends (done ones are skipped)
                self._fail(req, f"generation failed: {type(err).__name__}: {err}")
            self._running, self._kv = [], None
            self._route_running()
        self._admitting = []  # not on KeyboardInterrupt: then shutdown() fails them
        return True

    def _admissible(self) -> bool:
        return bool(self._waiting) and len(self._running) < self.max_batch

    def _take_waiting(self) -> list[Request]:
        room = self.max_batch - len(self._running)
        return [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]

    def _admit(self, candidates: list[Request]) -> list[Request]:
        """Hold each candidate's adapter; those that must wait for pool room go back to the queue."""
        group, retry = [], []
        for req in candidates:
            if req.cancelled:
                self._finish(req, "cancelled")
                continue
            try:
                req.slot = self.pool.acquire(req.adapter) if req.adapter is not None else 0
            except PoolBusyError:
                retry.append(req)
                continue
            except Exception as err:  # noqa: BLE001 - unloaded meanwhile, or its file went bad
                self._fail(req, str(err))
                continue
            group.append(req)
        if retry:
            with self._cv:
                self._waiting.extendleft(reversed(retry))
        return group

    def _prefill(self, group: list[Request]) -> None:
        try:
            ids, mask = left_pad([r.prompt_ids for r in group], self.pad_id)
            ids, mask = ids.to(self.device), mask.to(self.device)
            with self.pool.lock:
                self.routing.set([r.slot for r in group])
                out = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=prefill_positions(mask),
                    past_key_values=DynamicCache(config=self.model.config),
                    use_cache=True,
                    logits_to_keep=1,
                )
        except Exception as err:  # noqa: BLE001 - fail this group only; the running batch goes on
            for req in group:
                self._fail(req, f"prefill failed: {type(err).__name__}: {err}")
            self._route_running()
            return
        self.metrics.prefill_forwards += 1
        self.metrics.prompt_tokens += int(mask.sum())
        kv = BatchKV(out.past_key_values, mask)
        keep = self._next_tokens(group, out.logits[:, -1])
        if keep:
            if len(keep) < len(group):
                kv.select(keep)
            if self._kv is None:
                self._kv = kv
            else:
                self._kv.merge(kv)
            self._running.extend(group[i] for i in keep)
        self._route_running()

    def _decode_step(self) -> None:
        kv, rows = self._kv, self._running
        mask, positions = kv.step_inputs()
        tokens = torch.tensor([[r.last_token] for r in rows], dtype=torch.long, device=self.device)
        with self.pool.lock:
            out = self.model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=kv.cache,
                use_cache=True,
            )
        kv.advance()
        self.metrics.decode_steps += 1
        self.metrics.batch_sizes[len(rows)] += 1
        keep = self._next_tokens(rows, out.logits[:, -1])
        if len(keep) < len(rows):
            self._running = [rows[i] for i in keep]
            if keep:
                kv.select(keep)
            else:
                self._kv = None
            self._route_running()

    def _route_running(self) -> None:
        """Point every wrapped layer at the running rows' adapters (under the lock, like forwards)."""
        with self.pool.lock:
            self.routing.set([r.slot for r in self._running])

    def _next_tokens(self, rows: list[Request], logits: torch.Tensor) -> list[int]:
        """Sample and apply each row's next token; the indices of the rows that go on. A row that
        cannot continue (non-finite logits) fails alone."""
        tokens, failed = choose_tokens(logits, [r.params for r in rows], [r.generator for r in rows])
        keep = []
        for i, (req, token) in enumerate(zip(rows, tokens, strict=True)):
            if i in failed:
                source = f"adapter {req.adapter!r}" if req.adapter else "the base model"
                self._fail(req, f"generation failed: {failed[i]} with {source}")
            elif self._accept(req, token):
                keep.append(i)
        return keep

    def _accept(self, req: Request, token: int) -> bool:
        """Apply one sampled token to a request; False when the request is finished."""
        if req.cancelled:
            self._finish(req, "cancelled")
            return False
        req.completion_tokens += 1
        self.metrics.completion_tokens += 1
        if token in self.stop_ids and not req.params.ignore_eos:
            self._finish(req, "stop", req.stream.finish())  # text held back for a stop string is real text
            return False
        delta = req.stream.push(token)
        if req.stream.stopped:
            self._finish(req, "stop", delta)
            return False
        if req.completion_tokens >= req.params.max_tokens:
            self._finish(req, "length", delta + req.stream.finish())
            return False
        req.last_token = token
        if delta:
            req.text += delta
            self._emit(req, Event(req.id, delta))
        return True

    def _finish(self, req: Request, reason: str, delta: str = "") -> None:
        req.text += delta
        req.finish_reason = reason
        self._release(req)
        self.metrics.requests_finished += 1
        self.metrics.requests_cancelled += reason == "cancelled"
        self._emit(req, Event(req.id, delta, finish_reason=reason))
        req.done.set()

    def _fail(self, req: Request, message: str) -> None:
        if req.done.is_set():
            return
        req.error = message
        self._release(req)
        self.metrics.requests_failed += 1
        self._emit(req, Event(req.id, error=message))
        req.done.set()

    def _release(self, req: Request) -> None:
        """Give back the request's slot hold and its claim on the adapter (each exactly once)."""
        if req.slot and req.adapter is not None:
            self.pool.release(req.adapter)
            req.slot = 0
        if req.claimed:
            req.claimed = False
            self.pool.unclaim(req.adapter)

    @staticmethod
    def _emit(req: Request, event: Event) -> None:
        if req.on_event is not None:
            with contextlib.suppress(Exception):  # a broken listener must not stop the batch
                req.on_event(event)
