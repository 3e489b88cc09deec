"""Routed deltas from existing adapters: `deltatune route` builds an Arrow delta and writes it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deltatune.cli import command, fail


@command()
def route(
    out: Annotated[Path, typer.Argument(help="output adapter directory (self-contained Arrow delta)")],
    adapter: Annotated[
        list[Path], typer.Option("--adapter", "-a", help="a LoRA adapter to route over (repeat for each)")
    ],
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="adapters mixed per token")] = 3,
    temperature: Annotated[float, typer.Option(help="softmax temperature of the routing scores (> 0)")] = 1.0,
    general: Annotated[
        list[Path], typer.Option("--general", help="general adapter for GenKnowSub (repeat for each)")
    ] = [],  # noqa: B006
    model: Annotated[
        str, typer.Option("--model", "-m", help="'default', a HF directory, a .gguf file or a cached hub id")
    ] = "default",
    overwrite: bool = False,
) -> None:
    """Arrow routing over LoRA adapters (no training): prototypes per module, saved with the factors."""
    import deltatune
    from deltatune.atomic import new_directory
    from deltatune.formats.peft import save_delta

    if temperature <= 0:
        fail(f"--temperature must be greater than 0, got {temperature}")
    target = new_directory(out, overwrite)  # an occupied OUT fails before any model is loaded
    lm = deltatune.load(model)
    deltatune.add_delta(
        lm, "arrow", arrow_adapters=adapter, arrow_top_k=top_k, arrow_temperature=temperature,
        arrow_general_adapters=general,
    )  # fmt: skip
    with target as tmp:
        save_delta(lm, tmp, base_model=model)
    typer.echo(f"arrow over {len(adapter)} adapters, {len(lm.delta_paths)} modules, top-{top_k} -> {out}")
