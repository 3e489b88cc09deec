"""Self-rehearsal: the base model's own answers to general prompts, mixed into every training step.

Fine-tuning on one task can make a model answer everything in that task's style (a model tuned on
prose biographies answers "Answer with the city name only." with prose). Training on the base
model's own answers to general prompts as well keeps those behaviours in the loss
(self-rehearsal / self-distillation: "Selective Self-Rehearsal", "Selective Self-to-Supervised
Fine-Tuning"). Opt-in: `rehearsal: 0.25` makes about a quarter of every optimizer step rehearsal.

1. Before training, the base model (no delta yet) answers the prompts (`rehearsal_prompts`, default
   the 64 shipped general prompts in data/general/prompts.jsonl, disjoint from the questions that
   measure forgetting) greedily, batched. The answers are cached in the run directory
   (rehearsal.json) and reused on resume; in DDP rank 0 generates and broadcasts them, so every
   rank trains on the same.
2. The (prompt, base answer) chats are tokenized like any chat sample (loss on the answer and its
   end-of-turn token) and packed into their OWN rows, never sharing a row with task samples. An
   answer cut off by `rehearsal_max_new_tokens` keeps its tokens as targets but not the end-of-turn
   token, so the model is not taught to stop where the cut fell.
3. "Share of each step" is the share of the step's target tokens, which is the share of its loss
   and gradient (the loss is normalised by the step's target tokens). Packing fixes the rows, so it
   is reached through the share of rows: with d_t and d_r the mean target tokens per task row and
   per rehearsal row, a share r of target tokens needs a share q = r*d_t / (r*d_t + (1-r)*d_r) of
   rows. Step s takes k_s = c(s+1) - c(s) rehearsal rows, c(s) = floor(s * rows_per_step * q + 0.5),
   and the rest task rows, so over any run of steps the rehearsal rows are within half a row of q
   (with 4 rows per step and q = 0.25 every step has exactly one). Each stream (task rows,
   rehearsal rows) is read in its own seeded permutation, reshuffled every epoch of that stream. The
   summary reports the realised share of rows and of target tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from deltatune.data import IGNORE_INDEX, DataError, PackedRows, PackStats, pack, stop_token_ids, to_sample
from deltatune.data.tokenize import Prompt
from deltatune.formats import read_json, write_json
from deltatune.train.config import ConfigError
from deltatune.train.cost import GENERAL_PROMPTS
from deltatune.train.evaluate import generations, read_prompts

REHEARSAL_FILE = "rehearsal.json"


def rehearsal_rows_before(step: int, rows_per_step: int, row_share: float) -> int:
    """c(step): rehearsal rows used by the optimizer steps before `step`."""
    return math.floor(step * rows_per_step * row_share + 0.5)


def row_share(share: float, task_density: float, rehearsal_density: float) -> float:
    """The share of rows that makes `share` of the target tokens rehearsal (densities: targets per row)."""
    if share == 0:
        return 0.0
    return share * task_density / (share * task_density + (1 - share) * rehearsal_density)


def _density(rows: PackedRows) -> float:
    return float((rows.labels[:, 1:] != IGNORE_INDEX).sum()) / max(rows.input_ids.shape[0], 1)


def _stream(start: int, count: int, n: int, seed: int) -> list[int]:
    """Items [start, start+count) of the endless sequence of seeded permutations of range(n)."""
    out: list[int] = []
    while len(out) < count:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.extend(perm[offset : offset + count - len(out)].tolist())
    return out


def _sum_stats(a: PackStats, b: PackStats) -> PackStats:
    return PackStats(**{k: getattr(a, k) + getattr(b, k) for k in vars(a)})


def _sample_record(prompt: Prompt, answer: str) -> dict[str, Any]:
    if isinstance(prompt, str):
        return {"prompt": prompt, "completion": answer}
    return {"messages": [*prompt, {"role": "assistant", "content": answer}]}


def rehearsal_sample(tokenizer, prompt: Prompt, answer: str, finished: bool, train_on_prompt: bool = False):
    """The training sample of one base answer; a cut-off answer (not `finished`) has no stop target."""
    sample = to_sample(_sample_record(prompt, answer), tokenizer, train_on_prompt)
    if not finished:
        stops = set(stop_token_ids(tokenizer))
        last = max((i for i, t in enumerate(sample.labels) if t != IGNORE_INDEX), default=None)
        if last is not None and sample.labels[last] in stops:
            sample.labels[last] = IGNORE_INDEX
    return sample


@dataclass
class RehearsalMix:
    """The training rows (task rows, then rehearsal rows) and which of them each step takes."""

    rows: PackedRows
    task_rows: int
    rehearsal_rows: int
    share: float  # of each step's target tokens, asked for
    row_share: float  # of each step's rows, which gives `share` of target tokens on average
    record: dict[str, Any]  # rehearsal.json
    fingerprint: str  # of the rehearsal rows, kept in checkpoints

    def rows_for_step(self, step: int, rows_per_step: int, seed: int) -> torch.Tensor:
        """Global row indices of optimizer step `step`: its task rows, then its rehearsal rows."""
        done = rehearsal_rows_before(step, rows_per_step, self.row_share)
        k = rehearsal_rows_before(step + 1, rows_per_step, self.row_share) - done
        task = _stream(step * rows_per_step - done, rows_per_step - k, self.task_rows, seed)
        rehearsal = _stream(done, k, self.rehearsal_rows, seed + 1)
        return torch.tensor(task + [self.task_rows + i for i in rehearsal], dtype=torch.long)

    def summary(self, steps: int, rows_per_step: int, seed: int) -> dict[str, Any]:
        """The realised share of rows and of target tokens over `steps` optimizer steps."""
        targets = self.rows.labels[:, 1:] != -100
        rows = total = rehearsed = 0
        for step in range(steps):
            idx = self.rows_for_step(step, rows_per_step, seed)
            counts = targets[idx].sum(dim=1)
            is_rehearsal = idx >= self.task_rows
            rows += int(is_rehearsal.sum())
            total += int(counts.sum())
            rehearsed += int(counts[is_rehearsal].sum())
        answers = self.record["answers"]
        return {
            "share": self.share,
            "prompts": len(answers),
            "cut_off": sum(not a["finished"] for a in answers),  # at rehearsal_max_new_tokens
            "rows": self.rehearsal_rows,
            "planned_row_share": self.row_share,
            "row_share": rows / max(steps * rows_per_step, 1),
            "target_token_share": rehearsed / max(total, 1),
            "cache": REHEARSAL_FILE,
        }

    def save(self, out: Path) -> None:
        write_json(out / REHEARSAL_FILE, self.record)


class Rehearsal:
    """Reads the prompts when the config is checked (a bad file fails before anything runs); `mix`
    later, on the loaded base model, answers them and builds the mixed rows."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.source = Path(cfg.rehearsal_prompts) if cfg.rehearsal_prompts else GENERAL_PROMPTS
        self.prompts = read_prompts(self.source)
        blob = json.dumps({"prompts": self.prompts, "max_new_tokens": cfg.rehearsal_max_new_tokens})
        self.key = hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _answers(self, model, tokenizer, out: Path, resume_from: Path | None, rank: int) -> dict[str, Any]:
        cache = out / REHEARSAL_FILE
        if resume_from is not None and cache.is_file():
            record = read_json(cache)
            if record.get("key") != self.key:
                raise ConfigError(
                    f"config key 'rehearsal_prompts': {self.source} or rehearsal_max_new_tokens changed "
                    f"since {out} cached its rehearsal answers ({cache}); start a new run"
                )
            return record
        record = None
        if rank == 0:
            found = generations(
                model,
                tokenizer,
                self.prompts,
                self.cfg.rehearsal_max_new_tokens,
                batch_size=16,
                desc="rehearsal (base answers)",
            )
            record = {
                "key": self.key,
                "source": str(self.source),
                "max_new_tokens": self.cfg.rehearsal_max_new_tokens,
                "answers": [
                    {"prompt": p, "answer": g.text, "finished": g.finished}
                    for p, g in zip(self.prompts, found, strict=True)
                ],
            }
        if dist.is_initialized():  # every rank trains on rank 0's answers
            box = [record]
            dist.broadcast_object_list(box, src=0)
            record = box[0]
        return record

    def mix(
        self,
        model,
        tokenizer,
        train_rows: PackedRows,
        out: Path,
        resume_from: Path | None = None,
        rank: int = 0,
    ) -> RehearsalMix:
        """Base answers (generated, or the run's cache on resume) packed into rows after `train_rows`."""
        from deltatune.train.resume import STATE_JSON, data_fingerprint

        record = self._answers(model, tokenizer, out, resume_from, rank)
        samples = [
            rehearsal_sample(tokenizer, a["prompt"], a["answer"], a["finished"], self.cfg.train_on_prompt)
            for a in record["answers"]
        ]
        rows = pack(samples, self.cfg.max_seq_len, tokenizer.pad_token_id)
        if rows.stats.rows == 0:
            raise DataError(
                f"{self.source}: every rehearsal sample loses its answer to truncation at max_seq_len "
                f"{self.cfg.max_seq_len}"
            )
        fingerprint = data_fingerprint(rows.input_ids, rows.labels)
        if resume_from is not None:
            saved = read_json(resume_from / STATE_JSON).get("rehearsal_fingerprint")
            if saved is not None and saved != fingerprint:
                raise ConfigError(
                    f"config key 'resume': the rehearsal data differ from those {resume_from} was "
                    f"trained on ({out / REHEARSAL_FILE} was edited or regenerated); start a new run"
                )
        combined = PackedRows(
            input_ids=torch.cat([train_rows.input_ids, rows.input_ids]),
            labels=torch.cat([train_rows.labels, rows.labels]),
            position_ids=torch.cat([train_rows.position_ids, rows.position_ids]),
            stats=_sum_stats(train_rows.stats, rows.stats),
        )
        return RehearsalMix(
            rows=combined,
            task_rows=train_rows.input_ids.shape[0],
            rehearsal_rows=rows.input_ids.shape[0],
            share=self.cfg.rehearsal,
            row_share=row_share(self.cfg.rehearsal, _density(train_rows), _density(rows)),
            record=record,
            fingerprint=fingerprint,
        )
