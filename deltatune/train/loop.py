"""The training loop, top to bottom. No trainer framework: read `run` and you have read it all.

    load base ─► eval "before" ─► attach delta ─► pack data ─► for step: micro-batches ─► AdamW ─► log / ckpt
                                                                                                       │
                              summary.json, metrics.jsonl, loss.png, adapter/ ◄─ eval "after" ◄────────┘

Choices that matter for speed and memory (see README for measurements):
- frozen base weights are held in bf16 when the CPU/GPU supports it; trainable weights stay fp32 and
  the forward runs under bf16 autocast, so nothing is re-cast per step but the small delta
  (`base_dtype: fp32` keeps fp32 master weights under autocast instead, as peft + Trainer do);
- the loss is computed only at target positions, in chunks of `loss_chunk_tokens` whose logits are
  recomputed in the backward (checkpointed), so fp32 logits for the whole batch never exist;
- samples are packed into full rows, and attention runs per sample (attention.py), so a row costs
  what its samples cost: no attention across samples and no quadratic waste on long rows.

Gradient accumulation normalises by the real number of target tokens in the whole optimizer step
(summed over micro-batches and DDP ranks), so the result does not depend on how the step is split.
That is also what makes DDP training equal single-process training at the same global batch.

The "before" and "after" evaluations are cost.RunEvaluation: exact match per eval set and, with
`cost_metrics`, what the fine-tuning cost (perplexity, forgetting, calibration); they end in
summary.json's `eval` table and report.md. `rehearsal` adds the base model's own answers to general
prompts as rows of their own, a set share of every step (rehearsal.py).

Nothing is written into the run directory before every check has passed (`resume.plan`, the data,
the model, the checkpoint). A checkpoint is "good" only once its state has proved itself: the
parameters and AdamW moments are checked finite after every optimizer step, and a checkpoint written
at step s stays "unconfirmed" until the forward and backward of step s+1 with its weights gave a
finite loss and gradient norm (resume.confirm / resume.discard). Finite but exploded weights (a huge
learning rate puts lora_B near 1e30 in one step) are thus never kept as the last good checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from deltatune import attention, quant
from deltatune.deltas import add_delta, delta_report, named_delta_parameters
from deltatune.deltas.base import aux_loss
from deltatune.formats import write_json
from deltatune.formats.peft import save_delta
from deltatune.models import load_model, load_tokenizer
from deltatune.train import fsdp, resume
from deltatune.train.config import TrainConfig, build_config
from deltatune.train.cost import RunEvaluation
from deltatune.train.rehearsal import Rehearsal
from deltatune.train.report import write_report


class TrainingDiverged(RuntimeError):
    """The loss, gradient, parameters or optimizer state became NaN/inf; good checkpoints are kept."""


def _diverged(what: str, step: int, out: Path) -> TrainingDiverged:
    good = resume.latest(out)
    kept = (
        f"the last good checkpoint is {good} (its adapter loads with --adapter)"
        if good is not None
        else "no checkpoint was kept: none had passed a finite step"
    )
    return TrainingDiverged(f"{what} at step {step}; stopping. {kept}. Lower --learning-rate in a new run")


def nonfinite_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """The first trainable parameter or optimizer moment holding NaN/inf (by name), else None."""
    named = [(n, p) for n, p in named_delta_parameters(model).items() if p.requires_grad]
    tensors = [(n, p) for n, p in named]
    for n, p in named:
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value) and value.is_floating_point():
                tensors.append((f"{n} (optimizer {key})", value))
    if not tensors:
        return None
    finite = torch.stack([fsdp.local(t).detach().isfinite().all() for _, t in tensors])
    finite = fsdp.all_ranks_true(finite, model)  # FSDP: each rank checked its own shards
    if bool(finite.all()):  # one device sync for all of them
        return None
    return tensors[int((~finite).nonzero()[0, 0])][0]


# --- the loss ---------------------------------------------------------------------------------------


def _chunk_loss(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


class CausalLMLoss(nn.Module):
    """Summed next-token cross-entropy over target tokens, never holding all logits at once.

    Input deltas must therefore act inside the backbone (`model.base_model`), not in the LM head call.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        packed = {}
        if self.model.config._attn_implementation == attention.NAME:
            packed["packed_layout"] = attention.packed_layout(position_ids)
        hidden = self.model.base_model(
            input_ids=input_ids, position_ids=position_ids, use_cache=False, **packed
        )
        hidden = hidden.last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        keep = targets != -100
        hidden, targets = hidden[keep], targets[keep]
        head = self.model.get_output_embeddings()
        total = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, targets.numel(), self.chunk_tokens):
            part = slice(i, i + self.chunk_tokens)
            total = total + checkpoint(_chunk_loss, hidden[part], head, targets[part], use_reentrant=False)
        return total


# --- setup helpers ----------------------------------------------------------------------------------


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); starts a process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{local_rank}" if device_name == "cuda" else device_name)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return (dist.get_rank() if world > 1 else 0), world, device


def all_sum(value: float | int, device: torch.device) -> float:
    if not dist.is_initialized():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """LoRA+: the "up" factors (`Method.lora_plus_params`, LoRA's B) learn `lora_plus_ratio` times faster."""
    from deltatune.deltas import get_method

    ups = get_method(model.delta_method).lora_plus_params
    params = [(n, p) for n, p in named_delta_parameters(model).items() if p.requires_grad]
    fast = [p for n, p in params if any(u in n for u in ups)]
    slow = [p for n, p in params if not any(u in n for u in ups)]
    groups = [{"params": slow, "lr": cfg.learning_rate}]
    if fast:
        groups.append({"params": fast, "lr": cfg.learning_rate * cfg.lora_plus_ratio})
    for g in groups:
        g["initial_lr"] = g["lr"]
    return groups


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine / linear decay to 10% / 0, or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def rows_for_step(step: int, n_rows: int, rows_per_step: int, seed: int) -> torch.Tensor:
    """Global row indices of an optimizer step: a fresh seeded permutation every epoch."""
    start = step * rows_per_step
    out = []
    while len(out) < rows_per_step:
        epoch, offset = divmod(start + len(out), n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.extend(perm[offset : offset + rows_per_step - len(out)].tolist())
    return torch.tensor(out)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def build_data(cfg: TrainConfig, tokenizer):
    """Packed train rows, packed eval rows (for eval loss) and exact-match eval items."""
    from deltatune.data import DataError, load_samples, pack, task_samples
    from deltatune.train.evaluate import eval_items_from_file, eval_items_from_task

    if cfg.select is not None:  # `deltatune select` on the training records first (select/)
        from deltatune.select import training_samples

        train = training_samples(cfg, tokenizer)
    elif cfg.data:
        train = load_samples(cfg.data, tokenizer, cfg.train_on_prompt)
    else:
        train = task_samples(cfg.task, "train", cfg.train_samples, tokenizer, seed=cfg.seed)
    eval_samples, items = [], {}
    if cfg.eval_data:
        eval_samples = load_samples(cfg.eval_data, tokenizer, cfg.train_on_prompt)
        items[Path(cfg.eval_data).name] = eval_items_from_file(cfg.eval_data)[: cfg.eval_samples or None]
    elif cfg.task and cfg.eval_samples:
        eval_samples = task_samples(cfg.task, "test", cfg.eval_samples, tokenizer, seed=cfg.seed)
        items[cfg.task] = eval_items_from_task(cfg.task, cfg.eval_samples, seed=cfg.seed)
    pad = tokenizer.pad_token_id
    eval_rows = pack(eval_samples, cfg.max_seq_len, pad) if eval_samples else None
    train_rows = pack(train, cfg.max_seq_len, pad, order=cfg.packing, seed=cfg.seed)
    if train_rows.stats.rows == 0:  # every sample lost all its target tokens to truncation
        source = cfg.data or f"task {cfg.task}"
        raise DataError(
            f"{source}: all {train_rows.stats.dropped_samples} samples lose every target token to "
            f"truncation at max_seq_len {cfg.max_seq_len}, so nothing is left to train on; raise max_seq_len"
        )
    return train_rows, (eval_rows if eval_rows is not None and eval_rows.stats.rows else None), items


@torch.no_grad()
def eval_loss(loss_fn: CausalLMLoss, rows, batch_size: int, device: torch.device, autocast: dict) -> float:
    loss_fn.model.eval()
    total, count = 0.0, 0
    for i in tqdm(range(0, rows.input_ids.shape[0], batch_size), desc="eval loss", unit="batch", leave=False):
        batch = [t[i : i + batch_size].to(device) for t in (rows.input_ids, rows.position_ids, rows.labels)]
        with torch.autocast(**autocast):
            total += loss_fn(*batch).item()
        count += int((batch[2][:, 1:] != -100).sum())
    return total / max(count, 1)


def plot_metrics(metrics_file: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    train = [r for r in rows if "loss" in r]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# --- the run --------------------------------------------------------------------------------------


def run(config: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    cfg = config if isinstance(config, TrainConfig) else build_config(dict(config))
    rank, world, device = init_distributed(cfg.device)
    is_main = rank == 0
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and bf16_supported(device))
    autocast = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": use_bf16}
    out = Path(cfg.output or f"runs/{datetime.now():%Y%m%d-%H%M%S}-{cfg.method}")
    resume_from = resume.plan(out, cfg)  # fresh or resumed, checked before anything is loaded or written
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    train_rows, eval_rows, items = build_data(cfg, tokenizer)  # bad data fails before anything is written
    evaluation = RunEvaluation(cfg, tokenizer, items, eval_rows)  # reads perplexity_data
    rehearsing = Rehearsal(cfg) if cfg.rehearsal else None  # reads the rehearsal prompts
    fingerprint = resume.data_fingerprint(train_rows.input_ids, train_rows.labels)
    if resume_from is not None:
        resume.check_data(resume_from, fingerprint)
    if is_main:
        stats = train_rows.stats
        print(
            f"data: {stats.samples} samples -> {stats.rows} rows of {cfg.max_seq_len} tokens, "
            f"{stats.efficiency:.1%} filled, {stats.truncated_samples} truncated, {stats.dropped_samples} "
            "dropped (no target token left after truncation)"
        )
    model = load_model(
        cfg.model,
        dtype=torch.bfloat16 if use_bf16 and cfg.base_dtype == "bf16" else torch.float32,
        device=fsdp.LOAD_DEVICE if cfg.fsdp else device,
        quantize=cfg.quantize,
    )
    attention.use_packed_attention(model)  # per-sample attention for packed rows (see attention.py)

    t_eval = time.perf_counter()
    before = evaluation.before(model, autocast) if is_main and not resume_from else {}
    before_seconds = time.perf_counter() - t_eval
    mix = None  # rehearsal: the base model's own answers, in rows of their own (train/rehearsal.py)
    if rehearsing is not None:
        mix = rehearsing.mix(model, tokenizer, train_rows, out, resume_from, rank)
        train_rows = mix.rows

    base_params = quant.parameter_count(model)  # a quantized weight counts as the dense one it stands for
    base_bytes = quant.base_weight_bytes(model)
    add_delta(model, cfg.method, cfg.delta_config())
    for p in named_delta_parameters(model).values():
        p.data = p.data.float()  # trainable weights stay fp32 even on a bf16 base
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_fn = CausalLMLoss(model, cfg.loss_chunk_tokens)
    if cfg.fsdp:  # before the optimizer: sharding replaces the parameters (train/fsdp.py)
        fsdp.shard(loss_fn, device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    trainable = sum(p.numel() for p in named_delta_parameters(model).values() if p.requires_grad)

    start_step, tokens_seen, train_seconds = 0, 0, 0.0
    if resume_from is not None:
        state = resume.load(resume_from, model, optimizer, rank)
        start_step, tokens_seen, train_seconds = state["step"], state["tokens_seen"], state["train_seconds"]
        before = state["eval_before"]
        if is_main:
            print(f"resumed from {resume_from}")
    metrics_file = out / "metrics.jsonl"
    if is_main:  # every check has passed: the run directory is written from here on
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", cfg.to_dict())
        if mix is not None:
            mix.save(out)
        resume.truncate_metrics(metrics_file, start_step)
        resume.clear_unconfirmed(out, rank)
    train_module = loss_fn
    if world > 1 and not cfg.fsdp:
        train_module = nn.parallel.DistributedDataParallel(
            loss_fn, device_ids=[device] if device.type == "cuda" else None
        )

    rows_per_step = cfg.batch_size * cfg.grad_accum * world
    pending: Path | None = None  # the checkpoint of the last step, not yet proven good
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not is_main, desc="train", unit="step")
    step, last_loss = start_step, float("nan")
    run_start = time.perf_counter()
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor(step, cfg)
        idx = (
            rows_for_step(step, train_rows.input_ids.shape[0], rows_per_step, cfg.seed)
            if mix is None
            else mix.rows_for_step(step, rows_per_step, cfg.seed)
        )
        mine = idx[rank * cfg.batch_size * cfg.grad_accum : (rank + 1) * cfg.batch_size * cfg.grad_accum]
        # every rank knows the step's global rows, so the token counts need no communication
        step_targets = int((train_rows.labels[idx][:, 1:] != -100).sum())
        step_tokens = int((train_rows.input_ids[idx] != tokenizer.pad_token_id).sum())
        loss_sum, aux_sum = 0.0, None
        for micro in range(cfg.grad_accum):
            sel = mine[micro * cfg.batch_size : (micro + 1) * cfg.batch_size]
            batch = [
                t[sel].to(device) for t in (train_rows.input_ids, train_rows.position_ids, train_rows.labels)
            ]
            sync_now = micro == cfg.grad_accum - 1 or world == 1 or cfg.fsdp  # FSDP: reduce-scatter each
            ctx = train_module.no_sync() if not sync_now else torch.enable_grad()
            with ctx, torch.autocast(**autocast):
                loss = train_module(*batch)
                # DDP averages gradients over ranks; scale so the sum over all target tokens is / step_targets
                total = loss * world / step_targets
                aux = aux_loss(model)  # e.g. a router's load balancing, left on its layers by this forward
                if aux is not None:
                    # a per-micro-batch mean: / grad_accum here and DDP's average over ranks make the
                    # step's aux the mean over its micro-batches (packed rows: equal tokens in each)
                    total = total + aux / cfg.grad_accum
                    aux_sum = (aux_sum or 0.0) + aux.item()
                total.backward()
            loss_sum += loss.item()
        last_loss = all_sum(loss_sum, device) / step_targets
        last_aux = None if aux_sum is None else all_sum(aux_sum, device) / (cfg.grad_accum * world)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], cfg.max_grad_norm or float("inf")
        ).item()
        if not (math.isfinite(last_loss) and math.isfinite(grad_norm)):
            bar.close()
            resume.discard(pending, rank)
            raise _diverged(f"loss became {last_loss} (grad norm {grad_norm})", step + 1, out)
        if pending is not None:  # its weights gave a finite loss and gradient: a good checkpoint
            resume.confirm(pending, cfg.keep_checkpoints, rank)
            pending = None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bad = nonfinite_state(model, optimizer)
        if bad is not None:
            bar.close()
            raise _diverged(f"{bad} became non-finite", step, out)
        tokens_seen += step_tokens
        train_seconds += time.perf_counter() - t0
        tps = tokens_seen / max(train_seconds, 1e-9)
        bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tps:,.0f}")
        bar.update(1)
        record: dict[str, Any] = {}
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            record = {
                "step": step,
                "loss": last_loss,
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm,
                "tokens": tokens_seen,
                "tokens_per_second": tps,
            }
            if last_aux is not None:
                record["aux_loss"] = last_aux
        if eval_rows is not None and cfg.eval_every and step % cfg.eval_every == 0:
            record.update(
                step=step, eval_loss=eval_loss(loss_fn, eval_rows, cfg.batch_size, device, autocast)
            )
        if is_main and record:
            with metrics_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            state = {
                "step": step,
                "tokens_seen": tokens_seen,
                "train_seconds": train_seconds,
                "eval_before": before,
                "data_fingerprint": fingerprint,
            }
            if mix is not None:
                state["rehearsal_fingerprint"] = mix.fingerprint
            pending = resume.save(out, model, optimizer, state, rank, world)  # confirmed by step + 1
    bar.close()

    fsdp.gather_model_on_rank0(model, rank)  # FSDP: rank 0 saves and evaluates the whole model
    summary: dict[str, Any] = {}
    if is_main:
        save_delta(model, out / "adapter", base_model=cfg.model)
        final_eval_loss = (
            eval_loss(loss_fn, eval_rows, cfg.batch_size, device, autocast) if eval_rows else None
        )
        t_eval = time.perf_counter()
        after = evaluation.after(model, autocast, before, final_eval_loss)
        after_seconds = time.perf_counter() - t_eval
        if final_eval_loss is not None:
            with metrics_file.open("a") as f:
                f.write(json.dumps({"step": step, "eval_loss": final_eval_loss}) + "\n")
        plot_metrics(metrics_file, out / "loss.png")
        report = delta_report(model)
        if report.get("router_load"):
            from deltatune.route.mixlora import plot_router_load

            plot_router_load(report["router_load"], out / "router_load.png")
        summary = {
            "method": cfg.method,
            "model": cfg.model,
            "trainable_params": trainable,
            "total_params": base_params,  # the base model's; trainable_percent is relative to it
            "trainable_percent": 100.0 * trainable / base_params,
            "steps": step,
            "tokens_per_second": tokens_seen / max(train_seconds, 1e-9),
            "train_tokens": tokens_seen,
            "train_seconds": train_seconds,
            "wall_seconds": time.perf_counter() - run_start,
            "eval_seconds": {"before": before_seconds, "after": after_seconds},  # exact match + cost metrics
            "peak_memory_bytes": peak_memory_bytes(device),
            "final_loss": last_loss,
            "eval_loss": final_eval_loss,
            "eval": evaluation.table(before, after),
            "precision": "bf16" if use_bf16 else "fp32",
            "base_dtype": cfg.base_dtype if use_bf16 else "fp32",
            "quantize": cfg.quantize,
            "base_weight_bytes": base_bytes["total"],
            "base_linear_weight_bytes": base_bytes["linear"],
            "world_size": world,
            "packing": vars(train_rows.stats) | {"efficiency": train_rows.stats.efficiency},
            "output": str(out),
        }
        if report:
            summary["delta_report"] = report
        if mix is not None:
            summary["rehearsal"] = mix.summary(step, rows_per_step, cfg.seed)
        evaluation.write(out, before, after)  # reliability.png, general_answers.json
        write_report(out, summary)
        write_json(out / "summary.json", summary)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary
