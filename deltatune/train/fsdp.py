"""FSDP training: the frozen base and the delta sharded across ranks with PyTorch's FSDP2.

    fully_shard(each decoder layer) ─► fully_shard(the loss module, the root) ─► AdamW on the shards

Why each choice:
- one FSDP group per decoder layer (the model's `_no_split_modules`), so a step all-gathers one
  layer's weights at a time and frees them after its forward (and again for its backward); the
  root group holds what is left: embeddings, final norm and the LM head. With tied embeddings the
  head *is* the embedding matrix, so it must live in the group of a module whose forward runs both
  lookups: the loss module (`CausalLMLoss`), which calls `model.base_model` and then the head in
  checkpointed chunks. Sharding `model` itself would not do: its forward is never called in
  training, so its hooks would never gather the embeddings.
- no `param_dtype` in the mixed-precision policy: FSDP all-gathers every parameter in the dtype
  it is stored in, the frozen base in bf16 (when the loop chose bf16) and the trainable delta in
  fp32, and the forward runs under the loop's bf16 autocast as without FSDP. So a sharded step
  computes what an unsharded one does (only the order of the gradient sums differs), and the
  delta's master weights and AdamW moments stay fp32. Gradients are reduce-scattered in fp32.
- gradients are reduce-scattered after every micro-batch (no `no_sync` counterpart is used): that
  keeps only gradient shards alive between micro-batches, which is what FSDP is for. FSDP averages
  over ranks as DDP does, so the loop's loss scaling (`loss * world / step_targets`) is unchanged.
- the base loads on the host and `fully_shard` moves only each rank's shards to the accelerator,
  so the full model never has to fit on one device during training.

Saving gathers: `gathered_delta` all-gathers only the delta's parameters and lets rank 0 see them
as plain tensors while it writes the adapter and checkpoint (the format on disk is the one an
unsharded run writes); `full_optimizer_state` gathers the AdamW moments likewise, and `load_full_`
/ `shard_optimizer_state` cut a checkpoint's full tensors back into this rank's shards. The end
of a run (`gather_model_on_rank0`) gathers the whole model on rank 0 only, because the final
evaluation and the exact-match generation run there as in an unsharded run: a base that fits no
single device trains and checkpoints under FSDP, but then needs `eval_samples: 0` (and no
`eval_data`).

Methods: every trainable method was run by hand on the tiny model (2 ranks against 1 process, 3
steps, fp32): all but prompt_tuning give the single-process adapter, most bitwise and all within
1.3e-5 (diff_pruning's hard-concrete noise and mixlora's routed-token counts are per rank, as
under DDP). Prompt tuning
runs the layers a second time for its prompt, and its gradient comes back through the key/value
cache, not through the layers' outputs where FSDP's backward hooks sit, so it is refused
(config.NOT_SHARDABLE). tests/test_fsdp.py covers LoRA.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from deltatune.deltas import named_delta_parameters
from deltatune.train.config import ConfigError

# parameters all-gathered in their stored dtype (bf16 base, fp32 delta); gradients summed in fp32
POLICY = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)


def world_size() -> int:
    """The number of processes torchrun started (1 when launched without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# where the base is loaded before sharding: the host, so only each rank's shards reach the accelerator
LOAD_DEVICE = torch.device("cpu")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one at a time: the classes transformers names as never to be
    split across devices (`_no_split_modules`, e.g. LlamaDecoderLayer)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(
            f"config key 'fsdp': {type(model).__name__} names no decoder layer class "
            "(_no_split_modules), so there is nothing to shard layer by layer; train without fsdp"
        )
    return layers


def shard(loss_fn: nn.Module, device: torch.device) -> None:
    """Shard `loss_fn.model` (base and delta) across all ranks, in place; call before building the
    optimizer (fully_shard replaces the parameters by their sharded DTensors)."""
    model = loss_fn.model
    mesh = init_device_mesh(device.type, (world_size(),))
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=POLICY)
    fully_shard(loss_fn, mesh=mesh, mp_policy=POLICY)
    model._fsdp_root = weakref.ref(loss_fn)  # a plain attribute: not a submodule of the model
    held = sum(local(p).numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    if dist.get_rank() == 0:
        print(
            f"fsdp: {len(layers)} decoder layers + the root sharded over {world_size()} ranks; "
            f"rank 0 holds {held:,} of {total:,} parameter elements ({held / total:.0%})"
        )


def is_sharded(model: nn.Module) -> bool:
    return getattr(model, "_fsdp_root", None) is not None


def _fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    """Every FSDP group of the model, in the same order on every rank (the root first)."""
    return [model._fsdp_root(), *(m for m in model.modules() if isinstance(m, FSDPModule))]


def _full(t: torch.Tensor) -> torch.Tensor:
    """A collective: the whole tensor behind a shard (every rank must call it, in the same order)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@contextmanager
def gathered_delta(model: nn.Module, rank: int) -> Iterator[None]:
    """Inside the block, rank 0's model holds the delta's parameters as whole, plain tensors (so
    save_delta and a method's report read them as in an unsharded run); the frozen base stays
    sharded. A collective on entry; every rank must enter. No-op without FSDP."""
    if not is_sharded(model):
        yield
        return
    sharded = [p for p in named_delta_parameters(model).values() if isinstance(p, DTensor)]
    full = {id(p): nn.Parameter(_full(p).detach(), requires_grad=p.requires_grad) for p in sharded}
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    if rank == 0:
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None and id(p) in full:  # every module sharing the parameter
                    swapped.append((module, name, p))
        for module, name, p in swapped:
            module._parameters[name] = full[id(p)]
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with every sharded moment gathered whole (a collective)."""
    opt = optimizer.state_dict()
    opt["state"] = {
        idx: {key: _full(value) for key, value in sorted(pstate.items())}
        for idx, pstate in sorted(opt["state"].items())
    }
    return opt


def _like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` cut into this rank's shard of `like` (no communication: every rank holds `full`)."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def load_full_(target: torch.Tensor, full: torch.Tensor) -> None:
    """target.copy_(full) where target may be a shard of a tensor shaped like `full`."""
    with torch.no_grad():
        target.copy_(_like(full.to(target.dtype), target))


def shard_optimizer_state(
    optimizer: torch.optim.Optimizer, state: dict[int, dict[str, torch.Tensor]]
) -> dict[int, dict[str, torch.Tensor]]:
    """Full AdamW moments (by parameter index, as `state_dict()` numbers them) cut into the shards
    of the parameters they belong to; scalars (the step count) stay as they are."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {
        idx: {
            key: _like(value, params[idx]) if value.dim() and isinstance(params[idx], DTensor) else value
            for key, value in pstate.items()
        }
        for idx, pstate in state.items()
    }


def gather_model_on_rank0(model: nn.Module, rank: int) -> None:
    """After the last step: rank 0 gets the whole model as plain tensors, to save and evaluate it
    alone as an unsharded run does; the other ranks free each gathered group at once. A collective;
    the sharding is not used again (no forward on rank 0 reshards or gathers any more)."""
    if not is_sharded(model):
        return
    for module in _fsdp_modules(model):
        module.unshard()  # all-gather of this group, on every rank
        if rank == 0:
            module.set_reshard_after_forward(False, recurse=False)
        else:
            module.reshard()
    if rank == 0:
        # fully_shard marks every module it manages, and transformers' generate then keeps all ranks
        # in step (synced_gpus, an all-reduce per token) though rank 0 now generates alone
        for m in model.modules():
            m._is_fsdp_managed_module = False


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (the tensor itself when it is not sharded)."""
    return t.to_local() if isinstance(t, DTensor) else t


def all_ranks_true(flags: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Per-entry AND of boolean `flags` over all ranks when each rank checked only its own shards
    of `model`'s tensors (FSDP), so every rank takes the same branch; `flags` as they are otherwise."""
    if not is_sharded(model):
        return flags
    as_int = flags.to(torch.int32)
    dist.all_reduce(as_int, op=dist.ReduceOp.MIN)
    return as_int.bool()
