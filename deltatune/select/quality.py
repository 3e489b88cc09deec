"""Quality scores under a causal LM: IFD (Li et al., NAACL 2024, "From Quantity to Quality") and perplexity.

IFD = L(answer | prompt) / L(answer alone), each the mean next-token cross-entropy over the same
answer tokens. What is fed, exactly:
- with the prompt: the record tokenized as training tokenizes it (`deltatune.data.tokenize`, the
  model's chat template, segment by segment); the answer tokens are the training targets (each
  assistant message and its end-of-turn token). `tests/test_select.py` checks this equals to_sample.
- answer alone, chats: for each assistant message, only its own turn as the template renders it:
  the generation-prompt header (ChatML: "<|im_start|>assistant\\n") and the message with its
  end-of-turn token, with no system, user or earlier turn; several assistant turns are concatenated.
- answer alone, prompt/completion records: BOS (EOS when the tokenizer has no BOS) + completion + EOS.
- plain `text` records have no prompt, so IFD is undefined for them (perplexity works).
Both sequences are cut to `max_length` tokens; the answer-alone one keeps exactly the answer tokens
that survived in the with-prompt one, so the two means are over the same tokens. A record whose
answer starts beyond `max_length` gets no score.

Perplexity = exp(L(answer | prompt)). The selection keeps those nearest the median log-perplexity by
default: the highest perplexities are the noise (gibberish, an unrelated answer) and the lowest are
trivial or empty answers the model already predicts, so both ends go (as "perplexity filters" for
instruction data keep the middle); `perplexity_keep: low` keeps the lowest instead.

Outliers first: an answer that does not belong to its prompt (another record's answer, random
characters) gets no help from the prompt, so its IFD is near 1 and a plain "highest IFD" ranking
would keep it first. Such answers have a conditional loss far above the rest, so before ranking,
records whose log loss given the prompt lies more than `loss_outlier_mads` scaled median absolute
deviations above the median are dropped (`loss_outliers`, a robust z-score). That catches empty
answers and much gibberish, but not an answer copied from another record of a similar length: its
loss given the prompt is ordinary, only the prompt's help is missing. So records whose IFD lies more
than `ifd_outlier_mads` (default 1.5) scaled MADs above the median IFD go too, and only then does the
paper's rule (drop IFD > 1, keep the highest) rank what is left. Measured on the benchmark's dirty set
built with seed 1 (benchmarks/selection.py, labels known): a right answer's IFD is 0.13-0.47, an
unrelated, truncated or garbled one 0.5-1.1; after dedup the 1.5-MAD cut falls near 0.55 and the
kept quarter held 15% noise instead of 36% without it (a random quarter: 23%). On clean data the cut
costs the ~7% hardest records of a normal spread; `ifd_outlier_mads: 0` turns it off.

Speed (the scoring pass is most of a selection's time):
- all sequences of both kinds are sorted by (length, tokens) and run `batch_size` at a time, right
  padded with no attention mask (causal attention never looks right, so real tokens never see pads);
- a batch's common token prefix (the system prompt, a shared instruction) is run once and its KV
  cache repeated over the batch, so it is not recomputed per record;
- the LM head runs only on the hidden states of answer positions, gathered first, in fp32 chunks:
  no [batch, length, vocab] logits tensor ever exists;
- weights in bf16 where the CPU/GPU supports it (`precision: auto`), under torch.no_grad.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deltatune.data.packing import IGNORE_INDEX
from deltatune.data.readers import DataError
from deltatune.data.tokenize import Chat, RawText, chat_segments, stop_token_ids

MIN_SHARED_PREFIX = 4  # tokens: a shorter common prefix is not worth a separate forward
HEAD_CHUNK = 2048  # answer positions per fp32 LM-head call


@dataclass(frozen=True)
class Job:
    """One sequence to score: token ids, and labels (the id at an answer position, else -100)."""

    input_ids: list[int]
    labels: list[int]


def _until_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    end = next((i + 1 for i, t in enumerate(ids) if t in stop_ids), len(ids))
    return ids[:end] + [IGNORE_INDEX] * (len(ids) - end)


def _cut(job: Job, max_length: int, targets: int | None = None) -> Job:
    """The first `max_length` tokens, then (if `targets`) only up to the `targets`-th answer token."""
    ids, labels = job.input_ids[:max_length], job.labels[:max_length]
    if targets is not None:
        seen = 0
        for pos, label in enumerate(labels):
            seen += label != IGNORE_INDEX
            if seen == targets:
                ids, labels = ids[: pos + 1], labels[: pos + 1]
                break
    return Job(ids, labels)


def n_targets(job: Job) -> int:
    return sum(label != IGNORE_INDEX for label in job.labels[1:])


def build_jobs(
    parsed: list[Chat | RawText],
    tokenizer,
    max_length: int,
    answer_alone: bool = True,
    where: list[str] | None = None,
) -> list[tuple[Job, Job | None]]:
    """(with prompt, answer alone) per record, tokenized as the module docstring says; a record the
    chat template cannot render is a DataError naming its `where` (file:line)."""
    stop_ids = stop_token_ids(tokenizer)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    segments: list[list[tuple[str, bool]]] = []
    texts: list[str] = []
    for n, p in enumerate(parsed):
        if isinstance(p, Chat):
            try:
                segs = chat_segments(tokenizer, p.messages)
            except DataError as err:
                raise DataError(f"{where[n]}: {err}" if where else str(err)) from None
        else:
            segs = [(p.prompt, False), (p.completion, True)]
        segments.append(segs)
        texts.extend(text for text, _ in segs)
    ids = iter(tokenizer(texts, add_special_tokens=False).input_ids) if texts else iter(())
    out: list[tuple[Job, Job | None]] = []
    for p, segs in zip(parsed, segments, strict=True):
        seg_ids = [list(next(ids)) for _ in segs]
        if isinstance(p, Chat):
            full_ids, full_labels, alone_ids, alone_labels = [], [], [], []
            for k, ((_, is_target), tok) in enumerate(zip(segs, seg_ids, strict=True)):
                labels = _until_stop(tok, stop_ids) if is_target else [IGNORE_INDEX] * len(tok)
                full_ids += tok
                full_labels += labels
                if is_target:  # the header segment before it is the generation prompt
                    alone_ids += seg_ids[k - 1] + tok
                    alone_labels += [IGNORE_INDEX] * len(seg_ids[k - 1]) + labels
        else:
            if eos is None:
                raise DataError(
                    "the tokenizer has no EOS token, so a raw-text completion cannot be terminated"
                )
            # the prompt as training encodes it: with the tokenizer's own special tokens (BOS)
            prompt = list(tokenizer(p.prompt, add_special_tokens=True).input_ids)
            completion = seg_ids[1] + [eos]
            full_ids, full_labels = prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
            alone_ids, alone_labels = [start, *completion], [IGNORE_INDEX, *completion]
        full_labels[:1] = [IGNORE_INDEX]  # nothing in the sample predicts its first token
        full = _cut(Job(full_ids, full_labels), max_length)
        alone = None
        if answer_alone and not (isinstance(p, RawText) and not p.prompt):
            alone = _cut(Job(alone_ids, alone_labels), max_length, targets=max(n_targets(full), 1))
        out.append((full, alone))
    return out


def _common_prefix(rows: list[list[int]]) -> int:
    first = rows[0]
    n = min(len(r) for r in rows)
    for row in rows[1:]:
        k = 0
        while k < n and row[k] == first[k]:
            k += 1
        n = k
    return n


@torch.no_grad()
def mean_answer_losses(
    model, jobs: list[Job], batch_size: int = 32, pad_id: int = 0, done: Callable[[int], None] | None = None
) -> list[float]:
    """Mean cross-entropy over each job's answer tokens (NaN for a job with none), batched.

    `done(k)` is called after each batch with the number of jobs it finished (for a progress bar)."""
    device = next(model.parameters()).device
    backbone = model.base_model
    head = model.get_output_embeddings()
    weight = head.weight.float()
    bias = None if getattr(head, "bias", None) is None else head.bias.float()
    losses = [math.nan] * len(jobs)
    order = sorted(range(len(jobs)), key=lambda j: (len(jobs[j].input_ids), jobs[j].input_ids))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        seqs = [jobs[j].input_ids for j in rows]
        firsts = [
            next((t for t, lab in enumerate(jobs[j].labels) if lab != IGNORE_INDEX and t > 0), None)
            for j in rows
        ]
        if all(f is None for f in firsts):
            if done is not None:
                done(len(rows))
            continue
        # a shared prefix must end before the first predicted position: hidden[t-1] predicts token t
        p = min(_common_prefix(seqs), min(f for f in firsts if f is not None) - 1)
        p = p if p >= MIN_SHARED_PREFIX and len(rows) > 1 else 0
        width = max(len(s) for s in seqs) - p
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for r, j in enumerate(rows):
            n = len(seqs[r]) - p
            ids[r, :n] = torch.tensor(seqs[r][p:], dtype=torch.long)
            labels[r, :n] = torch.tensor(jobs[j].labels[p:], dtype=torch.long)
        ids, labels = ids.to(device), labels.to(device)
        if p:
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
            backbone(input_ids=ids.new_tensor(seqs[0][:p])[None], past_key_values=cache, use_cache=True)
            cache.batch_repeat_interleave(len(rows))
            hidden = backbone(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state
        else:
            hidden = backbone(input_ids=ids, use_cache=False).last_hidden_state
        keep = labels[:, 1:] != IGNORE_INDEX  # hidden[u - 1] predicts token u (u >= 1: p is before it)
        gathered, targets = hidden[:, :-1][keep], labels[:, 1:][keep]
        owners = torch.arange(len(rows), device=device)[:, None].expand_as(keep)[keep]
        per_token = torch.cat(
            [
                F.cross_entropy(
                    F.linear(gathered[i : i + HEAD_CHUNK].float(), weight, bias),
                    targets[i : i + HEAD_CHUNK],
                    reduction="none",
                )
                for i in range(0, len(targets), HEAD_CHUNK)
            ]
        )
        sums = torch.zeros(len(rows), dtype=torch.float64, device=device)
        sums.index_add_(0, owners, per_token.double())
        counts = torch.bincount(owners, minlength=len(rows))
        for r, j in enumerate(rows):
            if counts[r] > 0:
                losses[j] = float(sums[r] / counts[r])
        if done is not None:
            done(len(rows))
    return losses


def scores(
    model,
    tokenizer,
    parsed: list[Chat | RawText],
    where: list[str],
    metric: str = "ifd",
    max_length: int = 512,
    batch_size: int = 32,
    progress: bool = True,
) -> list[dict[str, float | None]]:
    """Per record: loss_with_prompt, perplexity and (for IFD) loss_answer_only and ifd; None where undefined."""
    from tqdm import tqdm

    if metric == "ifd":
        for p, w in zip(parsed, where, strict=True):
            if isinstance(p, RawText) and not p.prompt:
                raise DataError(
                    f"{w}: a 'text' record has no prompt, so IFD (answer loss with / without the prompt) "
                    "is undefined for it; use the perplexity quality score"
                )
    pairs = build_jobs(parsed, tokenizer, max_length, answer_alone=metric == "ifd", where=where)
    jobs = [job for pair in pairs for job in pair if job is not None]
    per_record = len(jobs) / max(len(parsed), 1)  # 2 sequences per record for IFD, 1 for perplexity
    bar_format = "{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"
    with tqdm(
        total=len(parsed), desc=f"score {metric}", unit="rec", disable=not progress, bar_format=bar_format
    ) as bar:
        done = lambda k: bar.update(k / per_record)  # noqa: E731 - records, not sequences, per second
        losses = iter(mean_answer_losses(model, jobs, batch_size, tokenizer.pad_token_id or 0, done))
    out = []
    for _full, alone in pairs:
        with_prompt = next(losses)
        entry: dict[str, float | None] = {"loss_with_prompt": _finite(with_prompt)}
        entry["perplexity"] = (
            _finite(math.exp(min(with_prompt, 700.0))) if math.isfinite(with_prompt) else None
        )
        if alone is not None:
            answer_only = next(losses)
            entry["loss_answer_only"] = _finite(answer_only)
            ratio = with_prompt / answer_only if answer_only > 0 else math.nan
            entry["ifd"] = _finite(ratio)
        out.append(entry)
    return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def high_outliers(values: dict[int, float], mads: float) -> set[int]:
    """Keys whose value exceeds median + mads * 1.4826 * MAD (a robust z-score); none when mads is 0,
    with fewer than 3 values, or when the MAD is 0 (no scale to measure against)."""
    if mads <= 0 or len(values) < 3:
        return set()
    median = statistics.median(values.values())
    mad = 1.4826 * statistics.median(abs(v - median) for v in values.values())
    if mad == 0:
        return set()
    return {k for k, v in values.items() if (v - median) / mad > mads}


def loss_outliers(losses: dict[int, float], mads: float) -> set[int]:
    """Keys whose log loss lies more than `mads` scaled MADs above the median log loss."""
    return high_outliers({k: math.log(max(v, 1e-12)) for k, v in losses.items()}, mads)
