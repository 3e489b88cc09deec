"""Request-level routing: one adapter per request, chosen from its prompt.

A router is a served model name over several adapters (`deltatune serve --router skills=a,b,c`).
Each request to it goes to one adapter for its whole generation, so the batched engine keeps its
fast one-adapter-per-row path and routing costs one short forward per request.

Two signals, both from a forward of the base model that stops after the first `layer` decoder
blocks (4 of SmolLM2's 30 by default), so a route costs a small fraction of a prefill:

- `CentroidRouter` (the default when example prompts are given): each adapter's prototype is the
  mean-pooled hidden state of a few example prompts of its skill (a data file or a built-in task's
  train split); a request goes to the adapter whose prototype has the highest cosine with its own
  pooled state, both centred on the mean of the prototypes (what all skills share, such as the chat
  template, cancels out). A handful of prompts per adapter is what anyone who trained the adapters
  has, and prompts of different skills separate cleanly in activation space.
- `ArrowRouter` (no data): Arrow's weight-space prototypes (the top right singular vector of each
  adapter's B·A per module), scored as Arrow scores tokens, |cos(x, v_i)|, but averaged over the
  whole prompt and over the adapters' modules in those blocks, and the request goes to the best
  adapter. It is Arrow pooled over the sequence instead of routed per token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from deltatune.data.tokenize import Prompt, left_pad, prompt_ids
from deltatune.formats.peft import LoraAdapter
from deltatune.serve.kv import prefill_positions


class _Stop(Exception):  # noqa: N818 - control flow, not an error: carries the hidden states out
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


@torch.inference_mode()
def pooled_states(model: nn.Module, rows: list[list[int]], pad_id: int, layer: int) -> torch.Tensor:
    """Mean over each prompt's tokens of the hidden state after `layer` decoder blocks: [rows, hidden]."""
    blocks = model.get_decoder().layers
    layer = max(1, min(layer, len(blocks)))

    def stop(_module, _args, output):
        raise _Stop(output[0] if isinstance(output, tuple) else output)

    device = next(model.parameters()).device
    ids, mask = left_pad(rows, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    handle = blocks[layer - 1].register_forward_hook(stop)
    try:
        model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=prefill_positions(mask))
        raise RuntimeError("the decoder returned before the routing layer")  # pragma: no cover
    except _Stop as out:
        hidden = out.hidden.float()
    finally:
        handle.remove()
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


@dataclass
class CentroidRouter:
    """A served name over `adapters`, with one activation prototype per adapter."""

    name: str
    adapters: list[str]
    prototypes: torch.Tensor  # [adapters, hidden], centred and unit-norm
    center: torch.Tensor  # [hidden]
    layer: int

    def choose(self, states: torch.Tensor) -> list[str]:
        """The adapter for each pooled state [rows, hidden]."""
        scores = F.normalize(states.float() - self.center, dim=-1) @ self.prototypes.T
        return [self.adapters[i] for i in scores.argmax(-1).tolist()]

    def route(self, model: nn.Module, rows: list[list[int]], pad_id: int) -> list[str]:
        return self.choose(pooled_states(model, rows, pad_id, self.layer))


@dataclass
class ArrowRouter:
    """A served name over `adapters`, with Arrow's prototypes per module (see the module docstring)."""

    name: str
    adapters: list[str]
    prototypes: dict[str, torch.Tensor]  # module path -> [adapters, in], unit-norm
    layer: int

    def route(self, model: nn.Module, rows: list[list[int]], pad_id: int) -> list[str]:
        totals: list[torch.Tensor] = []
        device = next(model.parameters()).device
        ids, mask = left_pad(rows, pad_id)
        weights = mask.to(device).unsqueeze(-1).float()

        def score(path: str):
            def hook(_module, args, _output):
                x = F.normalize(args[0].float(), dim=-1)
                cos = (x @ self.prototypes[path].to(device).T).abs()  # [rows, T, adapters]
                totals.append((cos * weights).sum(1) / weights.sum(1))

            return hook

        handles = [model.get_submodule(p).register_forward_hook(score(p)) for p in self.prototypes]
        try:
            pooled_states(model, rows, pad_id, self.layer)
        finally:
            for h in handles:
                h.remove()
        return [self.adapters[i] for i in torch.stack(totals).sum(0).argmax(-1).tolist()]


RequestRouter = CentroidRouter | ArrowRouter


def arrow_router(name: str, adapters: dict[str, LoraAdapter], layer: int = 4) -> ArrowRouter:
    """A data-free router over LoRA adapters: Arrow's prototypes in their modules of the first
    `layer` blocks (modules only some adapters target count for those only)."""
    from deltatune.route.arrow import top_right_singular_vector

    if len(adapters) < 2:
        raise ValueError(f"router {name!r}: route between at least two adapters, got {len(adapters)}")
    paths = sorted(
        {p for a in adapters.values() for p in a.modules if _block(p) is not None and _block(p) < layer}
    )
    shared = [p for p in paths if all(p in a.modules for a in adapters.values())]
    if not shared:
        raise ValueError(f"router {name!r}: the adapters share no module in the first {layer} blocks")
    prototypes = {
        p: torch.stack([top_right_singular_vector(a.modules[p].a, a.modules[p].b) for a in adapters.values()])
        for p in shared
    }
    return ArrowRouter(name, list(adapters), prototypes, layer)


def _block(path: str) -> int | None:
    match = re.search(r"\.layers\.(\d+)\.", path)
    return int(match.group(1)) if match else None


def build_router(
    model: nn.Module,
    tokenizer,
    name: str,
    examples: dict[str, list[Prompt]],
    layer: int = 4,
    batch_size: int = 16,
) -> CentroidRouter:
    """A centroid router over the adapters named in `examples`, each with its example prompts."""
    if len(examples) < 2:
        raise ValueError(f"router {name!r}: route between at least two adapters, got {len(examples)}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    means = []
    for adapter, prompts in examples.items():
        if not prompts:
            raise ValueError(f"router {name!r}: adapter {adapter!r} has no example prompts")
        rows = [prompt_ids(tokenizer, p) for p in prompts]
        states = torch.cat(
            [
                pooled_states(model, rows[i : i + batch_size], pad, layer)
                for i in range(0, len(rows), batch_size)
            ]
        )
        means.append(states.mean(0))
    means = torch.stack(means)
    center = means.mean(0)
    return CentroidRouter(name, list(examples), F.normalize(means - center, dim=-1), center, layer)


def example_prompts(spec: str, n: int) -> list[Prompt]:
    """`task:NAME` (the built-in task's train split) or a data file (the prompts of its records)."""
    if spec.startswith("task:"):
        from deltatune.data.tasks import examples

        return [
            ex.messages(with_answer=False) for ex in examples(spec.removeprefix("task:"), "train", n, seed=1)
        ]
    from deltatune.train.evaluate import eval_items_from_file

    return [item.prompt for item in eval_items_from_file(spec)[:n]]
