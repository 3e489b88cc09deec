"""Using a model with an adapter: generate, chat, eval, export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deltatune.cli import command, fail

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="'default', a HF directory, a .gguf file or a cached hub id")
]
QuantizeOpt = Annotated[
    str, typer.Option("--quantize", help="store the base's linear weights as none|nf4|int8 (as trained)")
]
AdapterOpt = Annotated[
    Path | None,
    typer.Option("--adapter", "-a", help="delta dir: PEFT adapter (any method), dense or compressed delta"),
]


def _load(model: str, adapter: Path | None, quantize: str = "none"):
    import deltatune
    from deltatune.models import load_tokenizer

    return deltatune.load(model, adapter=adapter, quantize=quantize), load_tokenizer(model)


@command()
def generate(
    prompt: Annotated[str, typer.Argument(help="user message (or raw text with --raw)")],
    model: ModelOpt = "default",
    adapter: AdapterOpt = None,
    max_new_tokens: int = 64,
    raw: Annotated[bool, typer.Option(help="no chat template")] = False,
    quantize: QuantizeOpt = "none",
) -> None:
    """Greedy generation for one prompt."""
    from deltatune.train.evaluate import generate as gen

    lm, tok = _load(model, adapter, quantize)
    text = prompt if raw else [{"role": "user", "content": prompt}]
    typer.echo(gen(lm, tok, [text], max_new_tokens=max_new_tokens)[0])


@command()
def chat(
    model: ModelOpt = "default",
    adapter: AdapterOpt = None,
    max_new_tokens: int = 256,
    quantize: QuantizeOpt = "none",
) -> None:
    """Interactive chat (empty line or Ctrl-D to quit)."""
    from deltatune.train.evaluate import generate as gen

    lm, tok = _load(model, adapter, quantize)
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


@command("eval")
def evaluate(
    model: ModelOpt = "default",
    adapter: AdapterOpt = None,
    task: Annotated[str | None, typer.Option(help="built-in task name")] = None,
    data: Annotated[Path | None, typer.Option(help="jsonl/json/csv/parquet eval file")] = None,
    n: Annotated[int, typer.Option(help="number of items")] = 100,
    seed: int = 0,
    max_new_tokens: int = 32,
    quantize: QuantizeOpt = "none",
) -> None:
    """Exact match of greedy answers on a built-in task's test split or an eval file."""
    from deltatune.train.evaluate import eval_items_from_file, eval_items_from_task, exact_match_score

    if (task is None) == (data is None):
        fail("give exactly one of --task or --data")
    items = eval_items_from_task(task, n, seed=seed) if task else eval_items_from_file(data)[:n]
    lm, tok = _load(model, adapter, quantize)
    result = exact_match_score(lm, tok, items, max_new_tokens=max_new_tokens)
    typer.echo(f"exact match: {100 * result['exact_match']:.1f}% of {result['n']}")


@command()
def export(
    out: Annotated[
        Path, typer.Argument(help="output: a HF model directory, or a .gguf file with --format gguf")
    ],
    model: ModelOpt = "default",
    adapter: AdapterOpt = None,
    merge: Annotated[bool, typer.Option("--merge", help="fold the adapter into the weights")] = False,
    quantize: Annotated[
        str, typer.Option("--quantize", help="the base the adapter was trained over: none|nf4|int8")
    ] = "none",
    out_format: Annotated[
        str, typer.Option("--format", help="hf (a model directory) or gguf (llama.cpp)")
    ] = "hf",
    gguf_type: Annotated[str, typer.Option("--gguf-type", help="f16|q8_0|q4_0 (with --format gguf)")] = "f16",
) -> None:
    """Write a merged HF model directory that plain transformers loads, or a GGUF file for llama.cpp.

    Over a quantized base (--quantize) the adapter is merged into the dequantized weights in fp32."""
    import deltatune
    from deltatune.export import export_gguf, export_merged

    if out_format not in ("hf", "gguf"):
        fail(f"--format: unknown format {out_format!r}; valid: hf, gguf")
    if adapter is not None and not merge:
        fail("export needs --merge with --adapter (the adapter is folded into the weights)")
    if out_format == "hf":
        if adapter is None:
            fail("export needs --adapter and --merge (a merged model directory is the output)")
        path = export_merged(model, adapter, out, quantize=quantize)
    else:
        path = export_gguf(model, adapter, out, gguf_type=gguf_type, quantize=quantize)
    typer.echo(f"wrote {path} (deltatune {deltatune.__version__})")
