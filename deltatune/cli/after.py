"""CLI verbs for what comes after training: merge, compress, decompress, extract, serve.

Thin on purpose: parse, validate, call the library, print its report. Registered on the main
`deltatune` app by deltatune.cli.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg="red", err=True)
    raise typer.Exit(2)


def _key_values(items: list[str], what: str) -> dict[str, object]:
    from deltatune.train.config import _yaml_scalar

    out: dict[str, object] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            _fail(ValueError(f"{what} expects key=value, got {item!r}"))
        out[key.replace("-", "_")] = _yaml_scalar(value)
    return out


def merge(
    config: Annotated[Path, typer.Argument(help="mergekit-style YAML")],
    out_dir: Annotated[Path, typer.Argument(help="output directory (HF model or PEFT adapter)")],
    threads: Annotated[int | None, typer.Option(help="worker threads (default: all cores)")] = None,
) -> None:
    """Merge full models or LoRA adapters (linear, task_arithmetic, ties, dare_*, breadcrumbs, model_stock, slerp)."""
    from deltatune.merge.config import MergeConfigError
    from deltatune.merge.executor import run_merge
    from deltatune.merge.storage import MergeError

    try:
        report = run_merge(config, out_dir, threads=threads)
    except (MergeConfigError, MergeError, FileNotFoundError, ValueError) as err:
        _fail(err)
    typer.echo(
        f"{report.method}: merged {report.tensors} tensors ({report.bytes_written / 2**20:.1f} MiB) "
        f"in {report.seconds:.1f} s -> {report.out_dir}"
    )
    if report.svd_errors:
        worst = max(report.svd_errors.items(), key=lambda kv: kv[1])
        typer.echo(f"rank {report.rank}: worst relative reconstruction error {worst[1]:.4f} ({worst[0]})")


def compress(
    src: Annotated[Path, typer.Argument(help="PEFT adapter dir, or a fine-tuned model dir (with --base)")],
    out: Annotated[Path, typer.Argument(help="output directory")],
    method: Annotated[str, typer.Option(help="compeft | bitdelta | delta_come | raw")] = "compeft",
    base: Annotated[Path | None, typer.Option(help="base model dir: makes SRC a full fine-tune")] = None,
    lora_mode: Annotated[
        str, typer.Option(help="dense (compress ΔW) or factors (compress A and B)")
    ] = "dense",
    param: Annotated[list[str], typer.Option("--param", "-p", help="method parameter key=value")] = [],  # noqa: B006
    overwrite: bool = False,
) -> None:
    """Compress a LoRA adapter or a full-model delta; prints the size ratio and errors."""
    from deltatune.compress import DeltaInputError, format_report
    from deltatune.compress import compress as run

    is_adapter = (src / "adapter_config.json").is_file()
    source = src if is_adapter or base is None else (base, src)
    try:
        report = run(
            source,
            out,
            method,
            lora_mode=lora_mode,
            overwrite=overwrite,
            base=base if is_adapter else None,
            **_key_values(param, "--param"),
        )
    except (DeltaInputError, ValueError, FileNotFoundError, FileExistsError) as err:
        _fail(err)
    typer.echo(format_report(report))


def decompress(
    src: Annotated[Path, typer.Argument(help="compressed directory")],
    out: Annotated[Path, typer.Argument(help="output directory")],
    base: Annotated[Path | None, typer.Option(help="override the recorded base model")] = None,
    overwrite: bool = False,
) -> None:
    """Decompress to a PEFT adapter, a dense delta, or a full HF model directory."""
    from deltatune.compress import DeltaInputError
    from deltatune.compress import decompress as run

    try:
        path = run(src, out, base=base, overwrite=overwrite)
    except (DeltaInputError, ValueError, FileNotFoundError, FileExistsError) as err:
        _fail(err)
    typer.echo(f"wrote {path}")


def extract(
    base: Annotated[Path, typer.Argument(help="base model dir")],
    finetuned: Annotated[Path, typer.Argument(help="fine-tuned model dir")],
    out: Annotated[Path, typer.Argument(help="output PEFT adapter dir")],
    rank: Annotated[int, typer.Option(help="LoRA rank")] = 16,
    overwrite: bool = False,
) -> None:
    """Turn a full fine-tune into a PEFT LoRA by (randomized) SVD; prints captured energy per module."""
    from deltatune.compress import DeltaInputError, extract_lora, format_report

    try:
        report = extract_lora(base, finetuned, out, rank, overwrite=overwrite)
    except (DeltaInputError, ValueError, FileNotFoundError, FileExistsError) as err:
        _fail(err)
    typer.echo(format_report(report))


def serve(
    base: Annotated[str, typer.Option(help="'default', a HF directory or a .gguf file")] = "default",
    adapter: Annotated[list[str], typer.Option(help="name=path, repeatable")] = [],  # noqa: B006
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="DELTATUNE_API_KEY", help="required Bearer key")
    ] = None,
    allow_adapter_dir: Annotated[list[Path], typer.Option(help="dirs POST /v1/adapters may load from")] = [],  # noqa: B006
    option: Annotated[list[str], typer.Option("--option", "-o", help="engine option key=value")] = [],  # noqa: B006
) -> None:
    """OpenAI-compatible server for the base model and many adapters at once."""
    from deltatune.serve.app import serve as run

    adapters = {}
    for item in adapter:
        name, eq, path = item.partition("=")
        if not eq:
            _fail(ValueError(f"--adapter expects name=path, got {item!r}"))
        adapters[name] = Path(path)
    try:
        run(
            base,
            adapters,
            host=host,
            port=port,
            api_key=api_key,
            allowed_adapter_dirs=allow_adapter_dir,
            **_key_values(option, "--option"),
        )
    except (ValueError, FileNotFoundError) as err:
        _fail(err)


def register(app: typer.Typer) -> None:
    for verb in (merge, compress, decompress, extract, serve):
        app.command()(verb)
