"""The `deltatune` command: parse, validate, call the library. No logic lives here.

Every verb turns expected failures (bad config, bad data, bad adapter, missing model) into one
line on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from deltatune.cli.after import register as register_after_training

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Parameter-efficient fine-tuning and everything after it.",
)

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="'default', a HF directory, a .gguf file or a cached hub id")
]
AdapterOpt = Annotated[Path | None, typer.Option("--adapter", "-a", help="adapter directory (PEFT format)")]


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg="red", err=True)
    raise typer.Exit(2)


def _expected_errors() -> tuple[type[Exception], ...]:
    from deltatune.data import DataError
    from deltatune.formats.peft import AdapterError
    from deltatune.models import ModelNotFoundError
    from deltatune.train.config import ConfigError
    from deltatune.train.loop import TrainingDiverged

    return ConfigError, DataError, AdapterError, ModelNotFoundError, TrainingDiverged, FileNotFoundError


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(ctx: typer.Context) -> None:
    """Fine-tune a model: deltatune train [CONFIG.yaml] [--key value ...].

    With no arguments: LoRA on a built-in task with the default model. Any config key can be given
    or overridden as --key value (e.g. --learning-rate 1e-3 --use-rslora true).
    """
    from deltatune.train.config import load_config, parse_overrides
    from deltatune.train.loop import run

    args = list(ctx.args)
    config = Path(args.pop(0)) if args and not args[0].startswith("--") else None
    try:
        cfg = load_config(config, parse_overrides(args))
        summary = run(cfg)
    except _expected_errors() as err:
        _fail(err)
    if summary:
        typer.echo(
            f"\ntrained {summary['trainable_params']:,} of {summary['total_params']:,} parameters "
            f"({summary['trainable_percent']:.2f}%) at {summary['tokens_per_second']:,.0f} tokens/s"
        )
        for name, res in summary["eval"].items():
            before = "n/a" if res["before"] is None else f"{100 * res['before']:.1f}%"
            typer.echo(f"exact match on {name}: base {before} -> fine-tuned {100 * res['after']:.1f}%")
        typer.echo(f"run directory: {summary['output']}")


def _load(model: str, adapter: Path | None):
    import deltatune
    from deltatune.models import load_tokenizer

    return deltatune.load(model, adapter=adapter), load_tokenizer(model)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="user message (or raw text with --raw)")],
    model: ModelOpt = "default",
    adapter: AdapterOpt = None,
    max_new_tokens: int = 64,
    raw: Annotated[bool, typer.Option(help="no chat template")] = False,
) -> None:
    """Greedy generation for one prompt."""
    from deltatune.train.evaluate import generate as gen

    try:
        lm, tok = _load(model, adapter)
    except _expected_errors() as err:
        _fail(err)
    text = prompt if raw else [{"role": "user", "content": prompt}]
    typer.echo(gen(lm, tok, [text], max_new_tokens=max_new_tokens)[0])


@app.command()
def chat(model: ModelOpt = "default", adapter: AdapterOpt = None, max_new_tokens: int = 256) -> None:
    """Interactive chat (empty line or Ctrl-D to quit)."""
    from deltatune.train.evaluate import generate as gen

    try:
        lm, tok = _load(model, adapter)
    except _expected_errors() as err:
        _fail(err)
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        reply = gen(lm, tok, [history], max_new_tokens=max_new_tokens)[0]
        history.append({"role": "assistant", "content": reply})
        typer.echo(f"bot> {reply}")


@app.command("eval")
def evaluate(
    model: ModelOpt = "default",
    adapter: AdapterOpt = None,
    task: Annotated[str | None, typer.Option(help="built-in task name")] = None,
    data: Annotated[Path | None, typer.Option(help="jsonl/json/csv/parquet eval file")] = None,
    n: Annotated[int, typer.Option(help="number of items")] = 100,
    seed: int = 0,
    max_new_tokens: int = 32,
) -> None:
    """Exact match of greedy answers on a built-in task's test split or an eval file."""
    from deltatune.train.evaluate import eval_items_from_file, eval_items_from_task, exact_match_score

    if (task is None) == (data is None):
        _fail(ValueError("give exactly one of --task or --data"))
    try:
        items = eval_items_from_task(task, n, seed=seed) if task else eval_items_from_file(data)[:n]
        lm, tok = _load(model, adapter)
    except (*_expected_errors(), ValueError) as err:
        _fail(err)
    result = exact_match_score(lm, tok, items, max_new_tokens=max_new_tokens)
    typer.echo(f"exact match: {100 * result['exact_match']:.1f}% of {result['n']}")


@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="output HF model directory")],
    model: ModelOpt = "default",
    adapter: AdapterOpt = None,
    merge: Annotated[bool, typer.Option("--merge", help="fold the adapter into the weights")] = False,
) -> None:
    """Write a merged HF model directory that plain transformers loads."""
    import deltatune
    from deltatune.export import export_merged

    if not merge or adapter is None:
        _fail(ValueError("export needs --adapter and --merge (a merged model directory is the output)"))
    try:
        path = export_merged(model, adapter, out)
    except _expected_errors() as err:
        _fail(err)
    typer.echo(f"wrote {path} (deltatune {deltatune.__version__})")


register_after_training(app)


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars are noise here; deltatune prints its own
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
