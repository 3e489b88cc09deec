"""`deltatune select DATA OUT --budget N|FRACTION --strategy dedup,quality,diversity`: data selection."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deltatune.cli import command, fail, key_values, keys_help, with_keys_help


def _options_help(_args: list[str]) -> str:
    from deltatune.select.options import SelectOptions

    return keys_help("Options (--param key=value)", SelectOptions, flags=False)


@command(cls=with_keys_help(_options_help))
def select(
    data: Annotated[Path, typer.Argument(help="records: jsonl, json, csv or parquet")],
    out: Annotated[Path, typer.Argument(help="selected records, same format; selection.json/.png beside it")],
    budget: Annotated[
        str | None, typer.Option(help="records to keep: a count N, or a fraction in (0, 1]")
    ] = None,
    strategy: Annotated[
        str, typer.Option(help="comma pipeline, run in order: dedup, quality, diversity")
    ] = "dedup,quality,diversity",
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="option key=value (repeatable; listed below)")
    ] = None,
    model: Annotated[str | None, typer.Option(help="model that scores quality (default: 'default')")] = None,
    quality: Annotated[str | None, typer.Option(help="quality score: ifd or perplexity")] = None,
    diversity: Annotated[str | None, typer.Option(help="diversity sampler: kcenter or kmeans")] = None,
    near_threshold: Annotated[float | None, typer.Option(help="near-duplicate Jaccard (0.8)")] = None,
    semantic_threshold: Annotated[float | None, typer.Option(help="semantic-duplicate cosine (0.95)")] = None,
    num_perm: Annotated[int | None, typer.Option(help="MinHash permutations (128)")] = None,
    max_length: Annotated[int | None, typer.Option(help="tokens per scored sequence (512)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="sequences per scoring forward (32)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace OUT, selection.json and selection.png")] = False,
) -> None:
    """Keep the records worth training on: dedup (exact, MinHash near, SemDeDup), quality (IFD or
    perplexity under a base model), diversity (k-center or k-means on MiniLM embeddings)."""
    from deltatune.select import select as run_select
    from deltatune.select.options import build_options

    params = key_values(param or [], "--param")
    flags = {
        "model": model,
        "quality": quality,
        "diversity": diversity,
        "near_threshold": near_threshold,
        "semantic_threshold": semantic_threshold,
        "num_perm": num_perm,
        "max_length": max_length,
        "batch_size": batch_size,
    }
    for key, value in flags.items():
        if value is None:
            continue
        if key in params and params[key] != value:
            fail(f"--{key.replace('_', '-')} and --param {key}=... disagree; give it once")
        params[key] = value
    options = build_options(params, what="--param")
    report = run_select(data, out, budget, strategy, overwrite=overwrite, options=options)
    summary = report["summary"]
    typer.echo(f"kept {summary['kept']} of {summary['records']} records")
    for reason, count in summary["reasons"].items():
        if reason != "kept":
            typer.echo(f"  {reason}: {count}")
    for note in summary["notes"]:
        typer.echo(f"  note: {note}")
    rates = ", ".join(f"{k} {v:,.0f} records/s" for k, v in summary["records_per_second"].items())
    if rates:
        typer.echo(f"  scoring: {rates}")
    typer.echo(f"-> {out}, {out.parent / 'selection.json'}, {out.parent / 'selection.png'}")
