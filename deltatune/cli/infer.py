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
        reply = gen(lm, tok, [history], max_new_tokens=max_new_tokens, progress=False)[
            0
        ]  # the reply shows it
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
    perplexity: Annotated[
        Path | None,
        typer.Option("--perplexity", help="held-out text or chat file: perplexity of its targets"),
    ] = None,
    forgetting: Annotated[
        bool,
        typer.Option(
            "--forgetting", help="KL from the base on general text, exact match of the base's general answers"
        ),
    ] = False,
    calibration: Annotated[
        bool,
        typer.Option(
            "--calibration", help="ECE of the answers' first-token probability (with --task/--data)"
        ),
    ] = False,
    reliability_plot: Annotated[
        Path | None,
        typer.Option("--reliability-plot", help="write the reliability diagram PNG (with --calibration)"),
    ] = None,
) -> None:
    """Exact match of greedy answers on a built-in task's test split or an eval file; optionally what
    fine-tuning cost: perplexity, forgetting and calibration (one line each)."""
    from deltatune.train import cost
    from deltatune.train.evaluate import eval_items_from_file, eval_items_from_task, exact_match_score

    if task is not None and data is not None:
        fail("give only one of --task or --data")
    if task is None and data is None and perplexity is None and not forgetting:
        fail("give --task or --data (exact match), --perplexity FILE or --forgetting")
    if calibration and task is None and data is None:
        fail("--calibration scores the answers of --task or --data; give one of them")
    if reliability_plot is not None and not calibration:
        fail("--reliability-plot needs --calibration")
    items = None
    if task or data:
        items = eval_items_from_task(task, n, seed=seed) if task else eval_items_from_file(data)[:n]
    if perplexity is not None:
        from deltatune.data import load_samples

        load_samples(perplexity, _load_tokenizer(model))  # a bad file fails before the model loads
    lm, tok = _load(model, adapter, quantize)
    if items is not None:
        result = exact_match_score(lm, tok, items, max_new_tokens=max_new_tokens)
        typer.echo(f"exact match: {100 * result['exact_match']:.1f}% of {result['n']}")
        if calibration:
            ece = cost.expected_calibration_error(result["confidence"], result["correct"])
            where = ""
            if reliability_plot is not None:
                cost.plot_reliability(
                    {f"ECE {ece:.3f}": cost.reliability_bins(result["confidence"], result["correct"])},
                    reliability_plot,
                )
                where = f"; reliability diagram: {reliability_plot}"
            typer.echo(
                f"calibration: ECE {ece:.4f} over {result['n']} answers (first-token probability vs exact "
                f"match, {cost.BINS} bins){where}"
            )
    if perplexity is not None:
        ppl = cost.perplexity(lm, tok, perplexity)
        typer.echo(f"perplexity on {perplexity}: {ppl['perplexity']:.4g} over {ppl['tokens']} target tokens")
    if forgetting:
        _forgetting(lm, tok, model, adapter, quantize)


def _load_tokenizer(model: str):
    from deltatune.models import load_tokenizer

    return load_tokenizer(model)


def _forgetting(lm, tok, model: str, adapter: Path | None, quantize: str) -> None:
    """Against the base: the same model with the delta switched off, or (a delta added into the
    weights: dense, compressed) the base loaded beside it."""
    from deltatune.formats import delta_kind
    from deltatune.train import cost

    base = None
    if adapter is not None and delta_kind(adapter) != "adapter":
        base, _ = _load(model, None, quantize)
    dtype = next(lm.parameters()).dtype
    cache = cost.answer_cache_path(model, dtype, quantize)
    questions = cost.general_questions()
    references = cost.base_answers(lm, tok, questions, base=base, cache=cache)
    kl = cost.forgetting_kl(lm, tok, base=base)
    typer.echo(
        f"forgetting: KL(base || tuned) {kl['kl']:.4g} nats/token over {kl['tokens']} general-text tokens"
    )
    general = cost.general_exact_match(lm, tok, references, questions)
    typer.echo(
        f"forgetting: general exact match {100 * general['exact_match']:.1f}% of {general['n']} "
        "(tuned answers equal to the base's own greedy answers)"
    )


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
