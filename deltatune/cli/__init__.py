"""The `deltatune` command: parse, validate, call the library. No logic lives here.

One module per feature (train, infer, deltas, serve); each registers its verbs with `command`, which
turns the expected failures of `expected_errors()` (bad config, data, file or option, missing model,
a path that cannot be read or written, a full or read-only disk) into one line on stderr and exit
code 2 via `fail`, without a traceback. Nothing here imports torch,
so `deltatune --help` stays fast: verbs import the library when they run.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, NoReturn

import typer
from typer.core import TyperCommand

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Parameter-efficient fine-tuning and everything after it.",
)


def fail(err: Exception | str) -> NoReturn:
    typer.secho(f"error: {describe(err) if isinstance(err, Exception) else err}", fg="red", err=True)
    raise typer.Exit(2)


def describe(err: Exception) -> str:
    """An OS error as "permission denied: PATH" (no errno prefix, no quotes); others as they say."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        also = f" -> {err.filename2}" if err.filename2 is not None else ""
        return f"{err.strerror.lower()}: {err.filename}{also}"
    return str(err)


# OSErrors that are the machine's state, not a bug: reported like expected errors
ENVIRONMENT_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def expected_errors() -> tuple[type[Exception], ...]:
    """What a verb reports as one line (exit 2) instead of a traceback; imported only on failure."""
    from deltatune.atomic import OutputPathError
    from deltatune.data import DataError
    from deltatune.formats import FormatError
    from deltatune.merge.config import MergeConfigError
    from deltatune.models import ModelNotFoundError
    from deltatune.train.config import ConfigError
    from deltatune.train.loop import TrainingDiverged

    library = ConfigError, DataError, FormatError, MergeConfigError, ModelNotFoundError, TrainingDiverged
    paths = FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError
    return (*library, OutputPathError, ValueError, *paths)


def command(*args: Any, **kwargs: Any) -> Callable[[Callable], Callable]:
    """`app.command`, with the one error policy: an expected error is one line and exit 2."""

    def register(verb: Callable) -> Callable:
        @functools.wraps(verb)  # typer reads the verb's signature through __wrapped__
        def run(*a: Any, **kw: Any) -> Any:
            try:
                return verb(*a, **kw)
            except expected_errors() as err:
                fail(err)
            except OSError as err:
                if err.errno not in ENVIRONMENT_ERRNOS:
                    raise
                fail(err)

        return app.command(*args, **kwargs)(run)

    return register


def key_values(items: list[str], what: str) -> dict[str, object]:
    """`key=value` items (e.g. repeated --param) as a dict; values parsed like config values."""
    from deltatune.train.config import parse_scalar

    out: dict[str, object] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            fail(f"{what} expects key=value, got {item!r}")
        out[key.replace("-", "_")] = parse_scalar(value)
    return out


def _type_name(tp: object) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        return "|".join(json.dumps(a) if isinstance(a, bool) else str(a) for a in args)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return "|".join(map(_type_name, args))
    return tp.__name__ if isinstance(tp, type) else str(tp)


def keys_help(title: str, model: type, flags: bool = True) -> str:
    """A pydantic model's fields (but excluded ones) as `--key-name <type>  [default: X]  description`."""
    rows = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        flag = f"{'--' + name.replace('_', '-') if flags else name} <{_type_name(field.annotation)}>"
        default = field.get_default(call_default_factory=True)
        shown = json.dumps(default) if isinstance(default, bool | list | dict) else default
        rows.append((flag, "" if default is None else f"[default: {shown}]", field.description or ""))
    w0, w1 = (max((len(row[i]) for row in rows), default=0) for i in (0, 1))
    lines = (f"  {flag:<{w0}}  {default:<{w1}}  {text}".rstrip() for flag, default, text in rows)
    return "\n".join([f"\n{title}:{'' if rows else ' none'}", *lines, ""])


def with_keys_help(extra: Callable[[list[str]], str]) -> type[TyperCommand]:
    """A command class whose --help appends `extra(raw args)`, built when help is asked for."""

    class Command(TyperCommand):
        def parse_args(self, ctx, args):
            ctx.meta["raw_args"] = list(args)
            return super().parse_args(ctx, args)

        def format_help(self, ctx, formatter) -> None:
            text = extra(ctx.meta.get("raw_args", []))  # first: it may fail (e.g. an unknown --method)
            super().format_help(ctx, formatter)
            formatter.write(text)

    return Command


from deltatune.cli import train, infer, select, deltas, inspect, route, serve  # noqa: E402, F401, I001  (registration order = help order)


def omp_defaults(environ: dict[str, str] | None = None) -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user set it (or DELTATUNE_OMP_DEFAULTS=0).

    Measured alone (benchmarks/omp_policy.py, README "Threads"): beside one other busy process,
    training under libgomp's default spinning fell to 29 tokens/s and PASSIVE kept 137 (4.7x), the
    other job 1.4x faster too; with nothing else running, PASSIVE gave 170 vs 209 (0.81x). A shared CPU is the common case here, so
    PASSIVE is the default; set OMP_WAIT_POLICY yourself on a dedicated machine. It must be set
    before torch starts its OpenMP runtime, so the CLI sets it first thing, before any import of torch.
    """
    env = os.environ if environ is None else environ
    if env.get("DELTATUNE_OMP_DEFAULTS", "1") != "0":
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    omp_defaults()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars are noise here; deltatune prints its own
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
