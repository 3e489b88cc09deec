"""Composition: one model with three skills, by routing instead of merging, on two task trios.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/compose.py          # both trios, 100 items per task
    python benchmarks/compose.py --steps 2 --union-steps 2 --eval-items 4 --out /tmp/smoke   # smoke run

For each trio (reversal/kv_lookup/entity_tracking, and addition/kv_lookup/entity_tracking) the rows
are: each single adapter (LoRA r16 all-linear, trained per task as in benchmarks/merge.py, cached
there), the best static merge (linear in adapter space, exact at r48: it had the best mean kept on
both trios in the merge benchmark, so no merge is chosen on these test items), Arrow top-1 and
top-2 over the three adapters (peft-compatible, per token), request-level routing (one adapter per
prompt, from 16 example prompts per adapter of the task's train split; `deltatune.serve.router`),
Arrow pooled over the prompt (the same request-level routing with Arrow's prototypes, no data),
one LoRA r16 trained on the union of the three tasks' training data, and MixLoRA trained on the
same union data for the same steps at the same trainable-parameter budget (±10%). Each row is
scored by exact match (greedy) on the same held-out test items of each task; "kept" is the row's
score divided by that task's own adapter's score. Scoring runs as the merge benchmark does: a bf16
copy of the base under bf16 autocast, the deltas computed beside the weights.

Serving throughput (tokens/s, 32 rows, prompts of the three tasks mixed) is measured with the
batched engine for the rows it serves: one adapter for all rows, request-level routing, and the
union LoRA. Every phase waits for a quiet CPU first and records the load it started under.
Writes benchmarks/out/compose.json and .md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spin-waiting OpenMP threads collapse on a shared CPU

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge as bench  # noqa: E402  (the merge benchmark's adapters, scorer and helpers)

import deltatune  # noqa: E402
from deltatune.data.tasks import examples  # noqa: E402
from deltatune.deltas import named_delta_parameters  # noqa: E402
from deltatune.formats.peft import read_lora  # noqa: E402
from deltatune.serve import Engine, SamplingParams  # noqa: E402
from deltatune.serve.router import arrow_router, build_router, example_prompts  # noqa: E402

OUT = bench.OUT
WORK = OUT / "compose"
TRIOS = {
    "format": ("reversal", "kv_lookup", "entity_tracking"),
    "compatible": ("addition", "kv_lookup", "entity_tracking"),
}
GOAL_KEPT = 0.95
ROUTER_EXAMPLES, ROUTER_LAYER = 16, 4
SERVE_ROWS, SERVE_TOKENS = 32, 16
# MixLoRA at LoRA r16 all-linear's budget: 4 experts of rank 6 on the FFN, top-2, plus a shared
# rank-6 LoRA on attention (see `mixlora_budget` in the JSON for the counts).
MIXLORA = {"mixlora_experts": 4, "mixlora_top_k": 2, "lora_r": 6, "lora_alpha": 12, "mixlora_attention": True}


def union_data(tasks: tuple[str, ...], per_task: int) -> Path:
    """The three tasks' training samples (the ones their adapters saw), shuffled into one jsonl."""
    path = WORK / "data" / f"union-{'-'.join(tasks)}-{per_task}.jsonl"
    if not path.is_file():
        rows = [{"messages": ex.messages()} for t in tasks for ex in examples(t, "train", per_task, seed=0)]
        random.Random(0).shuffle(rows)
        bench.write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def trained_on_union(
    name: str, tasks: tuple[str, ...], steps: int, extra: dict[str, Any]
) -> tuple[Path, dict]:
    """A delta trained on the union data, cached by its full config."""
    run_dir = WORK / "runs" / f"{name}-{'-'.join(tasks)}-s{steps}"
    config = bench.train_config(tasks[0], steps, run_dir) | {"data": str(union_data(tasks, 2000))} | extra
    config.pop("task")
    stamp, adapter = run_dir / "bench_train.json", run_dir / "adapter"
    if (adapter / "adapter_config.json").is_file() and stamp.is_file():
        cached = json.loads(stamp.read_text())
        if cached["config"] == config:
            print(f"[train] reusing {adapter}")
            return adapter, cached["summary"]
    bench.fresh_dir(run_dir)
    summary = deltatune.train(config)
    keep = ("steps", "final_loss", "train_seconds", "tokens_per_second", "trainable_params", "delta_report")
    kept = {k: summary.get(k) for k in keep}
    bench.write_atomic(stamp, json.dumps({"config": config, "summary": kept}, indent=2))
    return adapter, kept


def stored_params(model) -> int:
    return sum(p.numel() for p in named_delta_parameters(model).values())


def routed_scores(scorer: bench.Scorer, tasks, adapters: dict[str, Path], router) -> tuple[dict, dict]:
    """EM per task when each test prompt goes to the adapter the router picks; and the pick accuracy."""
    tok = scorer.tokenizer
    from deltatune.data.tokenize import prompt_ids

    pad = tok.pad_token_id or 0
    picks: dict[str, list[str]] = {}
    for t in tasks:
        rows = [prompt_ids(tok, it.prompt) for it in scorer.items[t]]
        picks[t] = [
            a for i in range(0, len(rows), 16) for a in router.route(scorer.base_bf16, rows[i : i + 16], pad)
        ]
    models = {a: scorer.with_adapter(adapters[a]) for a in adapters}
    scores, accuracy = {}, {}
    for t in tasks:
        correct = 0
        for a in adapters:
            items = [it for it, pick in zip(scorer.items[t], picks[t], strict=True) if pick == a]
            if items:
                correct += sum(scorer._score(models[a], t, items)["correct"])
        scores[t] = correct / len(scorer.items[t])
        accuracy[t] = sum(p == t for p in picks[t]) / len(picks[t])
    return scores, accuracy


def serve_tokens_per_second(
    scorer: bench.Scorer, tasks, adapters: dict[str, Path], names: list[str], routers: dict | None = None
) -> float:
    """Completion tokens/s of the batched engine on SERVE_ROWS mixed-task prompts, row i asking for
    model names[i] (greedy, every row exactly SERVE_TOKENS tokens: equal work in every setting)."""
    engine = Engine(
        copy.deepcopy(scorer.base_fp32),
        scorer.tokenizer,
        "base",
        adapters,
        autostart=False,
        max_batch=SERVE_ROWS,
    )
    try:
        for name, (members, examples_) in (routers or {}).items():
            engine.add_router(name, members, examples_)
        per_task = [scorer.items[tasks[i % len(tasks)]] for i in range(SERVE_ROWS)]
        prompts = [items[(i // len(tasks)) % len(items)].prompt for i, items in enumerate(per_task)]
        ids = [engine.chat_prompt(p) for p in prompts]
        params = SamplingParams(max_tokens=SERVE_TOKENS, ignore_eos=True)
        engine.generate(ids[:2], names[:2], params)  # warm-up
        started = time.perf_counter()
        done = engine.generate(ids, names, params)
        seconds = time.perf_counter() - started
    finally:
        engine.shutdown()
    assert all(r.error is None for r in done), [r.error for r in done if r.error]
    return sum(r.completion_tokens for r in done) / seconds


def arrow_dir(scorer: bench.Scorer, trio: str, adapters: list[Path], k: int) -> Path:
    """The Arrow delta over the trio's adapters, saved (self-contained) for serving."""
    out = WORK / "arrow" / f"{trio}-top{k}"
    if not (out / "adapter_config.json").is_file():
        model = deltatune.add_delta(
            copy.deepcopy(scorer.base_fp32), "arrow", arrow_adapters=[str(a) for a in adapters], arrow_top_k=k
        )
        deltatune.save_delta(model, bench.fresh_dir(out))
    return out


def measure_serving(
    scorer: bench.Scorer, trio: str, tasks, adapters: dict[str, Path], union: Path, mix: Path
) -> dict:
    """Serving tokens/s of every composition the engine serves, one engine each, in one quiet run."""
    bench.wait_for_quiet_cpu(f"{trio}: serving")
    per_row = [tasks[i % len(tasks)] for i in range(SERVE_ROWS)]
    shots = {t: example_prompts(f"task:{t}", ROUTER_EXAMPLES) for t in tasks}
    arrow = arrow_dir(scorer, trio, [adapters[t] for t in tasks], 2)
    runs = {
        "one adapter": ({tasks[0]: adapters[tasks[0]]}, [tasks[0]] * SERVE_ROWS, None),
        "three adapters, named per row": (adapters, per_row, None),
        "three adapters, request router": (
            adapters,
            ["skills"] * SERVE_ROWS,
            {"skills": (list(tasks), shots)},
        ),
        "three adapters, Arrow-pooled router": (
            adapters,
            ["skills"] * SERVE_ROWS,
            {"skills": (list(tasks), None)},
        ),
        "Arrow top-2 (per token)": ({"arrow": arrow}, ["arrow"] * SERVE_ROWS, None),
        "union LoRA": ({"union": union}, ["union"] * SERVE_ROWS, None),
        "MixLoRA": ({"mixlora": mix}, ["mixlora"] * SERVE_ROWS, None),
    }
    serving = {k: serve_tokens_per_second(scorer, tasks, a, n, r) for k, (a, n, r) in runs.items()}
    print(f"[{trio}] serving {serving}")
    return serving


SERVED_ROW = {  # composition row -> its serving measurement
    "adapter ": "one adapter",
    "request-level routing": "three adapters, request router",
    "Arrow pooled": "three adapters, Arrow-pooled router",
    "Arrow top-2": "Arrow top-2 (per token)",
    "one LoRA": "union LoRA",
    "MixLoRA": "MixLoRA",
}


def attach_serving(res: dict, serving: dict) -> None:
    res["serving"] = serving
    for r in res["rows"]:
        key = next((v for k, v in SERVED_ROW.items() if r["composition"].startswith(k)), None)
        r["served_tokens_per_second"] = serving.get(key)


def row(name: str, scores: dict, own: dict, params: int | None, tps: float | None, **extra) -> dict:
    kept = bench.kept_fractions(scores, own)
    values = [k for k in kept.values() if k is not None]
    return {
        "composition": name,
        "exact_match": scores,
        "kept": kept,
        "min_kept": min(values) if values else None,
        "mean_kept": statistics.fmean(values) if values else None,
        "trainable_params": params,
        "served_tokens_per_second": tps,
        **extra,
    }


def run_trio(scorer: bench.Scorer, trio: str, tasks, adapters: dict[str, Path], args) -> dict[str, Any]:
    tasks = list(tasks)
    own_adapters = {t: adapters[t] for t in tasks}
    singles = {t: scorer.with_adapter(adapters[t]) for t in tasks}
    scores = {t: scorer.score(model, tasks) for t, model in singles.items()}
    own = {t: scores[t][t] for t in tasks}
    rows = [row(f"adapter {t}", scores[t], own, stored_params(singles[t]), None) for t in tasks]
    print(f"[{trio}] singles {scores}")

    bench.wait_for_quiet_cpu(f"{trio}: merge")
    cfg = bench.merge_yaml("linear", [adapters[t] for t in tasks], bench.MERGES["linear"])
    merged, report = bench.run_one_merge(f"compose-{trio}-linear", cfg)
    model = scorer.with_adapter(merged)
    rows.append(
        row("static merge (linear, r48)", scorer.score(model, tasks), own, stored_params(model), None)
    )

    for k in (1, 2):
        arrow = deltatune.add_delta(
            copy.deepcopy(scorer.base_bf16),
            "arrow",
            arrow_adapters=[str(adapters[t]) for t in tasks],
            arrow_top_k=k,
        ).eval()
        rows.append(row(f"Arrow top-{k} (per token, peft-exact)", scorer.score(arrow, tasks), own, 0, None))
        print(f"[{trio}] {rows[-1]}")

    router = build_router(
        scorer.base_bf16, scorer.tokenizer, "skills",
        {t: example_prompts(f"task:{t}", ROUTER_EXAMPLES) for t in tasks}, ROUTER_LAYER,
    )  # fmt: skip
    scores, accuracy = routed_scores(scorer, tasks, own_adapters, router)
    rows.append(row("request-level routing", scores, own, 0, None, router_accuracy=accuracy))
    print(f"[{trio}] {rows[-1]}")
    library = {t: read_lora(adapters[t]) for t in tasks}
    scores, accuracy = routed_scores(
        scorer, tasks, own_adapters, arrow_router("arrow", library, ROUTER_LAYER)
    )
    rows.append(
        row(
            "Arrow pooled over the prompt (request-level, no data)",
            scores,
            own,
            0,
            None,
            router_accuracy=accuracy,
        )
    )
    print(f"[{trio}] {rows[-1]}")

    bench.wait_for_quiet_cpu(f"{trio}: union LoRA")
    lora_dir, lora_summary = trained_on_union("lora", tuple(tasks), args.union_steps, {})
    model = scorer.with_adapter(lora_dir)
    rows.append(
        row(
            "one LoRA on the union (r16)",
            scorer.score(model, tasks),
            own,
            lora_summary["trainable_params"],
            None,
        )
    )

    bench.wait_for_quiet_cpu(f"{trio}: MixLoRA")
    mix_dir, mix_summary = trained_on_union(
        "mixlora", tuple(tasks), args.union_steps, {"method": "mixlora", **MIXLORA}
    )
    model = scorer.with_adapter(mix_dir)
    budget = mix_summary["trainable_params"] / lora_summary["trainable_params"]
    rows.append(
        row(
            "MixLoRA on the union",
            scorer.score(model, tasks),
            own,
            mix_summary["trainable_params"],
            None,
            budget_vs_lora=budget,
        )
    )
    print(f"[{trio}] {rows[-1]}")

    res = {"tasks": tasks, "own": own, "rows": rows}
    if not args.no_serve:
        attach_serving(res, measure_serving(scorer, trio, tasks, own_adapters, lora_dir, mix_dir))
    return res | {"training": {"lora": lora_summary, "mixlora": mix_summary}}


def pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Command: `{result['settings']['command']}`; {result['settings']['eval_items']} items per task.",
        "",
    ]
    for trio, res in result["trios"].items():
        tasks = res["tasks"]
        head = " | ".join(f"{t} EM | kept" for t in tasks)
        lines += [
            f"**Trio {trio}**",
            "",
            f"| composition | {head} | min kept | mean kept | trainable params | served tok/s |",
        ]
        lines.append("|---|" + "---:|---:|" * len(tasks) + "---:|---:|---:|---:|")
        for r in res["rows"]:
            cells = " | ".join(f"{pct(r['exact_match'][t])} | {pct(r['kept'].get(t))}" for t in tasks)
            tps = "" if r["served_tokens_per_second"] is None else f"{r['served_tokens_per_second']:.0f}"
            params = "" if r["trainable_params"] is None else f"{r['trainable_params']:,}"
            lines.append(
                f"| {r['composition']} | {cells} | {pct(r['min_kept'])} | {pct(r['mean_kept'])} | {params} | {tps} |"
            )
        if res.get("serving"):
            one = res["serving"]["one adapter"]
            cells = ", ".join(
                f"{k} {v:.0f} tok/s ({one / v:.2f}x the time)" for k, v in res["serving"].items()
            )
            lines.append(f"Serving, {SERVE_ROWS} rows x {SERVE_TOKENS} tokens: {cells}.")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per single adapter")
    parser.add_argument("--union-steps", type=int, default=60, help="steps for the union LoRA and MixLoRA")
    parser.add_argument("--eval-items", type=int, default=100, help="held-out prompts per task")
    parser.add_argument("--trios", default=",".join(TRIOS), help="which trios: format, compatible")
    parser.add_argument("--no-serve", action="store_true", help="skip the serving throughput runs")
    parser.add_argument(
        "--serve-only",
        action="store_true",
        help="re-measure serving from the cached adapters into compose.json",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    trios = {name: TRIOS[name] for name in args.trios.split(",")}
    if args.serve_only:
        return serve_only(args, trios)
    started = time.perf_counter()
    loads = [bench.wait_for_quiet_cpu("train singles")]
    tasks = sorted({t for trio in trios.values() for t in trio})
    adapters = {t: bench.trained_adapter(t, args.steps)[0] for t in tasks}
    loads.append(bench.wait_for_quiet_cpu("evaluate"))
    scorer = bench.Scorer(tasks, args.eval_items)
    result: dict[str, Any] = {
        "settings": {
            "command": " ".join(["OMP_WAIT_POLICY=PASSIVE python benchmarks/compose.py", *sys.argv[1:]]),
            "steps": args.steps,
            "union_steps": args.union_steps,
            "eval_items": args.eval_items,
            "router": {"examples_per_adapter": ROUTER_EXAMPLES, "layer": ROUTER_LAYER},
            "mixlora": MIXLORA,
            "cpu": f"CPU, {os.cpu_count()} cores, torch {torch.__version__}",
        },
        "trios": {},
    }
    for name, trio in trios.items():
        result["trios"][name] = run_trio(scorer, name, trio, adapters, args)
        bench.write_atomic(args.out / "compose.json", json.dumps(result, indent=2) + "\n")
    result["load"] = loads
    result["wall_seconds"] = time.perf_counter() - started
    bench.write_atomic(args.out / "compose.json", json.dumps(result, indent=2) + "\n")
    bench.write_atomic(args.out / "compose.md", markdown(result))
    print(markdown(result))


def serve_only(args, trios: dict) -> None:
    """Serving for every trio from the cached adapters and runs, alone on the machine."""
    result = json.loads((args.out / "compose.json").read_text())
    tasks = sorted({t for trio in trios.values() for t in trio})
    adapters = {t: bench.trained_adapter(t, args.steps)[0] for t in tasks}
    scorer = bench.Scorer(tasks, args.eval_items)
    for name, trio in trios.items():
        union = trained_on_union("lora", trio, args.union_steps, {})[0]
        mix = trained_on_union("mixlora", trio, args.union_steps, {"method": "mixlora", **MIXLORA})[0]
        own = {t: adapters[t] for t in trio}
        attach_serving(result["trios"][name], measure_serving(scorer, name, trio, own, union, mix))
    result["settings"]["serving_command"] = " ".join(["python benchmarks/compose.py", *sys.argv[1:]])
    bench.write_atomic(args.out / "compose.json", json.dumps(result, indent=2) + "\n")
    bench.write_atomic(args.out / "compose.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
