"""LoRA training throughput: deltatune vs peft + transformers Trainer, side by side in one run.

Both sides train the default model (SmolLM2-135M-Instruct) with the same LoRA (r16, alpha 32,
all-linear), the same bf16 mixed precision, learning rate, schedule and number of optimizer steps,
on the same samples: chat samples with a realistic spread of lengths (short task prompts and long
copy-the-words answers, lognormal lengths), tokenized once with deltatune's tokenizer code so the
loss masks are identical. Trainer pads each batch to its longest sample (its default collator);
deltatune packs. Each side runs in its own subprocess so its peak RSS is its own.

tokens/s counts real (non-padding) tokens per second of the training loop. "% of bf16 peak" uses
the standard 4 x (matmul parameters) FLOPs per token for LoRA training (forward + input-gradient
backward; frozen weights need no weight gradient) against a bf16 matmul measured in this run.

    python benchmarks/train_throughput.py            # writes benchmarks/out/train_throughput.{json,md}
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "out"
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "seven",
    "music",
    "paper",
    "light",
    "table",
    "winter",
    "garden",
    "silver",
    "number",
    "window",
    "forest",
    "button",
    "candle",
    "mirror",
    "rocket",
    "planet",
    "sugar",
    "yellow",
    "bridge",
    "dragon",
    "castle",
]


def make_data(path: Path, n: int, seed: int) -> None:
    from deltatune.data.tasks import TASKS, examples

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 2 == 0:
            task = list(TASKS)[i // 2 % len(TASKS)]
            ex = examples(task, "train", 1, seed=seed + i)[0]
            rows.append({"messages": ex.messages()})
        else:
            k = min(300, max(4, int(rng.lognormvariate(math.log(50), 0.8))))
            words = " ".join(rng.choice(WORDS) for _ in range(k))
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": f"Repeat these words in order: {words}"},
                        {"role": "assistant", "content": words},
                    ]
                }
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def matmul_params(model) -> int:
    """Parameters that take part in matmuls per token: every Linear plus the (tied) LM head."""
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head = model.get_output_embeddings()
    return (
        linears
        if any(head is m for m in model.modules() if isinstance(m, torch.nn.Linear))
        else linears + head.weight.numel()
    )


def bf16_matmul_flops(seconds: float = 3.0) -> float:
    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return n * 2 * 2048**3 / (time.perf_counter() - start)


def run_deltatune(args) -> dict:
    import deltatune

    summary = deltatune.train(
        dict(
            data=str(args.data),
            eval_data=str(args.eval_data),
            eval_samples=0,
            lora_r=16,
            lora_alpha=32,
            learning_rate=args.lr,
            schedule="linear",
            warmup_steps=args.warmup,
            max_steps=args.steps,
            batch_size=args.rows,
            max_seq_len=args.seq_len,
            precision="bf16",
            save_every=0,
            seed=0,
            output=str(args.workdir / "deltatune"),
            eval_every=0,
            log_every=1,
            model=args.model,
            device=args.device,
        )
    )
    from deltatune.models import load_model

    log = [json.loads(x) for x in (args.workdir / "deltatune" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    return {
        "tokens_per_second": summary["tokens_per_second"],
        "peak_rss_bytes": peak_rss(),
        "final_loss": sum(losses[-5:]) / len(losses[-5:]),
        "eval_loss": summary["eval_loss"],
        "train_tokens": summary["train_tokens"],
        "train_seconds": summary["train_seconds"],
        "matmul_params": matmul_params(load_model(args.model)),
    }


def run_peft(args) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from deltatune.data import load_samples
    from deltatune.models import load_model, load_tokenizer

    tok = load_tokenizer(args.model)
    model = load_model(args.model, device=args.device)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    )
    train = [
        {
            "input_ids": s.input_ids[: args.seq_len],
            "labels": s.labels[: args.seq_len],
            "attention_mask": [1] * len(s.input_ids[: args.seq_len]),
        }
        for s in load_samples(args.data, tok)
    ]
    evals = [
        {"input_ids": s.input_ids, "labels": s.labels, "attention_mask": [1] * len(s.input_ids)}
        for s in load_samples(args.eval_data, tok)
    ]
    pad_collate = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True)
    seen = [0]

    def collate(features):  # counts the real tokens of exactly the batches the Trainer trains on
        batch = pad_collate(features)
        seen[0] += int(batch["attention_mask"].sum())
        return batch

    class Log(TrainerCallback):
        losses: list[float] = []
        tokens = 0

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                Log.losses.append(logs["loss"])

    targs = TrainingArguments(
        output_dir=str(args.workdir / "peft"),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=args.warmup,
        bf16=True,
        use_cpu=args.device == "cpu",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        max_grad_norm=1.0,
        weight_decay=0.0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=collate, callbacks=[Log()])
    result = trainer.train()
    seen = seen[0]
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(args.device, dtype=torch.bfloat16):
        for i in range(0, len(evals), args.batch):
            batch = pad_collate(evals[i : i + args.batch]).to(args.device)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += model(**batch).loss.item() * n
            count += n
    train_seconds = result.metrics["train_runtime"]
    return {
        "tokens_per_second": seen / train_seconds,
        "peak_rss_bytes": peak_rss(),
        "final_loss": sum(Log.losses[-5:]) / len(Log.losses[-5:]),
        "eval_loss": total / count,
        "train_tokens": seen,
        "train_seconds": train_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", choices=["deltatune", "peft"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="samples per step for peft+Trainer")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=OUT / "train_throughput")
    parser.add_argument(
        "--rows",
        type=int,
        default=0,
        help="deltatune packed rows per step (0: match tokens)",
    )
    parser.add_argument("--model", default="default", help="'default' or a HF model directory")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--eval-data", type=Path)
    args = parser.parse_args()

    if args.side:  # child process: one side only
        result = {"deltatune": run_deltatune, "peft": run_peft}[args.side](args)
        print("RESULT " + json.dumps(result))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    data, eval_data = args.workdir / "train.jsonl", args.workdir / "eval.jsonl"
    make_data(data, args.samples, seed=0)
    make_data(eval_data, 64, seed=10_000)
    from deltatune.data import load_samples
    from deltatune.models import load_tokenizer

    lengths = [min(len(s.input_ids), args.seq_len) for s in load_samples(data, load_tokenizer(args.model))]
    mean_len = sum(lengths) / len(lengths)
    rows = args.rows or max(1, round(args.batch * mean_len / (args.seq_len * 0.97)))
    results = {}
    for side in ("deltatune", "peft"):
        for sub in args.workdir.glob(f"{side}*"):
            subprocess.run(["rm", "-rf", str(sub)], check=True)
        cmd = [
            sys.executable,
            __file__,
            "--side",
            side,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--seq-len",
            str(args.seq_len),
            "--lr",
            str(args.lr),
            "--warmup",
            str(args.warmup),
            "--model",
            args.model,
            "--device",
            args.device,
            "--rows",
            str(rows),
            "--data",
            str(data),
            "--eval-data",
            str(eval_data),
            "--workdir",
            str(args.workdir),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            raise SystemExit(f"{side} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results[side] = json.loads(line[0][7:])
        print(side, results[side])

    peak = bf16_matmul_flops()
    ours, theirs = results["deltatune"], results["peft"]
    achieved = 4 * ours.pop("matmul_params") * ours["tokens_per_second"]
    report = {
        "setup": {
            "model": "SmolLM2-135M-Instruct",
            "lora": "r16 alpha32 all-linear",
            "precision": "bf16 autocast",
            "steps": args.steps,
            "peft_samples_per_step": args.batch,
            "deltatune_rows_per_step": rows,
            "seq_len": args.seq_len,
            "mean_sample_tokens": mean_len,
            "samples": args.samples,
            "torch_threads": torch.get_num_threads(),
        },
        "deltatune": ours,
        "peft_trainer": theirs,
        "ratios": {
            "tokens_per_second": ours["tokens_per_second"] / theirs["tokens_per_second"],
            "peak_rss": ours["peak_rss_bytes"] / theirs["peak_rss_bytes"],
            "eval_loss": ours["eval_loss"] / theirs["eval_loss"],
        },
        "bf16_matmul_gflops": peak / 1e9,
        "deltatune_percent_of_bf16_peak": 100 * achieved / peak,
    }
    (OUT / "train_throughput.json").write_text(json.dumps(report, indent=2))
    r = report["ratios"]
    md = [
        "| | deltatune | peft + Trainer | ratio |",
        "|---|---|---|---|",
        f"| tokens/s | {ours['tokens_per_second']:.0f} | {theirs['tokens_per_second']:.0f} | {r['tokens_per_second']:.2f}x |",
        f"| peak RSS | {ours['peak_rss_bytes'] / 2**30:.2f} GiB | {theirs['peak_rss_bytes'] / 2**30:.2f} GiB | {r['peak_rss']:.2f}x |",
        f"| final train loss (last 5 steps) | {ours['final_loss']:.3f} | {theirs['final_loss']:.3f} | |",
        f"| held-out loss | {ours['eval_loss']:.3f} | {theirs['eval_loss']:.3f} | {r['eval_loss']:.2f}x |",
        "",
        f"deltatune reaches {report['deltatune_percent_of_bf16_peak']:.0f}% of this machine's measured bf16 "
        f"matmul throughput ({report['bf16_matmul_gflops']:.0f} GFLOP/s).",
    ]
    (OUT / "train_throughput.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
