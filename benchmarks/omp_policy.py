"""OpenMP wait policy and thread count for training, on a quiet CPU and beside a second busy process.

torch's OpenMP threads spin after each parallel region (OMP_WAIT_POLICY=ACTIVE-like behaviour,
GNU libgomp's default spins for a while before sleeping). Alone that saves a little wake-up
latency; beside another process that also computes, spinning threads steal the cores the other
side needs, and both collapse. This runs the same short `deltatune train` (real default model,
LoRA r16, packed rows) under each setting, first alone, then next to a second torch process doing
bf16 matmuls with its own threads (the "other job"), and reports training tokens/s and the other
job's matmul rate.

    python benchmarks/omp_policy.py   # writes benchmarks/out/omp_policy.{json,md}; run it alone
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "out"

BUSY = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(1024, 1024, dtype=torch.bfloat16); b = torch.randn(1024, 1024, dtype=torch.bfloat16)
n, t0 = 0, time.perf_counter()
while True:
    a @ b; n += 1
    if n % 50 == 0:
        print(n * 2 * 1024**3 / (time.perf_counter() - t0) / 1e9, flush=True)
"""


def train_once(policy: str | None, threads: int, steps: int, workdir: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "DELTATUNE_OMP_DEFAULTS")}
    env["DELTATUNE_OMP_DEFAULTS"] = "0"  # measure the raw settings, not the CLI's chosen default
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    env["OMP_NUM_THREADS"] = str(threads)
    out = workdir / f"run-{policy}-{threads}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [
        sys.executable, "-m", "deltatune", "train", "--max-steps", str(steps), "--batch-size", "2",
        "--max-seq-len", "256", "--eval-samples", "0", "--train-samples", "400", "--save-every", "0",
        "--warmup-steps", "1", "--output", str(out),
    ]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return json.loads((out / "summary.json").read_text())["tokens_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--workdir", type=Path, default=OUT / "omp_policy")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count()
    rows = []
    for load in ("quiet", "busy"):
        for policy in (None, "PASSIVE"):
            for threads in (cores, max(1, cores // 2)):
                busy, rate = None, None
                if load == "busy":
                    benv = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
                    if policy is not None:
                        benv["OMP_WAIT_POLICY"] = policy  # both jobs run under the same setting
                    busy = subprocess.Popen(
                        [sys.executable, "-c", BUSY, str(cores)], env=benv, stdout=subprocess.PIPE, text=True
                    )
                    time.sleep(3)
                try:
                    tps = train_once(policy, threads, args.steps, args.workdir)
                finally:
                    if busy is not None:
                        busy.terminate()
                        lines = busy.communicate()[0].split()
                        rate = float(lines[-1]) if lines else None
                rows.append(
                    {
                        "load": load,
                        "omp_wait_policy": policy or "(unset: libgomp default)",
                        "threads": threads,
                        "train_tokens_per_second": tps,
                        "other_job_gflops": rate,
                    }
                )
                print(rows[-1], flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "omp_policy.json").write_text(json.dumps({"cores": cores, "rows": rows}, indent=2))
    md = [
        "| load | OMP_WAIT_POLICY | threads | train tokens/s | other job GFLOP/s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        other = f"{r['other_job_gflops']:.0f}" if r["other_job_gflops"] else "-"
        md.append(
            f"| {r['load']} | {r['omp_wait_policy']} | {r['threads']} | {r['train_tokens_per_second']:.0f} | {other} |"
        )
    (OUT / "omp_policy.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
