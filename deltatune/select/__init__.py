"""Data selection: train on the records worth training on (`deltatune select`, `select:` in a train config).

    read records ─► dedup (exact ─► near ─► semantic) ─► quality (IFD | perplexity) ─► diversity ─► OUT
                                                                                     selection.json, selection.png

The strategies run in the order given (`dedup,quality,diversity` by default), each on the records the
previous ones kept. dedup only removes; quality and diversity rank. The last ranking strategy fills
the budget; a ranking strategy before it keeps `pool` x budget (default 2x) for the next one, so
`quality,diversity` picks a diverse budget out of the best-scoring 2x budget. Without a budget,
quality only drops what it rejects outright (IFD above `ifd_max`, no answer within `max_length`).

Every input record gets an entry in selection.json: index, source (file:line), the scores computed
for it, its cluster (the diversity stage's nearest chosen center or k-means cluster, else its SemDeDup
cluster), kept, and the reason ("exact_duplicate of 12", "near_duplicate of 3 (jaccard 0.91)",
"semantic_duplicate of 7 (cosine 0.97)", "ifd>1", "below quality cut", "not selected for
diversity", "kept"), plus a summary (counts per reason, timings, records/s of the scoring passes).
Everything is checked (records parse, budget, strategy, options, output paths) before any model is
loaded, and OUT, selection.json and selection.png appear together or not at all.

`deltatune.select` is both this package and the verb `deltatune.select(records_path, out, ...)`.
"""

from __future__ import annotations

import json
import math
import sys
import time
import types
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltatune.select.options import (
    RANKING,
    STRATEGIES,
    SelectConfig,
    SelectError,
    SelectOptions,
    build_options,
    parse_strategy,
    resolve_budget,
)

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "STRATEGIES",
    "SelectConfig",
    "SelectError",
    "SelectOptions",
    "Selection",
    "select",
    "select_records",
]


@dataclass
class Selection:
    """The outcome for every record of one selection (indices are 0-based input positions)."""

    where: list[str]
    stages: list[str]
    budget: int | None
    reasons: list[str]
    kinds: list[str]
    duplicate_of: list[int | None]
    scores: list[dict[str, float | None]]
    clusters: list[int | None]
    timings: dict[str, float] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    embeddings: np.ndarray | None = None

    @property
    def kept(self) -> list[int]:
        return [i for i, kind in enumerate(self.kinds) if kind == "kept"]

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.kinds).most_common())

    def report(self, **extra: Any) -> dict[str, Any]:
        """selection.json: a summary and one entry per input record."""
        records = [
            {
                "index": i,
                "source": self.where[i],
                "scores": self.scores[i],
                "cluster": self.clusters[i],
                "kept": self.kinds[i] == "kept",
                "reason": self.reasons[i],
                "duplicate_of": self.duplicate_of[i],
            }
            for i in range(len(self.where))
        ]
        summary = {
            "records": len(self.where),
            "kept": len(self.kept),
            "budget": self.budget,
            "strategy": self.stages,
            "reasons": self.counts(),
            "timings_seconds": self.timings,
            "records_per_second": self.rates,
            "notes": self.notes,
        }
        return {**extra, "summary": summary, "records": records}


class _State:
    """What the stages share: who is still in, why the others left, the lazily computed embeddings."""

    def __init__(self, pairs: list[tuple[dict, str]], options: SelectOptions, stages: list[str], budget):
        from deltatune.data import DataError, parse_record
        from deltatune.select.records import record_text

        self.options = options
        self.where = [w for _, w in pairs]
        self.parsed = []
        for record, where in pairs:
            try:
                self.parsed.append(parse_record(record))
            except DataError as err:
                raise DataError(f"{where}: {err}") from None
        self.texts = [record_text(p) for p in self.parsed]
        n = len(pairs)
        self.sel = Selection(
            where=self.where,
            stages=stages,
            budget=budget,
            reasons=["kept"] * n,
            kinds=["kept"] * n,
            duplicate_of=[None] * n,
            scores=[{} for _ in range(n)],
            clusters=[None] * n,
        )
        self.alive = list(range(n))
        self.best: int | None = None  # the top-ranked record of the last quality stage

    def drop(self, i: int, kind: str, reason: str, duplicate_of: int | None = None) -> None:
        """Mark a record dropped; the stage then narrows `alive` once (keep_only), not per record."""
        self.sel.kinds[i], self.sel.reasons[i], self.sel.duplicate_of[i] = kind, reason, duplicate_of

    def keep_only(self, keep: set[int]) -> None:
        self.alive = [i for i in self.alive if i in keep]

    def embeddings(self) -> np.ndarray:
        if self.sel.embeddings is None:
            from deltatune.select.embed import embed_texts, embedding_device

            t = time.perf_counter()
            o = self.options
            stats: dict[str, float] = {}
            device = embedding_device(o.device)
            self.sel.embeddings = embed_texts(
                self.texts, o.embedding_model, o.embedding_batch_size, device, o.cache, o.progress, stats
            )
            self.sel.timings["embed"] = time.perf_counter() - t  # with loading the model, or the cache
            if "encode_seconds" in stats:
                self.sel.rates["embed"] = len(self.texts) / max(stats["encode_seconds"], 1e-9)
            else:
                self.sel.notes.append("embeddings: read from the cache")
        return self.sel.embeddings


def _timed(state: _State, name: str, t0: float) -> None:
    state.sel.timings[name] = state.sel.timings.get(name, 0.0) + time.perf_counter() - t0


def _dedup(state: _State) -> None:
    from deltatune.select import dedup

    o = state.options
    steps = []
    if o.exact:
        steps.append(("exact_duplicate", lambda: dedup.exact_duplicates(state.texts, state.alive), None))
    if o.near:
        steps.append(
            (
                "near_duplicate",
                lambda: dedup.near_duplicates(
                    state.texts, state.alive, o.near_threshold, o.num_perm, o.shingles
                ),
                "jaccard",
            )
        )
    for kind, run, measure in steps:
        t0 = time.perf_counter()
        dropped = run()
        for i, (j, sim) in dropped.items():
            state.drop(i, kind, f"{kind} of {j}" + (f" ({measure} {sim:.2f})" if measure else ""), j)
        state.keep_only(set(state.alive) - set(dropped))
        _timed(state, kind.replace("_duplicate", "_dedup"), t0)
    if o.semantic:
        vectors = state.embeddings()
        t0 = time.perf_counter()
        dropped, labels = dedup.semantic_duplicates(
            vectors, state.alive, o.semantic_threshold, o.semantic_clusters, o.seed
        )
        for i, label in labels.items():
            state.sel.clusters[i] = label
        for i, (j, sim) in dropped.items():
            state.drop(i, "semantic_duplicate", f"semantic_duplicate of {j} (cosine {sim:.3f})", j)
        state.keep_only(set(state.alive) - set(dropped))
        _timed(state, "semantic_dedup", t0)


def _load_scorer(state: _State, model, tokenizer):
    """The causal LM (and tokenizer) that scores quality: a given instance, or loaded by name."""
    import torch

    from deltatune.models import load_model, load_tokenizer
    from deltatune.train.loop import bf16_supported

    if model is not None and not isinstance(model, str):
        if tokenizer is None:
            raise SelectError("a model instance needs its tokenizer (tokenizer=...)")
        return model.eval(), tokenizer
    o = state.options
    name = model or o.model or "default"
    device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if o.device == "auto"
        else torch.device(o.device)
    )
    use_bf16 = o.precision == "bf16" or (o.precision == "auto" and bf16_supported(device))
    tokenizer = tokenizer or load_tokenizer(name)
    loaded = load_model(name, dtype=torch.bfloat16 if use_bf16 else torch.float32, device=device)
    return loaded.eval(), tokenizer


def _cut(state: _State, stage: str) -> int | None:
    """How many records a ranking stage keeps: the budget if it is the last one, else pool x budget."""
    budget = state.sel.budget
    if budget is None:
        return None
    last = max(k for k, s in enumerate(state.sel.stages) if s in RANKING)
    return budget if state.sel.stages.index(stage) == last else math.ceil(state.options.pool * budget)


def _quality(state: _State, model, tokenizer) -> None:
    from deltatune.select.quality import high_outliers, loss_outliers, scores

    o = state.options
    t0 = time.perf_counter()
    lm, tok = _load_scorer(state, model, tokenizer)
    _timed(state, "load_model", t0)
    t0 = time.perf_counter()
    alive = list(state.alive)
    computed = scores(
        lm,
        tok,
        [state.parsed[i] for i in alive],
        [state.where[i] for i in alive],
        o.quality,
        o.max_length,
        o.batch_size,
        o.progress,
    )
    seconds = time.perf_counter() - t0
    state.sel.timings["quality"] = seconds
    state.sel.rates["quality"] = len(alive) / max(seconds, 1e-9)
    key = o.quality
    ranked = []
    losses = {i: e["loss_with_prompt"] for i, e in zip(alive, computed, strict=True) if e["loss_with_prompt"]}
    outliers = loss_outliers(losses, o.loss_outlier_mads)
    for i, entry in zip(alive, computed, strict=True):
        state.sel.scores[i] = entry
        if entry["loss_with_prompt"] is None:
            state.drop(i, "no_answer_within_max_length", f"no answer token within max_length {o.max_length}")
        elif entry.get(key) is None:  # a zero answer-alone loss: the ratio is undefined
            state.drop(i, "score_undefined", f"{key} undefined")
        elif i in outliers:
            state.drop(
                i, "loss_outlier", f"answer loss outlier (> {o.loss_outlier_mads:g} MADs above the median)"
            )
        elif key == "ifd" and entry["ifd"] > o.ifd_max:
            state.drop(i, f"ifd>{o.ifd_max:g}", f"ifd>{o.ifd_max:g}")
        else:
            ranked.append(i)
    if key == "ifd":
        unexplained = high_outliers({i: state.sel.scores[i]["ifd"] for i in ranked}, o.ifd_outlier_mads)
        for i in sorted(unexplained):
            state.drop(i, "ifd_outlier", f"ifd outlier (> {o.ifd_outlier_mads:g} MADs above the median)")
        ranked = [i for i in ranked if i not in unexplained]
        ranked.sort(key=lambda i: (-state.sel.scores[i]["ifd"], i))
    elif o.perplexity_keep == "low":
        ranked.sort(key=lambda i: (state.sel.scores[i]["perplexity"], i))
    else:
        logs = {i: math.log(state.sel.scores[i]["perplexity"]) for i in ranked}
        median = sorted(logs.values())[len(logs) // 2] if logs else 0.0
        ranked.sort(key=lambda i: (abs(logs[i] - median), i))
    cut = _cut(state, "quality")
    for i in ranked[cut:] if cut is not None else []:
        state.drop(i, "below quality cut", "below quality cut")
    kept = ranked[:cut] if cut is not None else ranked
    state.best = kept[0] if kept else None
    state.keep_only(set(kept))


def _diversity(state: _State) -> None:
    import numpy as np

    from deltatune.select.diversity import assign, k_center_greedy, kmeans_sample

    o = state.options
    vectors = state.embeddings()
    t0 = time.perf_counter()
    alive = list(state.alive)
    k = _cut(state, "diversity")
    if len(alive) <= k:
        state.sel.notes.append(f"diversity: {len(alive)} records left for {k} places; all kept")
        chosen = list(range(len(alive)))
        centers = vectors[alive]
    elif o.diversity == "kcenter":
        start = alive.index(state.best) if state.best in alive else 0
        chosen = k_center_greedy(vectors[alive], k, start)
        centers = vectors[[alive[c] for c in chosen]]
    else:
        chosen, centers = kmeans_sample(vectors[alive], k, o.seed)
    if len(alive):
        labels = assign(vectors, np.asarray(centers))
        for i in range(len(state.where)):
            state.sel.clusters[i] = int(labels[i])
    keep = {alive[c] for c in chosen}
    for i in alive:
        if i not in keep:
            state.drop(i, "not selected for diversity", "not selected for diversity")
    state.keep_only(keep)
    _timed(state, "diversity", t0)


def select_records(
    pairs: list[tuple[dict, str]],
    budget: int | float | str | None = None,
    strategy: str | list[str] = "dedup,quality,diversity",
    options: SelectOptions | dict[str, Any] | None = None,
    model=None,
    tokenizer=None,
) -> Selection:
    """Run the pipeline on (record, "file:line") pairs, as read_records returns them; writes nothing.

    `model` is a model name/directory (default: options.model, else "default") or a loaded causal LM
    (then `tokenizer` is required); it is only loaded when the pipeline has a quality stage."""
    t_start = time.perf_counter()
    options = build_options(options)
    stages = parse_strategy(strategy)
    n_budget = resolve_budget(budget, len(pairs), stages)
    state = _State(pairs, options, stages, n_budget)
    for stage in stages:
        if stage == "dedup":
            _dedup(state)
        elif stage == "quality":
            _quality(state, model, tokenizer)
        else:
            _diversity(state)
    if n_budget is not None and len(state.alive) < n_budget:
        state.sel.notes.append(f"only {len(state.alive)} records left for a budget of {n_budget}")
    state.sel.timings["select"] = time.perf_counter() - t_start
    return state.sel


def select(
    records_path: str | Path,
    out: str | Path,
    budget: int | float | str | None = None,
    strategy: str | list[str] = "dedup,quality,diversity",
    *,
    model=None,
    tokenizer=None,
    overwrite: bool = False,
    options: SelectOptions | dict[str, Any] | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Select records of a data file into OUT (same format), with selection.json and selection.png beside it.

    `params` are options by name (near_threshold=0.9, quality="perplexity", ...; see SelectOptions);
    returns the selection.json content. Bad input raises before anything is loaded or written."""
    from deltatune.atomic import check_writable
    from deltatune.data import read_records
    from deltatune.select.plot import plot_selection
    from deltatune.select.records import SUFFIXES, commit, write_kept

    t_start = time.perf_counter()
    opts = build_options(
        {**(options.model_dump() if isinstance(options, SelectOptions) else options or {}), **params}
    )
    stages = parse_strategy(strategy)
    src, out = Path(records_path), Path(out)
    report_path, plot_path = out.parent / "selection.json", out.parent / "selection.png"
    if src.suffix.lower() in SUFFIXES and out.suffix.lower() != src.suffix.lower():
        raise SelectError(
            f"output {out}: must have the input's format ({src.suffix}), got {out.suffix or 'none'}"
        )
    for path in (out, report_path, plot_path):
        if path.exists() and src.exists() and path.resolve() == src.resolve():
            raise SelectError(f"output {path} would overwrite the input {src}")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists (pass --overwrite to replace it)")
    check_writable(out.parent, out)
    t0 = time.perf_counter()
    pairs = read_records(src)
    read_seconds = time.perf_counter() - t0
    resolve_budget(budget, len(pairs), stages)  # before parsing every record
    sel = select_records(pairs, budget, stages, opts, model=model, tokenizer=tokenizer)
    sel.timings["read"] = read_seconds
    extra = {"input": str(src), "output": str(out), "options": opts.model_dump()}

    def write_report(tmp: Path) -> None:
        sel.timings["total"] = time.perf_counter() - t_start
        tmp.write_text(json.dumps(sel.report(**extra), indent=2) + "\n", encoding="utf-8")

    def write_plot(tmp: Path) -> None:
        t = time.perf_counter()
        kept = [k == "kept" for k in sel.kinds]
        plot_selection(tmp, kept, sel.scores, sel.counts(), sel.embeddings)
        sel.timings["plot"] = time.perf_counter() - t

    commit(
        {
            out: lambda tmp: write_kept(src, tmp, sel.kept, sel.where),
            plot_path: write_plot,
            report_path: write_report,
        }
    )
    return sel.report(**extra)


def training_samples(cfg, tokenizer) -> list:
    """The training data of a train config (its data file, or its task's generated train split)
    after the config's `select:` block, tokenized as the training loop tokenizes it."""
    from deltatune.data import read_records, to_sample
    from deltatune.data.tasks import examples

    if cfg.data:
        pairs = read_records(cfg.data)
    else:
        generated = examples(cfg.task, "train", cfg.train_samples, seed=cfg.seed)
        pairs = [({"messages": ex.messages()}, f"task {cfg.task}[{i}]") for i, ex in enumerate(generated)]
    block = cfg.select
    follow = {"model": cfg.model} if block.options.model is None else {}  # unset: the run's own
    follow |= {k: getattr(cfg, k) for k in ("device", "precision") if getattr(block.options, k) == "auto"}
    options = block.options.model_copy(update=follow)
    sel = select_records(pairs, block.budget, block.strategy, options)
    counts = ", ".join(f"{k} {v}" for k, v in sel.counts().items() if k != "kept")
    print(f"select: kept {len(sel.kept)} of {len(pairs)} records" + (f" ({counts})" if counts else ""))
    return [to_sample(pairs[i][0], tokenizer, cfg.train_on_prompt) for i in sel.kept]


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """deltatune.select(records_path, out, budget, strategy, ...): see `select`."""
        return select(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
