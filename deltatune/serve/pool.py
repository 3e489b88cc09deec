"""The adapter pool: which adapters the server knows, which are resident, and in which slot.

An adapter is *registered* (a validated name -> directory) and, while it is in use or recently
used, *resident*: its LoRA weights copied into one slot of every MultiLoraLinear it targets. The
resident set lives under a memory budget in bytes (the adapters' own weights in the serving
dtype; the stacks are padded to the largest rank, so mixed ranks can take more). When a load would
pass the budget, resident adapters that no running request holds are evicted, least recently used
first; an evicted adapter stays registered and is read back from disk (safetensors only, via
`deltatune.formats.peft`) the next time a request names it, as in S-LoRA.

Only LoRA and rsLoRA are served: DoRA and other methods are refused at registration with a message
naming the adapter's config file. Any target subset and any ranks are fine; a module that no
resident adapter targeted before is wrapped the first time one does. An adapter with a NaN or inf
anywhere (a diverged run's checkpoint) is refused at registration too, naming the tensor: served, it
would only ever produce non-finite logits.

Unregistering never strands a request. Every request *claims* its adapter when it is accepted
(`claim`, before it waits in the queue) and gives the claim back when it ends; it *holds* the slot
(`acquire` / `release`) only while it runs. An adapter unregistered while claimed disappears at once
for new requests (its name is free to list, unknown to submit), but the requests that claimed it
still run with it, loading it back if it was evicted; the slot is freed when the last claim ends,
and until then registering the same name again is refused as "still finishing".
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deltatune.formats import ADAPTER_WEIGHTS, COMPRESSED_WEIGHTS, DENSE_CONFIG, FormatError, delta_kind
from deltatune.formats.peft import LoraFactors, lora_modules, read_adapter
from deltatune.serve.lora_batch import MultiLoraLinear, RowAdapters, wrap_linear
from deltatune.serve.row_deltas import RowDeltas

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class UnknownAdapterError(KeyError):
    """No adapter is registered under this name."""

    def __str__(self) -> str:
        return f"unknown adapter {self.args[0]!r}"


class PoolBusyError(RuntimeError):
    """The budget is full of adapters that running requests hold; try again when one finishes."""


@dataclass
class RowServed:
    layers: dict[str, nn.Module]  # a routed delta's layers by module path, on a shadow of the base


Served = dict[str, LoraFactors] | RowServed


@dataclass
class _Resident:
    slot: int
    nbytes: int
    refs: int = 0


@dataclass
class PoolStats:
    loads: int = 0
    evictions: int = 0
    unloads: int = 0


def validate_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise ValueError(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def read_servable(path: str | Path, rows: RowDeltas) -> Served:
    """What the batched engine serves for a delta: LoRA factors (a LoRA adapter, or a LoRA compressed
    in the factors layout, decoded here), or a routed delta's layers (served per row). Anything
    else is refused, naming the file."""
    kind = delta_kind(path)
    if kind == "compressed":
        from deltatune.compress.container import compressed_lora

        modules = compressed_lora(Path(path))
        factors = {f"{m}.lora_{ab}": getattr(w, ab.lower()) for m, w in modules.items() for ab in "AB"}
        check_finite(factors, Path(path) / COMPRESSED_WEIGHTS, " (decoded)")
        return modules
    if kind == "dense":
        raise FormatError(
            f"{Path(path) / DENSE_CONFIG}: a dense delta cannot be batched with other adapters; fold it into "
            f"the base (deltatune export OUT --adapter {path} --merge) and serve OUT as --base"
        )
    adapter = read_adapter(path)
    check_finite(adapter.tensors, adapter.weights_file)
    if adapter.method.served_per_row:
        return RowServed(rows.load(adapter))
    if not adapter.method.servable:
        raise FormatError(
            f"{adapter.config_file}: method {adapter.method.name!r} cannot be served; only LoRA, rsLoRA "
            "and the routed deltas (arrow, mixlora) can"
        )
    return lora_modules(adapter).modules


def check_finite(tensors: dict[str, torch.Tensor], where: Path, note: str = "") -> None:
    """Refuse NaN/inf weights, naming the first such tensor: they would poison every row they touch."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise FormatError(
                f"{where}: tensor {key}{note} has {bad} non-finite value(s) (NaN or inf) of {t.numel()}; "
                "the adapter cannot be served (a diverged run? use an earlier checkpoint)"
            )


def check_fits(model: nn.Module, modules: dict[str, LoraFactors], where: Path) -> None:
    """Every target is a linear layer of `model` with matching in/out features."""
    for path, w in modules.items():
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            raise FormatError(
                f"{where / ADAPTER_WEIGHTS}: module {path} does not exist in the base model"
            ) from None
        if isinstance(layer, MultiLoraLinear):
            layer = layer.base_layer
        if not isinstance(layer, nn.Linear):
            raise FormatError(
                f"{where / ADAPTER_WEIGHTS}: {path} is {type(layer).__name__}, not a linear layer"
            )
        want = (layer.out_features, layer.in_features)
        if (w.b.shape[0], w.a.shape[1]) != want:
            raise FormatError(
                f"{where / ADAPTER_WEIGHTS}: {path} maps {w.a.shape[1]} -> {w.b.shape[0]} features, "
                f"the base layer {want[1]} -> {want[0]}"
            )


class AdapterPool:
    """Registered adapters, the resident subset under a byte budget, and their slots."""

    def __init__(
        self, model: nn.Module, routing: RowAdapters, budget_bytes: int | None = None, prepack: bool = False
    ):
        self.model = model
        self.routing = routing
        self.budget_bytes = budget_bytes
        self.prepack = prepack  # wrapped layers keep a oneDNN-packed copy of their base weight
        self.dtype = next(model.parameters()).dtype
        self.lock = threading.RLock()  # held by the engine around every forward, too
        self.layers: dict[str, MultiLoraLinear] = {}
        self.paths: dict[str, Path] = {}
        self.resident: OrderedDict[str, _Resident] = OrderedDict()  # least recently used first
        self._targets: dict[str, list[str]] = {}
        self._claims: Counter[str] = Counter()  # live requests (queued or running) per adapter
        self._doomed: dict[str, Path] = {}  # unregistered while claimed or held: freed at the last end
        self._next_slot = 1
        self._free_slots: list[int] = []
        self.stats = PoolStats()
        self.rows = RowDeltas(model, routing)  # routed deltas, served per row (serve/row_deltas.py)

    def wrap_all_linear(self) -> None:
        """Wrap every nn.Linear now (the output head too), so all base projections use the packed path."""
        with self.lock:
            for path, module in list(self.model.named_modules()):
                if type(module) is nn.Linear:
                    self.layers[path] = wrap_linear(self.model, path, self.routing, self.prepack)

    # --- registry -------------------------------------------------------------------------------
    def register(self, name: str, path: str | Path) -> None:
        """Validate and load an adapter now (evicting idle ones if needed); errors name the file."""
        validate_adapter_name(name)
        path = Path(path)
        modules, nbytes = self._read(path)  # file I/O outside the lock
        if self.budget_bytes is not None and nbytes > self.budget_bytes:
            raise FormatError(
                f"{path}: needs {nbytes} bytes, more than the pool budget of {self.budget_bytes}"
            )
        with self.lock:
            if name in self.paths:
                raise ValueError(f"adapter {name!r} is already loaded; unload it first")
            if name in self._doomed:
                raise ValueError(f"adapter {name!r} is still finishing its requests; try again shortly")
            self.paths[name] = path
            # if running requests hold the budget, it becomes resident when a request needs it
            with contextlib.suppress(PoolBusyError):
                self._make_resident(name, modules, nbytes)

    def unregister(self, name: str) -> None:
        """Forget an adapter for new requests; those that claimed it (queued or running) still finish
        with it, and its slot is freed when the last of them ends."""
        with self.lock:
            if name not in self.paths:
                raise UnknownAdapterError(name)
            path = self.paths.pop(name)
            self.stats.unloads += 1
            entry = self.resident.get(name)
            if self._claims[name] > 0 or (entry is not None and entry.refs > 0):
                self._doomed[name] = path
            elif entry is not None:
                self._evict(name)

    def names(self) -> list[str]:
        with self.lock:
            return list(self.paths)

    def __contains__(self, name: str) -> bool:
        return name in self.paths

    # --- use by requests ------------------------------------------------------------------------
    def claim(self, name: str) -> None:
        """A request that will use `name` was accepted: keep the adapter until `unclaim`."""
        with self.lock:
            if name not in self.paths:
                raise UnknownAdapterError(name)
            self._claims[name] += 1

    def unclaim(self, name: str) -> None:
        """A request that claimed `name` ended (finished, failed, cancelled, never admitted)."""
        with self.lock:
            self._claims[name] -= 1
            if self._claims[name] <= 0:
                del self._claims[name]
                self._free_if_doomed(name)

    def acquire(self, name: str) -> int:
        """Hold an adapter for one request and return its slot; loads it from disk if it was evicted.
        An unregistered adapter is still acquirable by the requests that claimed it before."""
        with self.lock:
            path = self.paths.get(name) or (self._doomed.get(name) if self._claims[name] else None)
            if path is None:
                raise UnknownAdapterError(name)
            if name not in self.resident:
                self._make_resident(name, *self._read(path))
            entry = self.resident[name]
            entry.refs += 1
            self.resident.move_to_end(name)
            return entry.slot

    def release(self, name: str) -> None:
        with self.lock:
            entry = self.resident.get(name)
            if entry is None:
                return
            entry.refs -= 1
            self._free_if_doomed(name)

    def used_bytes(self) -> int:
        return sum(e.nbytes for e in self.resident.values())

    def describe(self) -> dict:
        with self.lock:
            return {
                "registered": len(self.paths),
                "resident": [n for n in self.resident if n not in self._doomed],
                "used_bytes": self.used_bytes(),
                "budget_bytes": self.budget_bytes,
                "loads": self.stats.loads,
                "evictions": self.stats.evictions,
                "unloads": self.stats.unloads,
            }

    # --- internals (called with the lock held) --------------------------------------------------
    def _free_if_doomed(self, name: str) -> None:
        entry = self.resident.get(name)
        if name in self._doomed and not self._claims[name] and (entry is None or entry.refs == 0):
            del self._doomed[name]
            if entry is not None:
                self._evict(name)

    def _read(self, path: Path) -> tuple[Served, int]:
        """What a slot of this adapter holds, checked against the model, and its bytes."""
        modules = read_servable(path, self.rows)
        if isinstance(modules, RowServed):
            return modules, self.rows.nbytes(modules.layers)
        check_fits(self.model, modules, path)
        size = torch.empty((), dtype=self.dtype).element_size()
        return modules, sum((w.a.numel() + w.b.numel()) * size for w in modules.values())

    def _make_resident(self, name: str, modules: Served, nbytes: int) -> None:
        self._evict_for(nbytes)
        slot = self._free_slots.pop() if self._free_slots else self._take_new_slot()
        self.resident[name] = _Resident(slot, nbytes)
        self.stats.loads += 1
        if isinstance(modules, RowServed):
            for path in modules.layers:  # hooks go on the wrappers, which run for every row
                if isinstance(self.model.get_submodule(path), nn.Linear):
                    self.layers[path] = wrap_linear(self.model, path, self.routing, self.prepack)
            self.rows.add(slot, modules.layers)
            self._targets[name] = []
            return
        for path, w in modules.items():
            layer = self.layers.get(path)
            if layer is None:
                layer = self.layers[path] = wrap_linear(self.model, path, self.routing, self.prepack)
            layer.write_slot(slot, w.a, w.b, w.scale)
        self._targets[name] = list(modules)

    def _take_new_slot(self) -> int:
        slot, self._next_slot = self._next_slot, self._next_slot + 1
        return slot

    def _evict_for(self, nbytes: int) -> None:
        if self.budget_bytes is None:
            return
        while self.used_bytes() + nbytes > self.budget_bytes:
            idle = next((n for n, e in self.resident.items() if e.refs == 0), None)
            if idle is None:
                raise PoolBusyError(
                    f"adapter pool budget ({self.budget_bytes} bytes) is held by running requests"
                )
            self._evict(idle)
            self.stats.evictions += 1

    def _evict(self, name: str) -> None:
        entry = self.resident.pop(name)
        for path in self._targets.pop(name, []):
            self.layers[path].clear_slot(entry.slot)
        self.rows.remove(entry.slot)
        self._free_slots.append(entry.slot)
