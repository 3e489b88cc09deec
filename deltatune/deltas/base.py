"""The delta contract: what a parameter-efficient method must say, and nothing more.

A *delta* is the trained change to a base model. A method module answers five questions:

    1. which modules it targets          Method.targets(model, cfg)   -> module paths
    2. what replaces a target            Method.wrap(module, cfg)      -> a DeltaLayer
    3. the forward contribution          DeltaLayer.forward
    4. the dense weight change, if any   DeltaLayer.delta_weight()     -> ΔW (merge, compress, export use it)
    5. how its state maps to disk        Method.to_disk / from_disk    (PEFT names by default)

Training, saving, merging and serving are written once against this contract, in the generic
functions at the bottom of this file. Methods that do not wrap linear layers (soft prompts, ...)
override `Method.attach` instead of `wrap`.

Beyond ΔW, a delta may carry:
    - a bias change                      DeltaLayer.delta_bias()        (BitFit, SSF; merge creates a bias if needed)
    - fixed state saved with it          persistent buffers             (VeRA's shared projections, PiSSA's
                                                                         initial factors, sparse indices)
    - state that wraps no module         a DeltaLayer whose base_layer is None, attached at its own path
                                         (a soft prompt, VeRA's shared projections); merging removes it

         base model                          with a delta attached
    ┌──────────────────┐              ┌──────────────────────────────┐
    │ q_proj: Linear   │   attach()   │ q_proj: LoraLinear            │
    │                  │  ─────────►  │   base_layer: Linear (frozen) │
    │                  │              │   lora_A, lora_B  (trainable) │
    └──────────────────┘              └──────────────────────────────┘
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

PEFT_PREFIX = "base_model.model."


class DeltaConfig(BaseModel):
    """Hyperparameters of a method; flat keys so they double as training-config keys."""

    model_config = ConfigDict(extra="forbid")


class DeltaLayer(nn.Module):
    """A module that wraps a frozen base module and adds a trainable change to it.

    `base_layer` is None for delta state that wraps nothing (see the module docstring). Attributes
    the wrapper lacks are looked up on the base module, so code that reads `layer.weight` or
    `layer.in_features` keeps working after a delta is attached.
    """

    base_layer: nn.Module | None
    merged: bool = False
    disabled: bool = False  # every forward reads it; set by deltas.disable_delta(model)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer" or "base_layer" not in self._modules:
                raise
            return getattr(self._modules["base_layer"], name)

    def delta_weight(self) -> torch.Tensor | None:
        """Dense ΔW in the base weight's shape, or None when the change is not a weight delta."""
        return None

    def delta_bias(self) -> torch.Tensor | None:
        """Dense Δb in the base bias's shape (the output size), or None when the bias does not change."""
        return None

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        delta, bias = self.delta_weight(), self.delta_bias()
        if delta is None and bias is None:
            raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights")
        if delta is not None:
            self.base_layer.weight += delta.to(self.base_layer.weight.dtype)
        if bias is not None:
            fold_bias(self, bias)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        delta, bias = self.delta_weight(), self.delta_bias()
        if delta is not None:
            self.base_layer.weight -= delta.to(self.base_layer.weight.dtype)
        if bias is not None:
            unfold_bias(self, bias)
        self.merged = False

    def delta_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters this delta owns (everything except the wrapped base module)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base_layer.")}

    def delta_buffers(self) -> dict[str, torch.Tensor]:
        """Fixed (untrained) tensors saved and loaded with the delta: its persistent buffers."""
        return {
            n: b
            for n, b in self.named_buffers()
            if not n.startswith("base_layer.") and n.rsplit(".", 1)[-1] not in _non_persistent(self, n)
        }


class DenseDeltaLinear(DeltaLayer):
    """A linear delta whose forward materialises ΔW: y = base(x) + x ΔWᵀ (LoHa, LoKr, sparse deltas).

    `forward_weight` is the ΔW the forward uses; it is `delta_weight()` unless a subclass trains
    through something else (the sparse methods' dense candidate).
    """

    def forward_weight(self) -> torch.Tensor:
        return self.delta_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        delta = self.forward_weight()
        return out + F.linear(in_delta_dtype(x, delta), delta).to(out.dtype)


def _non_persistent(layer: nn.Module, name: str) -> set[str]:
    owner = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
    return owner._non_persistent_buffers_set


@torch.no_grad()
def fold_bias(layer: DeltaLayer, bias: torch.Tensor) -> None:
    """base.bias += Δb; a base without a bias gets one (remembered, so unfold_bias can drop it)."""
    base = layer.base_layer
    if base.bias is None:
        base.bias = nn.Parameter(torch.zeros_like(bias, dtype=base.weight.dtype), requires_grad=False)
        layer._created_bias = True
    base.bias += bias.to(base.bias.dtype)


@torch.no_grad()
def unfold_bias(layer: DeltaLayer, bias: torch.Tensor) -> None:
    """Undo fold_bias; a bias that fold_bias created is removed, restoring the exact original module."""
    base = layer.base_layer
    if getattr(layer, "_created_bias", False):
        base.bias = None
        layer._created_bias = False
    else:
        base.bias -= bias.to(base.bias.dtype)


class RoutedMergeError(ValueError, NotImplementedError):
    """Merging a routed delta: a ValueError (the CLI prints one line) that is also 'not implemented'."""


def refuse_routed_merge(method: str, why: str) -> None:
    raise RoutedMergeError(
        f"{method} cannot be merged: a routed delta cannot be folded into the weights ({why}); "
        "load it with the delta attached instead (deltatune.load(base, adapter=...))"
    )


@dataclass(frozen=True)
class Method:
    """One registry entry. Subclass it in the method's module; override only what differs."""

    name: ClassVar[str]
    config_class: ClassVar[type[DeltaConfig]]
    family: ClassVar[str]  # what it changes: "weight", "activation" or "input" (see deltas/__init__.py)
    peft_type: ClassVar[str | None] = None  # None: stored in deltatune's own format
    lora_plus_params: ClassVar[tuple[str, ...]] = ()  # name fragments of the "up" factors LoRA+ speeds up
    servable: ClassVar[bool] = False  # whether the multi-adapter server runs adapters this method reads
    served_per_row: ClassVar[bool] = False  # served by recomputing its modules on its rows (routed deltas)
    trainable: ClassVar[bool] = True  # False: it has no parameters (Arrow routes adapters trained elsewhere)
    # why the method needs the dense base weight ("": it does not, so it runs over a quantized base, quant/)
    dense_base: ClassVar[str] = ""

    def targets(self, model: nn.Module, cfg: DeltaConfig) -> list[str]:
        return match_linear_modules(model, getattr(cfg, "target_modules", "all-linear"))

    def wrap(self, module: nn.Module, cfg: DeltaConfig, path: str) -> DeltaLayer:
        raise NotImplementedError

    def attach(self, model: nn.Module, cfg: DeltaConfig) -> list[str]:
        paths = self.targets(model, cfg)
        if not paths:
            raise ValueError(f"method {self.name!r}: target_modules matched no module of the model")
        for path in paths:
            model.set_submodule(path, self.wrap(model.get_submodule(path), cfg, path))
        return paths

    # --- disk mapping (PEFT naming by default) ---------------------------------------------------
    def to_disk(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {PEFT_PREFIX + k: v for k, v in state.items()}

    def from_disk(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}

    def disk_config(self, cfg: DeltaConfig, paths: list[str], base_model: str | None) -> dict[str, Any]:
        """The adapter_config.json written next to the weights."""
        return {"deltatune_method": self.name, "base_model_name_or_path": base_model, **cfg.model_dump()}

    def config_from_disk(self, disk: dict[str, Any], tensors: dict[str, torch.Tensor]) -> DeltaConfig:
        fields = self.config_class.model_fields
        return self.config_class(**{k: v for k, v in disk.items() if k in fields})

    def claims(self, disk: dict[str, Any]) -> bool:
        """Whether this method reads the adapter described by `disk` (an adapter_config.json)."""
        if "deltatune_method" in disk:
            return disk["deltatune_method"] == self.name
        return self.peft_type is not None and disk.get("peft_type") == self.peft_type

    def report(self, model: nn.Module) -> dict[str, Any]:
        """Numbers worth recording next to the saved delta (e.g. what a sparse method kept)."""
        return {}


def in_delta_dtype(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x as a delta's matmul should see it: autocast picks the dtype when on, else the delta's dtype."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(like.dtype)


# --- target matching ------------------------------------------------------------------------------


def require_linear(module: nn.Module, method: str, path: str) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{method} targets nn.Linear; {path} is {type(module).__name__}")
    return module


def _output_layer_names(model: nn.Module) -> set[str]:
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if get_out else None
    return {n for n, m in model.named_modules() if out is not None and m is out}


def match_linear_modules(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """PEFT's matching rules: 'all-linear' (minus the output layer), a list of name suffixes, or a regex."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if target_modules == "all-linear":
        skip = _output_layer_names(model)
        return [n for n in linears if n not in skip]
    if isinstance(target_modules, str):
        return [n for n in linears if re.fullmatch(target_modules, n)]
    return [n for n in linears if any(n == t or n.endswith("." + t) for t in target_modules)]


# --- generic operations over any attached delta -----------------------------------------------------


def delta_layers(model: nn.Module) -> dict[str, DeltaLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DeltaLayer)}


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of the auxiliary losses delta layers left in their last forward (`layer.aux_loss`, e.g.
    a router's load balancing), or None when none did: the training loop adds it to the loss."""
    losses = [
        loss
        for m in model.modules()
        if isinstance(m, DeltaLayer) and (loss := getattr(m, "aux_loss", None)) is not None
    ]
    return sum(losses[1:], losses[0]) if losses else None


def named_delta_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable delta parameters by their path in the model (the keys saved to disk, minus prefix).

    A parameter shared by two layers (a tied embedding's delta) is listed once, under its first path.
    """
    extra = getattr(model, "delta_extra_parameters", None)
    params = dict(extra()) if extra else {}
    seen = {id(p) for p in params.values()}
    for path, layer in delta_layers(model).items():
        for n, p in layer.delta_parameters().items():
            if id(p) not in seen:
                seen.add(id(p))
                params[f"{path}.{n}"] = p
    return params


def named_delta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything saved with a delta: its parameters plus its fixed buffers, by path in the model."""
    state: dict[str, torch.Tensor] = dict(named_delta_parameters(model))
    for path, layer in delta_layers(model).items():
        state.update({f"{path}.{n}": b for n, b in layer.delta_buffers().items()})
    return state


def freeze_base(model: nn.Module) -> None:
    """Only delta parameters train; everything else is frozen."""
    trainable = {id(p) for p in named_delta_parameters(model).values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def merge_into_base(model: nn.Module) -> nn.Module:
    """Fold every delta into the base weights and put the plain base modules back."""
    layers = delta_layers(model)
    for layer in layers.values():
        layer.merge()
    for path, layer in layers.items():
        if layer.base_layer is None:  # delta state that wraps nothing goes away with the delta
            parent, _, name = path.rpartition(".")
            delattr(model.get_submodule(parent), name)
        else:
            model.set_submodule(path, layer.base_layer)
    for attr in ("delta_method", "delta_config", "delta_paths"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def set_merged(model: nn.Module, merged: bool) -> None:
    """Merge or unmerge in place, keeping the delta layers (for equivalence checks and fast eval)."""
    for layer in delta_layers(model).values():
        layer.merge() if merged else layer.unmerge()
