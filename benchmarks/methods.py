"""The method zoo side by side: every method trained on the default model, on two built-in tasks.

    python benchmarks/methods.py                           # the README table: 21 methods x 2 tasks, ~2 h
    python benchmarks/methods.py --steps 2 --methods lora,ia3 --tasks reversal   # a smoke run
    python benchmarks/methods.py --resume methods-20261122-234344                 # finish or re-read a table

Each (method, task) run is one `deltatune.train` call in its own subprocess, so the peak memory
(`ru_maxrss`) is that run's alone; all runs share the step budget, batch, data and seed and differ
only in the method and its learning rate (LEARNING_RATES below). Writes benchmarks/out/methods.json
and benchmarks/out/methods.md: method, family, trainable parameters (count and % of the base
model's), training tokens/s, peak memory, exact match per task (before -> after), adapter size on
disk, the learning rate, and what the sparse methods kept.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"

# One learning rate per method: one short run cannot tune each, so these are the values the methods'
# papers and peft's examples use, scaled for a 135M model and a few hundred steps. The rule of thumb:
# the fewer and the more "multiplicative" the trained numbers, the larger the rate.
LEARNING_RATES: dict[str, float] = {
    # low-rank and structured weight deltas: the usual LoRA rate for small models
    "lora": 2e-3,
    "dora": 2e-3,
    "loha": 2e-3,
    "lokr": 2e-3,
    # PiSSA/OLoRA start on the weight's principal directions: a LoRA rate overshoots at first
    "pissa": 5e-4,
    "olora": 5e-4,
    # only two scaling vectors per layer train (the VeRA paper uses 1e-2 and more)
    "vera": 1e-2,
    # rotations via the Cayley parametrisation: well-conditioned, a bit below the LoRA rate
    "oft": 1e-3,
    "boft": 1e-3,
    # vectors (bias, scale, shift, rescaling): few numbers, large rates (BitFit, IA3, SSF papers)
    "bitfit": 5e-3,
    "ia3": 5e-3,
    "ssf": 5e-3,
    # dense deltas over whole matrices: full fine-tuning rates; the sparse ones keep only the
    # largest entries afterwards, so they can afford twice that
    "full": 5e-5,
    "layer_select": 5e-5,
    "graft": 1e-4,
    "diff_pruning": 1e-4,
    # bottleneck adapters start as the identity; the adapter literature uses 1e-4 .. 1e-3
    "houlsby": 1e-3,
    "parallel_adapter": 1e-3,
    # soft prompts need large rates (Lester et al. use 0.3 with Adafactor; peft's examples 3e-2)
    "prompt_tuning": 3e-2,
    # P-tuning v2 trains the prefix directly (5e-3 .. 1e-2); the MLP of prefix tuning is steeper
    "ptuning_v2": 5e-3,
    "prefix_tuning": 1e-3,
}


def run_one(config: dict) -> dict:
    """Train in a fresh process; returns the run's summary.json plus its adapter's size and report.

    A run directory that already holds a summary.json written for the same config (an earlier,
    interrupted invocation, with --resume) is read back instead of trained again."""
    out = Path(config["output"])
    if (out / "summary.json").is_file() and same_settings(out / "config.json", config):
        return read_run(out)
    code = "import json, sys, deltatune; deltatune.train(json.loads(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(config)], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": " | ".join(tail)}
    return read_run(out)


def same_settings(saved_config: Path, config: dict) -> bool:
    """Did the run that wrote `saved_config` (the loop's resolved config.json) use `config`?"""
    if not saved_config.is_file():
        return False
    saved = json.loads(saved_config.read_text())
    return all(saved.get(key) == value for key, value in config.items())


def read_run(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    adapter = out / "adapter"
    summary["adapter_bytes"] = sum(f.stat().st_size for f in adapter.iterdir() if f.is_file())
    summary["report"] = json.loads((adapter / "adapter_config.json").read_text()).get("deltatune_report", {})
    return summary


def base_param_count(model: str) -> int:
    """Parameters of the base model, read from its safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    from deltatune.models import resolve

    total = 0
    for file in sorted(Path(resolve(model)).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())  # noqa: SIM118
    return total


def row_for(method: str, family: str, lr: float, runs: dict[str, dict], base_params: int) -> dict:
    ok = [r for r in runs.values() if "error" not in r]
    row = {"method": method, "family": family, "learning_rate": lr, "tasks": {}}
    for task, r in runs.items():
        row["tasks"][task] = (
            {"error": r["error"]}
            if "error" in r
            else {
                "exact_match_before": r["eval"][task]["before"],
                "exact_match": r["eval"][task]["after"],
                "final_loss": r["final_loss"],
            }
        )
    if ok:
        first = ok[0]
        trainable = first["trainable_params"]
        row |= {
            "trainable_params": trainable,
            "trainable_percent": 100.0 * trainable / base_params,
            "tokens_per_second": sum(r["tokens_per_second"] for r in ok) / len(ok),
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in ok),
            "adapter_bytes": first["adapter_bytes"],
            "report": first["report"],
        }
    return row


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def markdown(rows: list[dict], tasks: list[str], command: str, meta: dict) -> str:
    head = [
        "method",
        "family",
        "trainable",
        "%",
        "tokens/s",
        "peak mem",
        *[f"EM {t}" for t in tasks],
        "adapter",
        "lr",
    ]
    lines = [
        f"`{command}`",
        "",
        f"{meta['model']}, {meta['steps']} steps x batch {meta['batch_size']} x {meta['max_seq_len']} tokens, "
        f"{meta['train_samples']} train / {meta['eval_samples']} test examples per task, seed {meta['seed']}, "
        f"{meta['precision']}. EM = exact match on the test split, before -> after training.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        if "trainable_params" not in row:
            errors = "; ".join(f"{t}: {r['error']}" for t, r in row["tasks"].items())
            lines.append(f"| {row['method']} | {row['family']} | failed: {errors} |")
            continue
        em = []
        for task in tasks:
            r = row["tasks"].get(task, {})
            em.append(
                "failed" if "error" in r else f"{r['exact_match_before']:.2f} -> {r['exact_match']:.2f}"
            )
        lines.append(
            f"| {row['method']} | {row['family']} | {_count(row['trainable_params'])} | "
            f"{row['trainable_percent']:.3f} | {row['tokens_per_second']:.0f} | "
            f"{_size(row['peak_memory_bytes'])} | {' | '.join(em)} | {_size(row['adapter_bytes'])} | "
            f"{row['learning_rate']:g} |"
        )
    sparse = [r for r in rows if r.get("report")]
    if sparse:
        lines += [
            "",
            "Sparse methods (share of ΔW entries kept, and of its summed |ΔW| and squared norm):",
            "",
        ]
        for r in sparse:
            rep = r["report"]
            lines.append(
                f"- {r['method']}: {rep['fraction_kept']:.3%} of entries, score kept {rep['score_kept']:.1%}, "
                f"energy kept {rep['energy_kept']:.1%} (nonzero before selection {rep['nonzero_fraction']:.1%})"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from deltatune.deltas import FAMILIES, METHODS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=36)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated method names")
    parser.add_argument("--tasks", default="reversal,addition", help="comma-separated built-in tasks")
    parser.add_argument("--model", default="default")
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--eval-samples", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--resume",
        metavar="NAME",
        help="reuse runs/NAME (e.g. methods-20261122-234300): finished runs are read back",
    )
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # run dirs are compared by their absolute path on --resume
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(METHODS)}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    meta = {
        "model": args.model,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_seq_len": args.max_seq_len,
        "train_samples": args.train_samples,
        "eval_samples": args.eval_samples,
        "seed": args.seed,
        "precision": args.precision,
    }
    base_params = base_param_count(args.model)
    stamp = args.resume or "methods-" + time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for method in methods:
        lr = LEARNING_RATES[method]
        runs = {}
        for task in tasks:
            config = {
                "model": args.model,
                "method": method,
                "task": task,
                "max_steps": args.steps,
                "learning_rate": lr,
                "train_samples": args.train_samples,
                "eval_samples": args.eval_samples,
                "batch_size": args.batch_size,
                "max_seq_len": args.max_seq_len,
                "seed": args.seed,
                "precision": args.precision,
                "warmup_steps": min(10, args.steps // 10),
                "save_every": 0,
                "output": str(args.out / "runs" / stamp / f"{method}-{task}"),
            }
            t0 = time.perf_counter()
            runs[task] = run_one(config)
            status = runs[task].get("error") or f"EM {runs[task]['eval'][task]['after']:.2f}"
            print(f"{method:16s} {task:10s} {time.perf_counter() - t0:7.1f}s  {status}", flush=True)
        rows.append(row_for(method, FAMILIES[method], lr, runs, base_params))
    given = sys.argv[1:] if argv is None else argv
    if args.resume:  # the command that reproduces the table does not need the resume flag
        i = given.index("--resume")
        given = given[:i] + given[i + 2 :]
    command = "python benchmarks/methods.py " + " ".join(given)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": command.strip(), "settings": meta, "tasks": tasks, "methods": rows}
    (args.out / "methods.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "methods.md").write_text(markdown(rows, tasks, command.strip(), meta))
    print((args.out / "methods.md").read_text())


if __name__ == "__main__":
    main()
