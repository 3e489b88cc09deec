"""Many LoRA adapters in one batch: the base projection once, the low-rank part per row.

Every wrapped linear keeps the weights of all resident adapters stacked by *slot*:

    a_stack: [slots, in, r_max]     A transposed, zero-padded to the largest rank seen
    b_stack: [slots, r_max, out]    B transposed, times the adapter's scale, zero-padded

Slot 0 is all zeros and stands for "no adapter"; an adapter that does not target a module leaves
its slot there at zero too. Zero padding makes ranks coexist: padded columns of A produce zeros
that meet zero rows of B. For a forward over rows [N, T, in], rows are grouped by adapter (each
group padded to the largest group, G rows) and, with the D distinct adapters' weights gathered,

    y = x W^T;   y[rows of group g] += bmm(bmm(x_grouped, a_stack[slot_g]), b_stack[slot_g])

(the BGMV / segmented-GEMM idea of Punica and S-LoRA, written with batched matmuls instead of a
custom kernel). Each adapter's weights are read once per forward however many rows use it, and
rows without an adapter cost nothing. When every row has its own adapter the grouping is the
identity and the update is added in place by the second matmul; when all rows share one adapter
two plain matmuls run; when no row has weights in this module the low-rank part is skipped. The
gathered weights and the grouping are cached per layer and reused while the batch composition and
the weights stay the same, which during decoding is most steps.

The base projection itself can run through a prepacked oneDNN weight (`pack_linear_weight`), which
is much faster than `F.linear` on the AMD CPUs this project runs on.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_keys = itertools.count(1)


@dataclass
class RowAdapters:
    """Which adapter slot each row of the current forward uses; shared by every wrapped layer."""

    slots: list[int] | None = None  # one per row; None: no row has an adapter
    key: int = 0  # changes whenever slots change, so layers know their cached gather is stale

    def set(self, slots: list[int]) -> None:
        """Route the next forwards: row i uses slot slots[i] (0 = base model)."""
        routed = list(slots) if any(slots) else None
        if self.key and routed == self.slots:
            return  # same composition: the layers' cached gathers stay valid
        self.slots = routed
        self.key = next(_keys)


def add_batched_lora(
    out: torch.Tensor, x: torch.Tensor, a_rows: torch.Tensor, b_rows: torch.Tensor
) -> torch.Tensor:
    """out [N, T, out] += x [N, T, in] @ a_rows [N, in, r] @ b_rows [N, r, out], row by row, in place
    (the add rides on the second matmul, so the update never exists as a separate tensor)."""
    return out.baddbmm_(torch.bmm(x, a_rows), b_rows)


def add_shared_lora(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out [M, out] += x [M, in] @ a [in, r] @ b [r, out] in place: one adapter for every row."""
    return out.addmm_(x @ a, b)


@dataclass
class RowGroups:
    """Rows regrouped by adapter: group g holds the rows of the g-th distinct slot, padded to `width`."""

    rows: int
    take: torch.Tensor  # [groups * width]: the row at each grouped position (padding repeats row 0)
    source: torch.Tensor  # [rows]: the grouped position of each row
    identity: bool  # one row per group, in row order: no regrouping needed


def group_rows(row_slots: list[int], device: torch.device | str = "cpu") -> tuple[list[int], RowGroups]:
    """Distinct slots (in order of first use) and how rows map onto them.

    Grouping reads each adapter's weights once per forward however many rows use it (32 rows over
    8 adapters read 8 adapters' weights, not 32 copies). Rows without an update here form the group
    of slot 0, whose weights are zero, so every row has exactly one grouped position and the result
    is gathered back with one index_select (no scatter). Padding positions compute a throw-away
    update from row 0.
    """
    members: dict[int, list[int]] = {}
    for row, slot in enumerate(row_slots):
        members.setdefault(slot, []).append(row)
    width = max(len(m) for m in members.values())
    take = [m[i] if i < len(m) else 0 for m in members.values() for i in range(width)]
    source = [0] * len(row_slots)
    for g, m in enumerate(members.values()):
        for i, row in enumerate(m):
            source[row] = g * width + i
    as_tensor = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    identity = width == 1 and take == list(range(len(row_slots)))
    return list(members), RowGroups(len(row_slots), as_tensor(take), as_tensor(source), identity)


@dataclass
class Plan:
    kind: str  # "shared": one adapter for all rows; "grouped": per-adapter groups of rows
    a: torch.Tensor  # [in, r] or [groups, in, r]
    b: torch.Tensor  # [r, out] or [groups, r, out]
    groups: RowGroups | None = None


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight in oneDNN's blocked layout, or None where that is unavailable or disagrees with F.linear.

    On this project's CPUs (AMD EPYC) a prepacked oneDNN linear runs 2-3x faster than `F.linear`
    for serving-sized batches; it is what torch.compile's CPU "freezing" does for linear layers.
    The result differs from F.linear by float rounding only (checked on a probe here).
    """
    if (
        weight.device.type != "cpu"
        or weight.dtype != torch.float32
        or not torch.backends.mkldnn.is_available()
    ):
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
        expected = F.linear(probe, weight)
        error = torch.linalg.vector_norm(linear(probe, weight, None, packed) - expected)
        ok = bool(error <= 1e-4 * torch.linalg.vector_norm(expected))
    except (AttributeError, RuntimeError):  # an older or newer torch without these ops
        return None
    return packed if ok else None


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None
) -> torch.Tensor:
    """x @ weight.T + bias, through the prepacked oneDNN weight when there is one."""
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class MultiLoraLinear(nn.Module):
    """A frozen nn.Linear plus the stacked LoRA weights of every resident adapter that targets it."""

    def __init__(self, base_layer: nn.Linear, routing: RowAdapters, prepack: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        w = base_layer.weight
        if not isinstance(base_layer, nn.Linear) or type(base_layer).forward is not nn.Linear.forward:
            raise TypeError(f"{type(base_layer).__name__} is not a plain nn.Linear")
        self.register_buffer("a_stack", w.new_zeros(1, self.in_features, 1), persistent=False)
        self.register_buffer("b_stack", w.new_zeros(1, 1, self.out_features), persistent=False)
        self.occupied: set[int] = set()  # slots with a nonzero update here
        # a frozen copy of the base weight in oneDNN's layout (serving never changes base weights)
        self.packed = pack_linear_weight(w) if prepack else None
        self._weights_version = 0
        self._cache: tuple[tuple[int, int], Plan | None] | None = None

    @property
    def rank(self) -> int:
        return self.a_stack.shape[-1]

    def _grow(self, slots: int, rank: int) -> None:
        """Reallocate the stacks to hold `slots` slots of rank `rank` (never shrinks)."""
        slots, rank = max(slots, self.a_stack.shape[0]), max(rank, self.rank)
        if (slots, rank) == (self.a_stack.shape[0], self.rank):
            return
        a = self.a_stack.new_zeros(slots, self.in_features, rank)
        b = self.b_stack.new_zeros(slots, rank, self.out_features)
        a[: self.a_stack.shape[0], :, : self.rank] = self.a_stack
        b[: self.b_stack.shape[0], : self.rank, :] = self.b_stack
        self.a_stack, self.b_stack = a, b

    @torch.no_grad()
    def write_slot(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
        """Store one adapter: lora_a [r, in] and lora_b [out, r] as PEFT saves them."""
        if slot < 1:
            raise ValueError("slot 0 is reserved for 'no adapter'")
        r = lora_a.shape[0]
        if lora_a.shape != (r, self.in_features) or lora_b.shape != (self.out_features, r):
            raise ValueError(
                f"lora_A {list(lora_a.shape)} / lora_B {list(lora_b.shape)} do not fit a "
                f"Linear({self.in_features}, {self.out_features})"
            )
        self._grow(slot + 1, r)
        dtype = self.a_stack.dtype
        self.a_stack[slot].zero_()
        self.b_stack[slot].zero_()
        self.a_stack[slot, :, :r] = lora_a.t().to(dtype)
        self.b_stack[slot, :r, :] = (lora_b.t().to(torch.float32) * scale).to(dtype)
        self.occupied.add(slot)
        self._weights_version += 1

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        if slot in self.occupied:
            self.a_stack[slot].zero_()
            self.b_stack[slot].zero_()
            self.occupied.discard(slot)
            self._weights_version += 1

    def slot_bytes(self, rank: int) -> int:
        """Bytes one adapter of rank `rank` occupies in this layer."""
        return rank * (self.in_features + self.out_features) * self.a_stack.element_size()

    def _plan(self):
        """What the low-rank part of this forward needs; cached per (routing, weights) version."""
        key = (self.routing.key, self._weights_version)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        plan = None
        if self.routing.slots is not None:
            # rows whose adapter has no weights here get no update here
            row_slots = [s if s in self.occupied else 0 for s in self.routing.slots]
            if len(set(row_slots)) == 1 and row_slots[0]:
                plan = Plan("shared", self.a_stack[row_slots[0]], self.b_stack[row_slots[0]])
            elif any(row_slots):  # slot 0 (zeros) is a group too when some rows have no update
                group_slots, groups = group_rows(row_slots, self.a_stack.device)
                index = torch.tensor(group_slots, dtype=torch.long, device=self.a_stack.device)
                plan = Plan(
                    "grouped",
                    self.a_stack.index_select(0, index),
                    self.b_stack.index_select(0, index),
                    groups,
                )
        self._cache = (key, plan)
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        out = linear(x, base.weight, base.bias, self.packed)
        plan = self._plan()
        if plan is None:
            return out
        xd = x.to(plan.a.dtype)
        if plan.kind == "shared":
            add_shared_lora(out.view(-1, self.out_features), xd.reshape(-1, self.in_features), plan.a, plan.b)
            return out
        rows, g = x.shape[0], plan.groups
        if rows != g.rows:
            raise RuntimeError(f"batch has {rows} rows but the routing names {g.rows}")
        if g.identity:  # one row per adapter, in row order: the gathered weights line up with the rows
            add_batched_lora(
                out.view(rows, -1, self.out_features), xd.reshape(rows, -1, self.in_features), plan.a, plan.b
            )
            return out
        grouped = xd.reshape(rows, -1).index_select(0, g.take).view(len(plan.a), -1, self.in_features)
        update = torch.bmm(torch.bmm(grouped, plan.a), plan.b).view(g.take.numel(), -1)
        out.view(rows, -1).add_(update.index_select(0, g.source))
        return out


def wrap_linear(model: nn.Module, path: str, routing: RowAdapters, prepack: bool = False) -> MultiLoraLinear:
    """Replace the nn.Linear at `path` by a MultiLoraLinear (idempotent); returns the wrapper."""
    module = model.get_submodule(path)
    if isinstance(module, MultiLoraLinear):
        return module
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{path} is {type(module).__name__}, not nn.Linear")
    wrapper = MultiLoraLinear(module, routing, prepack)
    model.set_submodule(path, wrapper)
    return wrapper
