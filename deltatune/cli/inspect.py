"""`deltatune inspect`: spectra of deltas and their task similarity, before a merge."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deltatune.cli import command, fail


@command()
def inspect(
    deltas: Annotated[list[Path], typer.Argument(help="adapter directories, or full models with --base")],
    base: Annotated[
        str | None, typer.Option(help="base model: needed for full fine-tunes, and for non-LoRA adapters")
    ] = None,
    top_r: Annotated[
        int, typer.Option("--top-r", min=1, help="r of the top-r energy and subspace overlap")
    ] = 16,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="directory for inspect.json and similarity.png")
    ] = Path("inspect"),
    overwrite: bool = False,
) -> None:
    """Per module: ΔW norm, effective rank, top-r energy, sparsity; across deltas: cosine and overlap."""
    import json

    from deltatune.atomic import new_directory
    from deltatune.inspect import inspect_deltas, label, plot_similarity

    if len(set(deltas)) != len(deltas):
        fail("the same delta is given twice")
    target = new_directory(out, overwrite)
    report = inspect_deltas(deltas, base, top_r)
    with target as tmp:
        (tmp / "inspect.json").write_text(json.dumps(report, indent=2) + "\n")
        if len(deltas) > 1:
            plot_similarity(report, tmp / "similarity.png")
    names = [label(d["path"]) for d in report["deltas"]]
    width = max(len(n) for n in names)
    typer.echo(f"{'delta':<{width}}  modules   norm   eff.rank  top{top_r} energy  sparsity")
    for name, d in zip(names, report["deltas"], strict=True):
        typer.echo(
            f"{name:<{width}}  {d['modules']:7d}  {d['norm']:6.2f}  {d['mean_effective_rank']:8.2f}"
            f"  {d[f'mean_top{top_r}_energy']:11.3f}  {d['sparsity']:8.3f}"
        )
    if len(deltas) > 1:
        for key, title in (("cosine", "cosine of ΔW"), ("subspace_overlap", f"top-{top_r} subspace overlap")):
            typer.echo(f"\n{title}\n{'':<{width}}  " + "  ".join(f"{n[:8]:>8}" for n in names))
            for name, row in zip(names, report[key], strict=True):
                typer.echo(f"{name:<{width}}  " + "  ".join(f"{v:8.3f}" for v in row))
    typer.echo(f"\n-> {out}/inspect.json" + (f", {out}/similarity.png" if len(deltas) > 1 else ""))
