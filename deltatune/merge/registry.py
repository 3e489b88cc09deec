"""The merge methods by name: mergekit's `merge_method` keys, their parameters and defaults.

A method is a pure tensor function (deltatune.merge.methods for the elementwise ones,
deltatune.merge.spectral for the ones that work on singular vectors) plus what the config checker
and the executor need to know about it: its parameters (name, per-model or global, type, default,
range), whether it needs a base model, how many inputs it takes, whether LiNeS applies, whether it
draws random masks, and the whole-tensor statistics that let it run chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from torch import Tensor

from deltatune.merge import spectral
from deltatune.merge.methods import (
    breadcrumbs,
    breadcrumbs_statistics,
    dare,
    dare_statistics,
    linear,
    model_stock,
    no_statistics,
    slerp,
    task_arithmetic,
    ties,
    ties_statistics,
)

REQUIRED: Any = object()  # marker: a parameter without a default
ANY: Any = object()  # marker: any value of an ignored parameter is fine


@dataclass(frozen=True)
class ParamSpec:
    """One parameter as written in a mergekit YAML: where it may appear and what it accepts."""

    name: str
    per_model: bool
    kind: type  # float or bool
    default: Any = REQUIRED
    low: float | None = None  # inclusive bounds for floats
    high: float | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def arg(self) -> str:
        return "lam" if self.name == "lambda" else self.name


@dataclass(frozen=True)
class MethodSpec:
    fn: Callable[..., Tensor]
    params: tuple[ParamSpec, ...]
    reference: str
    needs_base: bool = True
    min_models: int = 1  # inputs other than the base
    max_models: int | None = None
    task_vector: bool = False  # LiNeS applies; receives layer_scale
    # Depends on the row and column spaces only through rotations (SVD, projections): adapter merges
    # may run it on the coordinates of the deltas in the span of their factors
    rotation_invariant: bool = False
    spectral: bool = False  # treats 2-D weights as matrices (SVD); receives as_matrix=False for token rows
    learned: bool = False  # coefficients learned on prompts first (adamerging), then `fn` merges
    random: bool = False  # receives generator
    # Whole-tensor statistics that make `fn` elementwise, so it can run chunk by chunk (None: it cannot)
    statistics: Callable[..., dict[str, Any]] | None = None
    # mergekit parameters accepted without effect: name -> the value that has no effect (ANY: all)
    ignored: dict[str, Any] = field(default_factory=dict)

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)


_WEIGHT = ParamSpec("weight", True, float)
_LAMBDA = ParamSpec("lambda", False, float, 1.0)


def _density(default: float = 1.0) -> ParamSpec:
    return ParamSpec("density", True, float, default, 0.0, 1.0)


def _normalize(default: bool) -> ParamSpec:
    return ParamSpec("normalize", False, bool, default)


# int8_mask only changes the dtype of mergekit's sign mask; rescale=false is the default there.
_INT8_MASK = {"int8_mask": ANY}
_NO_EFFECT = {"int8_mask": ANY, "rescale": False}
_DARE_PARAMS = (
    _WEIGHT,
    _density(),
    _normalize(False),
    _LAMBDA,
    ParamSpec("rescale", False, bool, True),
    ParamSpec("q", True, float, None, 1e-6, 1.0),
)
_BREADCRUMBS_PARAMS = (
    _WEIGHT,
    _density(),
    ParamSpec("gamma", True, float, 0.01, 0.0, 1.0),
    _normalize(False),
    _LAMBDA,
)

METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec(
        linear, (_WEIGHT, _normalize(True)), "arXiv:2203.05482", needs_base=False, statistics=no_statistics
    ),
    "task_arithmetic": MethodSpec(
        task_arithmetic, (_WEIGHT, _normalize(False), _LAMBDA), "arXiv:2212.04089", task_vector=True,
        ignored=_NO_EFFECT, statistics=no_statistics,
    ),
    "ties": MethodSpec(
        ties, (_WEIGHT, _density(), _normalize(True), _LAMBDA), "arXiv:2306.01708", task_vector=True,
        ignored=_NO_EFFECT, statistics=ties_statistics,
    ),
    "dare_linear": MethodSpec(
        partial(dare, consensus=False), _DARE_PARAMS, "arXiv:2311.03099", task_vector=True, random=True,
        ignored=_INT8_MASK, statistics=dare_statistics,
    ),
    "dare_ties": MethodSpec(
        partial(dare, consensus=True), _DARE_PARAMS, "arXiv:2311.03099", task_vector=True, random=True,
        ignored=_INT8_MASK, statistics=dare_statistics,
    ),
    "breadcrumbs": MethodSpec(
        partial(breadcrumbs, consensus=False), _BREADCRUMBS_PARAMS, "arXiv:2312.06795", task_vector=True,
        ignored=_NO_EFFECT, statistics=breadcrumbs_statistics,
    ),
    "breadcrumbs_ties": MethodSpec(
        partial(breadcrumbs, consensus=True), _BREADCRUMBS_PARAMS, "arXiv:2312.06795", task_vector=True,
        ignored=_NO_EFFECT, statistics=breadcrumbs_statistics,
    ),
    "model_stock": MethodSpec(
        model_stock, (ParamSpec("filter_wise", False, bool, False),), "arXiv:2403.19522", min_models=2
    ),
    "tsv": MethodSpec(spectral.tsv_m, (_LAMBDA,), "arXiv:2412.00081", rotation_invariant=True, spectral=True,
                     statistics=no_statistics),
    "iso_c": MethodSpec(spectral.iso_c, (_LAMBDA,), "arXiv:2502.04959", rotation_invariant=True, spectral=True,
                     statistics=no_statistics),
    "iso_cts": MethodSpec(
        spectral.iso_cts, (_LAMBDA, ParamSpec("common_space_fraction", False, float, 0.8, 0.0, 1.0)),
        "arXiv:2502.04959", rotation_invariant=True, spectral=True, statistics=no_statistics,
    ),
    "adamerging": MethodSpec(task_arithmetic, (), "arXiv:2310.02575", learned=True),
    "slerp": MethodSpec(slerp, (ParamSpec("t", False, float),), "Shoemake 1985", min_models=1, max_models=1),
}  # fmt: skip
