"""Built-in procedural tasks with exact-match answers: the demo data for small models.

Each task is a generator `(rng, **difficulty) -> Example` in the `TASKS` registry. Generated data
needs no downloads, has one unambiguous short answer per prompt, and can be made as hard as needed
through keyword parameters (digits, words, boxes, pairs ...), whose defaults are tuned so that the
default 135M model scores low zero-shot while the pattern stays learnable by a short LoRA run.

Splits are disjoint by construction: every prompt is assigned to "train" or "test" by a hash of its
text (one prompt in `TEST_BUCKETS` out of `HASH_BUCKETS` goes to test), and `examples` only keeps
prompts of the requested split. So no test prompt can ever appear in train, whatever the seeds or
sizes, and a larger `n` extends a smaller one (same seed -> same prefix).
"""

from __future__ import annotations

import hashlib
import inspect
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "test"]
HASH_BUCKETS = 5
TEST_BUCKETS = 1  # prompts whose hash lands in bucket 0 of 5 (20% of the prompt space) are test prompts

WORDS = (  # noqa: SIM905 - a word list reads better as one string
    "apple river stone cloud table green music paper light water house bread chair dream ocean "
    "smile tiger plant glass horse money night point radio sugar train watch world youth beach "
    "candle dance earth field grape heart island juice knife lemon mouse nurse orange piano queen "
    "robot snake tower uncle voice wheel yellow zebra angel bottle copper desert engine forest "
    "garden hammer jacket kitten ladder marble needle pepper rabbit silver ticket violin window "
    "basket camera doctor finger guitar helmet pencil rocket spider tomato turtle wallet "
).split()

OBJECTS = (  # noqa: SIM905 - a word list reads better as one string
    "apple ball book coin cup key lamp pen ring shoe spoon watch bell card clock comb doll drum "
    "fork hat kite leaf map mask nail rope sock stamp toy "
).split()

KEYS = (  # noqa: SIM905 - a word list reads better as one string
    "lion rose ship moon fox owl bear wolf crow deer duck frog goat hawk lamb mole newt seal swan "
    "toad wasp yak eel cod ant bee cat dog elk hen pig ram "
).split()


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str

    def messages(self, with_answer: bool = True) -> list[dict[str, str]]:
        """The example as a chat; without the answer it is the generation prompt used for evaluation."""
        chat = [{"role": "user", "content": self.prompt}]
        if with_answer:
            chat.append({"role": "assistant", "content": self.answer})
        return chat


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    generate: Callable[..., Example]  # (rng, **difficulty) -> Example

    def difficulty(self) -> dict[str, int]:
        """The difficulty knobs and their defaults, read from the generator's keyword parameters."""
        params = inspect.signature(self.generate).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def sample(self, rng: random.Random, **difficulty: int) -> Example:
        unknown = sorted(set(difficulty) - set(self.difficulty()))
        if unknown:
            raise ValueError(
                f"task {self.name!r} has no difficulty parameter {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(self.difficulty())) or 'none'}"
            )
        return self.generate(rng, **difficulty)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def addition(rng: random.Random, *, digits: int = 3) -> Example:
    """Sum of two numbers with exactly `digits` digits each."""
    _require(digits >= 1, f"addition: digits must be >= 1, got {digits}")
    low, high = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
    a, b = rng.randint(low, high), rng.randint(low, high)
    return Example(f"What is {a} + {b}? Answer with the number only.", str(a + b))


def reversal(rng: random.Random, *, words: int = 4) -> Example:
    """Reverse a list of distinct common words."""
    _require(2 <= words <= len(WORDS), f"reversal: words must be in [2, {len(WORDS)}], got {words}")
    chosen = rng.sample(WORDS, words)
    prompt = (
        f"Reverse the order of this list of words: {', '.join(chosen)}. "
        "Answer with the reversed list only, words separated by commas."
    )
    return Example(prompt, ", ".join(reversed(chosen)))


def entity_tracking(rng: random.Random, *, boxes: int = 3, moves: int = 2) -> Example:
    """Objects start one per box, some are moved; ask where an object is or what a box holds."""
    _require(2 <= boxes <= 26, f"entity_tracking: boxes must be in [2, 26], got {boxes}")
    _require(moves >= 0, f"entity_tracking: moves must be >= 0, got {moves}")
    letters = [chr(ord("A") + i) for i in range(boxes)]
    things = rng.sample(OBJECTS, boxes)
    where = dict(zip(things, letters, strict=True))
    lines = [f"Box {box} contains the {thing}." for thing, box in where.items()]
    for _ in range(moves):
        thing = rng.choice(things)
        target = rng.choice([b for b in letters if b != where[thing]])
        lines.append(f"The {thing} is moved from box {where[thing]} to box {target}.")
        where[thing] = target
    single = [b for b in letters if sum(v == b for v in where.values()) == 1]
    if single and rng.random() < 0.5:
        box = rng.choice(single)
        (thing,) = [t for t, b in where.items() if b == box]
        question = f"What is in box {box} now? Answer with the object name only."
        return Example(" ".join(lines) + " " + question, thing)
    thing = rng.choice(things)
    question = f"Which box is the {thing} in now? Answer with the box letter only."
    return Example(" ".join(lines) + " " + question, where[thing])


def kv_lookup(rng: random.Random, *, pairs: int = 4, value_digits: int = 3) -> Example:
    """Find the value of one key in a short key=value list."""
    _require(1 <= pairs <= len(KEYS), f"kv_lookup: pairs must be in [1, {len(KEYS)}], got {pairs}")
    _require(value_digits >= 1, f"kv_lookup: value_digits must be >= 1, got {value_digits}")
    keys = rng.sample(KEYS, pairs)
    values = [str(rng.randint(10 ** (value_digits - 1), 10**value_digits - 1)) for _ in keys]
    asked = rng.randrange(pairs)
    listing = ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
    prompt = f"Each name has a number: {listing}. What is the number for {keys[asked]}? Answer with the number only."
    return Example(prompt, values[asked])


TASKS: dict[str, Task] = {
    "addition": Task("addition", "add two multi-digit numbers", addition),
    "reversal": Task("reversal", "reverse a list of common words", reversal),
    "entity_tracking": Task("entity_tracking", "track objects moved between boxes", entity_tracking),
    "kv_lookup": Task("kv_lookup", "look up one key in a key=value list", kv_lookup),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}") from None


def split_of(prompt: str) -> Split:
    """The split a prompt belongs to, fixed by a hash of its text (stable across runs and machines)."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % HASH_BUCKETS
    return "test" if bucket < TEST_BUCKETS else "train"


def examples(task: str, split: Split, n: int, seed: int = 0, **difficulty: int) -> list[Example]:
    """`n` distinct examples of `task` from one split; deterministic in all arguments."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    spec = get_task(task)
    knobs = ",".join(f"{k}={v}" for k, v in sorted(difficulty.items()))
    rng = random.Random(f"{task}|{split}|{seed}|{knobs}")  # str seeds are hashed with sha512: stable
    seen: set[str] = set()
    out: list[Example] = []
    attempts, max_attempts = 0, 100 * n + 1000
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"task {task!r} with {difficulty or 'default difficulty'} produced only {len(out)} distinct "
                f"{split} prompts out of {n} requested; ask for fewer or raise the difficulty"
            )
        example = spec.sample(rng, **difficulty)
        if example.prompt not in seen and split_of(example.prompt) == split:
            seen.add(example.prompt)
            out.append(example)
    return out


_TRAILING_PUNCT = re.compile(r"[\s.,;:!?]+$")


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace, drop trailing punctuation: nothing that could change meaning."""
    return _TRAILING_PUNCT.sub("", " ".join(text.split()).lower())


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)
