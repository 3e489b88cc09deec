"""Merge and compression quality on real adapters: three LoRA adapters on built-in tasks, merged and shrunk.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/merge.py        # full run: ~22 min on 2 shared cores, ~12 min
                                                               # when the adapters are already cached
    python benchmarks/merge.py --steps 2 --eval-items 4 --out /tmp/smoke   # a smoke run
    python benchmarks/merge.py --tables-only                   # rebuild goals and .md from the JSON

(a) One LoRA adapter (r 16, all linear layers, the library's defaults) is trained per task on the
default model (SmolLM2-135M-Instruct) and cached under benchmarks/out/merge/adapters/ (a re-run
with the same settings reuses it). Each adapter is scored on every task (exact match, greedy, on
the tasks' held-out test prompts). The three adapters are then merged with every method from a
mergekit-style YAML (`deltatune.merge.run_merge`), in adapter space: linear and task arithmetic
exactly (ranks stacked, r 48); TIES, DARE, Breadcrumbs and Model Stock on the dense deltas ΔW
followed by SVD back to r 48 (the relative error of that truncation is reported). SLERP
interpolates weights, not deltas, and takes exactly two models, so it runs on full models: the
first two adapters are exported merged into the base (fp32) and SLERPed pairwise (t = 0.5).
"kept" is the merged model's score on a task divided by that task's own adapter's score.

(b) Every adapter is compressed with each method at a few settings (`deltatune.compress.compress`),
its deltas are added to the base weights (`load_delta_into`) and it is scored on its own task. The
size ratio is the library's (adapter tensor bytes / stored bytes). Each adapter is also stored
uncompressed ("raw") and loaded the same way, as a check of the loading path itself.

Precision: models that carry the delta as LoRA factors (single adapters, adapter-space merges)
run as a bf16 copy of the base under bf16 autocast, the LoRA branch computed apart from the
weights; the run first checks on a few items per task that this predicts what fp32 predicts
(`precision_check`). Models whose weights hold W + ΔW (compressed deltas, SLERP) run in fp32:
rounding W + ΔW to bf16 blurs a small ΔW, and in a first run it cost the uncompressed "raw" delta
1 and 2 of 50 items on two adapters (fp32 scored exactly what the adapter scores). Before each
heavy phase the script waits (up to 10 x 60 s) while the 1-minute load average is above 3, and it
records the load it started under. Writes benchmarks/out/merge_quality.json and .md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spin-waiting OpenMP threads collapse on a shared CPU

import argparse
import copy
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import deltatune
from deltatune.compress import compress, load_delta_into
from deltatune.export import export_merged
from deltatune.merge import run_merge
from deltatune.models import load_model, load_tokenizer, resolve
from deltatune.train.evaluate import EvalItem, eval_items_from_task, exact_match_score

OUT = Path(__file__).resolve().parent / "out"
WORK = OUT / "merge"
TASKS = ("reversal", "kv_lookup", "entity_tracking")
GOAL_MERGE_KEPT = 0.90
GOAL_RATIO, GOAL_LOSS_POINTS = 10.0, 1.0
LOAD_LIMIT, LOAD_WAIT_S, LOAD_TRIES = 3.0, 60, 10

# Merge settings: mergekit's usual values for each method; every model gets the same parameters.
MERGES: dict[str, dict[str, Any]] = {
    "linear": {"model": {"weight": 1.0}, "global": {"normalize": True}},
    "task_arithmetic": {"model": {"weight": 1.0}, "global": {"lambda": 1.0}},
    "ties": {"model": {"weight": 1.0, "density": 0.5}, "global": {"normalize": True}},
    "dare_linear": {"model": {"weight": 1.0, "density": 0.5}, "global": {}},
    "dare_ties": {"model": {"weight": 1.0, "density": 0.5}, "global": {}},
    "breadcrumbs": {"model": {"weight": 1.0, "density": 0.9, "gamma": 0.01}, "global": {}},
    "model_stock": {"model": {}, "global": {}},
    # Singular-vector merges (merge/spectral.py), paper defaults: lambda 1, Iso-CTS fraction 0.8
    "tsv": {"model": {}, "global": {}},
    "iso_c": {"model": {}, "global": {}},
    "iso_cts": {"model": {}, "global": {"common_space_fraction": 0.8}},
    "ties_knots": {
        "method": "ties",
        "model": {"weight": 1.0, "density": 0.5},
        "global": {"normalize": True},
        "top": {"knots": True},
    },
    # Learned λ per task and block on the trio's train prompts (answers never read), merge/adamerging.py
    "adamerging": {
        "model": {},
        "global": {},
        "top": {"adamerging": {"prompts": "TRIO", "prompts_per_source": 32, "steps": 100, "lr": 0.01}},
    },
}
SLERP_T = 0.5

# Compression settings: (method, lora_mode, params). "factors" compresses A and B (the adapter stays
# low-rank); "dense" compresses ΔW = s·B@A as the papers do (Delta-CoMe's SVD needs the product).
_DC = {"fill_bits": 0, "budget_bits": None}  # Delta-CoMe with explicit (bits, count) groups, no budget
COMPRESSIONS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "raw (dense ΔW, reference)": ("raw", "dense", {}),
    "compeft d=0.3 std": ("compeft", "factors", {"density": 0.3}),
    "compeft d=0.1 std": ("compeft", "factors", {"density": 0.1}),
    "compeft d=0.1 mean_kept": ("compeft", "factors", {"density": 0.1, "scale": "mean_kept"}),
    "bitdelta (factors)": ("bitdelta", "factors", {}),
    "bitdelta (dense)": ("bitdelta", "dense", {}),
    "delta_come 8b x4 + 4b x12": ("delta_come", "dense", {"groups": [(8, 4), (4, 12)], **_DC}),
    "delta_come 6b x2 + 3b x6 + 2b x8, g576": ("delta_come", "dense", {"groups": [(6, 2), (3, 6), (2, 8)], "group_size": 576, **_DC}),
    "delta_come 8b x2 + 4b x6, g576": ("delta_come", "dense", {"groups": [(8, 2), (4, 6)], "group_size": 576, **_DC}),
}  # fmt: skip


# --- small helpers ---------------------------------------------------------------------------------


def wait_for_quiet_cpu(phase: str) -> dict[str, Any]:
    """Sleep while the 1-minute load is above LOAD_LIMIT (at most LOAD_TRIES times); return what was seen."""
    waited = 0
    load = os.getloadavg()[0]
    while load > LOAD_LIMIT and waited < LOAD_TRIES:
        print(f"[{phase}] load {load:.2f} > {LOAD_LIMIT}; sleeping {LOAD_WAIT_S} s")
        time.sleep(LOAD_WAIT_S)
        waited += 1
        load = os.getloadavg()[0]
    print(f"[{phase}] starting at load {load:.2f}")
    return {"phase": phase, "load_1min": round(load, 2), "waits": waited}


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fresh_dir(path: Path) -> Path:
    """An empty path for a library call that refuses to overwrite (only ever under WORK)."""
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class Scorer:
    """Exact match of a model on the held-out items of each task (bf16 or fp32: see the module docstring)."""

    def __init__(self, tasks: list[str], n_items: int):
        self.tokenizer = load_tokenizer()
        self.items = {t: eval_items_from_task(t, n_items, seed=0) for t in tasks}
        # Room for the longest answer plus 8 tokens: a longer completion cannot match anyway.
        self.max_new = {
            t: max(len(self.tokenizer(it.answer)["input_ids"]) for it in its) + 8
            for t, its in self.items.items()
        }
        self.base_bf16 = load_model(dtype=torch.bfloat16)
        self.base_fp32 = load_model(dtype=torch.float32)

    def _score(self, model, task: str, items: list[EvalItem] | None = None, bf16: bool = True) -> dict:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return exact_match_score(model, self.tokenizer, items or self.items[task], self.max_new[task])

    def score(self, model, tasks: list[str], bf16: bool = True) -> dict[str, float]:
        return {t: self._score(model, t, bf16=bf16)["exact_match"] for t in tasks}

    def with_adapter(self, adapter: Path | None, fp32: bool = False):
        base = self.base_fp32 if fp32 else self.base_bf16
        return deltatune.load(copy.deepcopy(base), adapter=adapter)

    def with_dense_delta(self, delta_dir: Path):
        """fp32 base + the stored delta (score it with bf16=False: see the module docstring)."""
        model = copy.deepcopy(self.base_fp32)
        load_delta_into(model, delta_dir)
        return model.eval()

    def precision_check(self, adapter: Path, task: str, n: int) -> dict[str, Any]:
        """Do bf16 weights + autocast predict what fp32 predicts, on the first n items?"""
        items = self.items[task][:n]
        preds = {}
        for name, fp32 in (("bf16", False), ("fp32", True)):
            preds[name] = self._score(self.with_adapter(adapter, fp32), task, items, bf16=not fp32)
        pairs = [(preds["bf16"][key], preds["fp32"][key]) for key in ("predictions", "correct")]
        same_text, same_verdict = (sum(a == b for a, b in zip(*pair, strict=True)) for pair in pairs)
        return {
            "task": task,
            "items": len(items),
            "same_predictions": same_text,
            "same_verdicts": same_verdict,
            "exact_match_bf16": preds["bf16"]["exact_match"],
            "exact_match_fp32": preds["fp32"]["exact_match"],
        }


# --- (a) adapters and merges -----------------------------------------------------------------------


def train_config(task: str, steps: int, out: Path) -> dict[str, Any]:
    return {
        "task": task,
        "max_steps": steps,
        "warmup_steps": min(6, steps // 5),
        "train_samples": 2000,
        "eval_samples": 0,  # scored below on the same items as every merge
        "learning_rate": 2e-3,
        "lora_r": 16,
        "save_every": 0,
        "seed": 0,
        "output": str(out),
    }


def trained_adapter(task: str, steps: int) -> tuple[Path, dict[str, Any]]:
    """The cached adapter for (task, steps), training it first if missing or trained with other settings."""
    run_dir = WORK / "adapters" / f"{task}-s{steps}"
    config = train_config(task, steps, run_dir)
    stamp = run_dir / "bench_train.json"
    adapter = run_dir / "adapter"
    if (adapter / "adapter_config.json").is_file() and stamp.is_file():
        cached = json.loads(stamp.read_text())
        if cached["config"] == config:
            print(f"[train] reusing {adapter}")
            return adapter, cached["summary"]
    fresh_dir(run_dir)
    summary = deltatune.train(config)
    kept = {k: summary[k] for k in ("steps", "final_loss", "train_seconds", "tokens_per_second", "precision")}
    write_atomic(stamp, json.dumps({"config": config, "summary": kept}, indent=2))
    return adapter, kept


def merge_yaml(
    method: str, adapters: list[Path], settings: dict[str, Any], tasks: list[str] | None = None
) -> dict[str, Any]:
    """The YAML of one merge row; `settings` may name the merge_method and add top-level keys."""
    own = settings["model"]  # a fresh dict per model, so the YAML has no anchors
    models = [{"model": str(a), **({"parameters": dict(own)} if own else {})} for a in adapters]
    config: dict[str, Any] = {
        "merge_method": settings.get("method", method),
        "base_model": str(resolve()),
        "models": models,
    }
    if settings["global"]:
        config["parameters"] = settings["global"]
    top = copy.deepcopy(settings.get("top", {}))
    if top.get("adamerging", {}).get("prompts") == "TRIO":
        top["adamerging"]["prompts"] = [f"task:{t}" for t in tasks or []]
    return config | top | {"dtype": "float32"}


def run_one_merge(name: str, config: dict[str, Any]) -> tuple[Path, Any]:
    config_path = WORK / "merges" / f"{name}.yaml"
    write_atomic(config_path, yaml.safe_dump(config, sort_keys=False))
    out = fresh_dir(WORK / "merges" / name)
    return out, run_merge(config_path, out)


def exported(task: str, adapter: Path, steps: int) -> Path:
    """The adapter folded into the base as a full HF directory (cached beside the adapter)."""
    out = WORK / "exports" / f"{task}-s{steps}"
    stamp = out / "bench_source.json"
    source = str((adapter / "adapter_model.safetensors").stat().st_mtime_ns)
    if stamp.is_file() and json.loads(stamp.read_text()) == {"adapter": str(adapter), "mtime": source}:
        return out
    export_merged(str(resolve()), adapter, fresh_dir(out))
    write_atomic(stamp, json.dumps({"adapter": str(adapter), "mtime": source}))
    return out


def kept_fractions(scores: dict[str, float], own: dict[str, float]) -> dict[str, float | None]:
    return {t: (scores[t] / own[t] if own[t] > 0 else None) for t in scores}


def merge_row(name: str, kind: str, report, scores: dict, own: dict, settings: dict, seconds: float) -> dict:
    errors = list(report.svd_errors.values())
    kept = kept_fractions(scores, own)
    return {
        "method": name,
        "space": kind,
        "settings": settings,
        "rank": report.rank,
        "svd_rel_error_mean": statistics.fmean(errors) if errors else None,
        "svd_rel_error_max": max(errors) if errors else None,
        "merge_seconds": round(report.seconds, 2),
        "wall_seconds": round(seconds, 1),
        "exact_match": scores,
        "kept": kept,
    }


def part_a(
    scorer: Scorer, tasks: list[str], adapters: dict[str, Path], steps: int, only: set[str] | None = None
) -> dict[str, Any]:
    base_scores = scorer.score(scorer.base_bf16, tasks)
    single = {t: scorer.score(scorer.with_adapter(adapters[t]), tasks) for t in tasks}
    own = {t: single[t][t] for t in tasks}
    print(f"[a] base {base_scores}\n[a] single {single}")
    merges = []
    for method, settings in MERGES.items():
        if only is not None and method not in only:
            continue
        started = time.perf_counter()
        out, report = run_one_merge(method, merge_yaml(method, [adapters[t] for t in tasks], settings, tasks))
        scores = scorer.score(scorer.with_adapter(out), tasks)
        merges.append(
            merge_row(method, "adapter", report, scores, own, settings, time.perf_counter() - started)
        )
        print(f"[a] {method}: {scores} (r {report.rank}, {report.seconds:.1f} s)")
    if only is not None and "slerp" not in only:
        return {"base": base_scores, "single": single, "own": own, "merges": merges,
                "interference": interference(tasks, adapters)}  # fmt: skip
    # SLERP: weights, two models; the first two adapters exported as full models, t = 0.5.
    started = time.perf_counter()
    first, second = tasks[:2]
    ends = [exported(t, adapters[t], steps) for t in (first, second)]
    slerp_config = {
        "merge_method": "slerp",
        "base_model": str(ends[0]),
        "models": [{"model": str(ends[1])}],
        "parameters": {"t": SLERP_T},
        "dtype": "float32",
        "out_dtype": "float32",
    }
    out, report = run_one_merge("slerp", slerp_config)
    scores = scorer.score(deltatune.load(out, dtype=torch.float32), tasks, bf16=False)
    name = f"slerp ({first} + {second} only, full models)"
    row = merge_row(name, "full model", report, scores, own, {"t": SLERP_T}, time.perf_counter() - started)
    row["pair"] = [first, second]
    merges.append(row)
    print(f"[a] slerp: {scores}")
    shutil.rmtree(WORK / "merges" / "slerp")  # 540 MB; the adapter merges are small and kept
    return {"base": base_scores, "single": single, "own": own, "merges": merges,
            "interference": interference(tasks, adapters)}  # fmt: skip


def interference(tasks: list[str], adapters: dict[str, Path]) -> dict[str, Any]:
    """`deltatune inspect` over the trio: cosine of ΔW and top-16 subspace overlap per pair."""
    from deltatune.inspect import inspect_deltas

    started = time.perf_counter()
    report = inspect_deltas([adapters[t] for t in tasks], top_r=16)
    pairs = {f"{tasks[i]} / {tasks[j]}": {"cosine": report["cosine"][i][j], "overlap": report["subspace_overlap"][i][j]}
             for i in range(len(tasks)) for j in range(i + 1, len(tasks))}  # fmt: skip
    norms = {t: d["norm"] for t, d in zip(tasks, report["deltas"], strict=True)}
    return {"pairs": pairs, "norms": norms, "seconds": round(time.perf_counter() - started, 2)}


# --- (b) compression -------------------------------------------------------------------------------


def part_b(scorer: Scorer, tasks: list[str], adapters: dict[str, Path], own: dict[str, float]) -> list[dict]:
    rows = []
    for task in tasks:
        reference = None
        for label, (method, mode, params) in COMPRESSIONS.items():
            out = fresh_dir(WORK / "compressed" / f"{task}-{method}-{mode}-{len(rows)}")
            report = compress(adapters[task], out, method, lora_mode=mode, **params)
            score = scorer.score(scorer.with_dense_delta(out), [task], bf16=False)[task]
            if method == "raw":
                reference = score
            rows.append(
                {
                    "task": task,
                    "setting": label,
                    "method": method,
                    "lora_mode": mode,
                    "params": params,
                    "ratio": report.ratio,
                    "rel_error": report.rel_error,
                    "exact_match": score,
                    "adapter_exact_match": own[task],
                    "loss_points_vs_adapter": 100 * (own[task] - score),
                    "loss_points_vs_raw": None if reference is None else 100 * (reference - score),
                }
            )
            print(
                f"[b] {task} {label}: ratio {report.ratio:.1f}x, err {report.rel_error:.3f}, EM {score:.2f}"
            )
            shutil.rmtree(out)
    return rows


# --- goals and tables ------------------------------------------------------------------------------


def summarize_kept(row: dict[str, Any], tasks: list[str]) -> None:
    """min and mean of `kept` over the tasks a merge is judged on (undefined if an own score is 0)."""
    kept = [row["kept"][t] for t in row.get("pair", tasks)]
    row["min_kept"] = None if None in kept else min(kept)
    row["mean_kept"] = None if None in kept else statistics.fmean(kept)


def settings_meeting_goal(rows: list[dict[str, Any]], loss_key: str) -> list[str]:
    """Compression settings of >= GOAL_RATIO that lose <= GOAL_LOSS_POINTS (by `loss_key`) on every adapter."""
    by_setting: dict[str, list[dict]] = {}
    for row in rows:
        by_setting.setdefault(row["setting"], []).append(row)
    return [
        s
        for s, rs in by_setting.items()
        if all(
            r["ratio"] >= GOAL_RATIO and r[loss_key] is not None and r[loss_key] <= GOAL_LOSS_POINTS
            for r in rs
        )
    ]


def goals(result: dict[str, Any]) -> dict[str, Any]:
    for row in result["merges"]:
        summarize_kept(row, result["tasks"])
    three_way = [m for m in result["merges"] if m["space"] == "adapter" and m["min_kept"] is not None]
    best = max(three_way, key=lambda m: (m["min_kept"], m["mean_kept"]), default=None)
    merge = {
        "goal": f"best three-adapter merge keeps >= {GOAL_MERGE_KEPT:.0%} of every task's single-adapter score",
        "best_method": best and best["method"],
        "best_min_kept": best and best["min_kept"],
        "best_mean_kept": best and best["mean_kept"],
        "met": bool(best and best["min_kept"] >= GOAL_MERGE_KEPT),
    }
    rows = result["compression"]
    if not rows:
        return {"merge": merge}
    least_loss = {  # per adapter: the least exact-match loss among settings of at least GOAL_RATIO
        t: min(
            (
                (r["loss_points_vs_adapter"], r["setting"])
                for r in rows
                if r["task"] == t and r["ratio"] >= GOAL_RATIO
            ),
            default=None,
        )
        for t in result["tasks"]
    }
    vs_adapter = settings_meeting_goal(rows, "loss_points_vs_adapter")
    vs_raw = settings_meeting_goal(rows, "loss_points_vs_raw")
    return {
        "merge": merge,
        "compression": {
            "goal": f">= {GOAL_RATIO:g}x at <= {GOAL_LOSS_POINTS:g} exact-match point lost, on every adapter",
            "settings_meeting_it_vs_adapter": vs_adapter,
            "settings_meeting_it_vs_raw": vs_raw,
            "least_loss_vs_adapter_at_goal_ratio": least_loss,
            "met_vs_adapter": bool(vs_adapter),
            "met_vs_raw": bool(vs_raw),
        },
    }


def ratio(x: float) -> str:
    return f"{x:.1f}x" if x >= 1 else f"{x:.2f}x"


def met_by(settings: list[str]) -> str:
    return f"**met** by {', '.join(settings)}." if settings else "**not met**."


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def compression_markdown(result: dict[str, Any]) -> list[str]:
    lines = [
        "## (b) Compressing each adapter",
        "",
        "| adapter | setting | mode | size ratio | rel. error of ΔW | EM | adapter EM | loss vs adapter (points) | loss vs raw (points) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["compression"]:
        vs_raw = "-" if r["loss_points_vs_raw"] is None else f"{r['loss_points_vs_raw']:+.0f}"
        lines.append(
            f"| {r['task']} | {r['setting']} | {r['lora_mode']} | {ratio(r['ratio'])} | {r['rel_error']:.3f} | "
            f"{pct(r['exact_match'])} | {pct(r['adapter_exact_match'])} | {r['loss_points_vs_adapter']:+.0f} | {vs_raw} |"
        )
    return lines + [
        "",
        "size ratio = the adapter's A and B bytes / stored bytes (tensor bytes only, the library's report). "
        "'factors' compresses A and B themselves (A includes its random initialisation), 'dense' compresses "
        "ΔW = s·B·A; a raw dense ΔW is ~20x larger than the rank-16 factors. BitDelta runs without its "
        "scale calibration (that needs calibration batches through the model). Rows are scored in fp32.",
        "",
    ]  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    tasks, s = result["tasks"], result["settings"]
    lines = [
        "# Merge and compression quality (benchmarks/merge.py)",
        "",
        f"Command: `{s['command']}`",
        "",
        f"Default model (SmolLM2-135M-Instruct), one LoRA adapter per task (r 16, all linear layers, "
        f"{s['steps']} steps of 4 x 512 packed tokens, lr 2e-3). Exact match on {s['eval_items']} held-out "
        f"test prompts per task, greedy; LoRA-form models in bf16, models holding W + ΔW in fp32. {s['cpu']}. Total wall time {result['wall_seconds'] / 60:.1f} min.",
        "",
        "Training (cached adapters are reused; these are the times of the run that trained them): "
        + ", ".join(
            f"{t} {v['train_seconds'] / 60:.1f} min at {v['tokens_per_second']:.0f} tokens/s, final loss {v['final_loss']:.3f}"
            for t, v in result["training"].items()
        )
        + ".",
        "",
        "## (a) Merging the three adapters",
        "",
        "| model | "
        + " | ".join(f"{t} EM | kept" for t in tasks)
        + " | min kept | mean kept | space, rank | SVD rel. error (mean / max) |",
        "|---|" + "---:|---:|" * len(tasks) + "---:|---:|---|---:|",
        "| base model | " + " | ".join(f"{pct(result['base'][t])} | " for t in tasks) + " | | | | |",
    ]
    for t in tasks:
        cells = " | ".join(f"{pct(result['single'][t][u])} | " for u in tasks)
        lines.append(f"| adapter {t} | {cells} | | | | |")
    for m in result["merges"]:
        cells = " | ".join(f"{pct(m['exact_match'][t])} | {pct(m['kept'][t])}" for t in tasks)
        err = (
            "-" if m["svd_rel_error_mean"] is None
            else f"{m['svd_rel_error_mean']:.3f} / {m['svd_rel_error_max']:.3f}"
        )  # fmt: skip
        rank = f"{m['space']}, r {m['rank']}" if m["rank"] else m["space"]
        lines.append(
            f"| {m['method']} | {cells} | {pct(m['min_kept'])} | {pct(m['mean_kept'])} | {rank} | {err} |"
        )
    lines += [
        "",
        "kept = merged EM / the task's own adapter's EM (its diagonal entry above); min and mean over the "
        "three tasks (over its two tasks for SLERP). Adapter-space merges are LoRA adapters of rank 48 "
        "(linear and task arithmetic exact; the others SVD-truncated, error per module in the last column). "
        "Settings: " + "; ".join(f"{m['method']} {json.dumps(m['settings'])}" for m in result["merges"]),
        "",
    ]
    if "interference" in result:
        inter = result["interference"]
        lines += [
            f"Interference before merging (`deltatune inspect`, {inter['seconds']:.1f} s): ΔW norms "
            + ", ".join(f"{t} {v:.1f}" for t, v in inter["norms"].items()),
            "",
            "| pair | cosine of ΔW | top-16 subspace overlap |",
            "|---|---:|---:|",
            *(f"| {k} | {v['cosine']:.3f} | {v['overlap']:.3f} |" for k, v in inter["pairs"].items()),
            "",
        ]
    if result["compression"]:
        lines += compression_markdown(result)
    g, checks = result["goals"], result["precision_check"]
    lines += [
        "## Goals",
        "",
        f"- Merge: {g['merge']['goal']}: **{'met' if g['merge']['met'] else 'not met'}** "
        f"(best: {g['merge']['best_method']}, min kept {pct(g['merge']['best_min_kept'])}, "
        f"mean kept {pct(g['merge']['best_mean_kept'])}).",
    ]
    if "compression" in g:
        lines += [
            f"- Compression: {g['compression']['goal']}, against the unmerged adapter: "
            + met_by(g["compression"]["settings_meeting_it_vs_adapter"])
            + " Least loss at >= 10x per adapter: "
            + ", ".join(
                f"{t} {v[0]:+.0f} points ({v[1]})" if v else f"{t} -"
                for t, v in g["compression"]["least_loss_vs_adapter_at_goal_ratio"].items()
            )
            + ".",
            "- The same goal against the raw row (the uncompressed ΔW loaded the same way): "
            + met_by(g["compression"]["settings_meeting_it_vs_raw"]),
            f"- With {s['eval_items']} items one item is {100 / s['eval_items']:.0f} points, so '<= 1 point' means no item lost.",
        ]  # fmt: skip
    lines += [
        "- bf16 vs fp32 check on the first items of each task (same prediction text / same right-or-wrong): "
        + ", ".join(
            f"{c['task']} {c['same_predictions']}/{c['items']} / {c['same_verdicts']}/{c['items']}"
            for c in checks
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per adapter")
    parser.add_argument("--eval-items", type=int, default=50, help="held-out prompts per task")
    parser.add_argument("--tasks", default=",".join(TASKS), help="three built-in tasks, comma-separated")
    parser.add_argument(
        "--check-items", type=int, default=8, help="items per task for the bf16 vs fp32 check"
    )
    parser.add_argument("--out", type=Path, default=OUT, help="where merge_quality.json/.md go")
    parser.add_argument("--no-compress", action="store_true", help="part (a) only: skip compression")
    parser.add_argument("--methods", help="merge rows to run, comma-separated (default: all, and slerp)")
    parser.add_argument(
        "--tables-only", action="store_true", help="rebuild goals and the .md from the existing JSON"
    )
    args = parser.parse_args()
    if args.tables_only:
        result = json.loads((args.out / "merge_quality.json").read_text())
        write_tables(result, args.out)
        return
    tasks = args.tasks.split(",")
    if len(tasks) < 2:
        parser.error("--tasks needs at least two tasks (SLERP uses the first two)")
    started = time.perf_counter()
    loads = [wait_for_quiet_cpu("train")]
    trained = {t: trained_adapter(t, args.steps) for t in tasks}
    adapters = {t: a for t, (a, _) in trained.items()}
    loads.append(wait_for_quiet_cpu("evaluate + merge"))
    scorer = Scorer(tasks, args.eval_items)
    check = [scorer.precision_check(adapters[t], t, min(args.check_items, args.eval_items)) for t in tasks]
    print(f"[check] {check}")
    result: dict[str, Any] = {
        "tasks": tasks,
        "settings": {
            "command": "OMP_WAIT_POLICY=PASSIVE python benchmarks/merge.py"
            + (f" --steps {args.steps}" if args.steps != 30 else "")
            + (f" --eval-items {args.eval_items}" if args.eval_items != 50 else "")
            + (f" --tasks {args.tasks}" if tasks != list(TASKS) else "")
            + (" --no-compress" if args.no_compress else "")
            + (f" --methods {args.methods}" if args.methods else "")
            + (f" --out {args.out}" if args.out != OUT else ""),
            "steps": args.steps,
            "eval_items": args.eval_items,
            "max_new_tokens": scorer.max_new,
            "cpu": f"CPU, {os.cpu_count()} cores (shared), torch {torch.__version__}",
        },
        "training": {t: s for t, (_, s) in trained.items()},
        "precision_check": check,
    }
    only = set(args.methods.split(",")) if args.methods else None
    if only and only - set(MERGES) - {"slerp"}:
        parser.error(
            f"--methods: unknown {sorted(only - set(MERGES) - {'slerp'})}; known: {', '.join(MERGES)}, slerp"
        )
    result |= part_a(scorer, tasks, adapters, args.steps, only)
    result["compression"] = []
    if not args.no_compress:
        loads.append(wait_for_quiet_cpu("compress"))
        result["compression"] = part_b(scorer, tasks, adapters, result["own"])
    result["load"] = loads
    result["wall_seconds"] = time.perf_counter() - started
    write_tables(result, args.out)


def write_tables(result: dict[str, Any], out: Path) -> None:
    result["goals"] = goals(result)
    write_atomic(out / "merge_quality.json", json.dumps(result, indent=2) + "\n")
    write_atomic(out / "merge_quality.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
