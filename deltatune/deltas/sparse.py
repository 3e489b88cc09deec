"""What sparse weight deltas share: a global top-fraction selection and the indices + values form.

Diff pruning and grafting both train a dense candidate ΔW per layer, then keep only a small fraction
of its entries across the whole model. The selection is one pure function (`select_top`): the
`density` fraction of all entries with the largest |ΔW|, never a zero, with what it kept reported
(fraction of entries, fraction of the summed |ΔW| "score", fraction of the squared norm).

    training       SparseTrainLayer: dense candidate, used whole in train mode and through its
                   selection in eval mode (model.eval() selects, via the SparseSelector)
    saving         to_disk selects from the same state, stores per layer
                   `sparse_indices` (int32, row-major into [out, in]) + `sparse_values` (fp32)
    loading        SparseLinear: indices (a buffer) + values (trainable on that support)

The SparseSelector wraps no module: it holds the density (a buffer, so saving sees it) and, when
the model switches to eval mode, runs the selection over all layers at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.deltas.base import PEFT_PREFIX, DeltaConfig, DeltaLayer, DenseDeltaLinear, Method

SELECTOR = "sparse_selector"
INDICES, VALUES = "sparse_indices", "sparse_values"


class SparseLoadedConfig(DeltaConfig):
    """A sparse delta read from disk: entries kept per module path (the config it was trained with
    is kept in the adapter_config.json but not needed to rebuild it)."""

    sparse_entries: dict[str, int]


def select_top(candidates: dict[str, torch.Tensor], density: float) -> tuple[dict[str, torch.Tensor], dict]:
    """Boolean keep-masks for the `density` fraction of all entries with the largest |value|."""
    total = sum(c.numel() for c in candidates.values())
    scores = torch.cat([c.detach().abs().flatten().float() for c in candidates.values()])
    k = min(round(density * total), int((scores > 0).sum()))
    if k == 0:
        masks = {p: torch.zeros_like(c, dtype=torch.bool) for p, c in candidates.items()}
    else:
        threshold = torch.kthvalue(scores, scores.numel() - k + 1).values
        masks = {p: (c.detach().abs() >= threshold) & (c != 0) for p, c in candidates.items()}
    kept = sum(int(m.sum()) for m in masks.values())
    score_total, energy_total = float(scores.sum()), float((scores**2).sum())
    score_kept = sum(
        float(c.detach().abs()[m].sum()) for m, c in zip(masks.values(), candidates.values(), strict=True)
    )
    energy_kept = sum(
        float((c.detach()[m] ** 2).sum()) for m, c in zip(masks.values(), candidates.values(), strict=True)
    )
    stats = {
        "entries": total,
        "entries_kept": kept,
        "fraction_kept": kept / max(total, 1),
        "nonzero_fraction": int((scores > 0).sum()) / max(total, 1),
        "score_kept": score_kept / score_total if score_total else 0.0,
        "energy_kept": energy_kept / energy_total if energy_total else 0.0,
    }
    return masks, stats


def sparse_tensors(candidates: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """The on-disk form: per module path, int32 flat indices and fp32 values of the kept entries."""
    masks, _ = select_top(candidates, density)
    out = {}
    for path, cand in candidates.items():
        idx = masks[path].flatten().nonzero().squeeze(1)
        out[f"{path}.{INDICES}"] = idx.to(torch.int32)
        out[f"{path}.{VALUES}"] = cand.detach().flatten()[idx].float()
    return out


def scatter_dense(indices: torch.Tensor, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Differentiable in `values`: zeros with values at the flat indices."""
    flat = values.new_zeros(shape.numel()).scatter(0, indices.long(), values)
    return flat.view(shape)


class SparseLinear(DenseDeltaLinear):
    """A loaded sparse delta: y = W x + ΔW x with ΔW given by (indices, values)."""

    def __init__(self, base_layer: nn.Linear, entries: int):
        super().__init__()
        self.base_layer = base_layer
        device = base_layer.weight.device
        self.register_buffer(INDICES, torch.zeros(entries, dtype=torch.int64, device=device))
        self.sparse_values = nn.Parameter(torch.zeros(entries, device=device))

    def delta_weight(self) -> torch.Tensor:
        return scatter_dense(self.sparse_indices, self.sparse_values, self.base_layer.weight.shape)


class SparseTrainLayer(DenseDeltaLinear):
    """A dense candidate ΔW while training, its selected part otherwise. Subclasses define both."""

    def attach_selector(self, selector: SparseSelector) -> None:
        self._selector = [selector]  # a plain list: not a child module
        self.keep: torch.Tensor | None = None

    def train_delta(self) -> torch.Tensor:
        raise NotImplementedError

    def candidate(self) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        if self.keep is None:
            self._selector[0].select()
        return self.candidate() * self.keep

    def forward_weight(self) -> torch.Tensor:
        return self.train_delta() if self.training else self.delta_weight()


class SparseSelector(DeltaLayer):
    """Runs the global selection over its layers when the model switches to eval mode."""

    def __init__(self, layers: list[SparseTrainLayer], density: float):
        super().__init__()
        self.base_layer = None
        self._layers = layers
        device = next(layers[0].parameters()).device
        self.register_buffer("density", torch.tensor(float(density), device=device))
        self.stats: dict[str, Any] = {}
        for layer in layers:
            layer.attach_selector(self)

    @torch.no_grad()
    def select(self) -> dict[str, Any]:
        masks, self.stats = select_top(
            {str(i): layer.candidate() for i, layer in enumerate(self._layers)}, float(self.density)
        )
        for i, layer in enumerate(self._layers):
            layer.keep = masks[str(i)]
        return self.stats

    def train(self, mode: bool = True) -> SparseSelector:
        super().train(mode)
        if not mode:
            self.select()
        return self

    def merge(self) -> None:  # the layers merge their own selected part
        self.merged = True

    def unmerge(self) -> None:
        self.merged = False


@dataclass(frozen=True)
class SparseMethod(Method):
    """A method that trains a dense ΔW and keeps a top fraction of it (graft, diff_pruning).

    A subclass says how to wrap a linear layer (`wrap`), which density its config asks for, and
    which tensor of its trained state ranks the entries; storage, loading and the report are shared.
    """

    family = "weight"

    def density(self, cfg: DeltaConfig) -> float:
        raise NotImplementedError

    def candidates(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def attach(self, model: nn.Module, cfg: DeltaConfig) -> list[str]:
        if isinstance(cfg, SparseLoadedConfig):
            for path, entries in cfg.sparse_entries.items():
                model.set_submodule(path, SparseLinear(model.get_submodule(path), entries))
            return list(cfg.sparse_entries)
        paths = super().attach(model, cfg)
        layers = [model.get_submodule(path) for path in paths]
        model.add_module(SELECTOR, SparseSelector(layers, self.density(cfg)))
        return paths

    def to_disk(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Trained state -> indices + values; a loaded state is already in that form."""
        if any(k.endswith(VALUES) for k in state):
            tensors = {k: (v.to(torch.int32) if k.endswith(INDICES) else v) for k, v in state.items()}
        else:
            tensors = sparse_tensors(self.candidates(state), float(state[f"{SELECTOR}.density"]))
        return {PEFT_PREFIX + k: v for k, v in tensors.items()}

    def disk_config(self, cfg: DeltaConfig, paths: list[str], base_model: str | None) -> dict[str, Any]:
        fields = {} if isinstance(cfg, SparseLoadedConfig) else cfg.model_dump()
        return {
            "deltatune_method": self.name,
            "base_model_name_or_path": base_model,
            "format": "sparse",
            **fields,
        }

    def config_from_disk(self, disk: dict[str, Any], tensors: dict[str, torch.Tensor]) -> SparseLoadedConfig:
        entries = {
            k.removesuffix("." + VALUES): int(v.numel()) for k, v in tensors.items() if k.endswith(VALUES)
        }
        if not entries:
            raise ValueError(f"no {VALUES} tensors found")
        return SparseLoadedConfig(sparse_entries=entries)

    def report(self, model: nn.Module) -> dict[str, Any]:
        selector = getattr(model, SELECTOR, None)
        return dict(selector.select()) if isinstance(selector, SparseSelector) else {}
