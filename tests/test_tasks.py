import random

import pytest

from deltatune.data.tasks import TASKS, exact_match, examples, get_task, normalize_answer, split_of


@pytest.mark.parametrize("task", sorted(TASKS))
def test_examples_are_deterministic_and_extend(task):
    a = examples(task, "train", 30, seed=1)
    assert a == examples(task, "train", 30, seed=1)
    assert examples(task, "train", 10, seed=1) == a[:10]  # a larger n extends a smaller one
    assert a != examples(task, "train", 30, seed=2)
    assert len({e.prompt for e in a}) == 30


@pytest.mark.parametrize("task", sorted(TASKS))
def test_splits_are_disjoint_across_seeds(task):
    train = {e.prompt for seed in range(3) for e in examples(task, "train", 400, seed=seed)}
    test = {e.prompt for seed in range(3) for e in examples(task, "test", 100, seed=seed)}
    assert train and test and not train & test
    assert all(split_of(p) == "test" for p in test)


def test_split_assignment_is_a_hash_of_the_prompt():
    # About a fifth of prompts land in test; the assignment does not depend on call order or seed.
    prompts = [f"prompt {i}" for i in range(5000)]
    share = sum(split_of(p) == "test" for p in prompts) / len(prompts)
    assert 0.17 < share < 0.23
    assert [split_of(p) for p in prompts[:50]] == [split_of(p) for p in prompts[:50]]


def test_answers_are_correct_by_recomputation():
    for ex in examples("addition", "test", 50, digits=4):
        a, b = ex.prompt.removeprefix("What is ").split("?")[0].split(" + ")
        assert len(a) == len(b) == 4 and int(ex.answer) == int(a) + int(b)
    for ex in examples("reversal", "test", 50, words=3):
        listed = ex.prompt.split(": ", 1)[1].split(". ")[0].split(", ")
        assert len(listed) == 3 and ex.answer.split(", ") == listed[::-1]
    for ex in examples("kv_lookup", "test", 50, pairs=5):
        listing, question = ex.prompt.removeprefix("Each name has a number: ").split(
            ". What is the number for "
        )
        table = dict(pair.split("=") for pair in listing.split(", "))
        assert len(table) == 5 and table[question.split("?")[0]] == ex.answer


def _simulate_boxes(prompt: str) -> tuple[dict[str, str], str]:
    where: dict[str, str] = {}
    sentences = [s.strip() for s in prompt.split(".") if s.strip()]
    for s in sentences:
        w = s.split()
        if s.startswith("Box ") and "contains" in s:
            where[w[-1]] = w[1]
        elif " is moved from box " in s:
            assert where[w[1]] == w[6]  # the story is consistent with itself
            where[w[1]] = w[9]
    question = next(s for s in sentences if s.startswith(("Which box", "What is in box")))
    return where, question


def test_entity_tracking_answers_follow_the_moves():
    kinds = set()
    for ex in examples("entity_tracking", "test", 100, boxes=4, moves=3):
        where, question = _simulate_boxes(ex.prompt)
        if question.startswith("Which box"):
            kinds.add("where")
            assert where[question.split()[4]] == ex.answer
        else:
            kinds.add("what")
            box = question.split()[4]
            assert [t for t, b in where.items() if b == box] == [ex.answer]
    assert kinds == {"where", "what"}


def test_messages():
    ex = examples("addition", "train", 1)[0]
    assert ex.messages() == [
        {"role": "user", "content": ex.prompt},
        {"role": "assistant", "content": ex.answer},
    ]
    assert ex.messages(with_answer=False) == [{"role": "user", "content": ex.prompt}]


def test_exact_match_normalises_only_surface():
    assert exact_match("  1674. ", "1674")
    assert exact_match("Knife,  silver, HORSE, hammer!", "knife, silver, horse, hammer")
    assert exact_match("B\n", "b")
    assert not exact_match("1,674", "1674")
    assert not exact_match("The answer is 1674", "1674")
    assert not exact_match("knife silver horse hammer", "knife, silver, horse, hammer")
    assert not exact_match("", "0")
    assert normalize_answer(" A  b. ") == "a b"


def test_errors_name_what_is_valid():
    with pytest.raises(ValueError, match="addition, entity_tracking, kv_lookup, reversal"):
        get_task("subtraction")
    with pytest.raises(ValueError, match="valid: digits"):
        examples("addition", "train", 1, words=3)
    with pytest.raises(ValueError, match="split"):
        examples("addition", "validation", 1)
    with pytest.raises(ValueError, match="distinct"):
        examples("addition", "test", 50, digits=1)  # only 100 sums of two digits exist
    with pytest.raises(ValueError, match="words must be"):
        get_task("reversal").sample(random.Random(0), words=1)


def test_difficulty_defaults_are_exposed():
    assert get_task("addition").difficulty() == {"digits": 3}
    assert set(get_task("entity_tracking").difficulty()) == {"boxes", "moves"}
