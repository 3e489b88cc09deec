"""Working on deltas after training: merge, compress, decompress, extract.

Each verb checks that its output can be written before it loads anything (`_writable`), so a
read-only or misplaced OUT costs one line, not a merge's worth of work and then a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deltatune.cli import command, key_values


def _writable(out: Path) -> None:
    from deltatune.atomic import check_writable

    check_writable(out.parent, out)


@command()
def merge(
    config: Annotated[Path, typer.Argument(help="mergekit-style YAML")],
    out_dir: Annotated[Path, typer.Argument(help="output directory (HF model or PEFT adapter)")],
    threads: Annotated[int | None, typer.Option(help="worker threads (default: all cores)")] = None,
) -> None:
    """Merge full models or LoRA adapters (linear, task_arithmetic, ties, dare_*, breadcrumbs, model_stock, slerp)."""
    from deltatune.merge.executor import run_merge

    _writable(out_dir)
    report = run_merge(config, out_dir, threads=threads)
    typer.echo(
        f"{report.method}: merged {report.tensors} tensors ({report.bytes_written / 2**20:.1f} MiB) "
        f"in {report.seconds:.1f} s -> {report.out_dir}"
    )
    if report.svd_errors:
        worst = max(report.svd_errors.items(), key=lambda kv: kv[1])
        typer.echo(f"rank {report.rank}: worst relative reconstruction error {worst[1]:.4f} ({worst[0]})")


@command()
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
    from deltatune.compress import compress as run
    from deltatune.compress import format_report
    from deltatune.formats import ADAPTER_CONFIG

    _writable(out)
    is_adapter = (src / ADAPTER_CONFIG).is_file()
    source = src if is_adapter or base is None else (base, src)
    params = key_values(param, "--param")
    report = run(
        source,
        out,
        method,
        lora_mode=lora_mode,
        overwrite=overwrite,
        base=base if is_adapter else None,
        **params,
    )
    typer.echo(format_report(report))


@command()
def decompress(
    src: Annotated[Path, typer.Argument(help="compressed directory")],
    out: Annotated[Path, typer.Argument(help="output directory")],
    base: Annotated[Path | None, typer.Option(help="override the recorded base model")] = None,
    rank: Annotated[
        int | None, typer.Option(help="LoRA stored as dense ΔW: write a PEFT LoRA of this rank (by SVD)")
    ] = None,
    overwrite: bool = False,
) -> None:
    """Decompress to a PEFT adapter, a dense delta, or a full HF model directory."""
    from deltatune.compress import decompress as run
    from deltatune.formats import ADAPTER_CONFIG, read_json

    _writable(out)
    path = run(src, out, base=base, rank=rank, overwrite=overwrite)
    typer.echo(f"wrote {path}")
    if rank is not None:
        errors = read_json(path / ADAPTER_CONFIG)["deltatune_report"]["svd_relative_errors"]
        worst = max(errors.items(), key=lambda kv: kv[1])
        typer.echo(f"rank {rank}: worst relative reconstruction error {worst[1]:.4f} ({worst[0]})")


@command()
def extract(
    base: Annotated[Path, typer.Argument(help="base model dir")],
    finetuned: Annotated[Path, typer.Argument(help="fine-tuned model dir")],
    out: Annotated[Path, typer.Argument(help="output PEFT adapter dir")],
    rank: Annotated[int, typer.Option(help="LoRA rank")] = 16,
    overwrite: bool = False,
) -> None:
    """Turn a full fine-tune into a PEFT LoRA by (randomized) SVD; prints captured energy per module."""
    from deltatune.compress import extract_lora, format_report

    _writable(out)
    report = extract_lora(base, finetuned, out, rank, overwrite=overwrite)
    typer.echo(format_report(report))
