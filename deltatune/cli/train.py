"""`deltatune train [CONFIG.yaml] [--key value ...]`: every config key is a flag, listed by --help."""

from __future__ import annotations

from pathlib import Path

import typer

from deltatune.cli import command, fail, keys_help, with_keys_help


def _config_keys(args: list[str]) -> str:
    """Help for the core keys and those of the method named in `args` (default: lora)."""
    from deltatune.deltas import get_method
    from deltatune.train.config import TrainConfig

    method = TrainConfig.model_fields["method"].default
    for arg, value in zip(args, [*args[1:], None], strict=True):
        if arg.startswith("--method="):
            method = arg.partition("=")[2]
        elif arg == "--method" and value is not None:
            method = value
    try:
        config_class = get_method(method).config_class
    except ValueError as err:
        fail(err)
    core = keys_help("Config keys (--key value, or key: value in CONFIG.yaml)", TrainConfig)
    return core + keys_help(f"Keys of --method {method}", config_class)


@command(
    cls=with_keys_help(_config_keys),
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def train(ctx: typer.Context) -> None:
    """Fine-tune a model: deltatune train [CONFIG.yaml] [--key value ...].

    With no arguments: LoRA on a built-in task with the default model. Any config key can be given
    or overridden as --key value (e.g. --learning-rate 1e-3 --use-rslora true).
    """
    from deltatune.train.config import load_config, parse_overrides
    from deltatune.train.loop import run

    args = list(ctx.args)
    config = Path(args.pop(0)) if args and not args[0].startswith("--") else None
    cfg = load_config(config, parse_overrides(args))
    summary = run(cfg)
    if summary:
        typer.echo(
            f"\ntrained {summary['trainable_params']:,} of {summary['total_params']:,} parameters "
            f"({summary['trainable_percent']:.2f}%) at {summary['tokens_per_second']:,.0f} tokens/s"
        )
        from deltatune.train.report import eval_lines

        for line in eval_lines(summary["eval"]):  # exact match per eval set, then the cost metrics
            typer.echo(line)
        typer.echo(f"run directory: {summary['output']}")
