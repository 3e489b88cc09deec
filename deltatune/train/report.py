"""report.md: a training run's numbers and plots on one page, and the lines the CLI prints.

Everything comes from the summary dict (the one written to summary.json) and the files already in
the run directory (loss.png, reliability.png, general_answers.json); nothing is recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deltatune.data.tasks import exact_match
from deltatune.formats import atomic_write

# summary["eval"] rows that are not an exact-match score on an eval set: label, unit, what it is
METRICS: dict[str, tuple[str, str, str]] = {
    "perplexity": (
        "perplexity",
        "float",
        "exp(mean next-token loss) over the held-out target tokens (the eval split, or perplexity_data)",
    ),
    "forgetting_kl": (
        "forgetting: KL(base || tuned)",
        "float",
        "nats per token position of the shipped general text (data/general/text.txt); 0 for the base",
    ),
    "general_exact_match": (
        "forgetting: general answers kept",
        "share",
        "share of the 32 general questions answered exactly as the base model answers them",
    ),
    "ece": (
        "calibration: ECE",
        "float",
        "expected calibration error (10 bins) of the first-token probability of the greedy answer "
        "against its exact match, on the eval items",
    ),
}


def _value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if unit == "share" else f"{value:.4g}"


def _change(before: float | None, after: float | None, unit: str) -> str:
    if before is None or after is None:
        return ""
    if unit == "share":
        return f"{100 * (after - before):+.1f} pts"
    return f"{after - before:+.4g}"


def _rows(table: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, str, str]]:
    """(label, before, after, change, meaning) for each eval row."""
    out = []
    order = list(METRICS)  # exact match per eval set first, then the cost metrics in METRICS order
    for name, row in sorted(table.items(), key=lambda kv: order.index(kv[0]) + 1 if kv[0] in METRICS else 0):
        label, unit, meaning = METRICS.get(name, (f"exact match on {name}", "share", "greedy answers"))
        before, after = row.get("before"), row.get("after")
        out.append((label, _value(before, unit), _value(after, unit), _change(before, after, unit), meaning))
    return out


def eval_lines(table: dict[str, dict[str, Any]]) -> list[str]:
    """One line per eval row, for the end of `deltatune train`."""
    return [f"{label}: base {before} -> fine-tuned {after}" for label, before, after, _, _ in _rows(table)]


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _question(prompt: Any) -> str:
    return prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)


def render(summary: dict[str, Any], out: Path) -> str:
    """The markdown of report.md for a run directory `out` holding `summary`."""
    lines = [f"# {summary['method']} on {summary['model']}: {summary['steps']} steps", ""]
    facts = [
        ("trainable parameters", f"{summary['trainable_params']:,} ({summary['trainable_percent']:.2f}%)"),
        ("train tokens", f"{summary['train_tokens']:,}"),
        ("tokens/s", f"{summary['tokens_per_second']:,.0f}"),
        ("final train loss", f"{summary['final_loss']:.4f}"),
        ("final eval loss", "n/a" if summary.get("eval_loss") is None else f"{summary['eval_loss']:.4f}"),
        ("precision", summary.get("precision", "")),
        ("wall seconds (steps and the after evaluation)", f"{summary['wall_seconds']:.1f}"),
    ]
    lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in facts), ""]
    if summary.get("eval"):
        lines += [
            "## Before (base) and after (tuned)",
            "",
            "| metric | base | tuned | change | what it measures |",
            "|---|---|---|---|---|",
            *(f"| {' | '.join(_cell(c) for c in row)} |" for row in _rows(summary["eval"])),
            "",
        ]
    lines += ["## Plots", "", "![train and eval loss](loss.png)", ""]
    if (out / "reliability.png").is_file():
        lines += [
            "![reliability diagram: exact match against first-token probability](reliability.png)",
            "",
        ]
    answers = out / "general_answers.json"
    if answers.is_file():
        rows = json.loads(answers.read_text())["answers"]
        changed = [r for r in rows if not exact_match(r["tuned"], r["base"])]  # as the score counts
        lines += [
            f"## General answers: {len(changed)} of {len(rows)} changed (all in general_answers.json)",
            "",
        ]
        if changed:
            lines += ["| question | base | tuned |", "|---|---|---|"]
            lines += [
                f"| {_cell(_question(r['question']))} | {_cell(r['base'])} | {_cell(r['tuned'])} |"
                for r in changed[:8]
            ]
            lines.append("")
    if summary.get("rehearsal"):
        r = summary["rehearsal"]
        lines += [
            "## Rehearsal",
            "",
            f"The base model's own answers to {r['prompts']} general prompts ({r['cut_off']} cut off at "
            f"rehearsal_max_new_tokens, trained on without an end-of-turn target) in {r['rows']} packed rows of their own (cached in {r['cache']}). Asked for: {r['share']:.0%} of "
            f"each step's target tokens (its loss), planned as {r['planned_row_share']:.1%} of its rows; "
            f"realised over the run: {r['target_token_share']:.1%} of target tokens, {r['row_share']:.1%} "
            "of rows.",
            "",
        ]
    if summary.get("packing"):
        p = summary["packing"]
        lines += [
            "## Packing",
            "",
            f"{p['samples']} samples in {p['rows']} rows, {p['efficiency']:.1%} filled, "
            f"{p['truncated_samples']} truncated, {p['dropped_samples']} dropped.",
            "",
        ]
    return "\n".join(lines)


def write_report(out: Path, summary: dict[str, Any]) -> Path:
    """Write `out`/report.md (atomically) and return its path."""
    path = Path(out) / "report.md"
    text = render(summary, Path(out))
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path
