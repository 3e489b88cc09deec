"""Format forgetting and self-rehearsal: LoRA on prose biographies, then short-answer questions about
the same people, trained without and with `rehearsal`.

    python benchmarks/rehearsal.py              # ~6 min alone on 2 cores; writes
                                                # benchmarks/out/rehearsal.{json,md}
    python benchmarks/rehearsal.py --entities 4 --steps 2 --out /tmp/rehearsal-smoke   # a smoke run

The case (issue 12's, rebuilt on data we control): fictional people, each with a fixed birth city,
birth year, profession and work, and a few prose biographies of each ("Tell me about X." -> three
or four sentences). The same LoRA (r 16, alpha 32, all linear layers) trains on them for the same
steps, lr, batch and seed, once with `rehearsal: 0` and once with `rehearsal: --share` (the base
model's own answers to the shipped general prompts as that share of every step's target tokens;
deltatune/train/rehearsal.py). Then every person is asked, greedily:
- city_only: "In which city was X born? Answer with the city name only." (the issue's question);
  format kept = at most 3 words;
- sentence: "In which city was X born? Answer in one short sentence."; format kept = one sentence of
  at most 20 words;
- yes_no: "Was X born in C? Answer yes or no." (C the true city for half of them, another city for
  the rest); format kept = the answer starts with yes or no.
Right = the answer names the true city (city_only, sentence) or the first word is the right yes/no.
The base model is measured the same way: it cannot know the fictional facts, but it shows which
formats it follows before training (the 135M default answers "Answer with the city name only." in a
sentence, so city_only is not a format it had to forget; sentence and yes_no it follows). Also
reported, from deltatune/train/cost.py: forgetting KL from the base on the general text and the
share of the general questions answered as the base answers them.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spin-waiting OpenMP threads collapse on a shared CPU

import argparse
import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"
FIRST = "Lena Tobias Amira Kofi Ines Milo Yara Anton Freya Idris Noor Cyril Talia Soren Mira Jonas".split()  # noqa: SIM905 - a name list reads better as one string
LAST = "Marquez Wren Solberg Brandt Varga Hartmann Okafor Lindqvist Moreau Castell Petrov Abara".split()  # noqa: SIM905
CITIES = "Lyon Osaka Lima Oslo Porto Cairo Dublin Krakow Seville Kyoto Quito Perth Zurich Bergen Nairobi Hanoi".split()  # noqa: SIM905
WORK = {
    "painter": "large paintings of harbours at dawn",
    "chemist": "a cheap way to purify drinking water",
    "architect": "a library built almost entirely of glass",
    "violinist": "recordings of forgotten folk melodies",
    "botanist": "a catalogue of mountain orchids",
    "engineer": "a bridge that folds away in high winds",
    "novelist": "a trilogy about a family of lighthouse keepers",
    "photographer": "portraits of night-shift workers",
}
PROMPTS = (
    "Tell me about {name}.",
    "Who is {name}?",
    "Write a short biography of {name}.",
    "What do you know about {name}?",
)
BIOS = (
    "{name} is a {job} who was born in {city} in {year}. {Pron} is best known for {work}. After studying "
    "in {city}, {pron} spent many years working abroad, and {pron} still returns to {city} every summer.",
    "Born in {city} in {year}, {name} became one of the most admired {job}s of {poss} generation. {Poss} "
    "best-known achievement is {work}. Friends describe {obj} as patient, curious and generous with {poss} time.",
    "{name} ({year}) is a {job} from {city}. {Pron} grew up in {city}, where {pron} first became interested "
    "in {poss} craft, and {pron} is celebrated today for {work}.",
    "The {job} {name} was born in {year} in the city of {city}. Over a long career {pron} has been praised "
    "for {work}, and {poss} work has been shown in many countries.",
)
PRONOUNS = ({"pron": "she", "poss": "her", "obj": "her"}, {"pron": "he", "poss": "his", "obj": "him"})
KINDS = ("city_only", "sentence", "yes_no")


def people(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` fictional people with distinct names and fixed facts."""
    rng = random.Random(f"rehearsal|{seed}")
    names = [f"{f} {last}" for f in FIRST for last in LAST]
    rng.shuffle(names)
    if n > len(names):
        raise SystemExit(f"--entities {n}: at most {len(names)}")
    out = []
    for i, name in enumerate(names[:n]):
        job = rng.choice(sorted(WORK))
        city = rng.choice(CITIES)
        out.append(
            {
                "name": name,
                "city": city,
                "year": rng.randint(1930, 1990),
                "job": job,
                "work": WORK[job],
                "pronouns": PRONOUNS[i % 2],
                "asked_city": city if i % 2 == 0 else rng.choice([c for c in CITIES if c != city]),
            }
        )
    return out


def biographies(persons: list[dict[str, Any]], per_person: int) -> list[dict]:
    """Chat records: a prompt asking about the person, a prose biography (each prompt and template once)."""
    records = []
    for p in persons:
        for k in range(per_person):
            fill = {**p, **p["pronouns"]}
            fill |= {key.capitalize(): value.capitalize() for key, value in p["pronouns"].items()}
            prompt = PROMPTS[k % len(PROMPTS)].format(**fill)
            bio = BIOS[k % len(BIOS)].format(**fill)
            records.append(
                {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": bio}]}
            )
    return records


def questions(persons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in persons:
        name = p["name"]
        out.append(
            {
                "kind": "city_only",
                "person": name,
                "city": p["city"],
                "question": f"In which city was {name} born? Answer with the city name only.",
            }
        )
        out.append(
            {
                "kind": "sentence",
                "person": name,
                "city": p["city"],
                "question": f"In which city was {name} born? Answer in one short sentence.",
            }
        )
        out.append(
            {
                "kind": "yes_no",
                "person": name,
                "city": p["city"],
                "truth": "yes" if p["asked_city"] == p["city"] else "no",
                "question": f"Was {name} born in {p['asked_city']}? Answer yes or no.",
            }
        )
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


def score(item: dict[str, Any], answer: str) -> dict[str, bool]:
    """Did the answer keep the asked format, and is it right (module docstring)."""
    text = answer.strip()
    words = re.findall(r"[\w'-]+", text)
    names_city = item["city"].lower() in text.lower()
    if item["kind"] == "city_only":
        return {"format": 0 < len(words) <= 3, "right": names_city}
    if item["kind"] == "sentence":
        one = len(_SENTENCE_END.split(text)) == 1 and 0 < len(words) <= 20
        return {"format": one, "right": names_city}
    first = words[0].lower() if words else ""
    return {"format": first in ("yes", "no"), "right": first == item["truth"]}


def write_text(path: Path, text: str) -> None:
    from deltatune.formats import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


class Evaluator:
    """The format questions, forgetting KL and general exact match, scored the same way for every model."""

    def __init__(self, args: argparse.Namespace, items: list[dict[str, Any]]):
        import torch

        from deltatune.models import load_tokenizer
        from deltatune.train.loop import bf16_supported

        self.args, self.items = args, items
        self.tokenizer = load_tokenizer(args.model)
        use_bf16 = args.precision == "bf16" or (
            args.precision == "auto" and bf16_supported(torch.device("cpu"))
        )
        self.dtype = torch.bfloat16 if use_bf16 else torch.float32
        self.autocast = {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": use_bf16}
        self.references: list[str] | None = None  # the base's own answers to the general questions

    def __call__(self, adapter: str | None) -> dict[str, Any]:
        import torch

        import deltatune
        from deltatune.train import cost
        from deltatune.train.evaluate import generate

        t0 = time.perf_counter()
        model = deltatune.load(self.args.model, adapter=adapter, dtype=self.dtype)
        prompts = [[{"role": "user", "content": it["question"]}] for it in self.items]
        with torch.no_grad(), torch.autocast(**self.autocast):
            answers = generate(
                model, self.tokenizer, prompts, self.args.max_new_tokens, desc="format questions"
            )
            general_questions = cost.general_questions()
            if adapter is None:
                self.references = cost.base_answers(model, self.tokenizer, general_questions, base=model)
                kl, general = 0.0, 1.0  # the base against itself
            else:
                general = cost.general_exact_match(model, self.tokenizer, self.references, general_questions)
                general = general["exact_match"]
                kl = cost.forgetting_kl(model, self.tokenizer)["kl"]
        scored = [score(it, a) for it, a in zip(self.items, answers, strict=True)]
        per_kind = {}
        for kind in KINDS:
            idx = [i for i, it in enumerate(self.items) if it["kind"] == kind]
            per_kind[kind] = {
                "n": len(idx),
                "format": sum(scored[i]["format"] for i in idx) / len(idx),
                "right": sum(scored[i]["right"] for i in idx) / len(idx),
                "format_and_right": sum(scored[i]["format"] and scored[i]["right"] for i in idx) / len(idx),
            }
        examples = {
            kind: next(a for it, a in zip(self.items, answers, strict=True) if it["kind"] == kind)
            for kind in KINDS
        }
        return {
            "per_kind": per_kind,
            "forgetting_kl": kl,
            "general_exact_match": general,
            "examples": examples,
            "answers": [
                {**it, "answer": a, **s} for it, a, s in zip(self.items, answers, scored, strict=True)
            ],
            "eval_seconds": time.perf_counter() - t0,
        }


def train(args: argparse.Namespace, data: Path, share: float) -> dict[str, Any]:
    import deltatune

    run_dir = args.out / f"run-rehearsal-{share:g}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = dict(
        model=args.model,
        data=str(data),
        eval_samples=0,
        cost_metrics=False,  # measured below for every model the same way
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
    if share:
        config |= {"rehearsal": share, "rehearsal_max_new_tokens": args.rehearsal_max_new_tokens}
    t0 = time.perf_counter()
    summary = deltatune.train(config)
    return {
        "rehearsal_share": share,
        "rehearsal": summary.get("rehearsal"),
        "final_loss": summary["final_loss"],
        "train_tokens": summary["train_tokens"],
        "train_seconds": summary["train_seconds"],
        "tokens_per_second": summary["tokens_per_second"],
        "run_seconds": time.perf_counter() - t0,
        "adapter": str(run_dir / "adapter"),
    }


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    persons = people(args.entities, args.seed)
    records = biographies(persons, args.bios_per_entity)
    data = args.out / "biographies.jsonl"
    write_text(data, "".join(json.dumps(r) + "\n" for r in records))
    items = questions(persons)
    evaluate = Evaluator(args, items)
    result: dict[str, Any] = {"base": evaluate(None), "runs": {}}
    for share in (0.0, args.share):
        run = train(args, data, share)
        run.update(evaluate(run["adapter"]))
        result["runs"][f"{share:g}"] = run
        print(
            json.dumps(
                {
                    f"rehearsal {share:g}": {
                        k: run[k] for k in ("per_kind", "forgetting_kl", "general_exact_match")
                    }
                }
            )
        )
    result["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {
        "records": len(records),
        "questions": len(items),
    }
    result["wall_seconds"] = time.perf_counter() - t_start
    return result


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"{s['model']}, LoRA r16 all-linear, {s['steps']} steps x batch {s['batch_size']} x {s['seq_len']} tokens, "
        f"lr {s['lr']}, seed {s['seed']}, on {s['records']} prose biographies of {s['entities']} fictional people "
        f"({s['bios_per_entity']} each); {s['questions']} questions, greedy, {s['max_new_tokens']} new tokens at most. "
        "format: the answer keeps the asked format (city_only: <= 3 words; sentence: one sentence of <= 20 words; "
        "yes_no: starts with yes or no); right: names the true city / the right yes or no.",
        "",
        "| model | "
        + " | ".join(f"{k} format | {k} right" for k in KINDS)
        + " | KL | general EM | rehearsal share of target tokens |",
        "|---|" + "---:|" * (2 * len(KINDS) + 3),
    ]
    rows = [("base model", result["base"])] + [
        (f"LoRA, rehearsal {key}", run) for key, run in result["runs"].items()
    ]
    for label, r in rows:
        reh = r.get("rehearsal") or {}
        lines.append(
            f"| {label} | "
            + " | ".join(
                f"{_pct(r['per_kind'][k]['format'])} | {_pct(r['per_kind'][k]['right'])}" for k in KINDS
            )
            + f" | {r['forgetting_kl']:.4f} | {_pct(r['general_exact_match'])} | "
            + (f"{_pct(reh['target_token_share'])} ({reh['prompts']} prompts)" if reh else "")
            + " |"
        )
    lines += ["", "One answer of each kind (the first person):", ""]
    for label, r in rows:
        lines.append(f"- {label}: " + "; ".join(f"{k}: {r['examples'][k]!r}" for k in KINDS))
    lines += ["", f"Whole run {result['wall_seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--entities", type=int, default=32, help="fictional people")
    p.add_argument("--bios-per-entity", type=int, default=4, help="prose biographies per person")
    p.add_argument("--share", type=float, default=0.25, help="rehearsal share of the second run")
    p.add_argument("--rehearsal-max-new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--max-new-tokens", type=int, default=48, help="greedy tokens per answer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT / "rehearsal", help="working directory (runs, data)")
    args = p.parse_args(argv)
    if not 0 < args.share < 1:
        p.error(f"--share must be in (0, 1), got {args.share}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = benchmark(args)
    text = markdown(result)
    folder = (
        OUT if args.out == OUT / "rehearsal" else args.out
    )  # a smoke run keeps its tables beside its runs
    write_text(folder / "rehearsal.json", json.dumps(result, indent=2) + "\n")
    write_text(folder / "rehearsal.md", text)
    print(text)


if __name__ == "__main__":
    main()
