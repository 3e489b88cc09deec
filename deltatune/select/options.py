"""What a selection is asked to do: the strategy pipeline, the budget and the options.

Kept apart from the pipeline so that the training config (`select:` block) can validate a selection
with pydantic alone, before any model or data is loaded. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

STRATEGIES = ("dedup", "quality", "diversity")
RANKING = ("quality", "diversity")  # strategies that rank or sample, and so can fill a budget


class SelectError(ValueError):
    """A selection that cannot run as asked (budget, strategy, option); the message says which."""


class SelectOptions(BaseModel):
    """Every knob of the pipeline; `deltatune select --param key=value` and `select.options` set them."""

    model_config = ConfigDict(extra="forbid")

    # dedup
    exact: bool = Field(True, description="dedup: drop exact duplicates of the normalised text")
    near: bool = Field(True, description="dedup: drop near duplicates (MinHash LSH, exact Jaccard check)")
    semantic: bool = Field(True, description="dedup: drop semantic duplicates (SemDeDup on embeddings)")
    near_threshold: float = Field(
        0.8, gt=0, le=1, description="Jaccard similarity that makes a near duplicate"
    )
    num_perm: int = Field(128, ge=16, description="MinHash permutations")
    shingles: Literal["char5", "word3"] = Field(
        "char5", description="near-dup shingles: character 5-grams (short records) or word 3-grams"
    )
    semantic_threshold: float = Field(0.95, gt=0, le=1, description="cosine that makes a semantic duplicate")
    semantic_clusters: int | None = Field(
        None, ge=1, description="k-means clusters for SemDeDup (default: one per 1000 records)"
    )
    # quality
    quality: Literal["ifd", "perplexity"] = Field("ifd", description="quality score")
    model: str | None = Field(
        None, description="model that scores quality (default: 'default'; in a train config: its model)"
    )
    ifd_max: float = Field(1.0, gt=0, description="records with IFD above this are dropped")
    loss_outlier_mads: float = Field(
        3.0,
        ge=0,
        description="drop records whose log answer loss given the prompt lies more than this many "
        "(scaled) MADs above the median: unrelated or garbled answers (0: off)",
    )
    ifd_outlier_mads: float = Field(
        1.5,
        ge=0,
        description="ifd: drop records whose IFD lies more than this many (scaled) MADs above the "
        "median, before keeping the highest: answers the prompt does not explain (0: off)",
    )
    perplexity_keep: Literal["middle", "low"] = Field(
        "middle", description="perplexity: keep those nearest the median log-perplexity, or the lowest"
    )
    max_length: int = Field(512, ge=8, description="tokens per scored sequence (longer ones are cut)")
    batch_size: int = Field(32, ge=1, description="sequences per forward when scoring")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 where supported (in a train config: its precision)"
    )
    device: str = Field(
        "auto", description="auto: cuda when available, else cpu (in a train config: its device)"
    )
    # diversity
    diversity: Literal["kcenter", "kmeans"] = Field("kcenter", description="diversity sampler")
    pool: float = Field(
        2.0, ge=1, description="a ranking strategy that is not last keeps pool x budget for the next"
    )
    embedding_model: str | None = Field(
        None, description="sentence-transformers model directory (default: bundled all-MiniLM-L6-v2)"
    )
    embedding_batch_size: int = Field(128, ge=1, description="texts per embedding forward")
    cache: bool = Field(True, description="cache embeddings under $DELTATUNE_CACHE/embeddings")
    seed: int = Field(0, description="seed for k-means")
    progress: bool = Field(True, description="progress bars on the scoring passes")


def _explain(err: ValidationError, what: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    return f"{what} {key}: {first['msg']} (got {first.get('input')!r})"


def build_options(values: dict[str, Any] | SelectOptions | None, what: str = "option") -> SelectOptions:
    """Validate option values; an unknown key or a bad value is one message naming it (and the valid keys)."""
    if isinstance(values, SelectOptions):
        return values
    values = {k.replace("-", "_"): v for k, v in (values or {}).items()}
    valid = list(SelectOptions.model_fields)
    for key in values:
        if key not in SelectOptions.model_fields:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SelectError(f"unknown {what} {key!r}{hint}; valid: {', '.join(valid)}")
    try:
        return SelectOptions(**values)
    except ValidationError as err:
        raise SelectError(_explain(err, what)) from None


def parse_strategy(strategy: str | list[str] | tuple[str, ...]) -> list[str]:
    """'dedup,quality,diversity' (or a list) as the ordered stage names; unknown or repeated names refused."""
    names = strategy.split(",") if isinstance(strategy, str) else list(strategy)
    stages = [str(n).strip().lower() for n in names if str(n).strip()]
    if not stages:
        raise SelectError(f"no strategy given; use a comma list of: {', '.join(STRATEGIES)}")
    for name in stages:
        if name not in STRATEGIES:
            raise SelectError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    repeated = sorted({n for n in stages if stages.count(n) > 1})
    if repeated:
        raise SelectError(f"strategy {repeated[0]!r} is given twice")
    return stages


def check_budget(budget: int | float | str | None) -> int | float | None:
    """The budget as a count (int >= 1) or a fraction (float in (0, 1]); checked without the data."""
    if budget is None:
        return None
    if isinstance(budget, str):
        text = budget.strip()
        try:
            budget = int(text)
        except ValueError:
            try:
                budget = float(text)
            except ValueError:
                raise SelectError(f"budget must be a count N or a fraction in (0, 1], got {text!r}") from None
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise SelectError(f"budget must be a count N or a fraction in (0, 1], got {budget!r}")
    if not math.isfinite(budget) or budget <= 0:
        raise SelectError(f"budget must be > 0, got {budget}")
    if isinstance(budget, float) and budget > 1:
        raise SelectError(
            f"a fractional budget must be in (0, 1], got {budget} (a count of records is an integer)"
        )
    return budget


def resolve_budget(budget: int | float | str | None, n: int, stages: list[str]) -> int | None:
    """The budget as a record count for `n` records; refused when larger than the data, or unusable."""
    budget = check_budget(budget)
    if budget is None:
        if "diversity" in stages:
            raise SelectError("strategy 'diversity' needs a budget (--budget N or FRACTION)")
        return None
    if not any(s in RANKING for s in stages):
        raise SelectError(
            "a budget needs a strategy that ranks (quality or diversity); dedup only removes duplicates"
        )
    if isinstance(budget, float):
        return max(1, round(budget * n))
    if budget > n:
        raise SelectError(f"budget {budget} is larger than the data ({n} records)")
    return budget


class SelectConfig(BaseModel):
    """The `select:` block of a training config: the same selection `deltatune select` runs."""

    model_config = ConfigDict(extra="forbid")

    budget: int | float | None = Field(None, description="records to keep: a count, or a fraction in (0, 1]")
    strategy: list[str] = Field(default_factory=lambda: list(STRATEGIES), description="stages, in order")
    options: SelectOptions = Field(default_factory=SelectOptions, description="see deltatune select --help")

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> Any:
        return check_budget(value)

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy(cls, value: Any) -> list[str]:
        if not isinstance(value, str | list | tuple):
            raise ValueError("expected a comma list or a list of strategies")
        return parse_strategy(value)
