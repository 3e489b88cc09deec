"""MixLoRA: a mixture of LoRA experts on each feed-forward block, trained (Li et al. 2024); LoRAMoE's
dense mixture is `mixlora_routing: soft`.

Each decoder layer's MLP (any module with gate_proj / up_proj / down_proj linears and an act_fn,
Llama-style) is wrapped in a `MixLoraMLP`. Expert e is the frozen MLP with a LoRA on each of its
three projections, proj_e(x) = base_proj(x) + scale · B_e A_e x, and a trainable linear router
(hidden -> E, no bias) mixes them per token:

    expert_e(x) = down_e(act(gate_e(x)) * up_e(x))
    y           = Σ_e w_e(x) · expert_e(x)
    topk:  w = softmax(router(x)) over all experts, keep the top k, renormalise to sum 1
           (moe-peft's MixLoRA and Mixtral; identical to a softmax over the top-k logits)
    soft:  w = softmax(router(x)) over all experts (LoRAMoE)

Efficiency: the base gate/up projections run once per token; per expert only the low-rank parts run
on the tokens routed to it (index_select + index_add, E is small), and because the base down
projection is linear and the weights sum to one, Σ_e w_e base_down(h_e) = base_down(Σ_e w_e h_e): it
runs once too. ΔW is never formed. Experts with no tokens still run on an empty slice, so every
parameter is in the graph of every step (DDP without find_unused_parameters needs that).

Load balancing (Switch / moe-peft): aux = coef · E · Σ_i f_i · P_i per layer, with P_i the mean
router probability of expert i over the layer's tokens and f_i the fraction of tokens whose routed
set contains i: their top k under top-k routing (so Σ f_i = k and a balanced router gives coef · k,
as in moe-peft), their argmax (Switch's top-1) under soft routing, where every expert is used. It is
computed in each training forward and left on the layer as `aux_loss`; deltas/base.aux_loss sums it
for the loop. The MLP sees no padding mask: packed rows are real tokens except the pad tail of each
row (the loop prints how full rows are), and those tail tokens are counted too.

Router statistics: `routed_tokens` [E] (int64, a persistent buffer, so a checkpoint restores it and
resume stays exact) counts the tokens routed to each expert in training forwards (not during an
activation-checkpointing recompute). `MixLora.report` turns it into per-layer load fractions for
summary.json and the adapter config, and `plot_router_load` draws router_load.png.

Experts per layer: `mixlora_experts` is one number or one per layer; with one number and
`mixlora_expert_rule: increasing` ("Higher Layers Need More LoRA Experts", Gao et al. 2024) layer l of
L gets round(lo + (E - lo) · l / (L - 1)) experts, lo = max(1, E // 2): E//2 at the bottom, E at the
top. `mixlora_attention` adds one plain LoRA, shared by all experts, on q/k/v/o.

A routed delta cannot be folded into the weights, so merging and export refuse with one message.
Stored in deltatune's own format (docs/formats.md, "Routed deltas: mixlora").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from deltatune.deltas.base import (
    DeltaConfig,
    DeltaLayer,
    Method,
    delta_layers,
    in_delta_dtype,
    match_linear_modules,
    refuse_routed_merge,
)
from deltatune.deltas.lora import LoraLinear, lora_scale

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _refuse_merge() -> None:
    refuse_routed_merge("mixlora", "its router picks experts per token")


# --- configuration ---------------------------------------------------------------------------------


class MixLoraConfig(DeltaConfig):
    """Flat training keys. Declared in validation order: each check reads only the keys above it."""

    mixlora_experts: int | list[int] = 4  # experts per layer: one number, or one per decoder layer
    mixlora_expert_rule: Literal["uniform", "increasing"] = "uniform"
    mixlora_routing: Literal["topk", "soft"] = "topk"
    mixlora_top_k: int = Field(2, ge=1, validate_default=True)  # experts per token (top-k routing)
    mixlora_aux_coef: float = Field(0.01, ge=0.0)  # load-balancing loss weight (0: none)
    mixlora_attention: bool = False  # also one shared LoRA on q/k/v/o
    lora_r: int = Field(16, ge=1)  # the LoRA keys mean what they mean for lora
    lora_alpha: float = Field(32.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    use_rslora: bool = False

    @field_validator("mixlora_experts")
    @classmethod
    def _positive(cls, value: int | list[int]) -> int | list[int]:
        counts = value if isinstance(value, list) else [value]
        if not counts or any(n < 1 for n in counts):
            raise ValueError(f"every layer needs at least one expert, got {value!r}")
        return value

    @field_validator("mixlora_expert_rule")
    @classmethod
    def _rule_needs_one_number(cls, value: str, info: ValidationInfo) -> str:
        if value == "increasing" and isinstance(info.data.get("mixlora_experts"), list):
            raise ValueError("'increasing' derives the counts from one number; mixlora_experts is a list")
        return value

    @field_validator("mixlora_top_k")
    @classmethod
    def _top_k_fits(cls, value: int, info: ValidationInfo) -> int:
        experts, rule = info.data.get("mixlora_experts"), info.data.get("mixlora_expert_rule")
        if experts is None or rule is None or info.data.get("mixlora_routing") != "topk":
            return value  # an earlier key failed already, or soft routing uses every expert
        fewest = min(experts) if isinstance(experts, list) else experts
        if rule == "increasing":
            fewest = max(1, experts // 2)  # the bottom layer's count
        if value > fewest:
            raise ValueError(
                f"mixlora_top_k={value} exceeds the {fewest} experts of the smallest layer "
                f"(mixlora_experts={experts!r}, mixlora_expert_rule={rule!r})"
            )
        return value


def experts_per_layer(experts: int | list[int], rule: str, n_layers: int) -> list[int]:
    """Experts of each of `n_layers` layers (see the module docstring for the 'increasing' rule)."""
    if isinstance(experts, list):
        if len(experts) != n_layers:
            raise ValueError(
                f"mixlora_experts lists {len(experts)} counts; the model has {n_layers} MLP layers"
            )
        return list(experts)
    if rule == "uniform" or n_layers == 1:
        return [experts] * n_layers
    lo = max(1, experts // 2)
    return [math.floor(lo + (experts - lo) * i / (n_layers - 1) + 0.5) for i in range(n_layers)]


# --- the math --------------------------------------------------------------------------------------


def route(logits: torch.Tensor, top_k: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(probs, weights, selected) for router logits [tokens, E].

    probs: softmax over all experts (fp32). weights [tokens, E]: the mixing weights, zero off the
    routed experts. selected: bool [tokens, E] of the top-k experts, or None for soft routing."""
    probs = logits.float().softmax(dim=-1)
    if top_k is None:
        return probs, probs, None
    top_w, top_i = probs.topk(top_k, dim=-1)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    weights = torch.zeros_like(probs).scatter(-1, top_i, top_w)
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top_i, True)
    return probs, weights, selected


def routed_set(probs: torch.Tensor, selected: torch.Tensor | None) -> torch.Tensor:
    """Bool [tokens, E] of where each token counts as routed: its top k, or its argmax (soft)."""
    if selected is not None:
        return selected
    return F.one_hot(probs.argmax(dim=-1), probs.shape[-1]).bool()


def load_balancing_loss(probs: torch.Tensor, routed: torch.Tensor, coef: float) -> torch.Tensor:
    """Switch's coef · E · Σ_i f_i · P_i; f (fraction routed to i) carries no gradient, P does."""
    f = routed.float().mean(dim=0)
    p = probs.mean(dim=0)
    return coef * probs.shape[-1] * (f * p).sum()


def _in_backward() -> bool:
    """Inside autograd's backward, i.e. an activation-checkpointing recompute of the forward."""
    return torch._C._current_graph_task_id() != -1


# --- the layer -------------------------------------------------------------------------------------


def is_gated_mlp(module: nn.Module) -> bool:
    """A Llama-style MLP: gate_proj, up_proj and down_proj linears and an act_fn."""
    return hasattr(module, "act_fn") and all(
        isinstance(getattr(module, name, None), nn.Linear) for name in PROJECTIONS
    )


class MixLoraMLP(DeltaLayer):
    """A frozen gated MLP plus E LoRA experts on its projections and a router (module docstring)."""

    def __init__(self, base_layer: nn.Module, experts: int, cfg: MixLoraConfig):
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.gate_proj.weight
        factory = {"device": weight.device, "dtype": torch.float32}
        hidden = base_layer.gate_proj.in_features
        r = cfg.lora_r
        self.experts = experts
        self.top_k = cfg.mixlora_top_k if cfg.mixlora_routing == "topk" else None
        self.aux_coef = cfg.mixlora_aux_coef
        self.scale = lora_scale(r, cfg.lora_alpha, cfg.use_rslora)
        self.router = nn.Linear(hidden, experts, bias=False, **factory)
        nn.init.normal_(self.router.weight, std=0.02)  # moe-peft's router_init_range
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in PROJECTIONS:
            proj = getattr(base_layer, name)
            a = torch.empty(experts, r, proj.in_features, **factory)
            for e in range(experts):
                nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))  # as LoRA's A, per expert
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(experts, proj.out_features, r, **factory))
        self.dropout = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()
        self.register_buffer("routed_tokens", torch.zeros(experts, dtype=torch.int64, device=weight.device))
        self.aux_loss: torch.Tensor | None = None

    def low_rank(self, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        """scale · B_e A_e x for one projection; under autocast the matmuls run in the autocast dtype."""
        a, b = self.lora_A[name][expert], self.lora_B[name][expert]
        return F.linear(F.linear(in_delta_dtype(x, a), a), b) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        self.aux_loss = None
        if self.disabled:
            return base(x)
        flat = x.reshape(-1, x.shape[-1])
        gate, up = base.gate_proj(flat), base.up_proj(flat)
        logits = self.router(in_delta_dtype(flat, self.router.weight))
        probs, weights, selected = route(logits, self.top_k)
        if self.training:
            routed = routed_set(probs, selected)
            if self.aux_coef > 0:
                self.aux_loss = load_balancing_loss(probs, routed, self.aux_coef)
            if not _in_backward():
                with torch.no_grad():
                    self.routed_tokens += routed.sum(dim=0)
        dropped = self.dropout(flat)
        mixed = torch.zeros(gate.shape, dtype=torch.float32, device=gate.device)
        delta = torch.zeros(flat.shape[0], base.down_proj.out_features, dtype=torch.float32, device=x.device)
        for e in range(self.experts):
            if selected is None:  # soft: every token uses every expert
                xe, ge, ue, we = dropped, gate, up, weights[:, e : e + 1]
            else:
                idx = selected[:, e].nonzero().squeeze(1)
                xe, ge, ue = dropped[idx], gate[idx], up[idx]
                we = weights[idx, e : e + 1]
            h = base.act_fn(ge + self.low_rank("gate_proj", e, xe)) * (ue + self.low_rank("up_proj", e, xe))
            dh = we * h
            dd = we * self.low_rank("down_proj", e, self.dropout(h))
            if selected is None:
                mixed = mixed + dh
                delta = delta + dd
            else:
                mixed.index_add_(0, idx, dh.float())
                delta.index_add_(0, idx, dd.float())
        out = base.down_proj(mixed.to(gate.dtype))  # Σ_e w_e base_down(h_e), as Σ_e w_e = 1
        out = out + delta.to(out.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def merge(self) -> None:
        _refuse_merge()

    def unmerge(self) -> None:
        return None  # never merged

    def expert_load(self) -> list[float]:
        """Share of the routed tokens each expert received in training (zeros before any)."""
        total = int(self.routed_tokens.sum())
        return [int(n) / total if total else 0.0 for n in self.routed_tokens.tolist()]


class SharedLoraLinear(LoraLinear):
    """The plain LoRA `mixlora_attention` puts on q/k/v/o. It would merge alone, but the delta as a
    whole cannot, so it refuses too: merging never leaves a half-merged model behind."""

    def merge(self) -> None:
        _refuse_merge()


# --- the method ------------------------------------------------------------------------------------


def mlp_paths(model: nn.Module) -> list[str]:
    """Every Llama-style MLP of the model, bottom layer first (module order)."""
    return [n for n, m in model.named_modules() if n and is_gated_mlp(m)]


@dataclass(frozen=True)
class MixLora(Method):
    name = "mixlora"
    config_class = MixLoraConfig
    family = "routed"
    lora_plus_params = (".lora_B.",)  # every expert's B factors and the shared attention LoRA's B
    servable = served_per_row = True  # per row in the batched engine (serve/row_deltas.py)

    def targets(self, model: nn.Module, cfg: MixLoraConfig) -> list[str]:
        paths = mlp_paths(model)
        return paths + (match_linear_modules(model, ATTENTION) if cfg.mixlora_attention else [])

    def attach(self, model: nn.Module, cfg: MixLoraConfig) -> list[str]:
        mlps = mlp_paths(model)
        if not mlps:
            raise ValueError(
                "method 'mixlora': the model has no Llama-style MLP (gate_proj, up_proj, down_proj, act_fn)"
            )
        counts = experts_per_layer(cfg.mixlora_experts, cfg.mixlora_expert_rule, len(mlps))
        attention = match_linear_modules(model, ATTENTION) if cfg.mixlora_attention else []
        if cfg.mixlora_attention and not attention:
            raise ValueError("mixlora_attention: the model has no q_proj/k_proj/v_proj/o_proj linears")
        for path, n in zip(mlps, counts, strict=True):
            model.set_submodule(path, MixLoraMLP(model.get_submodule(path), n, cfg))
        scale = lora_scale(cfg.lora_r, cfg.lora_alpha, cfg.use_rslora)
        for path in attention:
            layer = SharedLoraLinear(model.get_submodule(path), cfg.lora_r, scale, cfg.lora_dropout)
            model.set_submodule(path, layer)
        return mlps + attention

    def report(self, model: nn.Module) -> dict[str, Any]:
        """Per MLP layer: experts, tokens routed in training, and each expert's share of them."""
        layers = {p: m for p, m in delta_layers(model).items() if isinstance(m, MixLoraMLP)}
        return {
            "experts_per_layer": [m.experts for m in layers.values()],
            "router_tokens": {p: int(m.routed_tokens.sum()) for p, m in layers.items()},
            "router_load": {p: m.expert_load() for p, m in layers.items()},
        }


def plot_router_load(load: dict[str, list[float]], out: Path) -> None:
    """Heatmap of each layer's expert load (layers x experts; blank where a layer has fewer experts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(len(v) for v in load.values())
    grid = torch.full((len(load), width), float("nan"))
    for i, values in enumerate(load.values()):
        grid[i, : len(values)] = torch.tensor(values)
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * width, 1.2 + 0.3 * len(load)))
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(width))
    ax.set_title("router load (share of routed tokens)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
