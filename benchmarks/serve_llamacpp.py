"""CPU serving: deltatune's engine against llama.cpp (llama-cpp-python), same model, same prompts.

    python benchmarks/serve_llamacpp.py --llama-cpp-dir DIR      # 32 rows x 64 new tokens, 3 rounds
    python benchmarks/serve_llamacpp.py --llama-cpp-dir DIR --rows 4 --new-tokens 4 --repeats 1   # smoke
    python benchmarks/serve_llamacpp.py --llama-cpp-dir DIR --profile   # plus torch.profiler top ops

Needs llama-cpp-python (a benchmark-only environment: it compiles llama.cpp) and its vendored
llama.cpp sources for `convert_lora_to_gguf.py` (DIR: `vendor/llama.cpp` of the llama-cpp-python
sdist, or the env var LLAMA_CPP_DIR). Run it alone: both sides use every core.

On the default model (SmolLM2-135M-Instruct), short chat prompts rendered with the chat template
(the same token ids on both sides, tokenized by deltatune), greedy, exactly `new_tokens` new tokens
per row (stop tokens ignored on both sides, so the work is equal). Cases:

  single         1 stream, base model            llama.cpp and deltatune
  single_lora    1 stream, one LoRA adapter       llama.cpp and deltatune
  batch          `rows` streams decoded together  llama.cpp and deltatune
  batch_lora     `rows` streams, one LoRA         llama.cpp and deltatune
  batch_distinct `rows` streams, `rows` distinct LoRAs    deltatune only (llama.cpp applies its
                 adapters to the whole context); reported against the engine's own `batch`

llama.cpp runs the f16 GGUF that `deltatune export OUT.gguf --format gguf --gguf-type f16` writes
(`--gguf-type` picks another), through the low-level API as its `batched` example does: one
llama_batch holding every stream's prompt (its own seq_id each) for the prefill, then one
llama_decode per step with one token per stream, greedy argmax over the logits, each new token
detokenized (llama_token_to_piece). Its context is the library default otherwise (f16 KV cache,
flash attention "auto", one KV stream per sequence) with n_threads = n_threads_batch =
os.cpu_count(); f16 weights mean f16 activations in the matmuls (ggml's vec_dot type for F16),
fp32 accumulation and fp32 elsewhere. The adapter is a random rank-16 LoRA on every linear layer
but the head (as benchmarks/serve_throughput.py makes them), converted to GGUF by llama.cpp's own
convert_lora_to_gguf.py (`--lora-type`, default f16) and applied unmerged with
llama_adapter_lora_init + llama_set_adapters_lora. llama.cpp runs in its own process (its OpenMP
runtime apart from torch's), waiting on a pipe while deltatune runs.

deltatune runs its serving engine in this process (`Engine.generate`, the scheduler on the main
thread, as `deltatune serve` runs it) with the model in `--dtype` (float32, the engine's default:
weights, activations, KV cache and adapter stacks in fp32, linear layers through prepacked oneDNN
weights; bfloat16 runs everything in bf16 through F.linear) and torch's default thread count.

Each case is timed as the whole batch (prefill included) and as decode alone (after the prefill,
which also picks each row's first token): tokens/s = rows x new tokens / wall seconds, and rows x
(new tokens - 1) / decode seconds. Runs are interleaved round-robin (`--repeats` rounds, the order
of the two systems alternating per round), each starting when the machine is quiet
(serve_throughput.QuietGate); ratios deltatune / llama.cpp are the median over rounds of each
round's ratio. The greedy texts of the two sides are compared row by row (llama.cpp's token ids
decoded by the same tokenizer call the engine uses); they may differ by precision (f16 vs fp32).
`--profile` adds torch.profiler's top ops over a few of the engine's decode steps on the base model
(`--profile-rows` streams, default 1: the single-stream step), after the timed runs.
Writes benchmarks/out/serve_llamacpp.{json,md}; the GGUF files and adapters are cached under
benchmarks/out/cache/serve_llamacpp/.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
CACHE = OUT / "cache" / "serve_llamacpp"
ADAPTER = "lora-00"  # the adapter converted for llama.cpp (the others serve batch_distinct)
PAIRED = ("single", "single_lora", "batch", "batch_lora")


# --- llama.cpp, in its own process -------------------------------------------------------------
class LlamaCppRunner:
    """A llama.cpp model with one LoRA adapter and one context per stream count (low-level API)."""

    def __init__(self, gguf: str, lora: str, threads: int):
        import llama_cpp as lc
        from llama_cpp._logger import set_verbose

        set_verbose(False)
        self.lc, self.threads = lc, threads
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = lc.llama_model_load_from_file(gguf.encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.adapter = lc.llama_adapter_lora_init(self.model, lora.encode())
        if not self.adapter:
            raise RuntimeError(f"llama.cpp could not load the LoRA {lora}")
        self.contexts: dict[tuple[int, int], tuple] = {}
        self.piece = ctypes.create_string_buffer(256)

    def _context(self, streams: int, per_stream: int):
        key = (streams, per_stream)
        if key not in self.contexts:
            lc = self.lc
            params = lc.llama_context_default_params()
            params.n_ctx = streams * per_stream  # one KV stream per sequence (kv_unified false)
            params.n_seq_max = streams
            params.n_batch = streams * per_stream  # the whole prefill in one llama_decode
            params.n_threads = params.n_threads_batch = self.threads
            ctx = lc.llama_init_from_model(self.model, params)
            if not ctx:
                raise RuntimeError(f"llama.cpp could not make a context for {streams} streams")
            self.contexts[key] = (ctx, lc.llama_batch_init(params.n_batch, 0, 1))
        return self.contexts[key]

    def generate(self, prompts: list[list[int]], new_tokens: int, lora: bool) -> dict:
        """Greedy, exactly `new_tokens` per stream; times the prefill and the whole run."""
        import numpy as np

        lc, n = self.lc, len(prompts)
        per_stream = -(-(max(map(len, prompts)) + new_tokens) // 256) * 256
        ctx, batch = self._context(n, per_stream)
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        if lora:
            adapters = (lc.llama_adapter_lora_p_ctypes * 1)(self.adapter)
            lc.llama_set_adapters_lora(ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
        else:
            lc.llama_set_adapters_lora(ctx, None, 0, None)
        ids: list[list[int]] = [[] for _ in range(n)]
        text = [bytearray() for _ in range(n)]
        pos = [len(p) for p in prompts]
        start = time.perf_counter()
        k = 0
        for seq, prompt in enumerate(prompts):
            for i, token in enumerate(prompt):
                self._put(batch, k, token, i, seq, i == len(prompt) - 1)
                k += 1
        batch.n_tokens = k
        prefill_s = None
        for step in range(new_tokens):
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            logits = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(n, self.n_vocab))
            tokens = logits.argmax(axis=1).tolist()
            for seq, token in enumerate(tokens):
                ids[seq].append(token)
                size = lc.llama_token_to_piece(self.vocab, token, self.piece, 256, 0, False)
                text[seq] += self.piece.raw[: max(size, 0)]
            if prefill_s is None:
                prefill_s = time.perf_counter() - start
            if step == new_tokens - 1:
                break
            for seq, token in enumerate(tokens):
                self._put(batch, seq, token, pos[seq], seq, True)
                pos[seq] += 1
            batch.n_tokens = n
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "prefill_s": prefill_s, "ids": ids}

    @staticmethod
    def _put(batch, k: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[k], batch.pos[k], batch.n_seq_id[k] = token, pos, 1
        batch.seq_id[k][0], batch.logits[k] = seq, logits

    def close(self) -> None:
        for ctx, batch in self.contexts.values():
            self.lc.llama_batch_free(batch)
            self.lc.llama_free(ctx)
        self.lc.llama_adapter_lora_free(self.adapter)
        self.lc.llama_model_free(self.model)


def llamacpp_worker(conn, gguf: str, lora: str, threads: int) -> None:
    """Serve `generate` calls over a pipe: (prompts, new_tokens, lora) -> dict, None to stop."""
    try:
        runner = LlamaCppRunner(gguf, lora, threads)
        import llama_cpp

        conn.send({"ready": True, "version": llama_cpp.__version__,
                   "system_info": llama_cpp.llama_print_system_info().decode().strip()})  # fmt: skip
        while (job := conn.recv()) is not None:
            conn.send(runner.generate(*job))
        runner.close()
    except Exception as err:  # noqa: BLE001 - report it to the parent, which stops with it
        conn.send({"error": f"{type(err).__name__}: {err}"})


class LlamaCpp:
    """The parent's handle on the llama.cpp worker process."""

    def __init__(self, gguf: Path, lora: Path, threads: int):
        ctx = multiprocessing.get_context("spawn")  # no torch, no inherited OpenMP state
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=llamacpp_worker, args=(child, str(gguf), str(lora), threads))
        self.proc.start()
        self.info = self._reply()

    def _reply(self) -> dict:
        if not self.conn.poll(600):
            raise SystemExit("llama.cpp worker: no answer in 10 minutes")
        reply = self.conn.recv()
        if "error" in reply:
            raise SystemExit(f"llama.cpp worker: {reply['error']}")
        return reply

    def generate(self, prompts: list[list[int]], new_tokens: int, lora: bool) -> dict:
        self.conn.send((prompts, new_tokens, lora))
        return self._reply()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(30)


# --- artifacts ---------------------------------------------------------------------------------
def base_gguf(gguf_type: str) -> Path:
    """The default model as `deltatune export --format gguf --gguf-type TYPE` writes it (cached)."""
    from deltatune.export import export_gguf

    path = CACHE / f"SmolLM2-135M-Instruct-{gguf_type}.gguf"
    if not path.is_file():
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.partial.gguf")
        tmp.unlink(missing_ok=True)
        export_gguf("default", None, tmp, gguf_type)
        os.replace(tmp, path)
    return path


def lora_gguf(adapter: Path, llama_cpp_dir: Path, lora_type: str) -> Path:
    """A PEFT adapter converted by llama.cpp's convert_lora_to_gguf.py (cached next to it)."""
    from deltatune.models import resolve

    path = adapter.with_name(f"{adapter.name}-{lora_type}.gguf")
    if path.is_file():
        return path
    script = llama_cpp_dir / "convert_lora_to_gguf.py"
    if not script.is_file():
        raise SystemExit(
            f"--llama-cpp-dir: {script} not found (vendor/llama.cpp of the llama-cpp-python sdist)"
        )
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.partial.gguf")
    cmd = [sys.executable, str(script), "--base", str(resolve("default")), "--outfile", str(tmp),
           "--outtype", lora_type, str(adapter)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not tmp.is_file():
        raise SystemExit(f"convert_lora_to_gguf.py failed ({done.returncode}):\n{done.stderr[-2000:]}")
    os.replace(tmp, path)
    return path


def adapters(model, rows: int, rank: int) -> dict[str, Path]:
    """`rows` random rank-`rank` all-linear LoRAs (serve_throughput.make_adapters, seeded: cached)."""
    from serve_throughput import make_adapters

    root = CACHE / f"adapters-r{rank}"
    names = [f"lora-{i:02d}" for i in range(max(rows, 1))]
    if all((root / n / "adapter_model.safetensors").is_file() for n in names):
        return {n: root / n for n in names}
    return make_adapters(model, root, len(names), rank)


# --- deltatune ---------------------------------------------------------------------------------
class PrefillClock:
    """Times the engine's prefill (which also samples each row's first token), so decode time is
    the rest of the run. Wraps the bound method on this engine only."""

    def __init__(self, engine):
        self.seconds, inner = 0.0, engine._prefill

        def timed(group):
            start = time.perf_counter()
            try:
                return inner(group)
            finally:
                self.seconds += time.perf_counter() - start

        engine._prefill = timed


def engine_run(engine, clock: PrefillClock, prompts, assigned, new_tokens: int) -> dict:
    from serve_throughput import time_engine

    clock.seconds = 0.0
    seconds, texts = time_engine(engine, prompts, assigned, new_tokens)
    return {"seconds": seconds, "prefill_s": clock.seconds, "texts": texts}


def profile_decode(engine, prompts: list[list[int]], steps: int, skip: int = 2, top: int = 20) -> dict:
    """torch.profiler over `steps` decode steps of the engine on the base model, one stream per
    prompt (after `skip` warm steps): where a step's time goes, the sampling included."""
    from torch.profiler import ProfilerActivity, profile

    from deltatune.serve import SamplingParams

    prof, count, walls, inner = profile(activities=[ProfilerActivity.CPU]), [0], [], engine._decode_step

    def step():
        count[0] += 1
        on = skip < count[0] <= skip + steps
        if on and count[0] == skip + 1:
            prof.start()
        start = time.perf_counter()
        inner()
        if on:
            walls.append(time.perf_counter() - start)
            if count[0] == skip + steps:
                prof.stop()

    engine._decode_step = step
    try:
        params = SamplingParams(max_tokens=skip + steps + 2, ignore_eos=True)
        engine.generate(prompts, [None] * len(prompts), params)
    finally:
        del engine._decode_step  # back to the class's method
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "mkldnn::")
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "streams": len(prompts),
        "steps": steps,
        "wall_ms_per_step": round(1e3 * statistics.median(walls), 3),
        "self_cpu_ms_per_step": round(total / 1e3 / steps, 3),
        "matmul_share_of_self_cpu": round(
            sum(e.self_cpu_time_total for e in events if e.key.startswith(matmul)) / total, 3
        ),
        "top_ops": [
            {
                "op": e.key,
                "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
                "share": round(e.self_cpu_time_total / total, 3),
                "calls_per_step": round(e.count / steps, 1),
            }
            for e in rows
        ],  # fmt: skip
    }


# --- the benchmark -----------------------------------------------------------------------------
def rates(run: dict, rows: int, new_tokens: int) -> dict:
    decode_s = run["seconds"] - run["prefill_s"]
    return {
        "tokens_per_s": rows * new_tokens / run["seconds"],
        "decode_tokens_per_s": rows * (new_tokens - 1) / decode_s,
        "prefill_s": run["prefill_s"],
    }


def agreement(ours: list[str], theirs: list[str]) -> dict:
    same_prefix = [
        len(os.path.commonprefix([a, b])) / max(len(a), len(b), 1) for a, b in zip(ours, theirs, strict=True)
    ]
    return {"same_text_rows": f"{sum(a == b for a, b in zip(ours, theirs, strict=True))}/{len(ours)}",
            "mean_common_prefix": round(statistics.mean(same_prefix), 3)}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    import torch
    from serve_throughput import QuietGate, chat_prompts

    from deltatune.models import load_model, load_tokenizer
    from deltatune.serve import Engine
    from deltatune.serve.options import DTYPES

    CACHE.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer()
    model = load_model(dtype=DTYPES[args.dtype])
    paths = adapters(model, args.rows, args.rank)
    names = list(paths)
    gguf, lora = base_gguf(args.gguf_type), lora_gguf(paths[ADAPTER], args.llama_cpp_dir, args.lora_type)
    threads = os.cpu_count() or 1
    lcpp = LlamaCpp(gguf, lora, threads)
    engine = Engine(model, tokenizer, "base", paths, max_batch=args.rows, autostart=False)
    clock = PrefillClock(engine)
    stack = next((m.a_stack.dtype for m in engine.model.modules() if hasattr(m, "a_stack")), None)

    prompts = chat_prompts(tokenizer, args.rows)
    cases = {  # name: (prompts, adapter per row for deltatune, llama.cpp adapter on?)
        "single": (prompts[:1], [None], False),
        "single_lora": (prompts[:1], [ADAPTER], True),
        "batch": (prompts, [None] * args.rows, False),
        "batch_lora": (prompts, [ADAPTER] * args.rows, True),
        "batch_distinct": (prompts, names[: args.rows], None),
    }

    def timed(system: str, case: str) -> dict:
        ps, assigned, lora_on = cases[case]
        if system == "deltatune":
            return engine_run(engine, clock, ps, assigned, args.new_tokens)
        out = lcpp.generate(ps, args.new_tokens, lora_on)
        out["texts"] = [tokenizer.decode(ids, skip_special_tokens=True) for ids in out.pop("ids")]
        return out

    for ps, assigned, lora_on in cases.values():  # warm-up: contexts, graphs, oneDNN, caches
        engine_run(engine, clock, ps, assigned, 2)
        if lora_on is not None:
            lcpp.generate(ps, 2, lora_on)

    gate, runs, texts = QuietGate(args.max_wait), [], {}
    for round_ in range(args.repeats):
        order = ("deltatune", "llama.cpp") if round_ % 2 == 0 else ("llama.cpp", "deltatune")
        plan = [(s, c) for c in PAIRED for s in order] + [("deltatune", "batch_distinct")]
        for system, case in plan:
            busy = gate.wait()
            out = timed(system, case)
            texts[system, case] = out.pop("texts")
            n = len(cases[case][0])
            r = rates(out, n, args.new_tokens)
            runs.append({"round": round_, "system": system, "case": case, "rows": n, **r,
                         "other_threads_running_at_start": busy})  # fmt: skip
            print(f"{round_} {system:10s} {case:15s} {r['tokens_per_s']:8.1f} tok/s  decode "
                  f"{r['decode_tokens_per_s']:8.1f} tok/s  (others running: {busy})", flush=True)  # fmt: skip
    lcpp.close()
    profiled = (
        profile_decode(engine, prompts[: args.profile_rows], args.profile_steps) if args.profile else None
    )
    engine.shutdown()

    def median(system: str, case: str, key: str) -> float:
        return round(statistics.median(r[key] for r in runs if (r["system"], r["case"]) == (system, case)), 2)

    def ratio(num: tuple[str, str], den: tuple[str, str], key: str) -> float:
        """Median over rounds of this round's num / den: both saw the same spell of the machine."""
        by = {(r["round"], r["system"], r["case"]): r[key] for r in runs}
        return round(statistics.median(by[(i, *num)] / by[(i, *den)] for i in range(args.repeats)), 3)

    table = {}
    for case in PAIRED:
        table[case] = {
            f"{system}_{key}": median(system, case, key)
            for system in ("deltatune", "llama.cpp")
            for key in ("tokens_per_s", "decode_tokens_per_s", "prefill_s")
        }
        for key in ("tokens_per_s", "decode_tokens_per_s"):
            table[case][f"ratio_{key}"] = ratio(("deltatune", case), ("llama.cpp", case), key)
        table[case]["agreement"] = agreement(texts["deltatune", case], texts["llama.cpp", case])
        table[case]["first_texts"] = {s: texts[s, case][:2] for s in ("deltatune", "llama.cpp")}
    distinct = {
        f"deltatune_{k}": median("deltatune", "batch_distinct", k)
        for k in ("tokens_per_s", "decode_tokens_per_s")
    }
    for key in ("tokens_per_s", "decode_tokens_per_s"):
        distinct[f"vs_engine_base_{key}"] = ratio(
            ("deltatune", "batch_distinct"), ("deltatune", "batch"), key
        )
    results = {
        "setup": {
            "model": "SmolLM2-135M-Instruct (default)",
            "rows": args.rows,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "rank": args.rank,
            "prompt_tokens": [len(p) for p in prompts],
            "deltatune": {
                "precision": f"weights, activations, KV cache, adapter stacks: {args.dtype}",
                "dtype": args.dtype,
                "adapter_stack_dtype": str(stack).replace("torch.", ""),
                "prepack": engine.options.prepack and args.dtype == "float32",
                "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__,
            },
            "llama.cpp": {
                "precision": f"weights {args.gguf_type} (f16: matmul inputs f16), fp32 accumulation, "
                f"KV cache f16, LoRA {args.lora_type}",
                "gguf": gguf.name,
                "gguf_type": args.gguf_type,
                "lora_gguf": lora.name,
                "lora_type": args.lora_type,
                "kv_cache": "f16",
                "flash_attn": "auto (library default)",
                "n_threads": threads,
                "llama_cpp_python": lcpp.info["version"],
                "system_info": lcpp.info["system_info"],
            },
            "os_cpu_count": os.cpu_count(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "quiet_wait_left_s": round(gate.budget_s, 1),
        },  # fmt: skip
        "cases": table,
        "batch_distinct": distinct,
        "runs": runs,
    }
    if profiled is not None:
        results["profile"] = profiled
    return results


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(results: dict) -> str:
    s, c, d = results["setup"], results["cases"], results["batch_distinct"]
    dt, lc = s["deltatune"], s["llama.cpp"]
    lines = [
        f"CPU serving, {s['model']}: greedy, exactly {s['new_tokens']} new tokens per row (stop tokens "
        f"ignored), the same chat-template prompt ids on both sides; median of {s['repeats']} interleaved rounds. "
        f"deltatune engine: {dt['dtype']} (adapter stacks {dt['adapter_stack_dtype']}, prepacked oneDNN linears: "
        f"{dt['prepack']}), torch {dt['torch_threads']} threads. llama.cpp {lc['llama_cpp_python']}: "
        f"{lc['gguf_type']} GGUF, LoRA {lc['lora_type']} GGUF (unmerged), KV cache f16, {lc['n_threads']} threads "
        f"(os.cpu_count() = {s['os_cpu_count']}). Rank-{s['rank']} LoRA on every linear layer. "
        "Decode tokens/s leave out the prefill (which picks each row's first token); whole-run "
        "tokens/s include it.",
        "",
        "| case | llama.cpp decode tok/s | deltatune decode tok/s | deltatune / llama.cpp | "
        "llama.cpp whole run | deltatune whole run | ratio | same text |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {"single": "1 stream, base", "single_lora": "1 stream, 1 LoRA",
              "batch": f"{s['rows']} streams, base", "batch_lora": f"{s['rows']} streams, 1 LoRA"}  # fmt: skip
    for case, label in labels.items():
        r = c[case]
        lines.append(
            f"| {label} | {fmt(r['llama.cpp_decode_tokens_per_s'])} | {fmt(r['deltatune_decode_tokens_per_s'])} | "
            f"{fmt(r['ratio_decode_tokens_per_s'], '.2f')}x | {fmt(r['llama.cpp_tokens_per_s'])} | "
            f"{fmt(r['deltatune_tokens_per_s'])} | {fmt(r['ratio_tokens_per_s'], '.2f')}x | "
            f"{r['agreement']['same_text_rows']} |"
        )
    lines += [
        "",
        f"{s['rows']} streams with {s['rows']} distinct LoRAs (deltatune only; llama.cpp applies an adapter "
        f"to its whole context): decode {fmt(d['deltatune_decode_tokens_per_s'])} tok/s, "
        f"{fmt(d['vs_engine_base_decode_tokens_per_s'], '.2f')}x the engine's own base "
        f"(whole run {fmt(d['deltatune_tokens_per_s'])} tok/s, {fmt(d['vs_engine_base_tokens_per_s'], '.2f')}x).",
        f"Other threads runnable when each run started: "
        f"{', '.join(str(r['other_threads_running_at_start']) for r in results['runs'])}; "
        f"OMP_WAIT_POLICY={s['OMP_WAIT_POLICY']}.",
    ]  # fmt: skip
    if "profile" in results:
        p = results["profile"]
        peer = {1: "single", s["rows"]: "batch"}.get(p["streams"])
        step = f"{1e3 * p['streams'] / c[peer]['llama.cpp_decode_tokens_per_s']:.2f} ms" if peer else "-"
        lines += [
            "",
            f"deltatune decode step, {p['streams']} stream(s), base model, under torch.profiler: "
            f"{p['wall_ms_per_step']:.2f} ms wall, {p['self_cpu_ms_per_step']:.2f} ms in ops, matmuls "
            f"{100 * p['matmul_share_of_self_cpu']:.0f}% of op time (llama.cpp's step, same streams, unprofiled: {step}).",
            "",
            "| op | self ms/step | share | calls/step |",
            "|---|---:|---:|---:|",
        ]  # fmt: skip
        lines += [f"| {o['op']} | {o['self_ms_per_step']:.3f} | {100 * o['share']:.1f}% | {o['calls_per_step']:g} |"
                  for o in p["top_ops"]]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32, help="concurrent streams in the batch cases")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; ratios are their median")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="deltatune's model dtype"
    )
    parser.add_argument(
        "--gguf-type", choices=("f16", "q8_0", "q4_0"), default="f16", help="llama.cpp's base GGUF"
    )
    parser.add_argument("--lora-type", choices=("f32", "f16", "bf16", "q8_0"), default="f16")
    parser.add_argument(
        "--llama-cpp-dir",
        type=Path,
        default=os.environ.get("LLAMA_CPP_DIR"),
        help="llama.cpp sources with convert_lora_to_gguf.py (default: $LLAMA_CPP_DIR)",
    )
    parser.add_argument(
        "--max-wait", type=float, default=150.0, help="seconds to wait for a quiet machine, in all"
    )
    parser.add_argument(
        "--profile", action="store_true", help="torch.profiler over the engine's decode steps"
    )
    parser.add_argument("--profile-steps", type=int, default=8)
    parser.add_argument("--profile-rows", type=int, default=1, help="streams in the profiled batch")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()  # fmt: skip
    if args.llama_cpp_dir is None:
        parser.error("--llama-cpp-dir (or LLAMA_CPP_DIR) is required: llama.cpp's convert_lora_to_gguf.py")
    if args.rows < 1 or args.new_tokens < 2 or args.repeats < 1:
        parser.error("--rows and --repeats must be >= 1 and --new-tokens >= 2")
    results = run(args)
    write_json = (json.dumps(results, indent=2) + "\n").encode()
    from serve_throughput import write_atomic

    write_atomic(args.out / "serve_llamacpp.json", write_json)
    write_atomic(args.out / "serve_llamacpp.md", markdown(results).encode())
    print(markdown(results))


if __name__ == "__main__":
    main()
