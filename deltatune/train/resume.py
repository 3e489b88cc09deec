"""Checkpoints that survive SIGKILL: everything needed to continue bit-for-bit, written atomically.

    <output>/checkpoints/step-000050/
        adapter_config.json, adapter_model.safetensors   the delta as it would ship (PEFT format)
        trainer_state.safetensors                        the delta's raw training state by name (parameters
                                                         and buffers, before save-time conversions such as
                                                         PiSSA's or a sparse selection), AdamW moments and
                                                         every rank's RNG state
        trainer_state.json                               step, counters, eval-before, param-group layout

A checkpoint is first written to a hidden temp directory and then renamed to `unconfirmed-step-*`;
the loop renames it to `step-*` (`confirm`) only once the next step's forward and backward with its
weights gave a finite loss and gradient, and deletes it (`discard`) otherwise. So a `step-*`
directory that exists is complete and good; an unconfirmed one left by a kill is ignored, and
removed when the next run starts. Data order and the learning rate are functions of the
step, so they need no state. Only safetensors and JSON are read back: no pickle.

Whether a run may start at all is decided by `plan`, which only reads: a fresh run never lands in a
directory that holds one, and a resume must be a continuation of the same run. Its config must
equal the run's config.json in every key but the bookkeeping ones in `CHANGEABLE_ON_RESUME` (and
`max_steps` only with a constant schedule: the cosine and linear decays are functions of it), and
its packed training data must hash like the checkpoint's; anything else would give neither the old
run nor a new one. A finished run (summary.json written) has no checkpoint of its final step, so it
cannot be continued.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.atomic import check_writable
from deltatune.deltas import named_delta_state
from deltatune.formats import read_json
from deltatune.formats.peft import save_delta
from deltatune.train import fsdp
from deltatune.train.config import ConfigError, TrainConfig

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
UNCONFIRMED = "unconfirmed-"  # prefix of a checkpoint not yet proven good
RUN_CONFIG = "config.json"
SUMMARY = "summary.json"
# keys that change what is logged or kept, never the trained weights or the reported results
CHANGEABLE_ON_RESUME = ("log_every", "eval_every", "save_every", "keep_checkpoints", "max_steps")
NOT_COMPARED = ("resume", "output")  # the resume request itself, and the directory it names


def plan(out: Path, cfg: TrainConfig) -> Path | None:
    """The checkpoint this run continues, or None for a fresh start; refuses (ConfigError) a start
    that would mix runs, continue something else, or redo a finished run. Reads only."""
    if cfg.resume and cfg.output is None:
        raise ConfigError("config key 'resume': needs --output, the run directory to continue")
    check_writable(out)
    finished, ckpt = (out / SUMMARY).is_file(), latest(out)
    if not cfg.resume:
        if finished or ckpt is not None:
            raise ConfigError(
                f"config key 'output': {out} already holds a run; pass --resume true to continue it "
                "or choose another --output"
            )
        return None
    if finished:
        steps = read_json(out / SUMMARY).get("steps", "?")
        raise ConfigError(
            f"config key 'resume': the run in {out} is finished ({steps} steps, summary.json written); "
            "nothing to resume. Its final step is not checkpointed, so a longer run is a new run: "
            "choose another --output"
        )
    if ckpt is None:
        if cfg.resume == "auto":
            return None
        raise ConfigError(
            f"config key 'resume': {out} holds no checkpoint to resume (no run, or killed before its "
            "first save_every steps); --resume auto starts fresh when there is none"
        )
    step = read_json(ckpt / STATE_JSON)["step"]
    changes = config_changes(read_json(out / RUN_CONFIG), cfg.to_dict(), step, _defaults(cfg))
    if changes:
        raise ConfigError(
            f"config key 'resume': cannot continue {out} ({ckpt.name}) with a different config: "
            f"{'; '.join(changes)}. Only {', '.join(CHANGEABLE_ON_RESUME)} may change on resume "
            "(max_steps only with schedule 'constant'); any other change alters the result, so "
            "start a new run with another --output"
        )
    return ckpt


def _defaults(cfg: TrainConfig) -> dict[str, Any]:
    fields = {**TrainConfig.model_fields, **type(cfg.delta_config()).model_fields}
    return {k: f.get_default(call_default_factory=True) for k, f in fields.items() if not f.exclude}


def config_changes(
    stored: dict[str, Any], new: dict[str, Any], step: int, defaults: dict[str, Any] | None = None
) -> list[str]:
    """Every key whose change would alter the result of continuing a run stopped at `step`. A key
    the stored config lacks (added to deltatune since) counts as its default from `defaults`."""
    new, defaults = json.loads(json.dumps(new)), json.loads(json.dumps(defaults or {}))
    missing = object()
    stored = {**{k: v for k, v in defaults.items() if k in new}, **stored}

    def show(value: Any) -> str:
        return "unset" if value is missing else json.dumps(value)

    out = []
    for key in sorted((set(stored) | set(new)) - set(NOT_COMPARED)):
        old, now = stored.get(key, missing), new.get(key, missing)
        if old == now or (key in CHANGEABLE_ON_RESUME and key != "max_steps"):
            continue
        if key == "max_steps" and new.get("schedule") == stored.get("schedule") == "constant":
            if isinstance(now, int) and now >= step:
                continue
            out.append(f"max_steps {show(old)} -> {show(now)} is below the checkpoint's step {step}")
            continue
        why = f" (the {new.get('schedule')} decay depends on it)" if key == "max_steps" else ""
        out.append(f"{key} {show(old)} -> {show(now)}{why}")
    return out


def data_fingerprint(input_ids: torch.Tensor, labels: torch.Tensor) -> str:
    """A hash of the packed training rows: a resume must see the same data, not only the same keys."""
    digest = hashlib.sha256()
    for t in (input_ids, labels):
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_data(ckpt: Path, fingerprint: str) -> None:
    """Refuse to resume on training data that differ from the checkpoint's (edited file, other tokenizer)."""
    saved = read_json(ckpt / STATE_JSON).get("data_fingerprint")
    if saved is not None and saved != fingerprint:
        raise ConfigError(
            f"config key 'resume': the training data differ from those {ckpt} was trained on (same "
            "config keys, but the data file's content or the tokenizer changed); start a new run"
        )


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
    rank: int,
    world: int,
) -> Path:
    """Write the checkpoint of step `state['step']` as `unconfirmed-step-N` (see `confirm`)."""
    rngs = _rng_states(world)  # collective: every rank takes part
    opt = fsdp.full_optimizer_state(optimizer)  # collective under FSDP: the moments gathered whole
    with fsdp.gathered_delta(model, rank):  # collective under FSDP: rank 0 sees the whole delta
        return _write(out, model, opt, rngs, state, rank, world)


def _write(
    out: Path,
    model: nn.Module,
    opt: dict[str, Any],
    rngs: list[torch.Tensor],
    state: dict[str, Any],
    rank: int,
    world: int,
) -> Path:
    final = out / "checkpoints" / f"{UNCONFIRMED}step-{state['step']:06d}"
    if rank != 0:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        save_delta(model, tmp)
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
    return final


def confirm(pending: Path, keep: int, rank: int) -> Path:
    """The step after `pending` was finite: it becomes `step-N`, and only the `keep` newest stay."""
    good = pending.with_name(pending.name.removeprefix(UNCONFIRMED))
    if rank == 0:
        if good.exists():  # left by an earlier attempt at the same step
            shutil.rmtree(good)
        pending.rename(good)
        for old in _step_dirs(good.parent.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return good


def discard(pending: Path | None, rank: int) -> None:
    """Delete a checkpoint whose next step diverged, or unconfirmed ones a killed run left."""
    if rank == 0 and pending is not None:
        shutil.rmtree(pending, ignore_errors=True)


def clear_unconfirmed(out: Path, rank: int) -> None:
    for stale in (out / "checkpoints").glob(f"{UNCONFIRMED}step-*"):
        discard(stale, rank)


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
            fsdp.load_full_(t, saved[name])  # under FSDP: this rank's shard of it
    opt = optimizer.state_dict()
    if [len(g["params"]) for g in opt["param_groups"]] != [g["n_params"] for g in state["param_groups"]]:
        raise ValueError(f"{path / STATE_JSON}: optimizer layout differs from this run's configuration")
    restored: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            restored.setdefault(int(idx), {})[name] = value
    opt["state"] = fsdp.shard_optimizer_state(optimizer, restored)
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
