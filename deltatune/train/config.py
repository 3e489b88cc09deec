"""Training configuration: one flat set of keys, from YAML and `--key value` overrides.

Core keys live in `TrainConfig`; each method adds its own flat keys through its `DeltaConfig`
class (e.g. `lora_r`), so a new method needs no change here. Everything is validated before any
file is written: an unknown key or a bad value gets one message naming the key and what is allowed.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from deltatune.deltas import METHODS, DeltaConfig, get_method
from deltatune.select.options import SelectConfig


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and file) at fault."""


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # what to train
    model: str = Field("default", description="'default', a HF directory, a .gguf file or a cached hub id")
    method: str = Field("lora", description="delta method (lora, dora, ia3, ...); adds its own keys")
    task: str | None = Field(None, description="built-in task, used without data (default: reversal)")
    data: str | None = Field(None, description="training file: jsonl, json, csv or parquet")
    eval_data: str | None = Field(None, description="eval file (default: the task's test split)")
    train_samples: int = Field(3000, ge=1, description="samples generated from the task")
    eval_samples: int = Field(100, ge=0, description="eval items (0: no eval on a task, all of eval_data)")
    train_on_prompt: bool = Field(False, description="loss on prompt tokens too, not only the answer")
    select: SelectConfig | None = Field(
        None, description="select the training records first: {budget, strategy, options} (deltatune select)"
    )
    output: str | None = Field(None, description="run directory (default: runs/<time>-<method>)")
    # optimisation
    learning_rate: float = Field(2e-3, gt=0, description="peak AdamW learning rate")
    lora_plus_ratio: float = Field(1.0, gt=0, description="LoRA+: B (and other up factors) at lr * ratio")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warmup")
    warmup_steps: int = Field(6, ge=0, description="linear warmup steps")
    max_steps: int = Field(60, ge=1, description="optimizer steps")
    batch_size: int = Field(4, ge=1, description="packed rows per micro-batch, per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_seq_len: int = Field(512, ge=8, description="tokens per packed row; longer samples are truncated")
    packing: Literal["shuffled", "longest_first"] = Field(
        "shuffled",
        description="sample order when filling rows: shuffled (rows are random mixes; generalises better) "
        "or longest_first (best-fit decreasing: ~1% denser, rows of one kind)",
    )
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0: no clipping)")
    # execution
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 where supported")
    base_dtype: Literal["bf16", "fp32"] = Field(
        "bf16",
        description="with bf16 precision, hold the frozen base in bf16 (half the memory, faster) or fp32 "
        "under autocast (bit-equal to peft + Trainer's bf16=True; see README)",
    )
    device: str = Field("auto", description="auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    gradient_checkpointing: bool = Field(False, description="recompute activations: less memory, slower")
    quantize: Literal["none", "nf4", "int8"] = Field(
        "none", description="store the frozen base's linear weights as nf4 or int8 (QLoRA-style)"
    )
    fsdp: bool = Field(
        False,
        description="shard base and delta across the torchrun processes (FSDP2) instead of replicating "
        "them (DDP); needs 2+ processes",
    )
    loss_chunk_tokens: int = Field(1024, ge=16, description="tokens per chunk of the LM head and loss")
    seed: int = Field(0, description="seed for data, initialisation and dropout")
    # bookkeeping
    log_every: int = Field(5, ge=1, description="print and log metrics every N steps")
    eval_every: int = Field(0, ge=0, description="eval loss every N steps (0: only at the end)")
    save_every: int = Field(50, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept in the run directory")
    resume: Literal[False, True, "auto"] = Field(
        False,
        description="true: continue the run in output from its latest checkpoint; auto: that, or start "
        "fresh when it has none",
    )
    eval_max_new_tokens: int = Field(24, ge=1, description="greedy tokens per answer for exact match")
    # what fine-tuning cost (train/cost.py) and a remedy (train/rehearsal.py)
    cost_metrics: bool = Field(
        True,
        description="before/after also: forgetting (KL from the base on general text, exact match of the "
        "base's answers to general questions), ECE of the eval answers, eval-split perplexity",
    )
    perplexity_data: str | None = Field(
        None, description="held-out file for perplexity before/after (default: the eval split)"
    )
    rehearsal: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of each step's target tokens that are the base model's own answers to "
        "general prompts, in rows of their own (self-rehearsal against forgetting; 0: off)",
    )
    rehearsal_prompts: str | None = Field(
        None, description="prompts file for rehearsal (default: the shipped general prompts)"
    )
    rehearsal_max_new_tokens: int = Field(
        128,
        ge=1,
        description="greedy tokens per rehearsal answer; one cut off there has no end-of-turn target",
    )
    # method-specific keys, validated against the method's own config class
    method_args: dict[str, Any] = Field(default_factory=dict, exclude=True)

    @model_validator(mode="after")
    def _check_method(self) -> TrainConfig:
        require_trainable(self.method)
        require_quantizable(self.method, self.quantize)
        if self.fsdp:
            require_fsdp(self.method, self.quantize)
        if self.data is None and self.task is None:
            self.task = "reversal"
        return self

    @field_validator("rehearsal_prompts", "rehearsal_max_new_tokens")
    @classmethod
    def _needs_rehearsal(cls, value: Any, info: ValidationInfo) -> Any:
        default = cls.model_fields[info.field_name].default
        if value != default and not info.data.get("rehearsal"):
            raise PydanticCustomError("needs_rehearsal", "only applies with rehearsal > 0")
        return value

    def delta_config(self) -> DeltaConfig:
        return get_method(self.method).config_class(**self.method_args)

    def to_dict(self) -> dict[str, Any]:
        return {**self.model_dump(), **self.delta_config().model_dump()}


def require_trainable(method_name: str, source: str = "") -> None:
    """Refuse a method with nothing to train (arrow routes existing adapters) before the loop starts."""
    if not get_method(method_name).trainable:
        raise ConfigError(
            f"{source}config key 'method': {method_name!r} has nothing to train (it routes existing "
            "adapters); build it with `deltatune route` or add_delta instead"
        )


def require_quantizable(method_name: str, quantize: str, source: str = "") -> None:
    """Refuse `quantize` with a method that needs the dense base weight (Method.dense_base)."""
    from deltatune.quant import check_method

    try:
        check_method(method_name, quantize)
    except ValueError as err:
        raise ConfigError(f"{source}config key 'quantize': {str(err).removeprefix('quantize: ')}") from None


# methods whose gradient reaches a sharded layer by a path FSDP does not see (train/fsdp.py)
NOT_SHARDABLE = {
    "prompt_tuning": "its prompt runs the frozen decoder layers once more, and only that run's "
    "key/value states, not the layers' outputs, carry its gradient, so FSDP frees those layers' "
    "gathered weights before the backward needs them",
}


def require_fsdp(method_name: str, quantize: str, source: str = "") -> None:
    """Refuse `fsdp: true` where it cannot shard: a single process (nothing to shard across; training
    unsharded instead would hide that the memory saving asked for is not there), a quantized base
    (its codes are plain attributes, not parameters, so FSDP would replicate them on every rank), or
    a method in NOT_SHARDABLE."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        raise ConfigError(
            f"{source}config key 'fsdp': needs 2 or more processes (launch with torchrun "
            "--nproc_per_node N -m deltatune train ...); this is a single process, so there is "
            "nothing to shard across"
        )
    if quantize != "none":
        raise ConfigError(
            f"{source}config key 'quantize': {quantize} does not combine with fsdp (the quantized "
            "codes are not parameters, so FSDP would replicate them on every rank rather than shard "
            "them); use quantize none with fsdp, or DDP (no --fsdp) over the quantized base"
        )
    if method_name in NOT_SHARDABLE:
        raise ConfigError(
            f"{source}config key 'fsdp': method {method_name!r} does not train under FSDP "
            f"({NOT_SHARDABLE[method_name]}); use DDP (no --fsdp), or prefix_tuning / ptuning_v2"
        )


def _method_keys() -> set[str]:
    return {k for m in METHODS.values() for k in m.config_class.model_fields}


def _explain(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{source}config key '{key}': {first['msg']}{shown}"


def build_config(values: dict[str, Any], source: str = "") -> TrainConfig:
    """Validate a flat dict of keys into a TrainConfig; raise ConfigError naming the bad key."""
    values = {k.replace("-", "_"): v for k, v in values.items()}
    method_name = values.get("method", "lora")
    if method_name not in METHODS:
        raise ConfigError(
            f"{source}config key 'method': unknown method {method_name!r}; valid: {', '.join(METHODS)}"
        )
    require_trainable(method_name, source)
    if isinstance(values.get("quantize"), str):
        require_quantizable(method_name, values["quantize"], source)
    if values.get("fsdp") is True:
        require_fsdp(method_name, str(values.get("quantize", "none")), source)
    method_fields = get_method(method_name).config_class.model_fields
    core = {k: v for k, v in values.items() if k in TrainConfig.model_fields}
    method_args = {k: v for k, v in values.items() if k in method_fields}
    for key in values:
        if key in core or key in method_args:
            continue
        if key in _method_keys():
            raise ConfigError(f"{source}config key '{key}' does not apply to method '{method_name}'")
        allowed = sorted((set(TrainConfig.model_fields) - {"method_args"}) | set(method_fields))
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{source}unknown config key '{key}'{hint}; valid keys: {', '.join(allowed)}")
    try:
        cfg = TrainConfig(**core, method_args=method_args)
        cfg.delta_config()
    except ValidationError as err:
        raise ConfigError(_explain(err, source)) from None
    except ValueError as err:
        raise ConfigError(f"{source}{err}") from None
    return cfg


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--key value` / `--key=value` pairs; values are parsed as YAML scalars (1e-3, true, [a, b])."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected --key value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"config key '{key.replace('-', '_')}': missing value after {arg}")
            value = args[i + 1]
            i += 1
        out[key.replace("-", "_")] = parse_scalar(value)
        i += 1
    return out


def parse_scalar(text: str) -> Any:
    """A command-line value as YAML reads it (1e-3 -> float, true -> bool, [a, b] -> list); else the text."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in "eE.") else value
        except ValueError:
            return value
    return value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    values: dict[str, Any] = {}
    source = ""
    if path is not None:
        path = Path(path)
        source = f"{path}: "
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} invalid YAML: {getattr(err, 'problem', err)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        values.update(loaded or {})
    values.update(overrides or {})
    return build_config(values, source)
