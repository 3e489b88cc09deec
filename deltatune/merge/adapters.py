"""Merging LoRA adapters in adapter space, without ever forming cross terms.

A LoRA module contributes dW_i = s_i * B_i @ A_i (A_i: [r_i, in], B_i: [out, r_i], s_i = alpha/r or
alpha/sqrt(r) with rsLoRA). Averaging A's and B's separately gives (sum w_i B_i)(sum w_j A_j), whose
cross terms B_i A_j belong to no adapter; that is a known bug elsewhere and is never done here.

- `linear` and `task_arithmetic` are linear in the deltas, so their merge is exact: stacking ranks,
  A = [A_1; ...; A_n] and B = [c_1 s_1/s_out B_1, ..., c_n s_n/s_out B_n], gives exactly
  sum_i c_i dW_i. The coefficients c_i are obtained by running the method's own pure function on
  one-hot inputs, so they include `normalize`, `lambda`, LiNeS and per-layer gradients or filters.
  With `rank: r` the stacked product is truncated by SVD (through QR of the thin factors, so the
  dense matrix is never built) and the relative Frobenius error is reported per module.
- TSV-M, Iso-C and Iso-CTS depend on ΔW only through rotations, so they run on the coordinates of
  the ΔW_i in the span of the factors (`subspace_merge`): exact, without dense SVDs.
- Every other method except slerp (TIES, DARE, Breadcrumbs, Model Stock, KnOTS) is not linear: it runs on
  the dense deltas dW_i with a zero base (the result is then the merged delta) and the result is
  factored back by SVD to `rank` (default: the sum of the input ranks), with the error reported.
  SLERP interpolates weights, not deltas, so it needs the base weights and is refused here.

Per-tensor parameters see the name `<module>.weight`, so mergekit filters such as `self_attn` and
layer gradients mean the same as in a full-model merge. The output is a PEFT adapter directory with
scale 1 (lora_alpha = r, no rsLoRA), one rank for every module (modules missing from an adapter
contribute zero columns), written atomically.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

import torch

from deltatune.atomic import new_directory
from deltatune.deltas.base import PEFT_PREFIX
from deltatune.deltas.lora import factors_from_svd, truncate_dense
from deltatune.formats import ADAPTER_WEIGHTS, MODEL_CONFIG, FormatError, read_json
from deltatune.formats.peft import LoraAdapter, LoraFactors, read_lora, write_adapter
from deltatune.merge.config import MergeConfig, ParameterResolver
from deltatune.merge.inputs import MergeInputs, MergeReport, layer_index, method_kwargs, torch_dtype

EXACT_METHODS = frozenset({"linear", "task_arithmetic"})


# ---------------------------------------------------------------------------------------------------
# Pure math


def linear_coefficients(fn, kwargs: dict[str, Any], n: int, needs_base: bool) -> list[float]:
    """c_i of a method that is linear in its inputs, read off by feeding it one-hot inputs."""
    units = list(torch.eye(n, dtype=torch.float64))
    zero = torch.zeros(n, dtype=torch.float64) if needs_base else None
    return fn(zero, units, **kwargs).tolist()


def stack_factors(
    factors: list[LoraFactors | None], coefficients: list[float], shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact concatenation: B_cat @ A_cat == sum_i c_i * s_i * B_i @ A_i (output scale 1)."""
    a_parts, b_parts = [], []
    for f, c in zip(factors, coefficients, strict=True):
        if f is not None:
            a_parts.append(f.a.double())
            b_parts.append(f.b.double() * (c * f.scale))
    if not a_parts:
        return torch.zeros(0, shape[1], dtype=torch.float64), torch.zeros(shape[0], 0, dtype=torch.float64)
    return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)


def truncate_factors(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of b @ a via QR of the thin factors; returns (A, B, relative error)."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return factors_from_svd(qb @ u, s, vh @ qa.T, rank)


def subspace_merge(
    fn, kwargs: dict[str, Any], factors: list[LoraFactors | None], shape: tuple[int, int], rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A rotation-invariant method on the products s_i B_i A_i, inside the span of their factors.

    With orthonormal bases Q_out of [s_i B_i] and Q_in of [A_iᵀ], ΔW_i = Q_out M_i Q_inᵀ exactly;
    the method runs on the small M_i and its result is lifted back: no [out, in] matrix is formed.
    """
    present = [f for f in factors if f is not None]
    q_out, _ = torch.linalg.qr(torch.cat([f.b.double() * f.scale for f in present], dim=1))
    q_in, _ = torch.linalg.qr(torch.cat([f.a.double().T for f in present], dim=1))
    zero = torch.zeros(q_out.shape[1], q_in.shape[1], dtype=torch.float64)
    small = [
        zero if f is None else (q_out.T @ (f.b.double() * f.scale)) @ (f.a.double() @ q_in) for f in factors
    ]
    if "shape" in inspect.signature(fn).parameters:
        kwargs = kwargs | {"shape": shape}
    u, s, vh = torch.linalg.svd(fn(zero, small, **kwargs), full_matrices=False)
    return factors_from_svd(q_out @ u, s, vh @ q_in.T, rank)


def pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows/columns up to `rank` so every module of the output has the same r."""
    extra = rank - a.shape[0]
    return torch.cat([a, a.new_zeros(extra, a.shape[1])]), torch.cat(
        [b, b.new_zeros(b.shape[0], extra)], dim=1
    )


# ---------------------------------------------------------------------------------------------------
# The merge


def _module_shapes(adapters: list[LoraAdapter]) -> dict[str, tuple[int, int]]:
    shapes: dict[str, tuple[int, int]] = {}
    for adapter in adapters:
        for module, f in adapter.modules.items():
            shape = (f.b.shape[0], f.a.shape[1])
            if shapes.setdefault(module, shape) != shape:
                raise FormatError(
                    f"adapter {adapter.directory}: module {module} is {list(shape)} but {list(shapes[module])} elsewhere"
                )
    return dict(sorted(shapes.items()))


def _output_config(adapters: list[LoraAdapter], modules: list[str], rank: int) -> dict[str, Any]:
    """The first adapter's settings with scale 1 and one rank; explicit module paths if targets differ."""
    config = dict(adapters[0].config)
    same_targets = all(a.config.get("target_modules") == config.get("target_modules") for a in adapters)
    config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    if not same_targets or any(a.config.get("layers_to_transform") for a in adapters):
        config.update(target_modules=modules, layers_to_transform=None, layers_pattern=None)
    return config


def merge_adapters(cfg: MergeConfig, inputs: MergeInputs, out_dir: Path) -> MergeReport:
    """Merge PEFT LoRA adapters into one adapter directory (exact, or SVD-truncated with errors)."""
    started = time.perf_counter()
    spec = cfg.spec
    if cfg.merge_method == "slerp":
        raise cfg.error(["merge_method"], "slerp interpolates weights, not deltas; it cannot merge adapters")
    adapters = [read_lora(p) for p in inputs.models]
    shapes = _module_shapes(adapters)
    exact = cfg.merge_method in EXACT_METHODS
    input_rank = max(
        sum(a.modules[m].a.shape[0] for a in adapters if m in a.modules) for m in shapes
    )  # the exact stacked rank
    rank = cfg.rank or input_rank
    num_layers = 1 + max((i for m in shapes if (i := layer_index(m)) is not None), default=0)
    if inputs.base is not None and (inputs.base / MODEL_CONFIG).is_file():
        num_layers = read_json(inputs.base / MODEL_CONFIG).get("num_hidden_layers", num_layers)
    resolver = ParameterResolver(spec, cfg.parameters or {}, inputs.params, inputs.names)
    out_dtype = torch_dtype(cfg.out_dtype or cfg.dtype) or next(iter(adapters[0].modules.values())).a.dtype

    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for module, shape in shapes.items():
        kwargs = method_kwargs(cfg, resolver, f"{module}.weight", num_layers)
        factors = [a.modules.get(module) for a in adapters]
        if exact:
            coefficients = linear_coefficients(spec.fn, kwargs, len(adapters), spec.needs_base)
            a, b = stack_factors(factors, coefficients, shape)
            if cfg.rank is not None:
                a, b, errors[module] = truncate_factors(a, b, rank)
            else:
                a, b = pad_rank(a, b, rank)
        elif spec.rotation_invariant:
            a, b, errors[module] = subspace_merge(spec.fn, kwargs, factors, shape, rank)
        else:
            deltas = [f.dense() if f is not None else torch.zeros(shape) for f in factors]
            merged = spec.fn(torch.zeros(shape), deltas, **kwargs)
            a, b, errors[module] = truncate_dense(merged, rank)
        prefix = f"{PEFT_PREFIX}{module}"
        tensors[f"{prefix}.lora_A.weight"] = a.to(out_dtype).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.to(out_dtype).contiguous()

    config = _output_config(adapters, list(shapes), rank)
    with new_directory(out_dir) as tmp:
        write_adapter(tmp, config, tensors)
        written = (tmp / ADAPTER_WEIGHTS).stat().st_size
    return MergeReport(
        method=cfg.merge_method,
        out_dir=Path(out_dir),
        kind="adapter",
        tensors=len(tensors),
        bytes_written=written,
        seconds=time.perf_counter() - started,
        rank=rank,
        svd_errors=errors,
    )
