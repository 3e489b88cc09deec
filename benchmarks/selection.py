"""Does data selection pay? The same LoRA trained on a dirty set, a random quarter, `deltatune select`'s
quarter, and the clean data.

    python benchmarks/selection.py --alt-strategy ''   # the README table (~17 min alone on 2 cores), writes
                                                # benchmarks/out/select.{json,md}
    python benchmarks/selection.py --speed         # scoring speed on 10k short records (IFD pass, pipeline;
                                                # ~15 min), writes benchmarks/out/select_speed.{json,md}
    python benchmarks/selection.py --records 48 --steps 2 --eval-items 4 --out /tmp/select-smoke   # smoke

The dirty set is built from three built-in tasks (deltatune/data/tasks.py; the first of `--tasks` is
over-represented `--ratio`:1:1 in every part) and written as chat jsonl, with one label per record in
a side file (labels.jsonl: clean / duplicate / noise, the kind, and the record it copies):
- 35% unique clean records (task train split);
- 40% duplicates of random clean records, in equal shares: exact copies, case/whitespace changes
  (lowercased, the first word in capitals, or doubled spaces), and one instruction word swapped or
  added ("Reply" for "Answer", "Please ..."); the answer stays right;
- 25% noise on fresh prompts, in equal shares: the answer of an unrelated record of another task,
  the answer of another record of the same task (a plausible but wrong answer: these signals are not
  expected to catch it), an empty answer, a truncated answer (its first half), random-character
  gibberish.

Five runs train the same LoRA (r 16, alpha 32, all linear layers; same steps, lr, batch, seed,
`deltatune.train(dict(data=...))`): (a) all records, (b) a seeded random 25%, (c) `deltatune select`
at 25% with the default pipeline (dedup,quality,diversity, default options), (c') `deltatune select`
at 25% with dedup,quality and `quality: perplexity` (the library's middle-perplexity rule), (d) the
unique clean records. Each is scored on every task's test split (`eval_items_from_task`, batched
greedy exact match), with forgetting (KL from the base on the shipped general text, exact match of
the base's own answers to the general questions) and ECE of the answers' first-token probability,
all from deltatune/train/cost.py. Selection quality is measured against the labels: duplicates
removed (an injected copy counts as removed unless another member of its group is kept too), noise
removed per kind, clean records kept, and the composition of what each subset trains on; the random
quarter gets the same numbers, as the reference a selection must beat.

How the strategies were fixed. (c) is the default pipeline. Its first version kept more noise than a
random quarter (36% vs 23% on a dirty set built with seed 1, 39% on the benchmark's seed 0), because
IFD ranks the noise first (an unrelated or garbled answer gets no help from its prompt, so its IFD
is near 1, against 0.13-0.47 for a right answer) and k-center then prefers the outliers left in its
2x pool. The IFD outlier cut (`ifd_outlier_mads`, default 1.5; deltatune/select/quality.py) was then
chosen by replaying the selection stages on the seed-1 set's scores and embeddings against its
labels, with no training run and no test score (kept noise: 45/300 at 1.5 MADs, 66 at 3, 108
without; lowest-IFD ranking or per-cluster cuts kept less noise but skewed the tasks or added
machinery); the seed-0 set's score distributions from the first version's run had been seen too,
its training results had not guided anything. (c') (`--alt-strategy`, dedup,quality with `quality:
perplexity`) is the library's middle-perplexity rule; `--alt-strategy ''` drops it. `--strategy`
and `-p` change (c), `--alt-param` changes (c').

Targets (issue 12): (c) beats (b) by >= 10 points mean exact match and reaches >= 90% of (d);
selection removes >= 90% of the injected duplicates and >= 60% of the noise. The markdown says which
hold. Run it alone: the times are this machine's, and anything else running slows them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import string
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spin-waiting OpenMP collapses on a shared CPU

OUT = Path(__file__).resolve().parent / "out"
TASK_NAMES = ("reversal", "addition", "kv_lookup")
DUPLICATE_KINDS = ("exact_copy", "case_whitespace", "word_edit")
NOISE_KINDS = ("unrelated_answer", "plausible_wrong", "empty_answer", "truncated_answer", "gibberish")
DEDUP_REASONS = ("exact_duplicate", "near_duplicate", "semantic_duplicate")
# one instruction word swapped or added: the edits leave the task and its answer as they were
WORD_EDITS = (
    ("Answer with", "Reply with"),
    ("Answer with", "Respond with"),
    ("What is", "What's"),
    ("Reverse the order", "Invert the order"),
    ("Each name", "Every name"),
)
PREFIXES = ("Please ", "Now ", "Quick question: ")


# --- the dirty set --------------------------------------------------------------------------------


def _split(total: int, tasks: list[str], ratio: float) -> dict[str, int]:
    """`total` records over the tasks, the first `ratio` times each other's share (largest remainder)."""
    weights = [ratio] + [1.0] * (len(tasks) - 1)
    raw = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    return dict(zip(tasks, counts, strict=True))


def _case_whitespace(prompt: str, rng: random.Random) -> str:
    """The same words differently cased and spaced (what scraped copies of one text look like)."""
    words = prompt.split(" ")
    edit = rng.choice(("lower", "upper_first", "spaces"))
    if edit == "lower":
        return prompt.lower()
    if edit == "upper_first":
        return " ".join(w.upper() if i == 0 else w for i, w in enumerate(words)) + " "
    k = rng.randrange(1, len(words))
    return "  ".join([" ".join(words[:k]), " ".join(words[k:])]).replace(". ", ".  ")


def _word_edit(prompt: str, rng: random.Random) -> str:
    """One instruction word swapped for a synonym, or a word added in front."""
    swaps = [(a, b) for a, b in WORD_EDITS if a in prompt]
    if swaps and rng.random() < 0.6:
        a, b = rng.choice(swaps)
        return prompt.replace(a, b, 1)
    return rng.choice(PREFIXES) + prompt[0].lower() + prompt[1:]


def _gibberish(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + string.punctuation + "  "
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(8, 40))).strip() or "#"


def build_dirty(
    n: int, tasks: list[str], ratio: float, dup_share: float, noise_share: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """(records, labels) in one shuffled order; labels[i] says what was injected into records[i]."""
    from deltatune.data.tasks import examples

    rng = random.Random(f"select-bench|{seed}")
    n_dup, n_noise = round(n * dup_share), round(n * noise_share)
    n_clean = n - n_dup - n_noise
    if n_clean < len(tasks):
        raise SystemExit(f"--records {n}: too few for {len(tasks)} tasks with these shares")
    clean_counts, noise_counts = _split(n_clean, tasks, ratio), _split(n_noise, tasks, ratio)
    items: list[dict] = []  # {prompt, answer, task, label, kind, of (position in items)}
    noise_prompts: list[tuple[str, Any]] = []
    for task in tasks:
        found = examples(task, "train", clean_counts[task] + noise_counts[task], seed=seed)
        for ex in found[: clean_counts[task]]:
            items.append({"prompt": ex.prompt, "answer": ex.answer, "task": task, "label": "clean"})
        noise_prompts += [(task, ex) for ex in found[clean_counts[task] :]]
    clean = list(range(len(items)))
    by_task = defaultdict(list)
    for i in clean:
        by_task[items[i]["task"]].append(i)
    for k in range(n_dup):
        j = rng.choice(clean)
        kind = DUPLICATE_KINDS[k % len(DUPLICATE_KINDS)]
        prompt = items[j]["prompt"]
        if kind == "case_whitespace":
            prompt = _case_whitespace(prompt, rng)
        elif kind == "word_edit":
            prompt = _word_edit(prompt, rng)
        items.append({**items[j], "prompt": prompt, "label": "duplicate", "kind": kind, "of": j})
    rng.shuffle(noise_prompts)
    for k, (task, ex) in enumerate(noise_prompts):
        kind = NOISE_KINDS[k % len(NOISE_KINDS)]
        if kind == "unrelated_answer":
            others = [t for t in tasks if t != task]
            answer = items[rng.choice(by_task[rng.choice(others)])]["answer"]
        elif kind == "plausible_wrong":  # another record's answer of the same task: the right format
            wrong = [items[i]["answer"] for i in by_task[task] if items[i]["answer"] != ex.answer]
            answer = rng.choice(wrong) if wrong else ex.answer + "0"
        elif kind == "empty_answer":
            answer = ""
        elif kind == "truncated_answer":
            answer = ex.answer[: max(1, len(ex.answer) // 2)]
        else:
            answer = _gibberish(rng)
        items.append({"prompt": ex.prompt, "answer": answer, "task": task, "label": "noise", "kind": kind})
    order = list(range(len(items)))
    rng.shuffle(order)
    position = {old: new for new, old in enumerate(order)}
    records, labels = [], []
    for new, old in enumerate(order):
        it = items[old]
        messages = [{"role": "user", "content": it["prompt"]}, {"role": "assistant", "content": it["answer"]}]
        records.append({"messages": messages})
        of = position[it["of"]] if "of" in it else None
        labels.append(
            {"index": new, "task": it["task"], "label": it["label"], "kind": it.get("kind"), "of": of}
        )
    return records, labels


def write_jsonl(path: Path, rows: list[dict]) -> None:
    from deltatune.formats import atomic_write

    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_text(path: Path, text: str) -> None:
    from deltatune.formats import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# --- selection quality against the labels ---------------------------------------------------------


def subset_quality(labels: list[dict], kept: list[int], reasons: list[str] | None = None) -> dict[str, Any]:
    """What a subset kept of the injected duplicates, noise and clean records (see module docstring)."""
    keep = set(kept)
    group = {lab["index"]: lab["of"] if lab["label"] == "duplicate" else lab["index"] for lab in labels}
    members: dict[int, list[int]] = defaultdict(list)
    for lab in labels:
        if lab["label"] != "noise":
            members[group[lab["index"]]].append(lab["index"])
    copies = sum(len(m) - 1 for m in members.values())
    extra_kept = sum(max(sum(i in keep for i in m) - 1, 0) for m in members.values())
    out: dict[str, Any] = {
        "records": len(kept),
        "injected_copies": copies,
        "duplicates_removed": 1 - extra_kept / copies if copies else None,
        "clean_kept": sum(any(i in keep for i in m) for m in members.values()) / max(len(members), 1),
    }
    if reasons is not None:  # after the dedup stage alone (a record dropped later still passed it)
        passed = {i for i, r in enumerate(reasons) if not r.startswith(DEDUP_REASONS)}
        extra = sum(max(sum(i in passed for i in m) - 1, 0) for m in members.values())
        out["duplicates_removed_by_dedup"] = 1 - extra / copies if copies else None
    noise = [lab for lab in labels if lab["label"] == "noise"]
    out["noise_removed"] = sum(lab["index"] not in keep for lab in noise) / len(noise) if noise else None
    by_kind = {}
    for kind in NOISE_KINDS:
        these = [lab["index"] for lab in noise if lab["kind"] == kind]
        if these:
            by_kind[kind] = {
                "injected": len(these),
                "removed": sum(i not in keep for i in these) / len(these),
            }
            if reasons is not None:
                why = Counter(reasons[i].split(" of ")[0] for i in these if i not in keep)
                by_kind[kind]["removed_by"] = dict(why.most_common())
    out["noise_removed_by_kind"] = by_kind
    kept_labels = [labels[i] for i in kept]
    n = max(len(kept), 1)
    out["composition"] = {
        "clean_unique": len({group[lab["index"]] for lab in kept_labels if lab["label"] != "noise"}) / n,
        "redundant_copies": extra_kept / n,
        "noise": sum(lab["label"] == "noise" for lab in kept_labels) / n,
        "per_task": dict(Counter(lab["task"] for lab in kept_labels).most_common()),
    }
    return out


# --- training and evaluation ----------------------------------------------------------------------


def train_run(args: argparse.Namespace, name: str, data: Path) -> dict[str, Any]:
    import deltatune

    run_dir = args.out / f"run-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    summary = deltatune.train(
        dict(
            model=args.model,
            data=str(data),
            eval_samples=0,
            cost_metrics=False,  # measured below on every run the same way, base references shared
            max_steps=args.steps,
            warmup_steps=min(6, args.steps // 10),
            batch_size=args.batch_size,
            max_seq_len=args.seq_len,
            learning_rate=args.lr,
            lora_r=16,
            lora_alpha=32,
            precision=args.precision,
            save_every=0,
            log_every=max(1, args.steps // 10),
            seed=args.seed,
            output=str(run_dir),
        )
    )
    return {
        "train_records": summary["packing"]["samples"],
        "train_rows": summary["packing"]["rows"],
        "final_loss": summary["final_loss"],
        "train_tokens": summary["train_tokens"],
        "train_seconds": summary["train_seconds"],
        "tokens_per_second": summary["tokens_per_second"],
        "adapter": str(run_dir / "adapter"),
    }


class Evaluator:
    """Every run scored the same way: exact match per task, ECE over all items, KL and general EM."""

    def __init__(self, args: argparse.Namespace):
        import torch

        from deltatune.models import load_tokenizer
        from deltatune.train.evaluate import eval_items_from_task
        from deltatune.train.loop import bf16_supported

        self.args = args
        self.tokenizer = load_tokenizer(args.model)
        use_bf16 = args.precision == "bf16" or (
            args.precision == "auto" and bf16_supported(torch.device("cpu"))
        )
        self.dtype = torch.bfloat16 if use_bf16 else torch.float32
        self.autocast = {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": use_bf16}
        self.items = {t: eval_items_from_task(t, args.eval_items, seed=args.seed) for t in args.tasks}
        self.references: list[str] | None = None  # the base's own answers to the general questions

    def __call__(self, adapter: str | None) -> dict[str, Any]:
        import torch

        import deltatune
        from deltatune.train import cost
        from deltatune.train.evaluate import exact_match_score

        t0 = time.perf_counter()
        model = deltatune.load(self.args.model, adapter=adapter, dtype=self.dtype)
        out: dict[str, Any] = {"exact_match": {}}
        confidence, correct = [], []
        with torch.no_grad(), torch.autocast(**self.autocast):
            for task, items in self.items.items():
                found = exact_match_score(model, self.tokenizer, items, self.args.max_new_tokens, desc=task)
                out["exact_match"][task] = found["exact_match"]
                confidence += found["confidence"]
                correct += found["correct"]
                out.setdefault("examples", {})[task] = [
                    {"answer": it.answer, "prediction": p}
                    for it, p in zip(items[:3], found["predictions"], strict=False)
                ]
            out["mean_exact_match"] = sum(out["exact_match"].values()) / len(self.items)
            out["ece"] = cost.expected_calibration_error(confidence, correct)
            questions = cost.general_questions()
            if adapter is None:
                # not the shared answer cache: its key has no autocast, and these must be computed
                # exactly as the tuned answers are
                self.references = cost.base_answers(model, self.tokenizer, questions, base=model)
                out["forgetting_kl"], out["general_exact_match"] = 0.0, 1.0  # the base against itself
            else:
                general = cost.general_exact_match(model, self.tokenizer, self.references, questions)
                out["general_exact_match"] = general["exact_match"]
                out["forgetting_kl"] = cost.forgetting_kl(model, self.tokenizer)["kl"]
        out["eval_seconds"] = time.perf_counter() - t0
        del model
        return out


# --- the benchmark --------------------------------------------------------------------------------


def _options(params: list[str]) -> dict[str, str]:
    bad = [kv for kv in params if "=" not in kv]
    if bad:
        raise SystemExit(f"-p {bad[0]}: expected KEY=VALUE")
    return dict(kv.split("=", 1) for kv in params)


def run_selection(
    args: argparse.Namespace, data: Path, budget: int, name: str, strategy: str, params: list[str]
) -> tuple[list[int], dict[str, Any]]:
    """`deltatune.select` as a user runs it (embeddings not cached, so the time is a cold one)."""
    import deltatune

    out = args.out / f"selected-{name}" / "selected.jsonl"
    t0 = time.perf_counter()
    report = deltatune.select(
        data,
        out,
        budget=budget,
        strategy=strategy,
        overwrite=True,
        options={"cache": False, **_options(params)},
    )
    seconds = time.perf_counter() - t0
    summary = report["summary"]
    info = {
        "strategy": summary["strategy"],
        "params": params,
        "options": report["options"],
        "seconds": seconds,
        "records_per_second": len(report["records"]) / seconds,
        "stage_seconds": summary["timings_seconds"],
        "stage_records_per_second": summary["records_per_second"],
        "reasons": summary["reasons"],
        "notes": summary["notes"],
    }
    return [r["index"] for r in report["records"] if r["kept"]], info | {
        "reasons_list": [r["reason"] for r in report["records"]]
    }


def run_names(args: argparse.Namespace) -> dict[str, str]:
    names = {"a": "(a) all records", "b": f"(b) random {args.budget:.0%}"}
    names["c"] = f"(c) deltatune select {args.budget:.0%}: {args.strategy}" + "".join(
        f" -p {kv}" for kv in args.param
    )
    if args.alt_strategy:
        names["c2"] = f"(c') deltatune select {args.budget:.0%}: {args.alt_strategy}" + "".join(
            f" -p {kv}" for kv in args.alt_param
        )
    names["d"] = "(d) clean records"
    return names


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    records, labels = build_dirty(
        args.records, args.tasks, args.ratio, args.dup_share, args.noise_share, args.seed
    )
    data = args.out / "dirty.jsonl"
    write_jsonl(data, records)
    write_jsonl(args.out / "labels.jsonl", labels)  # what was injected, kept out of the training records
    budget = max(1, round(args.budget * len(records)))
    names = run_names(args)

    subsets: dict[str, list[int]] = {"a": list(range(len(records)))}
    t0 = time.perf_counter()
    subsets["b"] = sorted(random.Random(args.seed).sample(range(len(records)), budget))
    selections: dict[str, dict[str, Any]] = {"b": {"seconds": time.perf_counter() - t0}}
    pipelines = {"c": (args.strategy, args.param), "c2": (args.alt_strategy, args.alt_param)}
    quality: dict[str, Any] = {}
    for key in ("c", "c2"):
        if key in names:
            strategy, params = pipelines[key]
            subsets[key], selections[key] = run_selection(args, data, budget, key, strategy, params)
            quality[key] = subset_quality(labels, subsets[key], selections[key].pop("reasons_list"))
            print(json.dumps({key: selections[key]["reasons"], "seconds": selections[key]["seconds"]}))
    subsets["d"] = [lab["index"] for lab in labels if lab["label"] == "clean"]
    for key in ("a", "b", "d"):
        quality[key] = subset_quality(labels, subsets[key])

    evaluate = Evaluator(args)
    base = evaluate(None)
    runs: dict[str, Any] = {}
    for key in names:
        path = args.out / f"train-{key}.jsonl"
        write_jsonl(path, [records[i] for i in subsets[key]])
        run = train_run(args, key, path)
        run.update(evaluate(run["adapter"]))
        run["selection_seconds"] = selections.get(key, {}).get("seconds")
        runs[key] = run
        shown = ("exact_match", "mean_exact_match", "forgetting_kl", "general_exact_match", "ece")
        print(json.dumps({key: {k: run[k] for k in shown}}))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings |= {
        "budget_records": budget,
        "dirty_records": len(records),
        "label_counts": dict(Counter(lab["label"] for lab in labels)),
    }
    return {
        "settings": settings,
        "names": names,
        "base": base,
        "runs": runs,
        "selections": {k: v for k, v in selections.items() if k != "b"},
        "selection_quality": quality,
        "targets": {k: targets(runs, quality, k) for k in ("c", "c2") if k in runs},
        "wall_seconds": time.perf_counter() - t_start,
    }


def targets(runs: dict[str, Any], quality: dict[str, Any], key: str) -> dict[str, Any]:
    """The issue's targets for the selection `key` ("c", or the variant "c2")."""
    b, c, d = (runs[k]["mean_exact_match"] for k in ("b", key, "d"))
    q = quality[key]
    return {
        "minus_b_points": 100 * (c - b),
        "beats_b_by_10_points": 100 * (c - b) >= 10,
        "over_d": c / d if d else None,
        "reaches_90pct_of_d": d > 0 and c / d >= 0.9,
        "duplicates_removed": q["duplicates_removed"],
        "duplicates_target_90pct": (q["duplicates_removed"] or 0) >= 0.9,
        "noise_removed": q["noise_removed"],
        "noise_target_60pct": (q["noise_removed"] or 0) >= 0.6,
    }


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def markdown(result: dict[str, Any]) -> str:
    s, runs, names, tasks = result["settings"], result["runs"], result["names"], result["settings"]["tasks"]
    lines = [
        f"{s['model']}, LoRA r16 all-linear, {s['steps']} steps x batch {s['batch_size']} x {s['seq_len']} tokens, "
        f"lr {s['lr']}, seed {s['seed']}. Dirty set: {s['dirty_records']} records "
        f"({', '.join(f'{k} {v}' for k, v in s['label_counts'].items())}; {tasks[0]} {s['ratio']:g}:1 against each "
        f"other task); budget {s['budget_records']} records; {s['eval_items']} test items per task, greedy. "
        "KL: forgetting KL (nats/token) from the base on the general text; general EM: share of the general "
        "questions answered as the base answers them; ECE: first-token probability vs exact match, all test items.",
        "",
        "| run | "
        + " | ".join(f"{t} EM" for t in tasks)
        + " | mean EM | KL | general EM | ECE | train records | selection time |",
        "|---|" + "---:|" * (len(tasks) + 6),
    ]
    for label, r in [("base model", result["base"])] + [(names[k], runs[k]) for k in names]:
        sel = r.get("selection_seconds")
        sel_text = ""
        if sel is not None:  # a random draw takes microseconds: no rate for it
            sel_text = f"{sel:.2f} s" + (
                f" ({s['dirty_records'] / sel:,.0f} records/s)" if sel >= 0.01 else ""
            )
        lines.append(
            f"| {label} | "
            + " | ".join(_pct(r["exact_match"][t]) for t in tasks)
            + f" | {_pct(r['mean_exact_match'])} | {r['forgetting_kl']:.4f} | {_pct(r['general_exact_match'])} | "
            f"{r['ece']:.3f} | {r.get('train_records', '')} | {sel_text} |"
        )
    q = result["selection_quality"]
    lines += [
        "",
        "What each subset trains on, against the injected labels (an injected copy counts as removed unless "
        "another member of its group is kept; the random quarter is the reference a selection must beat):",
        "",
        "| subset | records | duplicates removed | noise removed | clean kept | kept: clean unique / redundant copies / noise | per task |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for k in names:
        x, comp = q[k], q[k]["composition"]
        lines.append(
            f"| {names[k]} | {x['records']} | {_pct(x['duplicates_removed'])} | {_pct(x['noise_removed'])} | "
            f"{_pct(x['clean_kept'])} | {_pct(comp['clean_unique'])} / {_pct(comp['redundant_copies'])} / "
            f"{_pct(comp['noise'])} | " + ", ".join(f"{t} {n}" for t, n in comp["per_task"].items()) + " |"
        )
    keys = [k for k in ("c", "c2") if k in runs]
    lines += [
        "",
        "| noise kind | injected | removed by random | "
        + " | ".join(f"removed by {names[k].split(':')[0]}" for k in keys)
        + " |",
        "|---|---:|---:|" + "---:|" * len(keys),
    ]
    for kind, x in q["b"]["noise_removed_by_kind"].items():
        lines.append(
            f"| {kind} | {x['injected']} | {_pct(x['removed'])} | "
            + " | ".join(
                f"{_pct(q[k]['noise_removed_by_kind'][kind]['removed'])} ("
                + ", ".join(f"{r} {n}" for r, n in q[k]["noise_removed_by_kind"][kind]["removed_by"].items())
                + ")"
                for k in keys
            )
            + " |"
        )
    for k in keys:
        sel = result["selections"][k]
        lines += [
            "",
            f"{names[k]}: {sel['seconds']:.1f} s for {s['dirty_records']} records ({sel['records_per_second']:.0f} "
            "records/s; "
            + ", ".join(f"{n} {v:.1f} s" for n, v in sel["stage_seconds"].items() if n != "select")
            + "); duplicates removed by the dedup stage alone "
            f"{_pct(q[k].get('duplicates_removed_by_dedup'))}; reasons: "
            + ", ".join(f"{n} {v}" for n, v in sel["reasons"].items())
            + "."
            + ("" if not sel["notes"] else " Notes: " + "; ".join(sel["notes"]) + "."),
        ]
    for k in keys:
        t = result["targets"][k]
        label = names[k].split(":")[0]
        lines += [
            "",
            f"Targets, {label}:",
            f"- beats (b) by >= 10 points mean EM: {t['minus_b_points']:+.1f} points ({_met(t['beats_b_by_10_points'])})",
            f"- reaches >= 90% of (d): {_pct(t['over_d'])} ({_met(t['reaches_90pct_of_d'])})",
            f"- duplicates removed >= 90%: {_pct(t['duplicates_removed'])} ({_met(t['duplicates_target_90pct'])}; "
            f"random: {_pct(q['b']['duplicates_removed'])})",
            f"- noise removed >= 60%: {_pct(t['noise_removed'])} ({_met(t['noise_target_60pct'])}; "
            f"random: {_pct(q['b']['noise_removed'])})",
        ]
    lines += ["", f"Whole run {result['wall_seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


# --- scoring speed --------------------------------------------------------------------------------


def speed(args: argparse.Namespace) -> dict[str, Any]:
    """records/s of the IFD pass alone and of the whole pipeline on `--speed-records` short records."""
    from deltatune.data.tasks import TASKS, examples
    from deltatune.models import load_tokenizer
    from deltatune.select import select_records

    args.out.mkdir(parents=True, exist_ok=True)
    per_task = -(-args.speed_records // len(TASKS))
    pairs = []
    for task in TASKS:
        for i, ex in enumerate(examples(task, "train", per_task, seed=args.seed)):
            pairs.append(({"messages": ex.messages()}, f"{task}:{i + 1}"))
    pairs = pairs[: args.speed_records]
    tok = load_tokenizer(args.model)
    lengths = tok(
        [p[0]["messages"][0]["content"] + p[0]["messages"][1]["content"] for p in pairs[:200]]
    ).input_ids
    out: dict[str, Any] = {
        "records": len(pairs),
        "mean_record_tokens_without_template": sum(map(len, lengths)) / len(lengths),
    }
    options = {"cache": False, "model": args.model}
    for name, strategy, budget in (
        ("ifd_pass", "quality", None),
        ("pipeline", "dedup,quality,diversity", args.budget),
    ):
        t0 = time.perf_counter()
        sel = select_records(pairs, budget, strategy, options)
        seconds = time.perf_counter() - t0
        out[name] = {
            "strategy": strategy,
            "seconds": seconds,
            "records_per_second": len(pairs) / seconds,
            "stage_seconds": sel.timings,
            "stage_records_per_second": sel.rates,
            "kept": len(sel.kept),
        }
        print(json.dumps({name: out[name]}))
    return out


def speed_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Scoring {result['records']} short records (the four built-in tasks, ~{result['mean_record_tokens_without_template']:.0f} "
        "tokens each before the chat template) with the default model, embeddings not cached:",
        "",
        "| pass | seconds | records/s | IFD pass records/s | target >= 200 records/s |",
        "|---|---:|---:|---:|---|",
    ]
    for name in ("ifd_pass", "pipeline"):
        r = result[name]
        quality_rate = r["stage_records_per_second"].get("quality", 0.0)
        rate = quality_rate if name == "ifd_pass" else r["records_per_second"]
        lines.append(
            f"| {r['strategy']} | {r['seconds']:.1f} | {r['records_per_second']:.0f} | {quality_rate:.0f} | "
            f"{'met' if rate >= 200 else 'not met'} |"
        )
    p = result["pipeline"]["stage_seconds"]
    lines += ["", "Pipeline stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in p.items()) + "."]
    return "\n".join(lines) + "\n"


# --- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="default")
    p.add_argument("--tasks", default=",".join(TASK_NAMES), help="comma list; the first is over-represented")
    p.add_argument(
        "--ratio", type=float, default=5.0, help="records of the first task per record of each other"
    )
    p.add_argument("--records", type=int, default=1200, help="records in the dirty set")
    p.add_argument("--dup-share", type=float, default=0.40)
    p.add_argument("--noise-share", type=float, default=0.25)
    p.add_argument("--budget", type=float, default=0.25, help="fraction kept by (b) and (c)")
    p.add_argument("--strategy", default="dedup,quality,diversity", help="the pipeline of (c)")
    p.add_argument(
        "-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="a select option for (c)"
    )
    p.add_argument(
        "--alt-strategy", default="dedup,quality", help="the pipeline of the variant (c'); '' for none"
    )
    p.add_argument(
        "--alt-param",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a select option for (c') (default: quality=perplexity)",
    )
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--eval-items", type=int, default=40, help="test items per task")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed", action="store_true", help="only the scoring-speed measurement")
    p.add_argument("--speed-records", type=int, default=10_000)
    p.add_argument("--out", type=Path, default=OUT / "select", help="working directory (runs, data)")
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.alt_param is None:
        args.alt_param = ["quality=perplexity"]
    from deltatune.data.tasks import TASKS

    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown or len(args.tasks) < 2:
        p.error(f"--tasks: need 2+ of {', '.join(TASKS)} (got {args.tasks})")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.speed:
        result = speed(args)
        json_path, md_path, text = OUT / "select_speed.json", OUT / "select_speed.md", speed_markdown(result)
    else:
        result = benchmark(args)
        json_path, md_path, text = OUT / "select.json", OUT / "select.md", markdown(result)
    if args.out != OUT / "select":  # a smoke run: keep its tables beside its own runs
        json_path, md_path = args.out / json_path.name, args.out / md_path.name
    write_text(json_path, json.dumps(result, indent=2) + "\n")
    write_text(md_path, text)
    print(text)


if __name__ == "__main__":
    main()
