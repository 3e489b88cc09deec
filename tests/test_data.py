import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from deltatune.data import (
    IGNORE_INDEX,
    DataError,
    Sample,
    load_samples,
    pack,
    read_records,
    stop_token_ids,
    task_samples,
    to_sample,
)
from deltatune.data.packing import best_fit
from deltatune.models import load_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def target_spans(tokenizer, sample: Sample) -> list[str]:
    """Decoded runs of consecutive target tokens."""
    spans, run = [], []
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        if label == IGNORE_INDEX:
            if run:
                spans.append(run)
            run = []
        else:
            assert label == token  # labels are not shifted
            run.append(token)
    if run:
        spans.append(run)
    return [tokenizer.decode(s) for s in spans]


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": "sure thing"},
]


def test_chat_targets_are_assistant_content_and_end_of_turn(tok):
    sample = to_sample({"messages": CHAT}, tok)
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    assert sample.input_ids == tok(rendered, add_special_tokens=False).input_ids
    assert target_spans(tok, sample) == ["yo<|im_end|>", "sure thing<|im_end|>"]


def test_alpaca_becomes_a_chat(tok):
    sample = to_sample({"instruction": "Add the numbers.", "input": "2 2", "output": "4"}, tok)
    chat = [{"role": "user", "content": "Add the numbers.\n\n2 2"}, {"role": "assistant", "content": "4"}]
    assert (
        sample.input_ids
        == tok(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False).input_ids
    )
    assert target_spans(tok, sample) == ["4<|im_end|>"]
    no_input = to_sample({"instruction": "Say hi.", "output": "hi"}, tok)
    assert "Say hi.<|im_end|>" in tok.decode(no_input.input_ids)


def test_prompt_completion_is_raw_text(tok):
    sample = to_sample({"prompt": "Q: 2+2\nA:", "completion": " 4"}, tok)
    assert tok.decode(sample.input_ids) == "Q: 2+2\nA: 4" + tok.eos_token
    assert "".join(target_spans(tok, sample)) == " 4" + tok.eos_token


def test_text_trains_on_everything_but_the_first_token(tok):
    sample = to_sample({"text": "hello big world"}, tok)
    ids = tok("hello big world").input_ids + [tok.eos_token_id]
    assert sample.input_ids == ids
    assert sample.labels == [IGNORE_INDEX] + ids[1:]


def test_train_on_prompt_labels_every_token_but_the_first(tok):
    sample = to_sample({"messages": CHAT}, tok, train_on_prompt=True)
    assert sample.labels == [IGNORE_INDEX] + sample.input_ids[1:]


def test_task_samples_target_the_answer(tok):
    from deltatune.data.tasks import examples

    samples = task_samples("addition", "train", 5, tok, seed=3)
    for ex, sample in zip(examples("addition", "train", 5, seed=3), samples, strict=True):
        assert target_spans(tok, sample) == [ex.answer + "<|im_end|>"]


def test_stop_tokens_of_the_default_template(tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tok) == list(dict.fromkeys([tok.eos_token_id, im_end]))


def test_other_template_end_of_turn_is_found(tok):
    # A template whose end-of-turn is <|endoftext|> (not the EOS <|im_end|>) and that adds a footer.
    tok = load_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}<|endoftext|> --\n{% else %}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]: {% endif %}"
    )
    end = tok.convert_tokens_to_ids("<|endoftext|>")
    assert stop_token_ids(tok) == [tok.eos_token_id, end]
    sample = to_sample({"messages": CHAT}, tok)
    assert target_spans(tok, sample) == ["yo<|endoftext|>", "sure thing<|endoftext|>"]


def test_template_that_is_not_prefix_consistent_is_an_error(tmp_path):
    tok = load_tokenizer()
    # Renders the message count first, so adding a message rewrites the beginning.
    tok.chat_template = "{{ messages|length }}{% for m in messages %}|{{ m['content'] }}{% endfor %}"
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n")
    with pytest.raises(DataError, match=r"chat\.jsonl:1: .*not prefix-consistent"):
        load_samples(path, tok)


BAD_RECORDS = [
    ({"messages": []}, r"messages: List should have at least 1 item"),
    ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\.0\.role: Input should be"),
    ({"messages": [{"role": "user"}]}, r"messages\.0\.content: missing"),
    ({"messages": [{"role": "user", "content": 5}]}, r"messages\.0\.content: Input should be a valid string"),
    ({"messages": [{"role": "user", "content": "x"}]}, r"no assistant message"),
    ({"instruction": "x"}, r"output: missing"),
    ({"prompt": "x", "completion": ""}, r"completion: String should have at least 1 character"),
    ({"question": "x", "answer": "y"}, r"unknown record format \(keys: answer, question\)"),
]
GOOD = {"text": "fine"}


@pytest.mark.parametrize(("record", "message"), BAD_RECORDS)
def test_bad_jsonl_record_names_file_line_and_field(tmp_path, tok, record, message):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(record) + "\n")  # blank line 2 is skipped
    with pytest.raises(DataError, match=rf"data\.jsonl:3: .*{message}"):
        load_samples(path, tok)


def test_jsonl_syntax_and_shape_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b",}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        read_records(path)
    path.write_text('{"text": "a"}\n["text"]\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: expected an object"):
        read_records(path)


def test_bad_json_record_names_index(tmp_path, tok):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, GOOD, {"messages": [{"role": "robot", "content": "x"}]}]))
    with pytest.raises(DataError, match=r"data\.json\[2\]: .*messages\.0\.role"):
        load_samples(path, tok)
    path.write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(DataError, match=r"data\.json:2: invalid JSON"):
        read_records(path)
    path.write_text('{"text": "a"}')
    with pytest.raises(DataError, match=r"data\.json: expected a JSON list"):
        read_records(path)


def test_csv_records_lines_and_nested_messages(tmp_path, tok):
    path = tmp_path / "data.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "input", "output"])
        w.writerow(["Say\nhi.", "", "hi"])  # a quoted cell spanning lines 2-3; empty input = absent
        w.writerow(["Add.", "2 2", ""])  # line 4: empty output cell means the field is missing
    records = read_records(path)
    assert [where for _, where in records] == [f"{path}:2", f"{path}:4"]
    assert records[0][0] == {"instruction": "Say\nhi.", "output": "hi"}
    with pytest.raises(DataError, match=r"data\.csv:4: .*output: missing"):
        load_samples(path, tok)

    chat_csv = tmp_path / "chat.csv"
    chat_csv.write_text('messages\n"' + json.dumps(CHAT).replace('"', '""') + '"\n"[{bad json"\n')
    with pytest.raises(DataError, match=r"chat\.csv:3: field 'messages' is text but not valid JSON"):
        read_records(chat_csv)
    chat_csv.write_text('messages\n"' + json.dumps(CHAT).replace('"', '""') + '"\n')
    assert load_samples(chat_csv, tok)[0] == to_sample({"messages": CHAT}, tok)


def test_parquet_records_and_bad_record_index(tmp_path, tok):
    path = tmp_path / "data.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}]), path
    )
    with pytest.raises(DataError, match=r"data\.parquet\[1\]: .*completion: missing"):
        load_samples(path, tok)
    chat = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": CHAT}]), chat)
    assert load_samples(chat, tok)[0] == to_sample({"messages": CHAT}, tok)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_empty_file_is_an_error(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_text({".jsonl": "\n", ".json": "[]", ".csv": "text\n"}[suffix])
    with pytest.raises(DataError, match=rf"empty{suffix}: no records"):
        read_records(path)


def test_tokenizer_without_chat_template(tmp_path):
    tok = load_tokenizer()
    tok.chat_template = None
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"text": "raw is fine"}) + "\n" + json.dumps({"messages": CHAT}) + "\n")
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: the tokenizer has no chat template"):
        load_samples(path, tok)
    assert stop_token_ids(tok) == [tok.eos_token_id]


def test_not_utf8_is_an_error(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl: not UTF-8 text"):
        read_records(path)


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"data\.txt: unsupported file type"):
        read_records(tmp_path / "data.txt")
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        read_records(tmp_path / "nope.jsonl")


def _fully_trained(start: int, length: int) -> Sample:
    ids = list(range(start, start + length))
    return Sample(ids, list(ids))


def test_pack_by_hand():
    # Lengths 5, 3, 4, 2, 6, 10 into rows of 8. Best fit decreasing, worked by hand:
    # 10 -> cut to 8, row 0 (full); 6 -> row 1 (2 free); 5 -> row 2 (3 free); 4 -> row 3 (4 free);
    # 3 -> the tightest row with room is row 2 (3 free); 2 -> row 1 (2 free).
    lengths = [5, 3, 4, 2, 6, 10]
    samples = [_fully_trained(100 * (i + 1), n) for i, n in enumerate(lengths)]
    packed = pack(samples, max_len=8, pad_id=0)
    s = packed.stats
    assert (s.samples, s.rows, s.tokens, s.padding_tokens) == (6, 4, 28, 4)
    assert (s.truncated_samples, s.truncated_tokens) == (1, 2)
    assert s.target_tokens == 28 - 6  # every token but the first of each sample
    assert s.efficiency == pytest.approx(28 / 32)

    assert packed.input_ids.tolist() == [
        list(range(600, 608)),
        [500, 501, 502, 503, 504, 505, 400, 401],
        [100, 101, 102, 103, 104, 200, 201, 202],
        [300, 301, 302, 303, 0, 0, 0, 0],
    ]
    assert packed.position_ids.tolist() == [
        list(range(8)),
        [0, 1, 2, 3, 4, 5, 0, 1],
        [0, 1, 2, 3, 4, 0, 1, 2],
        [0, 1, 2, 3, 0, 1, 2, 3],
    ]
    m = IGNORE_INDEX
    assert packed.labels.tolist() == [
        [m] + list(range(601, 608)),
        [m, 501, 502, 503, 504, 505, m, 401],
        [m, 101, 102, 103, 104, m, 201, 202],
        [m, 301, 302, 303, m, m, m, m],
    ]
    assert pack(samples, max_len=8, pad_id=0).input_ids.equal(packed.input_ids)  # deterministic


def test_best_fit_in_a_given_order_by_hand():
    # Lengths 5, 3, 4, 2, 6 into rows of 8, visited as 4, 0, 1, 3, 2 (by hand):
    # 6 -> row 0 (2 free); 5 -> row 1 (3 free); 3 -> the tightest with room is row 1 (0 free);
    # 2 -> row 0 (0 free); 4 -> a new row 2.
    assert best_fit([5, 3, 4, 2, 6], 8, [4, 0, 1, 3, 2]) == [[4, 3], [0, 1], [2]]


def test_shuffled_packing_is_best_fit_in_a_seeded_order():
    lengths = [7, 2, 5, 3, 8, 2, 4, 6, 2, 3]
    samples = [_fully_trained(100 * (i + 1), n) for i, n in enumerate(lengths)]
    shuffled = pack(samples, max_len=8, pad_id=0, order="shuffled", seed=3)
    visit = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(3)).tolist()
    rows = [[100 * (i + 1) for i in members] for members in best_fit(lengths, 8, visit)]
    firsts = [[int(t) for t, p in zip(r, pos, strict=True) if p == 0 and t] for r, pos in
              zip(shuffled.input_ids, shuffled.position_ids, strict=True)]  # fmt: skip
    assert firsts == rows  # each row holds exactly the samples best fit put there, in that order
    assert shuffled.input_ids.equal(pack(samples, max_len=8, pad_id=0, order="shuffled", seed=3).input_ids)
    assert not shuffled.input_ids.equal(
        pack(samples, max_len=8, pad_id=0, order="shuffled", seed=4).input_ids
    )
    assert shuffled.stats.tokens == sum(lengths) and shuffled.stats.samples == len(lengths)
    with pytest.raises(ValueError, match="packing order"):
        pack(samples, max_len=8, pad_id=0, order="random")


def test_pack_keeps_prompt_masks(tok):
    samples = [to_sample({"messages": CHAT}, tok), to_sample({"text": "hello world"}, tok)]
    packed = pack(samples, max_len=64, pad_id=tok.pad_token_id)
    assert packed.stats.rows == 1
    assert packed.stats.target_tokens == sum(sum(lab != IGNORE_INDEX for lab in s.labels) for s in samples)


def _shifted_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_equal_separate_samples(tok, attn):
    """Restarted position ids + use_cache=False isolate samples: logits and loss match separate runs."""
    model = tiny_llama(seed=1, attn_implementation=attn).eval()
    samples = task_samples("reversal", "train", 4, tok) + task_samples("addition", "train", 4, tok)
    packed = pack(samples, max_len=160, pad_id=tok.pad_token_id)
    assert packed.stats.rows < len(samples)  # several samples share a row
    with torch.no_grad():
        rows = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
        alone = {tuple(s.input_ids): model(input_ids=torch.tensor([s.input_ids])).logits[0] for s in samples}
    total = sum(_shifted_loss_sum(alone[tuple(s.input_ids)][None], torch.tensor([s.labels])) for s in samples)
    checked = 0
    for r in range(packed.stats.rows):
        starts = (packed.position_ids[r] == 0).nonzero().flatten().tolist() + [packed.input_ids.shape[1]]
        for a, b in zip(starts, starts[1:], strict=False):
            key = tuple(packed.input_ids[r, a:b].tolist())
            if key in alone:
                torch.testing.assert_close(rows[r, a:b], alone[key], atol=1e-5, rtol=0)
                checked += 1
    assert checked == len(samples)
    torch.testing.assert_close(_shifted_loss_sum(rows, packed.labels), total, atol=1e-3, rtol=1e-5)


def test_default_use_cache_lets_packed_samples_attend_to_each_other(tok):
    """Why pack() tells callers to pass use_cache=False: with a KV cache the block mask is not built."""
    model = tiny_llama(seed=1).eval()
    a, b = task_samples("addition", "train", 2, tok)
    packed = pack([a, b], max_len=len(a.input_ids) + len(b.input_ids), pad_id=tok.pad_token_id)
    second = packed.input_ids.shape[1] - min(len(a.input_ids), len(b.input_ids))
    with torch.no_grad():
        leaky = model(input_ids=packed.input_ids, position_ids=packed.position_ids).logits
        isolated = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
    assert (leaky[0, second:] - isolated[0, second:]).abs().max() > 1e-2
