"""Merge configuration: mergekit's YAML for the common subset, checked before any tensor is read.

A mergekit user's file for the supported methods runs unchanged:

    merge_method: ties                      # any key of deltatune.merge.registry.METHODS
    base_model: path/to/base                # required by the task-vector methods, model_stock, slerp
    models:
      - model: path/to/finetune_a
        parameters: {weight: 0.5, density: 0.6}
      - model: path/to/finetune_b
        parameters:
          weight: [0.2, 0.8]                # a gradient: interpolated over the layers
          density:
            - filter: mlp                   # the first filter that is a substring of the tensor name
              value: 0.5
            - value: 0.7
    parameters: {normalize: true, lambda: 1.0, int8_mask: true}   # defaults for every model
    dtype: float32                          # accepted: float32, float16, bfloat16, float64
    out_dtype: bfloat16
    tokenizer_source: base                  # the only tokenizer source: files are copied from the base

Parameter values follow mergekit exactly: a per-model setting wins over the global one, a filter
list picks the first entry whose `filter` is a substring of the tensor name, and a list of numbers is
a gradient evaluated at t = layer / (num_layers - 1) (t = 0 for tensors outside the layers).
`int8_mask` (and `rescale: false` outside DARE) are accepted and ignored because they do not change
results. Anything else that deltatune does not implement (`slices`, `modules`, `tokenizer`,
`chat_template`, other tokenizer sources, DELLA's `epsilon`, ...) is an error naming the key and line.

deltatune's own options, at the top level:

    lines: {alpha: 0.5, beta: 0.5}          # LiNeS layer scaling, any task-vector method
    dare_rescale: paper | darex_q           # darex_q needs a `q` parameter (global or per model)
    seed: 0                                 # seeds DARE's per-tensor generators
    shard_size: 5GB                         # bytes per output shard (mergekit counts parameters)
    rank: 16                                # adapter merges only: SVD-truncate to this rank
    knots: true                             # run a task-vector method in KnOTS space (spectral.py)
    adamerging: {prompts: [task:addition]}  # merge_method adamerging: learned λ (adamerging.py)

Models are named as `deltatune.models.resolve` accepts (HF directory, `default`, .gguf, cached hub
id); a directory with `adapter_config.json` makes the whole config an adapter merge.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from deltatune.merge.registry import ANY, METHODS, REQUIRED, MethodSpec, ParamSpec
from deltatune.merge.spectral import knots_space

DTYPES = ("float32", "float16", "bfloat16", "float64")
MERGEKIT_ONLY = {
    "slices": "mergekit's layer 'slices' are not supported; list whole models under 'models'",
    "modules": "mergekit's per-module 'modules' are not supported; list whole models under 'models'",
    "tokenizer": "mergekit's 'tokenizer' block is not supported; the base model's tokenizer is copied",
    "chat_template": "'chat_template' is not supported; the base model's tokenizer files are copied as they are",
}
_KNOWN_ELSEWHERE = {"epsilon": "della", "select_topk": "sce", "filter_wise": "model_stock", "t": "slerp"}


class MergeConfigError(ValueError):
    """One problem in a merge config, with the file, line and key at fault."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputModel(_Strict):
    model: str
    parameters: dict[str, Any] | None = None


class LinesOptions(_Strict):
    alpha: float
    beta: float


class AdaMergingOptions(_Strict):
    """Settings of merge_method: adamerging (deltatune.merge.adamerging)."""

    prompts: list[str] = Field(min_length=1)  # task:NAME or a data file, each
    prompts_per_source: int = Field(64, ge=1)
    steps: int = Field(100, ge=1)
    lr: float = Field(0.01, gt=0)
    init: float = Field(0.3, ge=0, le=1)  # the paper's initial λ
    batch_size: int = Field(8, ge=1)
    seed: int = 0


class MergeConfig(_Strict):
    merge_method: str
    models: list[InputModel]
    base_model: str | None = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    lines: LinesOptions | None = None
    dare_rescale: Literal["paper", "darex_q"] = "paper"
    seed: int = 0
    shard_size: int | str = "5GB"
    rank: int | None = None
    knots: bool = False
    adamerging: AdaMergingOptions | None = None

    _text: str = PrivateAttr(default="")
    _source: str = PrivateAttr(default="<config>")

    @property
    def spec(self) -> MethodSpec:
        spec = METHODS[self.merge_method]
        if self.knots:  # 2-D weights are aligned by one SVD, whole; token rows and 1-D ones stream
            return replace(spec, fn=knots_space(spec.fn), spectral=True)
        return spec

    def error(self, loc: Sequence[str | int], message: str) -> MergeConfigError:
        """A MergeConfigError for problems found after parsing (missing files, model counts)."""
        return _Checker(self._text, self._source).fail(loc, message)


# ---------------------------------------------------------------------------------------------------
# Parameter settings: scalar | gradient list | {filter, value} | [{filter, value}, ...]


def _setting_scalars(setting: Any) -> list[Any]:
    """All scalar values inside a setting; raises ValueError when its shape is not mergekit's."""
    if isinstance(setting, (bool, int, float, str)):
        return [setting]
    if isinstance(setting, dict):
        unknown = set(setting) - {"filter", "value"}
        if unknown or "value" not in setting:
            raise ValueError(
                f"a conditional setting needs 'value' (and optionally 'filter'), got keys {sorted(setting)}"
            )
        if setting.get("filter") is not None and not isinstance(setting["filter"], str):
            raise ValueError("'filter' must be a string")
        return _setting_scalars(setting["value"])
    if isinstance(setting, list) and setting:
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            return list(setting)
        if all(isinstance(e, dict) for e in setting):
            return [s for e in setting for s in _setting_scalars(e)]
    raise ValueError(
        f"expected a value, a list of values (a gradient) or a list of {{filter, value}} entries, got {setting!r}"
    )


def _typed(param: ParamSpec, value: Any) -> Any:
    """Convert one scalar to the parameter's type, checking its range."""
    if param.kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    if (param.low is not None and number < param.low) or (param.high is not None and number > param.high):
        raise ValueError(f"must be between {param.low} and {param.high}, got {number}")
    return number


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """mergekit's rule: first matching filter, then gradient interpolation at t; None if no filter matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for entry in setting:
            flt = entry.get("filter")
            if flt is None or flt == "*" or flt in tensor_name:
                return evaluate_setting(entry["value"], tensor_name, t)
        return None
    if not isinstance(setting, list):
        return setting
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
    if not numeric:  # booleans and strings step instead of interpolating
        return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]


@dataclass(frozen=True)
class ParameterResolver:
    """Per-tensor parameter values for the method, with mergekit's precedence and defaults."""

    spec: MethodSpec
    global_params: dict[str, Any]
    model_params: Sequence[dict[str, Any]]  # one per non-base input, in input order
    model_names: Sequence[str]

    def resolve(self, tensor_name: str, t: float) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        for param in self.spec.params:
            if param.per_model:
                kwargs[param.arg] = [
                    self._one(param, (own, self.global_params), tensor_name, t, name)
                    for own, name in zip(self.model_params, self.model_names, strict=True)
                ]
            else:
                kwargs[param.arg] = self._one(param, (self.global_params,), tensor_name, t, None)
        return kwargs

    @staticmethod
    def _one(
        param: ParamSpec, scopes: Sequence[dict[str, Any]], tensor_name: str, t: float, model: str | None
    ) -> Any:
        for scope in scopes:
            if param.name in scope:
                value = evaluate_setting(scope[param.name], tensor_name, t)
                if value is not None:
                    return _typed(param, value)
        if param.default is REQUIRED:
            where = f" of model {model}" if model else ""
            raise MergeConfigError(f"no value for parameter '{param.name}'{where} at tensor {tensor_name}")
        return param.default


# ---------------------------------------------------------------------------------------------------
# Loading and checking


def yaml_line(text: str, loc: Sequence[str | int]) -> int | None:
    """1-based line of the YAML node at `loc` (keys and list indices), or of its deepest parent found."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _loc_str(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_size(value: int | str) -> int:
    """Bytes from 123, '500MB', '5GB', '2GiB'."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", value, re.IGNORECASE)
    if not match:
        raise ValueError(f"expected a size such as 500MB or 5GB, got {value!r}")
    number, unit, binary = match.groups()
    power = " KMGT".index(unit.upper() or " ")
    return int(float(number) * (1024 if binary else 1000) ** power)


class _Checker:
    """Turns a problem and its key path into one MergeConfigError with file and line."""

    def __init__(self, text: str, source: str):
        self.text, self.source = text, source

    def fail(self, loc: Sequence[str | int], message: str) -> MergeConfigError:
        line = yaml_line(self.text, loc) if loc else None
        where = f"{self.source}:{line}" if line else self.source
        key = f" {_loc_str(loc)}:" if loc else ""
        return MergeConfigError(f"{where}:{key} {message}")


def _check_parameters(
    chk: _Checker, cfg: MergeConfig, params: dict[str, Any], loc: list, per_model: bool
) -> None:
    spec, method = cfg.spec, cfg.merge_method
    for name, setting in params.items():
        where = [*loc, name]
        try:
            scalars = _setting_scalars(setting)
        except ValueError as err:
            raise chk.fail(where, str(err)) from None
        if name in spec.ignored:
            allowed = spec.ignored[name]
            if allowed is not ANY and any(s != allowed for s in scalars):
                shown = str(scalars[0]).lower() if isinstance(scalars[0], bool) else scalars[0]
                raise chk.fail(where, f"'{name}: {shown}' is not supported by deltatune's {method}")
            continue
        param = spec.param(name)
        if param is None:
            names = ", ".join(p.name for p in spec.params) or "none"
            hint = f" ('{name}' belongs to {_KNOWN_ELSEWHERE[name]})" if name in _KNOWN_ELSEWHERE else ""
            raise chk.fail(
                where, f"unknown parameter for merge_method {method}{hint}; its parameters: {names}"
            )
        if per_model and not param.per_model:
            raise chk.fail(where, f"'{name}' is a global parameter; put it under the top-level 'parameters'")
        if name == "q" and cfg.dare_rescale != "darex_q":
            raise chk.fail(where, "'q' is the DAREx-q rescale; it needs 'dare_rescale: darex_q'")
        for scalar in scalars:
            try:
                _typed(param, scalar)
            except ValueError as err:
                raise chk.fail(where, str(err)) from None


def _check(chk: _Checker, cfg: MergeConfig) -> None:
    if cfg.merge_method not in METHODS:
        raise chk.fail(
            ["merge_method"], f"unknown merge_method '{cfg.merge_method}'; available: {', '.join(METHODS)}"
        )
    spec = cfg.spec
    for key in ("dtype", "out_dtype"):
        value = getattr(cfg, key)
        if value is not None and value.removeprefix("torch.") not in DTYPES:
            raise chk.fail([key], f"unknown dtype '{value}'; available: {', '.join(DTYPES)}")
    if cfg.tokenizer_source not in (None, "base"):
        raise chk.fail(
            ["tokenizer_source"], "only 'base' is supported: the base model's tokenizer files are copied"
        )
    if not cfg.models:
        raise chk.fail(["models"], "list at least one model")
    if cfg.lines is not None and not spec.task_vector:
        task_vector = ", ".join(n for n, s in METHODS.items() if s.task_vector)
        raise chk.fail(
            ["lines"], f"LiNeS scales task vectors; it applies to {task_vector}, not {cfg.merge_method}"
        )
    if (cfg.adamerging is None) == (cfg.merge_method == "adamerging"):
        loc = ["merge_method"] if cfg.adamerging is None else ["adamerging"]
        raise chk.fail(
            loc, "merge_method adamerging and the 'adamerging:' block (prompts, steps, ...) go together"
        )
    if cfg.knots and not spec.task_vector:
        task_vector = ", ".join(n for n, s in METHODS.items() if s.task_vector)
        raise chk.fail(
            ["knots"], f"KnOTS aligns task vectors; it applies to {task_vector}, not {cfg.merge_method}"
        )
    if cfg.dare_rescale == "darex_q" and not spec.random:
        raise chk.fail(["dare_rescale"], "darex_q is a DARE rescale; use it with dare_linear or dare_ties")
    if cfg.rank is not None and cfg.rank < 1:
        raise chk.fail(["rank"], "must be a positive integer")
    try:
        parse_size(cfg.shard_size)
    except ValueError as err:
        raise chk.fail(["shard_size"], str(err)) from None
    _check_parameters(chk, cfg, cfg.parameters or {}, ["parameters"], per_model=False)
    for i, entry in enumerate(cfg.models):
        _check_parameters(chk, cfg, entry.parameters or {}, ["models", i, "parameters"], per_model=True)
    for param in spec.params:
        if param.default is REQUIRED and not param.per_model and param.name not in (cfg.parameters or {}):
            raise chk.fail(
                ["parameters"], f"merge_method {cfg.merge_method} needs the parameter '{param.name}'"
            )
    if cfg.dare_rescale == "darex_q":
        for i, entry in enumerate(cfg.models):
            if entry.model != cfg.base_model and "q" not in (entry.parameters or {}) | (cfg.parameters or {}):
                raise chk.fail(["models", i], "dare_rescale: darex_q needs a 'q' for every model")


def _pydantic_problem(chk: _Checker, err: ValidationError) -> MergeConfigError:
    first = err.errors()[0]
    loc = [p for p in first["loc"] if isinstance(p, (str, int))]
    if first["type"] == "extra_forbidden":
        key = loc[-1]
        if len(loc) == 1 and key in MERGEKIT_ONLY:
            return chk.fail(loc, MERGEKIT_ONLY[key])
        parents = {"models": InputModel, "lines": LinesOptions, "adamerging": AdaMergingOptions}
        parent = MergeConfig if len(loc) == 1 else parents[loc[0]]
        return chk.fail(loc, f"unknown key '{key}'; allowed here: {', '.join(parent.model_fields)}")
    if first["type"] == "missing":
        return chk.fail(loc[:-1], f"missing required key '{loc[-1]}'")
    return chk.fail(loc, first["msg"])


def load_config(path: str | Path) -> MergeConfig:
    """Parse and check a merge YAML; raises MergeConfigError naming the file, line and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise MergeConfigError(f"cannot read merge config {path}: {err.strerror}") from None
    return parse_config(text, str(path))


def parse_config(text: str, source: str = "<config>") -> MergeConfig:
    chk = _Checker(text, source)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise MergeConfigError(f"{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise MergeConfigError(f"{source}: a merge config is a YAML mapping with merge_method and models")
    try:
        cfg = MergeConfig.model_validate(raw)
    except ValidationError as err:
        raise _pydantic_problem(chk, err) from None
    _check(chk, cfg)
    cfg._text, cfg._source = text, source
    return cfg
