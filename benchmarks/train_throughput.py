"""LoRA training, side by side on equal work: deltatune vs peft + Trainer vs TRL's SFTTrainer (packing).

Every side trains the default model (SmolLM2-135M-Instruct) with the same LoRA (r16, alpha 32,
all-linear, no dropout), bf16 mixed precision, AdamW at the same learning rate, linear decay after
the same warmup, gradient clipping at 1.0, on exactly the same samples: chat samples with a
realistic spread of lengths (short task prompts and long copy-the-words answers, lognormal),
tokenized once with deltatune's tokenizer code so the loss masks are identical. Each side makes
one pass over the data (no sample twice, none left out but the remainder of the last step), so
all see the same target tokens (within 1%):

    peft + Trainer   8 samples per step, each batch padded to its longest sample (its default collator)
    TRL SFTTrainer   packing=True (best-fit decreasing, padding-free rows with restarted position ids)
    deltatune        packed rows, per-sample attention; rows per step chosen to match 8 samples' tokens

Each side runs in its own process (so peak RSS is its own), one after another, and saves its
adapter. One scorer, independent of all three (peft on the fp32 base, bf16 autocast, padded
batches, `model(**batch).loss` weighted by target tokens), gives every adapter's held-out loss on
the same held-out samples; deltatune's own eval of its adapter is reported beside it.

tokens/s counts real (non-padding) tokens per second of the training loop. "% of bf16 roof" uses
4 x (matmul parameters) FLOPs per token for LoRA training (forward + input-gradient backward; the
frozen weights need no weight gradient) against a 2048x2048 bf16 matmul measured in this run.

    python benchmarks/train_throughput.py   # writes benchmarks/out/train_throughput.{json,md}; run it alone
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
SIDES = ("deltatune", "deltatune_fp32base", "peft", "trl")
LORA = {"r": 16, "alpha": 32}


def make_data(path: Path, n: int, seed: int) -> None:
    from deltatune.data.tasks import TASKS, examples

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 2 == 0:
            task = list(TASKS)[i // 2 % len(TASKS)]
            rows.append({"messages": examples(task, "train", 1, seed=seed + i)[0].messages()})
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
    tied = any(head is m for m in model.modules() if isinstance(m, torch.nn.Linear))
    return linears if tied else linears + head.weight.numel()


def bf16_matmul_flops(seconds: float = 3.0) -> float:
    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return n * 2 * 2048**3 / (time.perf_counter() - start)


def samples(args, path: Path):
    from deltatune.data import load_samples
    from deltatune.models import load_tokenizer

    tok = load_tokenizer(args.model)
    out = []
    for s in load_samples(path, tok):
        ids, labels = s.input_ids[: args.seq_len], s.labels[: args.seq_len]
        if any(t != -100 for t in labels[1:]):
            out.append({"input_ids": ids, "labels": labels})
    return tok, out


def targets(labels: torch.Tensor) -> int:
    return int((labels[..., 1:] != -100).sum())


# --- the sides (each in its own process) ---------------------------------------------------------


def run_deltatune(args) -> dict:
    import deltatune
    from deltatune.data import load_samples, pack
    from deltatune.models import load_tokenizer
    from deltatune.train.loop import rows_for_step

    tok = load_tokenizer(args.model)
    from deltatune.train.config import parse_scalar

    extra = {k.replace("-", "_"): parse_scalar(v) for k, v in args.dt_set}
    if args.side == "deltatune_fp32base":
        extra["base_dtype"] = "fp32"
    order = extra.get("packing", "shuffled")
    rows = pack(load_samples(args.data, tok), args.seq_len, tok.pad_token_id, order=order, seed=0)
    n_rows = rows.input_ids.shape[0]
    steps = n_rows // args.rows
    used = torch.cat([rows_for_step(s, n_rows, args.rows, 0) for s in range(steps)])
    summary = deltatune.train(
        dict(
            data=str(args.data),
            eval_data=str(args.eval_data),
            eval_samples=0,
            lora_r=LORA["r"],
            lora_alpha=LORA["alpha"],
            learning_rate=args.lr,
            schedule="linear",
            warmup_steps=args.warmup,
            max_steps=steps,
            batch_size=args.rows,
            max_seq_len=args.seq_len,
            precision="bf16",
            save_every=0,
            seed=0,
            output=str(args.workdir / args.side),
            log_every=1,
            model=args.model,
            device=args.device,
            cost_metrics=False,  # the peers measure nothing of the kind; keep the processes comparable
        )
        | extra
    )
    log = [json.loads(x) for x in (args.workdir / args.side / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    return {
        "steps": steps,
        "tokens_per_second": summary["tokens_per_second"],
        "peak_rss_bytes": peak_rss(),
        "final_loss": sum(losses[-5:]) / len(losses[-5:]),
        "own_eval_loss": summary["eval_loss"],
        "train_tokens": summary["train_tokens"],
        "train_target_tokens": targets(rows.labels[used]),
        "train_seconds": summary["train_seconds"],
        "adapter": str(args.workdir / args.side / "adapter"),
    }


class Counter:
    """Wraps a collator: counts the real and target tokens of exactly the batches a Trainer trains on."""

    def __init__(self, collate, pad_id: int):
        self.collate, self.pad_id, self.tokens, self.targets = collate, pad_id, 0, 0

    def __call__(self, features):
        batch = self.collate(features)
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        self.targets += targets(batch["labels"])
        return batch


def trainer_args(args, steps: int, out: Path, batch: int) -> dict:
    return dict(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        max_steps=steps,
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
        max_grad_norm=1.0,
        weight_decay=0.0,
        disable_tqdm=True,
    )


def peft_model(args):
    from peft import LoraConfig, get_peft_model

    from deltatune.models import load_model

    config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear", lora_dropout=0.0)
    return get_peft_model(load_model(args.model, device=args.device), config)


def finish_trainer(trainer, counter: Counter, out: Path) -> dict:
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trainer.model.save_pretrained(str(out / "adapter"))
    seconds = result.metrics["train_runtime"]
    return {
        "steps": trainer.state.global_step,
        "tokens_per_second": counter.tokens / seconds,
        "peak_rss_bytes": peak_rss(),
        "final_loss": sum(losses[-5:]) / len(losses[-5:]),
        "train_tokens": counter.tokens,
        "train_target_tokens": counter.targets,
        "train_seconds": seconds,
        "adapter": str(out / "adapter"),
    }


def run_peft(args) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tok, train = samples(args, args.data)
    train = [s | {"attention_mask": [1] * len(s["input_ids"])} for s in train]
    counter = Counter(DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True), tok.pad_token_id)
    out = args.workdir / "peft"
    targs = TrainingArguments(**trainer_args(args, len(train) // args.batch, out, args.batch))
    targs.remove_unused_columns = False
    trainer = Trainer(model=peft_model(args), args=targs, train_dataset=train, data_collator=counter)
    return finish_trainer(trainer, counter, out)


def run_trl(args) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok, train = samples(args, args.data)
    out = args.workdir / "trl"
    config = SFTConfig(
        **trainer_args(args, 1, out, args.rows), packing=True, packing_strategy="bfd", max_length=args.seq_len
    )
    trainer = SFTTrainer(
        model=peft_model(args), args=config, train_dataset=Dataset.from_list(train), processing_class=tok
    )
    trainer.args.max_steps = len(trainer.train_dataset) // args.rows  # one pass over the packed rows
    counter = Counter(trainer.data_collator, tok.pad_token_id)
    trainer.data_collator = counter
    return finish_trainer(trainer, counter, out)


def score(args) -> dict:
    """Held-out loss of each saved adapter, scored one way for all: peft, fp32 base, bf16 autocast, padded."""
    from peft import PeftModel
    from transformers import DataCollatorForSeq2Seq

    from deltatune.models import load_model

    tok, evals = samples(args, args.eval_data)
    evals = [s | {"attention_mask": [1] * len(s["input_ids"])} for s in evals]
    collate = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True)
    out = {}
    for name, path in json.loads(args.adapters).items():
        model = PeftModel.from_pretrained(load_model(args.model, device=args.device), path).eval()
        total, count = 0.0, 0
        with torch.no_grad(), torch.autocast(args.device, dtype=torch.bfloat16):
            for i in range(0, len(evals), 8):
                batch = collate(evals[i : i + 8]).to(args.device)
                n = targets(batch["labels"])
                total += model(**batch).loss.item() * n
                count += n
        out[name] = {"peft_scorer": total / count, "deltatune_eval": deltatune_eval(args, path)}
    return out


def deltatune_eval(args, adapter: str) -> float:
    """The adapter scored deltatune's way: loaded by deltatune.load on the bf16 base, packed eval rows."""
    import deltatune
    from deltatune import attention
    from deltatune.data import load_samples, pack
    from deltatune.models import load_tokenizer
    from deltatune.train.loop import CausalLMLoss, eval_loss

    tok = load_tokenizer(args.model)
    model = deltatune.load(args.model, adapter=adapter, dtype=torch.bfloat16, device=args.device)
    attention.use_packed_attention(model)
    rows = pack(load_samples(args.eval_data, tok), args.seq_len, tok.pad_token_id)
    autocast = {"device_type": args.device, "dtype": torch.bfloat16, "enabled": True}
    return eval_loss(CausalLMLoss(model, 1024), rows, 4, torch.device(args.device), autocast)


# --- the parent: data, sides, scorer, table --------------------------------------------------------


def child(args, side: str, **extra: str) -> dict:
    cmd = [sys.executable, __file__, "--side", side]
    for key in ("batch", "seq_len", "lr", "warmup", "model", "device", "rows", "workdir"):
        if getattr(args, key, None) is not None:
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += ["--data", str(args.data), "--eval-data", str(args.eval_data)]
    for k, v in args.dt_set:
        cmd += ["--dt-set", f"{k}={v}"]
    for k, v in extra.items():
        cmd += [f"--{k}", v]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise SystemExit(f"{side} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[0][7:])


def table(report: dict) -> str:
    sides = [s for s in SIDES if s in report["results"]]
    names = {
        "deltatune": "deltatune",
        "deltatune_fp32base": "deltatune, base_dtype fp32",
        "peft": "peft + Trainer",
        "trl": "TRL SFTTrainer (packing)",
    }
    res = report["results"]
    head = "| | " + " | ".join(names[s] for s in sides) + " |"
    lines = [head, "|---" * (len(sides) + 1) + "|"]

    def row(label: str, fmt) -> None:
        lines.append(f"| {label} | " + " | ".join(fmt(res[s], s) for s in sides) + " |")

    row("optimizer steps", lambda r, s: f"{r['steps']}")
    row("train target tokens", lambda r, s: f"{r['train_target_tokens']:,}")
    row("tokens/s", lambda r, s: f"{r['tokens_per_second']:.0f}")
    row("% of bf16 matmul roof", lambda r, s: f"{r['percent_of_bf16_roof']:.0f}%")
    row("peak RSS", lambda r, s: f"{r['peak_rss_bytes'] / 2**30:.2f} GiB")
    row("final train loss (last 5 steps)", lambda r, s: f"{r['final_loss']:.4f}")
    row("held-out loss (one scorer: peft, fp32 base)", lambda r, s: f"{r['held_out_loss']:.4f}")
    row(
        "held-out loss (deltatune's eval, bf16 base)", lambda r, s: f"{r['held_out_loss_deltatune_eval']:.4f}"
    )
    ratios = report["ratios"]
    lines += [
        "",
        "deltatune vs "
        + "; vs ".join(
            f"{names[s]}: tokens/s {ratios[s]['tokens_per_second']:.2f}x, peak RSS {ratios[s]['peak_rss']:.2f}x, "
            f"held-out loss {ratios[s]['held_out_loss']:.3f}x"
            for s in sides
            if s not in ("deltatune", "deltatune_fp32base")
        )
        + f". bf16 matmul measured: {report['bf16_matmul_gflops']:.0f} GFLOP/s "
        f"({report['setup']['torch_threads']} threads).",
    ]
    if "ratios_fp32base" in report:
        alt = report["ratios_fp32base"]
        lines.append(
            "deltatune with base_dtype fp32 vs "
            + "; vs ".join(
                f"{names[s]}: tokens/s {r['tokens_per_second']:.2f}x, peak RSS {r['peak_rss']:.2f}x, "
                f"held-out loss {r['held_out_loss']:.3f}x"
                for s, r in alt.items()
            )
            + "."
        )
    for s in sides:
        if "own_eval_loss" in res[s]:
            lines.append(f"{names[s]}: in-run eval of its adapter {res[s]['own_eval_loss']:.4f}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", choices=[*SIDES, "score"])
    parser.add_argument("--sides", default=",".join(SIDES), help="comma list of sides to run")
    parser.add_argument("--batch", type=int, default=8, help="samples per step for peft + Trainer")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--samples", type=int, default=496, help="training samples (one pass: 62 peft steps)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--workdir", type=Path, default=OUT / "train_throughput")
    parser.add_argument(
        "--rows", type=int, default=0, help="deltatune/TRL packed rows per step (0: match tokens)"
    )
    parser.add_argument("--model", default="default", help="'default' or a HF model directory")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--eval-data", type=Path)
    parser.add_argument("--adapters", help="(scorer) JSON name -> adapter dir")
    parser.add_argument(
        "--dt-set", action="append", default=[], type=lambda s: tuple(s.split("=", 1)),
        help="extra deltatune config key=value (ablations)",
    )  # fmt: skip
    parser.add_argument("--tag", default="train_throughput", help="output file name")
    args = parser.parse_args()

    if args.side:  # child process: one side only
        fn = {"peft": run_peft, "trl": run_trl, "score": score}.get(args.side, run_deltatune)
        print("RESULT " + json.dumps(fn(args)))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    args.data, args.eval_data = args.workdir / "train.jsonl", args.workdir / "eval.jsonl"
    make_data(args.data, args.samples, seed=0)
    make_data(args.eval_data, 64, seed=10_000)
    _, train = samples(args, args.data)
    mean_len = sum(len(s["input_ids"]) for s in train) / len(train)
    args.rows = args.rows or max(1, round(args.batch * mean_len / (args.seq_len * 0.97)))
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    results = {}
    for side in sides:
        subprocess.run(["rm", "-rf", str(args.workdir / side)], check=True)
        results[side] = child(args, side)
        print(side, results[side], flush=True)
    scores = child(args, "score", adapters=json.dumps({s: r["adapter"] for s, r in results.items()}))
    peak = bf16_matmul_flops()
    from deltatune.models import load_model

    params = matmul_params(load_model(args.model))
    for side, r in results.items():
        r["held_out_loss"] = scores[side]["peft_scorer"]
        r["held_out_loss_deltatune_eval"] = scores[side]["deltatune_eval"]
        r["percent_of_bf16_roof"] = 100 * 4 * params * r["tokens_per_second"] / peak
    report = {
        "setup": {
            "model": "SmolLM2-135M-Instruct",
            "lora": "r16 alpha32 all-linear, dropout 0",
            "precision": "bf16 autocast",
            "samples": len(train),
            "mean_sample_tokens": mean_len,
            "peft_samples_per_step": args.batch,
            "packed_rows_per_step": args.rows,
            "seq_len": args.seq_len,
            "lr": args.lr,
            "warmup_steps": args.warmup,
            "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
            "deltatune_overrides": dict(args.dt_set),
        },
        "results": results,
        "bf16_matmul_gflops": peak / 1e9,
    }
    if "deltatune" in results:
        ours = results["deltatune"]
        report["ratios"] = {
            s: {
                "tokens_per_second": ours["tokens_per_second"] / r["tokens_per_second"],
                "peak_rss": ours["peak_rss_bytes"] / r["peak_rss_bytes"],
                "held_out_loss": ours["held_out_loss"] / r["held_out_loss"],
                "train_target_tokens": ours["train_target_tokens"] / r["train_target_tokens"],
            }
            for s, r in results.items()
            if s != "deltatune"
        }
        if "deltatune_fp32base" in results:  # the exact alternative, against the same peers
            alt = results["deltatune_fp32base"]
            report["ratios_fp32base"] = {
                s: {
                    "tokens_per_second": alt["tokens_per_second"] / r["tokens_per_second"],
                    "peak_rss": alt["peak_rss_bytes"] / r["peak_rss_bytes"],
                    "held_out_loss": alt["held_out_loss"] / r["held_out_loss"],
                }
                for s, r in results.items()
                if s in ("peft", "trl")
            }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.tag}.json").write_text(json.dumps(report, indent=2))
    if "ratios" in report:
        md = table(report)
        (OUT / f"{args.tag}.md").write_text(md)
        print(md)


if __name__ == "__main__":
    main()
