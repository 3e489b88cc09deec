"""Choosing the next token and turning tokens into text, per request.

Greedy rows (temperature 0) take the argmax of the whole batch at once. Sampled rows divide their
logits by the temperature, keep the smallest set of tokens whose probability reaches top_p
(nucleus sampling), and draw with their own `torch.Generator`, so a request with a seed gives the
same text whatever else shares its batch.

Any accepted temperature is numerically safe: the row's maximum is subtracted *before* dividing (in
fp64, where 1e-300 is not 0 as it is in fp32), so the scaled logits are <= 0 with the best token at
exactly 0, and a tiny temperature (1e-300) sends
every other token to -inf instead of overflowing to inf/inf = NaN. Such a temperature therefore
samples the argmax (ties aside), the limit of temperature -> 0. A row whose logits are not finite
(NaN or inf: a diverged adapter, an overflow in the model) gets an error instead of a token, for
that row alone; the other rows of the batch are untouched.

Text is produced incrementally: after each token the row's ids are decoded again (cheap for the
short completions a server returns, and always consistent with a one-shot decode), and only text
that can no longer change is released: a trailing U+FFFD (a multi-byte character cut in half) and
any suffix that could still grow into a stop string are held back until the next token decides.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


class ParamError(ValueError):
    """A request parameter the engine cannot honour; `param` names it (the API's 400 says which)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the decoder; validated here so the engine never sees nonsense."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: always generate max_tokens

    def __post_init__(self) -> None:
        checks = {
            "max_tokens": self.max_tokens >= 1,
            "temperature": 0.0 <= self.temperature <= 100.0,
            "top_p": 0.0 < self.top_p <= 1.0,
            "stop": all(isinstance(s, str) and s for s in self.stop),
            "seed": self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
        }
        bad = next((k for k, ok in checks.items() if not ok), None)
        if bad is not None:
            raise ParamError(f"invalid {bad}: {getattr(self, bad)!r}", bad)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(seed: int | None) -> torch.Generator:
    return torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the most likely tokens whose cumulative probability first reaches top_p; renormalise."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from one row of finite logits [vocab] under temperature and top-p."""
    logits = logits.double().cpu()  # generators live on the CPU; fp64 holds any float temperature
    scaled = (logits - logits.max()) / params.temperature  # <= 0, best token 0: no inf/inf at tiny T
    probs = top_p_filter(torch.softmax(scaled, dim=-1).float(), params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def choose_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> tuple[list[int], dict[int, str]]:
    """Next token per row of logits [rows, vocab]: one batched argmax, then the sampled rows one by one.

    Returns the tokens and, for rows that cannot continue, {row: why}; those rows' tokens are junk."""
    chosen = logits.argmax(-1).tolist()
    finite = torch.isfinite(logits).all(-1).tolist()
    failed = {i: "the model's logits are not finite (NaN or inf)" for i, ok in enumerate(finite) if not ok}
    for i, p in enumerate(params):
        if not p.greedy and i not in failed:
            try:
                chosen[i] = sample_row(logits[i], p, generators[i])
            except RuntimeError as err:  # one row's sampling must not end the batch
                failed[i] = f"sampling failed: {err}"
    return chosen, failed


def _held_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class TextStream:
    """Incremental detokenisation with stop strings: push tokens, get the text that is safe to send."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.sent = ""  # text released so far
        self.stopped = False  # a stop string was found; the text ends before it

    def push(self, token_id: int) -> str:
        """Add a token; returns the newly releasable text (may be empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._release(text[: min(hits)])
        hold = _held_suffix(text, self.stop)
        if text.endswith("\ufffd"):
            hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
        return self._release(text[: len(text) - hold])

    def finish(self) -> str:
        """The held-back tail once generation ends without a stop string."""
        if self.stopped:
            return ""
        return self._release(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _release(self, text: str) -> str:
        if not text.startswith(self.sent):  # decoding changed earlier text; never unsend
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta
