"""What fine-tuning cost: perplexity, forgetting (KL and answer drift) and calibration.

- **perplexity**: exp(mean next-token loss over target tokens) on a held-out file: assistant tokens
  of chats, completions of prompt/completion records, every token (+ EOS) of plain text, exactly as
  training masks them (data/tokenize.py). Samples are packed and scored with the training loss
  (`loop.CausalLMLoss`: per-sample attention, the LM head in chunks).
- **forgetting KL**: KL(base || tuned) of the next-token distributions, averaged over every token
  position of a fixed English text shipped with the package (data/general/text.txt, ~2.2k tokens,
  cut into windows of 256). The base distribution is the same model with the delta switched off
  (`deltas.disable_delta`), so any delta works without a second copy; a delta folded into the
  weights (dense, compressed) needs the base model passed as `base`. Logits are made from the
  hidden states a chunk of positions at a time, so fp32 full-vocabulary logits never exist for more
  than `chunk_tokens` positions of each model at once.
- **general exact match**: the share of fixed general questions (data/general/questions.jsonl, 32
  short factual and format-following questions) on which the tuned model's greedy answer equals the
  BASE model's own greedy answer (`tasks.exact_match`: case, spacing and a trailing period aside).
  The references are the base's outputs, not shipped answers: the 135M default base answers in
  sentences ("The capital of France is Paris.") and so gets 0 of 32 right under a strict one-word
  check, which would leave no question to keep; the base's own answers are defined for every model
  and any change in them (content or format) is drift. They are computed with the delta disabled
  and cached per model (`answer_cache_path`; a training run keeps them in its checkpoints).
- **calibration**: expected calibration error of the first-token probability of the model's own
  greedy answer (captured during generation, so free) against that answer's exact match, in 10
  equal-width bins: ECE = sum_b |B|/n * |acc(B) - conf(B)|; and a reliability diagram.

Every pass shows a progress bar. `RunEvaluation` runs all of it before and after a training run.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from deltatune.data.packing import PackedRows
from deltatune.data.tokenize import Prompt, encode_text
from deltatune.deltas import disable_delta
from deltatune.train.evaluate import generate, read_prompts

GENERAL_DIR = Path(__file__).resolve().parents[1] / "data" / "general"
GENERAL_TEXT = GENERAL_DIR / "text.txt"
GENERAL_QUESTIONS = GENERAL_DIR / "questions.jsonl"
GENERAL_PROMPTS = (
    GENERAL_DIR / "prompts.jsonl"
)  # for rehearsal (train/rehearsal.py), disjoint from the questions
GENERAL_MAX_NEW_TOKENS = 24
BINS = 10


# --- perplexity -------------------------------------------------------------------------------------


@torch.no_grad()
def target_nll(
    model, rows: PackedRows, batch_size: int = 4, chunk_tokens: int = 1024, desc: str = "loss"
) -> tuple[float, int]:
    """(summed next-token loss over target tokens, number of target tokens) of packed rows."""
    from deltatune.train.loop import CausalLMLoss

    loss_fn = CausalLMLoss(model, chunk_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = rows.input_ids.shape[0]
    try:
        for i in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=n == 0):
            batch = [
                t[i : i + batch_size].to(device) for t in (rows.input_ids, rows.position_ids, rows.labels)
            ]
            total += loss_fn(*batch).item()
            count += int((batch[2][:, 1:] != -100).sum())
    finally:
        model.train(was_training)
    return total, count


def perplexity(
    model, tokenizer, path: str | Path, max_seq_len: int = 512, batch_size: int = 4, chunk_tokens: int = 1024
) -> dict[str, float]:
    """{"perplexity", "nll" (nats per target token), "tokens"} on a held-out data file."""
    from deltatune.data import DataError, load_samples, pack

    samples = load_samples(path, tokenizer)
    rows = pack(samples, max_seq_len, tokenizer.pad_token_id)
    nll, count = target_nll(model, rows, batch_size, chunk_tokens, desc="perplexity")
    if count == 0:
        raise DataError(f"{path}: no target tokens to score")
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}


# --- forgetting: KL on general text ------------------------------------------------------------------


def general_windows(tokenizer, text: str | None = None, window: int = 256) -> list[list[int]]:
    """The general text's tokens in consecutive windows (the last may be shorter)."""
    ids = encode_text(tokenizer, GENERAL_TEXT.read_text() if text is None else text)
    return [ids[i : i + window] for i in range(0, len(ids), window)]


def _logsumexp_and_exp(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    top = z.amax(-1, keepdim=True)
    e = (z - top).exp_()
    total = e.sum(-1, keepdim=True)
    return top + total.log(), e, total


def kl_sum(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """sum over rows of KL(softmax(p) || softmax(q)), as sum_v p_v (z_p - z_q)_v - lse(z_p) + lse(z_q):
    two exponentials per element instead of log_softmax twice and kl_div's third (the vocabulary
    is 49k wide, so this elementwise work is most of the pass); exactly 0 when p == q."""
    lse_p, e_p, sum_p = _logsumexp_and_exp(p_logits)
    lse_q, _, _ = _logsumexp_and_exp(q_logits)
    expected_gap = e_p.mul_(p_logits - q_logits).sum(-1, keepdim=True) / sum_p
    return (expected_gap - lse_p + lse_q).sum()


def _as_base(model, base=None):
    """A context yielding the base model: `base` itself, or `model` with its delta switched off."""
    return disable_delta(model) if base is None else nullcontext(base)


def _hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


@torch.no_grad()
def forgetting_kl(
    model,
    tokenizer,
    text: str | None = None,
    base=None,
    window: int = 256,
    batch_size: int = 4,
    chunk_tokens: int = 256,
) -> dict[str, float]:
    """{"kl": mean KL(base || tuned) in nats per position, "tokens"} on the general text.

    `base` is the base model when the delta is not a switchable layer (merged into the weights);
    without it the base is `model` under `disable_delta`."""
    windows = general_windows(tokenizer, text, min(window, model.config.max_position_embeddings))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    groups: dict[int, list[list[int]]] = {}
    for w in windows:
        groups.setdefault(len(w), []).append(w)
    batches = [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    total, count = 0.0, 0
    try:
        for rows in tqdm(batches, desc="forgetting KL", unit="batch"):
            ids = torch.tensor(rows, device=device)
            tuned_hidden = _hidden(model, ids).flatten(0, 1)
            with _as_base(model, base) as reference:
                base_hidden = _hidden(reference, ids).flatten(0, 1)
            for i in range(0, tuned_hidden.shape[0], chunk_tokens):
                part = slice(i, i + chunk_tokens)
                tuned_logits = model.get_output_embeddings()(tuned_hidden[part]).float()
                with _as_base(model, base) as reference:
                    base_logits = reference.get_output_embeddings()(base_hidden[part]).float()
                total += kl_sum(base_logits, tuned_logits).item()
                count += tuned_logits.shape[0]
    finally:
        model.train(was_training)
    return {"kl": total / max(count, 1), "tokens": count}


# --- forgetting: exact match of the base's own answers -----------------------------------------------


def general_questions(path: str | Path | None = None) -> list[Prompt]:
    return read_prompts(GENERAL_QUESTIONS if path is None else path)


def base_answers(
    model,
    tokenizer,
    questions: list[Prompt],
    base=None,
    max_new_tokens: int = GENERAL_MAX_NEW_TOKENS,
    cache: Path | None = None,
) -> list[str]:
    """The base model's greedy answers (delta disabled, or `base`), read from / written to `cache`."""
    key = _answers_key(questions, max_new_tokens)
    if cache is not None and cache.is_file():
        try:
            stored = json.loads(cache.read_text())
            if stored.get("key") == key:
                return stored["answers"]
        except (json.JSONDecodeError, KeyError, AttributeError):
            pass  # a damaged cache is recomputed
    with _as_base(model, base) as reference:
        answers = generate(
            reference, tokenizer, questions, max_new_tokens, batch_size=32, desc="general (base)"
        )
    if cache is not None:
        from deltatune.formats import write_json

        with suppress(OSError):  # a cache that cannot be written only costs the next run this pass
            write_json(cache, {"key": key, "answers": answers})
    return answers


def _answers_key(questions: list[Prompt], max_new_tokens: int) -> str:
    blob = json.dumps({"questions": questions, "max_new_tokens": max_new_tokens}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def answer_cache_path(model_name: str, dtype: torch.dtype, quantize: str) -> Path:
    """Where a base model's general answers are cached: one file per model files, dtype and quantization."""
    from deltatune.models import cache_root, resolve

    directory = resolve(model_name).resolve()
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.glob("*.safetensors"))
    blob = json.dumps([str(directory), files, str(dtype), quantize])
    return cache_root() / "general_answers" / f"{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"


def general_exact_match(
    model, tokenizer, references: list[str], questions: list[Prompt] | None = None
) -> dict[str, Any]:
    """{"exact_match": share of questions answered as the base answered them, "n", "predictions"}."""
    from deltatune.data.tasks import exact_match

    questions = general_questions() if questions is None else questions
    if len(references) != len(questions):
        raise ValueError(f"{len(references)} reference answers for {len(questions)} questions")
    predictions = generate(
        model, tokenizer, questions, GENERAL_MAX_NEW_TOKENS, batch_size=32, desc="general (tuned)"
    )
    same = [exact_match(p, r) for p, r in zip(predictions, references, strict=True)]
    return {"exact_match": sum(same) / len(same), "n": len(same), "predictions": predictions}


# --- calibration -----------------------------------------------------------------------------------


def reliability_bins(confidence: list[float], correct: list[bool], bins: int = BINS) -> list[dict]:
    """Equal-width confidence bins [k/bins, (k+1)/bins) (the last one closed): count, mean
    confidence and accuracy of the items in each (None for an empty bin)."""
    if len(confidence) != len(correct):
        raise ValueError(f"{len(confidence)} confidences for {len(correct)} outcomes")
    members: list[list[int]] = [[] for _ in range(bins)]
    for i, c in enumerate(confidence):
        if not 0.0 <= c <= 1.0:
            raise ValueError(f"confidence {c} is not a probability")
        members[min(int(c * bins), bins - 1)].append(i)
    out = []
    for k, idx in enumerate(members):
        n = len(idx)
        out.append(
            {
                "low": k / bins,
                "high": (k + 1) / bins,
                "count": n,
                "confidence": sum(confidence[i] for i in idx) / n if n else None,
                "accuracy": sum(bool(correct[i]) for i in idx) / n if n else None,
            }
        )
    return out


def expected_calibration_error(confidence: list[float], correct: list[bool], bins: int = BINS) -> float:
    """sum over bins of |B|/n * |accuracy(B) - mean confidence(B)|."""
    if not confidence:
        raise ValueError("no items to calibrate")
    n = len(confidence)
    return sum(
        b["count"] / n * abs(b["accuracy"] - b["confidence"])
        for b in reliability_bins(confidence, correct, bins)
        if b["count"]
    )


def plot_reliability(curves: dict[str, list[dict]], out: Path) -> None:
    """A reliability diagram: accuracy against confidence per bin for each labelled set of bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deltatune.formats import atomic_write

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    for label, bins in curves.items():
        full = [b for b in bins if b["count"]]
        ax.plot([b["confidence"] for b in full], [b["accuracy"] for b in full], "o-", label=label)
        for b in full:
            ax.annotate(str(b["count"]), (b["confidence"], b["accuracy"]), fontsize=7, alpha=0.7)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("first-token probability of the answer (bin mean)")
    ax.set_ylabel("exact match (bin accuracy)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


# --- a training run's before / after evaluation ---------------------------------------------------


class RunEvaluation:
    """The before (base) and after (tuned) evaluation of a training run, on the main process.

    Exact match per eval set always; with `cost_metrics`: ECE on the same items (from the same
    generation pass), perplexity on the eval split (after: exp of the final eval loss, no extra
    pass), forgetting KL and general exact match. `perplexity_data` adds perplexity on that file
    even without `cost_metrics`. `before` returns JSON (a checkpoint keeps it for a resume,
    including the base's general answers, the references of `after`)."""

    def __init__(self, cfg, tokenizer, items: dict[str, list], eval_rows: PackedRows | None):
        from deltatune.data import load_samples, pack

        self.cfg, self.tokenizer, self.items = cfg, tokenizer, items
        self.cost = cfg.cost_metrics
        self.perplexity_rows, self.perplexity_is_eval = None, False
        if cfg.perplexity_data:  # read now: a bad file fails before anything is written
            samples = load_samples(cfg.perplexity_data, tokenizer)
            self.perplexity_rows = pack(samples, cfg.max_seq_len, tokenizer.pad_token_id)
        elif self.cost and eval_rows is not None:
            self.perplexity_rows, self.perplexity_is_eval = eval_rows, True
        self.questions = general_questions() if self.cost else []

    def _exact_match(self, model, when: str) -> tuple[dict[str, Any], list[float], list[bool]]:
        from deltatune.train.evaluate import exact_match_score

        scores, confidence, correct = {}, [], []
        for name, its in self.items.items():
            result = exact_match_score(
                model, self.tokenizer, its, self.cfg.eval_max_new_tokens, desc=f"{when}: {name}"
            )
            scores[name] = result["exact_match"]
            confidence += result["confidence"]
            correct += result["correct"]
        return scores, confidence, correct

    def _common(self, model, when: str, eval_loss: float | None = None) -> dict[str, Any]:
        out, confidence, correct = self._exact_match(model, when)
        if self.cost and confidence:
            out["ece"] = expected_calibration_error(confidence, correct)
            out["ece_bins"] = reliability_bins(confidence, correct)
        if self.perplexity_rows is not None:
            if self.perplexity_is_eval and eval_loss is not None:
                out["perplexity"] = math.exp(eval_loss)
            else:
                nll, count = target_nll(
                    model,
                    self.perplexity_rows,
                    self.cfg.batch_size,
                    self.cfg.loss_chunk_tokens,
                    desc=f"{when}: perplexity",
                )
                out["perplexity"] = math.exp(nll / max(count, 1))
        return out

    @torch.no_grad()
    def before(self, model, autocast: dict) -> dict[str, Any]:
        with torch.autocast(**autocast):
            out = self._common(model, "before")
            if self.cost:
                out["general_answers"] = base_answers(model, self.tokenizer, self.questions)
        return out

    @torch.no_grad()
    def after(
        self, model, autocast: dict, before: dict[str, Any], eval_loss: float | None = None
    ) -> dict[str, Any]:
        with torch.autocast(**autocast):
            out = self._common(model, "after", eval_loss)
            if self.cost:
                references = before.get("general_answers")
                if references is None:  # a run resumed from a checkpoint of an older deltatune
                    references = base_answers(model, self.tokenizer, self.questions)
                general = general_exact_match(model, self.tokenizer, references, self.questions)
                out["general_exact_match"] = general["exact_match"]
                out["general_answers"] = general["predictions"]
                out["forgetting_kl"] = forgetting_kl(model, self.tokenizer, chunk_tokens=256)["kl"]
        return out

    def table(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """summary.json's `eval`: {metric: {before, after}}; exact match per eval set by its name."""
        table = {name: {"before": before.get(name), "after": after[name]} for name in self.items}
        if "perplexity" in after:
            table["perplexity"] = {"before": before.get("perplexity"), "after": after["perplexity"]}
        if "forgetting_kl" in after:  # the base against itself: 0 and 1 by definition
            table["forgetting_kl"] = {"before": 0.0, "after": after["forgetting_kl"]}
            table["general_exact_match"] = {"before": 1.0, "after": after["general_exact_match"]}
        if "ece" in after:
            table["ece"] = {"before": before.get("ece"), "after": after["ece"]}
        return table

    def write(self, out: Path, before: dict[str, Any], after: dict[str, Any]) -> None:
        """reliability.png and general_answers.json (each question with the base's and tuned answer)."""
        from deltatune.formats import write_json

        curves = {
            f"{label} (ECE {d['ece']:.3f})": d["ece_bins"]
            for label, d in (("base", before), ("tuned", after))
            if "ece_bins" in d
        }
        if curves:
            plot_reliability(curves, out / "reliability.png")
        if "general_answers" in after and before.get("general_answers") is not None:
            rows = [
                {"question": q, "base": b, "tuned": t}
                for q, b, t in zip(
                    self.questions, before["general_answers"], after["general_answers"], strict=True
                )
            ]
            write_json(out / "general_answers.json", {"answers": rows})
