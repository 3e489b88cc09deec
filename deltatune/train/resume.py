"""Checkpoints that survive SIGKILL: everything needed to continue bit-for-bit, written atomically.

    <output>/checkpoints/step-000050/
        adapter_config.json, adapter_model.safetensors   the delta as it would ship (PEFT format)
        trainer_state.safetensors                        the delta's raw training state by name (parameters
                                                         and buffers, before save-time conversions such as
                                                         PiSSA's or a sparse selection), AdamW moments and
                                                         every rank's RNG state
        trainer_state.json                               step, counters, eval-before, param-group layout

A checkpoint is first written to a hidden temp directory and then renamed into place, so a
`step-*` directory that exists is complete. Data order and the learning rate are functions of the
step, so they need no state. Only safetensors and JSON are read back: no pickle.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.deltas import named_delta_state
from deltatune.formats.peft import save_delta
from deltatune.train.config import ConfigError

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"


def prepare_output(out: Path, resume: bool) -> None:
    """Refuse to mix a fresh run into a directory that already holds one."""
    if not resume and out.exists() and any((out / name).exists() for name in ("checkpoints", "summary.json")):
        raise ConfigError(
            f"config key 'output': {out} already holds a run; pass --resume true to continue it "
            "or choose another --output"
        )
    out.mkdir(parents=True, exist_ok=True)


def _step_dirs(out: Path) -> list[Path]:
    root = out / "checkpoints"
    return sorted(root.glob("step-*")) if root.is_dir() else []


def latest(out: Path) -> Path | None:
    dirs = _step_dirs(out)
    return dirs[-1] if dirs else None


def _rng_states(world: int) -> list[torch.Tensor]:
    """Every rank's CPU (and CUDA) RNG state, gathered on all ranks."""
    state = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state = torch.cat([state, torch.cuda.get_rng_state()])
    if world == 1:
        return [state]
    gathered = [torch.empty_like(state) for _ in range(world)]
    dist.all_gather(gathered, state)
    return gathered


def _set_rng_state(state: torch.Tensor) -> None:
    cpu_len = torch.get_rng_state().numel()
    torch.set_rng_state(state[:cpu_len])
    if state.numel() > cpu_len and torch.cuda.is_available():
        torch.cuda.set_rng_state(state[cpu_len:])


def save(
    out: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
    rank: int,
    world: int,
) -> Path:
    rngs = _rng_states(world)  # collective: every rank takes part
    final = out / "checkpoints" / f"step-{state['step']:06d}"
    if rank != 0:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        save_delta(model, tmp)
        opt = optimizer.state_dict()
        tensors = {f"rng.rank{r}": s for r, s in enumerate(rngs)}
        tensors |= {f"delta.{k}": v.detach().cpu().contiguous() for k, v in named_delta_state(model).items()}
        for idx, pstate in opt["state"].items():
            for key, value in pstate.items():
                tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        save_file(tensors, tmp / STATE_TENSORS)
        groups = [
            {k: v for k, v in g.items() if k != "params"} | {"n_params": len(g["params"])}
            for g in opt["param_groups"]
        ]
        (tmp / STATE_JSON).write_text(
            json.dumps({**state, "param_groups": groups, "world_size": world}, indent=2)
        )
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in _step_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> dict[str, Any]:
    """Restore delta weights, optimizer moments and this rank's RNG; returns the counters."""
    state = json.loads((path / STATE_JSON).read_text())
    tensors = load_file(path / STATE_TENSORS)
    saved = {k.removeprefix("delta."): v for k, v in tensors.items() if k.startswith("delta.")}
    current = named_delta_state(model)
    if set(saved) != set(current) or any(saved[k].shape != v.shape for k, v in current.items()):
        raise ValueError(
            f"{path / STATE_TENSORS}: does not match the configured delta (changed method or targets?)"
        )
    with torch.no_grad():
        for name, t in current.items():
            t.copy_(saved[name])
    opt = optimizer.state_dict()
    if [len(g["params"]) for g in opt["param_groups"]] != [g["n_params"] for g in state["param_groups"]]:
        raise ValueError(f"{path / STATE_JSON}: optimizer layout differs from this run's configuration")
    restored: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            restored.setdefault(int(idx), {})[name] = value
    opt["state"] = restored
    optimizer.load_state_dict(opt)
    if state["world_size"] != (dist.get_world_size() if dist.is_initialized() else 1):
        raise ValueError(
            f"{path / STATE_JSON}: saved with world size {state['world_size']}; resume with the same"
        )
    _set_rng_state(tensors[f"rng.rank{rank}"])
    return state


def truncate_metrics(metrics_file: Path, step: int) -> None:
    """On resume, drop log lines from steps after the checkpoint (they will be logged again)."""
    if not metrics_file.exists():
        return
    keep = [
        line for line in metrics_file.read_text().splitlines() if line and json.loads(line)["step"] <= step
    ]
    metrics_file.write_text("".join(line + "\n" for line in keep))
