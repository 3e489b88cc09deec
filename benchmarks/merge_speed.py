"""Merge speed and memory, deltatune vs mergekit, on three default-size models (SmolLM2-135M, fp32).

    python benchmarks/merge_speed.py            # writes benchmarks/out/merge_speed.json and .md

The base is the default model (`deltatune.models.resolve()`); two "fine-tunes" are the base plus
seeded noise on every tensor (1% of the tensor's std), written once to benchmarks/out/cache/.
Each merge runs in its own subprocess, which reports the wall time of the merge call (imports
excluded) and its peak RSS (VmHWM, so memory-mapped input pages count too). The floor is a process
that only reads every byte of every input file and writes one output file the size of a model:
either read(2) into a reused 64 MB buffer, or mmap and sum every word; linear is compared with the
faster of the two. mergekit runs with its defaults (torch's own threads) and, as a second
reference, with one thread (`--num-threads 1`), which avoids OpenMP stalls when the machine is busy;
the TIES targets compare against the faster of the two. Runs are repeated (see REPEATS) and the best
time kept (the machine is shared); the page cache is warmed first, so all runs read from memory.

Merges: linear over the three models (weights 0.5/0.3/0.2), and TIES with the base as base_model
and the two fine-tunes (density 0.5, weights 0.5/0.5). The singular-vector merges mergekit does not
have (TSV-M, Iso-C, Iso-CTS, TIES in KnOTS space) run on the same base and fine-tunes, deltatune
only, once each; they are compared with deltatune's own TIES (peak RSS goal: <= 1.5x).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
CACHE = OUT / "cache"
REPEATS = {"floor-read": 3, "floor-mmap": 3, "deltatune": 3, "mergekit": 2, "mergekit-1thread": 1}
NOISE = 0.01
TOOLS = ("floor-read", "floor-mmap", "deltatune", "mergekit", "mergekit-1thread")
TARGETS = {"ties_time": 0.25, "ties_memory": 0.5, "linear_vs_floor": 1.3}
SPECTRAL = {"tsv": "", "iso_c": "", "iso_cts": "", "ties_knots": "knots: true\n"}  # method -> extra YAML
SPECTRAL_MEMORY_GOAL = 1.5  # peak RSS vs deltatune's TIES


def configs(base: Path, ft1: Path, ft2: Path) -> dict[str, str]:
    return {
        "linear": f"""merge_method: linear
models:
  - model: {base}
    parameters: {{weight: 0.5}}
  - model: {ft1}
    parameters: {{weight: 0.3}}
  - model: {ft2}
    parameters: {{weight: 0.2}}
dtype: float32
""",
        "ties": f"""merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.5, density: 0.5}}
parameters: {{normalize: true}}
dtype: float32
""",
        **{
            name: f"merge_method: {name.removesuffix('_knots')}\nbase_model: {base}\nmodels:\n  - model: {ft1}\n"
            f"  - model: {ft2}\n{extra}dtype: float32\n"
            + ("parameters: {weight: 0.5, density: 0.5}\n" if name == "ties_knots" else "")
            for name, extra in SPECTRAL.items()
        },
    }


def make_models() -> tuple[Path, Path, Path]:
    """The default model and two noisy copies (cached)."""
    import torch
    from safetensors.torch import load_file, save_file

    from deltatune.models import resolve

    base = resolve()
    copies = []
    for seed in (1, 2):
        target = CACHE / f"smollm2-135m-noise{seed}"
        copies.append(target)
        if (target / "model.safetensors").is_file():
            continue
        tmp = CACHE / f".{target.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        gen = torch.Generator().manual_seed(seed)
        tensors = load_file(base / "model.safetensors")
        for name, t in sorted(tensors.items()):
            scale = float(t.float().std()) if t.numel() > 1 else 1.0
            tensors[name] = t + NOISE * scale * torch.randn(t.shape, generator=gen, dtype=t.dtype)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        for f in base.iterdir():
            if f.name != "model.safetensors" and f.is_file():
                shutil.copyfile(f, tmp / f.name)
        os.replace(tmp, target)
    return base, copies[0], copies[1]


# ---------------------------------------------------------------------------------------------------
# Children: one merge each, reporting {"seconds", "peak_rss_bytes"} on the last stdout line


def child(tool: str, method: str, config: Path, out: Path) -> None:
    if tool == "deltatune":
        from deltatune.merge import run_merge

        started = time.perf_counter()
        run_merge(config, out)
    elif tool in ("mergekit", "mergekit-1thread"):
        import torch
        import yaml
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge

        if tool == "mergekit-1thread":  # mergekit's --num-threads 1: no OpenMP stalls on a busy machine
            torch.set_num_threads(1)
        merge_config = MergeConfiguration.model_validate(yaml.safe_load(config.read_text()))
        started = time.perf_counter()
        run_merge(merge_config, str(out), MergeOptions(quiet=True, write_model_card=False))
    else:  # a read/write floor: read(2) into a buffer, or mmap and sum every word
        inputs = [
            Path(line.split("model:")[1].strip()) / "model.safetensors"
            for line in config.read_text().splitlines()
            if "model:" in line
        ]
        import numpy  # noqa: F401 - imported before the clock starts

        started = time.perf_counter()
        floor(inputs, out, use_mmap=tool == "floor-mmap")
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak_rss()}))


def peak_rss() -> int:
    """This process image's peak RSS: VmHWM restarts at exec, while ru_maxrss keeps the parent's peak."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def floor(inputs: list[Path], out: Path, use_mmap: bool, chunk: int = 64 << 20) -> None:
    """Read every byte of every input once and write one file as large as an input.

    That is the I/O a merge cannot avoid. Two ways to read: read(2) into a reused 64 MB buffer (one
    copy out of the page cache), or mmap plus a sum over every 8-byte word (no copy, as the merge reads).
    """
    import mmap

    import numpy as np

    buffer = bytearray(chunk)
    view = memoryview(buffer)
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            if use_mmap:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                    words = np.frombuffer(mapped, dtype=np.uint64, count=len(mapped) // 8)
                    words.sum()
                    del words
            else:
                while f.readinto(view):
                    pass
    out.mkdir(parents=True)
    remaining = inputs[0].stat().st_size
    with open(out / "model.safetensors", "wb", buffering=0) as f:
        while remaining:
            remaining -= f.write(view[: min(chunk, remaining)])


# ---------------------------------------------------------------------------------------------------
# Parent


def run_child(tool: str, method: str, config: Path) -> dict:
    out = OUT / f"merged-{tool}-{method}"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", tool, method, str(config), str(out)],
        capture_output=True,
        text=True,
        env=os.environ | {"TQDM_DISABLE": "1"},
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} {method} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = wall
    shutil.rmtree(out, ignore_errors=True)
    return result


def markdown(rows: list[dict], ratios: dict, machine: str) -> str:
    lines = [
        "# Merge speed: deltatune vs mergekit",
        "",
        f"Three SmolLM2-135M models in fp32 (538 MB each); {machine}. Best of 3 runs (mergekit: 2, mergekit-1thread:",
        "1), each in its own process. seconds: the merge call (imports excluded); process seconds: the",
        "whole process (Python start-up and imports included); peak RSS: the process's VmHWM, memory-mapped",
        "input pages included. Command: `python benchmarks/merge_speed.py`.",
        "",
        "| merge | tool | seconds | process seconds | peak RSS (MB) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['tool']} | {r['seconds']:.2f} | {r['process_seconds']:.1f} "
            f"| {r['peak_rss_bytes'] / 1e6:.0f} |"
        )
    lines += ["", "| target | measured | goal | met |", "|---|---:|---:|:---:|"]
    for key, label in (
        ("ties_time", "TIES time, deltatune / mergekit (its faster configuration)"),
        ("ties_memory", "TIES peak RSS, deltatune / mergekit (same run)"),
        ("linear_vs_floor", "linear time, deltatune / read-write floor (the faster one)"),
    ):
        met = "yes" if ratios[key] <= TARGETS[key] else "no"
        lines.append(f"| {label} | {ratios[key]:.2f}x | <= {TARGETS[key]}x | {met} |")
    for m, r in ratios.get("spectral", {}).items():
        met = "yes" if r["memory_vs_ties"] <= SPECTRAL_MEMORY_GOAL else "no"
        lines.append(f"| {m}: time / peak RSS vs deltatune TIES | {r['time_vs_ties']:.2f}x / "
                     f"{r['memory_vs_ties']:.2f}x | RSS <= {SPECTRAL_MEMORY_GOAL}x | {met} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    base, ft1, ft2 = make_models()
    OUT.mkdir(parents=True, exist_ok=True)
    paths = {}
    for method, text in configs(base, ft1, ft2).items():
        paths[method] = OUT / f"merge_speed_{method}.yaml"
        paths[method].write_text(text)
    for p in (base, ft1, ft2):  # warm the page cache so every run reads from memory
        with open(p / "model.safetensors", "rb") as f:
            while f.read(64 << 20):
                pass
    load_before = os.getloadavg()
    plan = [
        (tool, method)
        for method in ("linear", "ties")
        for tool in TOOLS
        if not (tool.startswith("floor") and method == "ties")
    ] + [("deltatune", m) for m in SPECTRAL]
    runs: dict[tuple[str, str], list[dict]] = {key: [] for key in plan}
    for repeat in range(max(REPEATS.values())):
        for tool, method in plan:
            if repeat >= (1 if method in SPECTRAL else REPEATS[tool]):
                continue  # mergekit runs are the slow ones: fewer repeats
            result = run_child(tool, method, paths[method])
            runs[(tool, method)].append(result)
            print(
                f"{tool:16s} {method:6s} {result['seconds']:7.2f} s {result['peak_rss_bytes'] / 1e6:7.0f} MB",
                flush=True,
            )
    rows = []
    for (tool, method), results in runs.items():
        best = min(results, key=lambda r: r["seconds"])
        peak = max(r["peak_rss_bytes"] for r in results)
        rows.append(dict(tool=tool, method=method, seconds=best["seconds"], process_seconds=best["process_seconds"],
                         peak_rss_bytes=peak, runs=results))  # fmt: skip
    by = {(r["tool"], r["method"]): r for r in rows}
    mergekit_ties = min(
        (by[(t, "ties")] for t in ("mergekit", "mergekit-1thread")), key=lambda r: r["seconds"]
    )
    ratios = {  # TIES against mergekit's faster configuration
        "ties_time": by[("deltatune", "ties")]["seconds"] / mergekit_ties["seconds"],
        "ties_memory": by[("deltatune", "ties")]["peak_rss_bytes"] / mergekit_ties["peak_rss_bytes"],
        "linear_vs_floor": by[("deltatune", "linear")]["seconds"]
        / min(by[(t, "linear")]["seconds"] for t in ("floor-read", "floor-mmap")),
    }
    ties = by[("deltatune", "ties")]
    spectral = {
        m: {"time_vs_ties": by[("deltatune", m)]["seconds"] / ties["seconds"],
            "memory_vs_ties": by[("deltatune", m)]["peak_rss_bytes"] / ties["peak_rss_bytes"]}
        for m in SPECTRAL
    }  # fmt: skip
    ratios["spectral"] = spectral
    load = f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after"
    machine = f"{os.cpu_count()} CPU cores shared with other jobs, 1-minute load average {load}"
    (OUT / "merge_speed.json").write_text(
        json.dumps({"rows": rows, "ratios": ratios, "targets": TARGETS, "machine": machine}, indent=2) + "\n"
    )
    (OUT / "merge_speed.md").write_text(markdown(rows, ratios, machine))
    print(markdown(rows, ratios, machine))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--child", nargs=4, metavar=("TOOL", "METHOD", "CONFIG", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        tool, method, config, out = args.child
        child(tool, method, Path(config), Path(out))
    else:
        main()
