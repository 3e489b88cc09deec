"""Arrow: route each token over a library of existing LoRA adapters, with no training (Ostapenko et al. 2024).

Per layer, adapter i contributes scale_i · B_i A_i x. Its *prototype* v_i is the top right singular
vector of ΔW_i = B_i A_i: the input direction the adapter amplifies most. A token x scores every
adapter by |x · v_i| (sign-free, not normalised: peft's rule), keeps the top k, and mixes them with a
softmax over the kept scores (divided by the temperature):

    y = W x + Σ_i c_i(x) · scale_i · B_i A_i x,      c = softmax_topk(|x Vᵀ| / T), zero off the top k

Prototypes here are exact (QR of the thin factors + SVD of the small core, never ΔW); peft runs 15
power-iteration steps from a random start, which agrees when the spectrum has a gap.

GenKnowSub (`arrow_general_adapters`), as peft does it: the mean of the general adapters' A is
subtracted from every task adapter's A, and their mean B from every B, separately, before the
prototypes are built. It is applied to the factors A and B, not to ΔW (so it is not ΔW - mean ΔW).

Adapters of different ranks are zero-padded to the largest rank of the module (zero rows of A and
columns of B add nothing). A routed delta has no single ΔW, so it cannot be merged, and it has no
parameters, so it is not trained. It saves as a self-contained directory (docs/formats.md): the
stacked factors, scales and prototypes per module, so loading never reads the source adapters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from deltatune.deltas.base import DeltaConfig, DeltaLayer, Method, in_delta_dtype, refuse_routed_merge
from deltatune.formats import FormatError

if TYPE_CHECKING:
    from deltatune.formats.peft import LoraAdapter

Factors = tuple[torch.Tensor, torch.Tensor]  # one module of one adapter: A [r, in], B [out, r]


# --- the math --------------------------------------------------------------------------------------


def top_right_singular_vector(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The unit vector [in] that ΔW = B A stretches most, exactly and without forming ΔW.

    Aᵀ = Qa Ra and B = Qb Rb, so B A = Qb (Rb Raᵀ) Qaᵀ and the SVD of the small core gives ΔW's.
    Computed in fp64, returned in fp32; the sign (free for a singular vector) puts the largest
    entry positive, and Arrow only uses |x · v|."""
    qa, ra = torch.linalg.qr(a.double().T)
    qb, rb = torch.linalg.qr(b.double())
    _, _, vh = torch.linalg.svd(rb @ ra.T)
    v = qa @ vh[0]
    return (v if v[v.abs().argmax()] >= 0 else -v).float()


def arrow_coefficients(
    x: torch.Tensor, prototypes: torch.Tensor, top_k: int, temperature: float
) -> torch.Tensor:
    """Routing weights [tokens, E] for tokens x [tokens, in]: softmax over each token's top-k |x · v_i|.

    The scores are computed in fp32 even under autocast: in bf16 a near-tie flips a token's top-k."""
    with torch.autocast(x.device.type, enabled=False):
        scores = (x.float() @ prototypes.float().T).abs()
    top, idx = torch.topk(scores, top_k, dim=-1)
    weights = torch.softmax(top / temperature, dim=-1)
    return weights.new_zeros(scores.shape).scatter_(-1, idx, weights)


def routed_delta(
    x: torch.Tensor, coeff: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """Σ_i coeff_i · scale_i · B_i A_i x for tokens x [tokens, in], as two matmuls over all adapters."""
    experts, rank, _ = a_stack.shape
    z = F.linear(x, a_stack.reshape(experts * rank, -1)).view(-1, experts, rank)
    z = z * (coeff * scales).to(z.dtype)[..., None]
    return F.linear(z.reshape(-1, experts * rank), b_stack.transpose(0, 1).reshape(b_stack.shape[1], -1))


def gen_know_sub(task: list[Factors], general: list[Factors]) -> list[Factors]:
    """GenKnowSub as peft does it: every task (A, B) minus the general adapters' mean A and mean B.

    The factors are shifted separately, not ΔW; all adapters need the same shapes (rank)."""
    mean_a = torch.stack([a for a, _ in general]).mean(0)
    mean_b = torch.stack([b for _, b in general]).mean(0)
    return [(a - mean_a, b - mean_b) for a, b in task]


def stack_factors(factors: list[Factors]) -> tuple[torch.Tensor, torch.Tensor]:
    """a_stack [E, r_max, in], b_stack [E, out, r_max]: every adapter zero-padded to the largest rank."""
    r_max = max(a.shape[0] for a, _ in factors)
    a_stack = torch.stack([F.pad(a.float(), (0, 0, 0, r_max - a.shape[0])) for a, _ in factors])
    b_stack = torch.stack([F.pad(b.float(), (0, r_max - b.shape[1])) for _, b in factors])
    return a_stack, b_stack


# --- the layer -------------------------------------------------------------------------------------


class ArrowLinear(DeltaLayer):
    """A frozen nn.Linear plus the Arrow mix of E LoRA adapters; everything is a (saved) buffer."""

    def __init__(
        self,
        base_layer: nn.Linear,
        a_stack: torch.Tensor,
        b_stack: torch.Tensor,
        scales: torch.Tensor,
        prototypes: torch.Tensor,
        top_k: int,
        temperature: float,
    ):
        super().__init__()
        self.base_layer = base_layer
        if not 1 <= top_k <= a_stack.shape[0]:
            raise ValueError(
                f"arrow_top_k={top_k} must be between 1 and the number of adapters ({a_stack.shape[0]})"
            )
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.register_buffer("a_stack", a_stack.to(**factory))
        self.register_buffer("b_stack", b_stack.to(**factory))
        self.register_buffer("scales", scales.to(**factory))
        self.register_buffer("prototypes", prototypes.to(**factory))
        self.top_k, self.temperature = top_k, temperature

    @classmethod
    def from_factors(
        cls,
        base_layer: nn.Linear,
        factors: list[Factors],
        scales: list[float],
        top_k: int,
        temperature: float,
    ) -> ArrowLinear:
        """The layer for one module of a library: stacks, scales and exact prototypes."""
        a_stack, b_stack = stack_factors(factors)
        prototypes = torch.stack([top_right_singular_vector(a, b) for a, b in factors])
        return cls(base_layer, a_stack, b_stack, torch.tensor(scales), prototypes, top_k, temperature)

    @classmethod
    def empty(
        cls, base_layer: nn.Linear, experts: int, rank: int, top_k: int, temperature: float
    ) -> ArrowLinear:
        """Zero buffers of a saved delta's shapes, for load_delta to fill."""
        out, inp = base_layer.out_features, base_layer.in_features
        a_stack, b_stack = torch.zeros(experts, rank, inp), torch.zeros(experts, out, rank)
        return cls(
            base_layer, a_stack, b_stack, torch.zeros(experts), torch.zeros(experts, inp), top_k, temperature
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        tokens = in_delta_dtype(x, self.a_stack).reshape(-1, x.shape[-1])
        coeff = arrow_coefficients(tokens, self.prototypes, self.top_k, self.temperature)
        delta = routed_delta(tokens, coeff, self.a_stack, self.b_stack, self.scales)
        return out + delta.view(*x.shape[:-1], -1).to(out.dtype)

    def merge(self) -> None:
        refuse_routed_merge("arrow", "every token mixes its own top-k adapters: there is no single ΔW")


# --- the method ------------------------------------------------------------------------------------


class ArrowConfig(DeltaConfig):
    arrow_adapters: list[str] = Field(
        default_factory=list, description="LoRA adapter directories to route over"
    )
    arrow_top_k: int = Field(3, ge=1, description="adapters mixed per token")
    arrow_temperature: float = Field(1.0, gt=0, description="softmax temperature of the routing scores")
    arrow_general_adapters: list[str] = Field(
        default_factory=list, description="general LoRA adapters whose mean GenKnowSub subtracts"
    )

    @field_validator("arrow_adapters", "arrow_general_adapters", mode="before")
    @classmethod
    def _paths_as_text(cls, value: Any) -> Any:
        return [os.fspath(v) for v in value] if isinstance(value, list | tuple) else value


class ArrowSavedConfig(ArrowConfig):
    """A saved Arrow delta: the buffers come from its file; the source adapters are only a record."""

    arrow_ranks: dict[str, int] = Field(exclude=True)  # module path -> padded rank


def _linear(modules: dict[str, nn.Module], path: str, who: str) -> nn.Linear:
    module = modules.get(path)
    if module is None:
        raise FormatError(f"{who}: module {path} is not in the base model")
    if not isinstance(module, nn.Linear):
        raise FormatError(
            f"{who}: module {path} is {type(module).__name__}; Arrow routes nn.Linear layers only"
        )
    return module


def _check_counts(cfg: ArrowConfig) -> None:
    if not cfg.arrow_adapters:
        raise ValueError("arrow_adapters: Arrow routes over a library of LoRA adapters; give at least one")
    if cfg.arrow_top_k > len(cfg.arrow_adapters):
        raise ValueError(
            f"arrow_top_k={cfg.arrow_top_k} is larger than the number of adapters ({len(cfg.arrow_adapters)})"
        )


def _check_library(model: nn.Module, adapters: list[LoraAdapter], cfg: ArrowConfig) -> list[str]:
    """The module paths every adapter targets; any mismatch names the adapter and the module."""
    first = adapters[0]
    paths = list(first.modules)
    for adapter in adapters[1:]:
        extra = sorted(set(adapter.modules) - set(paths))
        missing = sorted(set(paths) - set(adapter.modules))
        if extra or missing:
            which = f"targets {extra[0]}, which" if extra else f"does not target {missing[0]}, which"
            raise FormatError(
                f"adapter {adapter.directory}: {which} adapter {first.directory} "
                f"{'does not' if extra else 'does'} (Arrow needs every adapter to target the same modules)"
            )
    modules = dict(model.named_modules())
    for adapter in adapters:
        for path, f in adapter.modules.items():
            linear = _linear(modules, path, f"adapter {adapter.directory}")
            if (f.a.shape[1], f.b.shape[0]) != (linear.in_features, linear.out_features):
                raise FormatError(
                    f"adapter {adapter.directory}: module {path} maps {f.a.shape[1]} -> {f.b.shape[0]}, "
                    f"the base layer {linear.in_features} -> {linear.out_features}"
                )
    if cfg.arrow_general_adapters:
        for adapter in adapters[1:]:
            for path, f in adapter.modules.items():
                if f.a.shape != first.modules[path].a.shape:
                    raise FormatError(
                        f"adapter {adapter.directory}: module {path} has rank {f.a.shape[0]}, adapter "
                        f"{first.directory} rank {first.modules[path].a.shape[0]}; GenKnowSub subtracts "
                        "factors, so with arrow_general_adapters every adapter needs the same rank"
                    )
    return paths


@dataclass(frozen=True)
class Arrow(Method):
    name = "arrow"
    config_class = ArrowConfig
    family = "routed"
    trainable = False  # no parameters: it routes adapters trained elsewhere
    servable = served_per_row = True  # per row in the batched engine (serve/row_deltas.py)

    def attach(self, model: nn.Module, cfg: ArrowConfig) -> list[str]:
        _check_counts(cfg)
        if isinstance(cfg, ArrowSavedConfig):
            experts, modules = len(cfg.arrow_adapters), dict(model.named_modules())
            for path, rank in cfg.arrow_ranks.items():
                linear = _linear(modules, path, "arrow")
                layer = ArrowLinear.empty(linear, experts, rank, cfg.arrow_top_k, cfg.arrow_temperature)
                model.set_submodule(path, layer)
            return list(cfg.arrow_ranks)
        from deltatune.formats.peft import read_lora  # formats.peft imports the registry

        task = [read_lora(p) for p in cfg.arrow_adapters]
        general = [read_lora(p) for p in cfg.arrow_general_adapters]
        paths = _check_library(model, task + general, cfg)
        for path in paths:
            factors = [(ad.modules[path].a, ad.modules[path].b) for ad in task]
            if general:
                factors = gen_know_sub(factors, [(g.modules[path].a, g.modules[path].b) for g in general])
            scales = [ad.modules[path].scale for ad in task]
            layer = ArrowLinear.from_factors(
                model.get_submodule(path), factors, scales, cfg.arrow_top_k, cfg.arrow_temperature
            )
            model.set_submodule(path, layer)
        return paths

    def config_from_disk(self, disk: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ArrowSavedConfig:
        ranks = {
            k.removesuffix(".a_stack"): int(v.shape[1]) for k, v in tensors.items() if k.endswith(".a_stack")
        }
        if not ranks:
            raise ValueError("no a_stack tensors found")
        fields = ArrowConfig.model_fields
        return ArrowSavedConfig(**{k: v for k, v in disk.items() if k in fields}, arrow_ranks=ranks)
