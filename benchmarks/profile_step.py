"""Where a deltatune LoRA training step spends its time: torch.profiler over a few steps.

Same setup as the training benchmark's deltatune side (default model, bf16 base, LoRA r16
all-linear, packed rows of 512 tokens from benchmarks/train_throughput.py's data), the step as
train/loop.py runs it (packed attention, chunked loss, AdamW, clipping). Prints and writes the top
ops by self CPU time, and the share of time in matmuls.

    python benchmarks/profile_step.py   # writes benchmarks/out/profile_step.{json,md}; run it alone
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import OUT, make_data  # noqa: E402

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_scaled_dot")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--tag", default="profile_step")
    args = parser.parse_args()

    from deltatune import attention
    from deltatune.data import load_samples, pack
    from deltatune.deltas import add_delta, named_delta_parameters
    from deltatune.models import load_model, load_tokenizer
    from deltatune.train.loop import CausalLMLoss

    work = OUT / "profile_step"
    work.mkdir(parents=True, exist_ok=True)
    make_data(work / "train.jsonl", 200, seed=0)
    tok = load_tokenizer("default")
    rows = pack(load_samples(work / "train.jsonl", tok), args.seq_len, tok.pad_token_id)
    model = load_model("default", dtype=torch.bfloat16)
    attention.use_packed_attention(model)
    add_delta(model, "lora", lora_r=16, lora_alpha=32)
    params = [p for p in named_delta_parameters(model).values() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    loss_fn = CausalLMLoss(model, 1024)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(i: int) -> int:
        sel = torch.arange(i * args.rows, (i + 1) * args.rows) % rows.input_ids.shape[0]
        batch = [t[sel] for t in (rows.input_ids, rows.position_ids, rows.labels)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(*batch) / int((batch[2][:, 1:] != -100).sum())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int((batch[0] != tok.pad_token_id).sum())

    model.train()
    step(0)  # warm-up
    tokens, start = 0, time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(1, args.steps + 1):
            tokens += step(i)
    seconds = time.perf_counter() - start
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    rows_out = [
        {
            "op": e.key,
            "self_ms_per_step": e.self_cpu_time_total / 1e3 / args.steps,
            "share": e.self_cpu_time_total / total,
            "calls_per_step": e.count / args.steps,
        }
        for e in top
    ]
    matmul = sum(e.self_cpu_time_total for e in events if e.key.startswith(MATMUL_OPS)) / total
    unprofiled_start, unprofiled_tokens = time.perf_counter(), 0
    for i in range(args.steps + 1, 2 * args.steps + 1):
        unprofiled_tokens += step(i)
    unprofiled = unprofiled_tokens / (time.perf_counter() - unprofiled_start)
    report = {
        "tokens_per_second": unprofiled,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "tokens_per_second_under_profiler": tokens / seconds,
        "matmul_share": matmul,
        "top": rows_out,
    }
    (OUT / f"{args.tag}.json").write_text(json.dumps(report, indent=2))
    md = [
        f"tokens/s {unprofiled:.0f} "
        f"({report['tokens_per_second_under_profiler']:.0f} under the profiler), peak RSS "
        f"{report['peak_rss_bytes'] / 2**30:.2f} GiB; "
        f"matmul ops: {100 * matmul:.0f}% of self CPU time",
        "",
        "| op | self ms/step | share | calls/step |",
        "|---|---|---|---|",
    ]
    md += [
        f"| {r['op']} | {r['self_ms_per_step']:.1f} | {100 * r['share']:.1f}% | {r['calls_per_step']:.0f} |"
        for r in rows_out
    ]
    (OUT / f"{args.tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
