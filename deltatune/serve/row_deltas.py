"""Routed deltas inside the batched engine: Arrow and MixLoRA rows beside plain LoRA rows.

A LoRA row goes through the gathered low-rank path (serve/lora_batch.py). A routed delta cannot be
stacked into a slot: Arrow mixes several low-rank parts per token, MixLoRA replaces a whole MLP. So
each one is attached with `load_delta` to a *shadow* of the base model (new module objects over the
same weight tensors, nothing copied), and a forward hook on the engine's module at each path the
delta touches recomputes that module's output for the rows whose slot holds the delta, with the
delta's own layer. The math is the method's own, so a routed row's greedy output equals
`deltatune generate` with that delta; the price is that module run a second time on those rows.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from deltatune.deltas import delta_layers
from deltatune.formats import FormatError
from deltatune.formats.peft import Adapter, load_delta
from deltatune.serve.lora_batch import RowAdapters


def shared_copy(model: nn.Module) -> nn.Module:
    """The module tree copied, every parameter and buffer shared with `model` (no tensor is copied)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class RowDeltas:
    """Per-row routed deltas: slot -> the delta's layers, and one forward hook per module path."""

    def __init__(self, model: nn.Module, routing: RowAdapters):
        self.model, self.routing = model, routing
        self.plain = shared_copy(model)  # taken before the engine wraps any linear
        self.layers: dict[str, dict[int, nn.Module]] = {}  # module path -> slot -> layer
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}

    def load(self, adapter: Adapter) -> dict[str, nn.Module]:
        """The delta attached to a fresh shadow of the base; its layers by module path."""
        shadow = shared_copy(self.plain)
        load_delta(shadow, adapter)
        layers = delta_layers(shadow.eval())
        loose = next((p for p, layer in layers.items() if layer.base_layer is None), None)
        if loose is not None:
            raise FormatError(f"{adapter.directory}: {loose} wraps no module; it cannot be served per row")
        return layers

    @staticmethod
    def nbytes(layers: dict[str, nn.Module]) -> int:
        tensors = {
            id(t): t
            for layer in layers.values()
            for t in [*layer.delta_parameters().values(), *layer.delta_buffers().values()]
        }
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def add(self, slot: int, layers: dict[str, nn.Module]) -> None:
        for path, layer in layers.items():
            self.layers.setdefault(path, {})[slot] = layer
            if path not in self._hooks:
                self._hooks[path] = self.model.get_submodule(path).register_forward_hook(self._hook(path))

    def remove(self, slot: int) -> None:
        for path in [p for p, by_slot in self.layers.items() if by_slot.pop(slot, None) is not None]:
            if not self.layers[path]:
                del self.layers[path]
                self._hooks.pop(path).remove()

    def _hook(self, path: str):
        def recompute(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            slots = self.routing.slots
            if not slots:
                return None
            for slot, layer in self.layers.get(path, {}).items():
                rows = [i for i, s in enumerate(slots) if s == slot]
                if rows:
                    index = torch.tensor(rows, device=output.device)
                    output[index] = layer(args[0][index]).to(output.dtype)
            return output

        return recompute
