"""deltatune select: dedup, IFD, k-center against hand computations; the CLI's outputs and errors;
the `select:` block of a train config."""

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import deltatune
from deltatune.cli import app
from deltatune.data import parse_record, to_sample
from deltatune.models import load_tokenizer, tiny_llama
from deltatune.select import dedup, embed, select_records
from deltatune.select.diversity import k_center_greedy, kmeans_sample
from deltatune.select.options import SelectError
from deltatune.select.quality import scores

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


def chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(autouse=True)
def own_embedding_cache(tmp_path, monkeypatch):
    """Each test's embeddings in its own cache, so a cached vector never hides a computation."""
    monkeypatch.setattr(embed, "cache_dir", lambda: tmp_path / "embedding-cache")


# --- dedup -----------------------------------------------------------------------------------------


def _char5(text: str) -> set[str]:
    """Character 5-grams of lowercased text without punctuation, written out independently."""
    kept = "".join(c for c in text.lower() if c.isalnum() or c.isspace())
    norm = " ".join(kept.split())
    return {norm[i : i + 5] for i in range(len(norm) - 4)}


def test_exact_and_near_dedup_find_planted_duplicates():
    texts = [
        "What is 12 + 34? Answer with the number only, and nothing else.\n46",
        "Reverse the list: apple, river, stone.\nstone, river, apple",
        "What is 12 + 34? Please answer with the number only, and nothing else.\n46",  # 0, a word added
        "Reverse the list: apple, river, stome.\nstone, river, apple",  # 1 with a typo
        "What is 71 + 20? Answer with the number only, and nothing else.\n91",  # same template, other sum
        "Name a colour of the sky on a clear day.\nblue",
        "  Name a colour of the sky on a clear day!!\n\nBLUE ",  # 5 again
    ]
    alive = list(range(len(texts)))
    exact = dedup.exact_duplicates(texts, alive)
    assert exact == {6: (5, 1.0)}  # case, punctuation and spacing do not make a different text
    rest = [i for i in alive if i not in exact]
    near = dedup.near_duplicates(texts, rest, threshold=0.8, num_perm=128)
    assert set(near) == {2, 3}
    assert near[3][0] == 1 and near[2][0] == 0
    # the reported similarity is the exact Jaccard of the character 5-gram sets
    a, b = _char5(texts[1]), _char5(texts[3])
    assert near[3][1] == pytest.approx(len(a & b) / len(a | b))
    a, b = _char5(texts[0]), _char5(texts[4])
    assert len(a & b) / len(a | b) < 0.8  # the other sum is distinct content, and is kept


def test_semantic_dedup_drops_the_later_of_a_close_pair_within_a_cluster():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 16))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    close = base[2] + 0.05 * rng.normal(size=16)
    close /= np.linalg.norm(close)
    vectors = np.vstack([base, close]).astype(np.float32)  # record 6 is a paraphrase of record 2
    cosine = float(vectors[6] @ vectors[2])
    assert cosine > 0.95 and (np.abs(base @ base.T - np.eye(6)) < 0.9).all()
    dropped, clusters = dedup.semantic_duplicates(vectors, list(range(7)), threshold=0.95, clusters=1)
    assert dropped == {6: (2, pytest.approx(cosine, abs=1e-6))}
    assert set(clusters) == set(range(7))
    # with k-means clusters the pair still shares one (it is the closest pair by far)
    dropped, clusters = dedup.semantic_duplicates(vectors, list(range(7)), threshold=0.95, clusters=3)
    assert set(dropped) == {6} and clusters[6] == clusters[2]
    # a record dropped earlier in the pipeline is not there to be matched
    assert dedup.semantic_duplicates(vectors, [0, 1, 3, 4, 5, 6], 0.95, 1)[0] == {}


# --- quality: IFD against a hand computation -------------------------------------------------------


def _hand_loss(model, ids: list[int], targets: list[int]) -> float:
    """Mean cross-entropy over `targets` (positions) with one plain forward of the whole sequence."""
    logits = model(torch.tensor([ids])).logits[0]
    pos = torch.tensor(targets)
    return F.cross_entropy(logits[pos - 1].float(), torch.tensor(ids)[pos]).item()


def _check_ifd_by_hand(model, tok, records: list[dict], batch_size: int) -> None:
    parsed = [parse_record(r) for r in records]
    where = [f"d.jsonl:{i + 1}" for i in range(len(records))]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    got = scores(model, tok, parsed, where, "ifd", max_length=512, batch_size=batch_size, progress=False)
    for record, entry in zip(records, got, strict=True):
        sample = to_sample(record, tok)  # the with-prompt sequence is what training sees
        targets = [t for t, lab in enumerate(sample.labels) if lab != -100]
        with_prompt = _hand_loss(model, sample.input_ids, targets)
        if "messages" in record:  # answer alone: the assistant turn of the ChatML template only
            header = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
            turn = tok(record["messages"][1]["content"] + "<|im_end|>\n", add_special_tokens=False).input_ids
            alone = header + turn
            n_answer = turn.index(im_end) + 1
        else:  # BOS + completion + EOS
            completion = tok(record["completion"], add_special_tokens=False).input_ids
            header = [tok.bos_token_id]
            alone = [*header, *completion, tok.eos_token_id]
            n_answer = len(completion) + 1
        answer_only = _hand_loss(model, alone, list(range(len(header), len(header) + n_answer)))
        assert len(targets) == n_answer  # the same answer tokens in both
        assert entry["loss_with_prompt"] == pytest.approx(with_prompt, rel=1e-5)
        assert entry["loss_answer_only"] == pytest.approx(answer_only, rel=1e-5)
        assert entry["ifd"] == pytest.approx(with_prompt / answer_only, rel=1e-5)
        assert entry["perplexity"] == pytest.approx(np.exp(with_prompt), rel=1e-5)


def test_ifd_equals_hand_computation():
    tok = load_tokenizer()
    model = tiny_llama(seed=0, initializer_range=0.3).eval()
    records = [chat(f"What is {a} + {b}?", str(a + b)) for a, b in [(1, 2), (30, 4), (512, 77), (9, 19)]]
    records.append({"prompt": "Say hello to", "completion": " the world"})
    for batch_size in (1, 8):  # one at a time, and batched (sharing the system prompt's KV)
        _check_ifd_by_hand(model, tok, records, batch_size)
    # the same prompt with other answers: the whole prompt up to the first answer token is shared
    same_prompt = [chat("What is 1 + 2?", answer) for answer in ("3", "4", "5")]
    _check_ifd_by_hand(model, tok, same_prompt, batch_size=3)


def test_ifd_keeps_the_highest_and_drops_above_one(tiny_dir):
    """The paper's rule with the outlier cuts off; then the IFD cut on top (hand-checked below)."""
    from deltatune.select.quality import high_outliers

    records = [
        chat(f"Repeat the word number {i}: {w}", w)
        for i, w in enumerate(["apple", "river", "stone", "cloud", "grass", "flame", "sugar", "wheel"])
    ]
    pairs = [(r, f"d.jsonl:{i + 1}") for i, r in enumerate(records)]
    off = {"progress": False, "precision": "fp32", "loss_outlier_mads": 0, "ifd_outlier_mads": 0}
    sel = select_records(pairs, 3, "quality", off, model=str(tiny_dir))
    ifd = [s["ifd"] for s in sel.scores]
    ranked = sorted((i for i in range(8) if ifd[i] <= 1), key=lambda i: -ifd[i])
    assert sel.kept == sorted(ranked[:3])
    for i in range(8):
        if ifd[i] > 1:
            assert sel.reasons[i] == "ifd>1"
        elif i not in ranked[:3]:
            assert sel.reasons[i] == "below quality cut"
    cut = {**off, "ifd_outlier_mads": 0.5}
    sel = select_records(pairs, 3, "quality", cut, model=str(tiny_dir))
    unexplained = high_outliers({i: ifd[i] for i in ranked}, 0.5)
    assert unexplained  # 0.5 MADs cuts some of eight spread values
    rest = [i for i in ranked if i not in unexplained]
    assert sel.kept == sorted(rest[:3])
    assert {i for i in range(8) if sel.reasons[i].startswith("ifd outlier (> 0.5 MADs")} == unexplained


def test_ifd_refuses_text_records_naming_the_line(tiny_dir):
    pairs = [(chat("a?", "b"), "d.jsonl:1"), ({"text": "just prose"}, "d.jsonl:2")]
    with pytest.raises(ValueError, match=r"d.jsonl:2: a 'text' record has no prompt"):
        select_records(pairs, 1, "quality", {"progress": False}, model=str(tiny_dir))


# --- diversity -------------------------------------------------------------------------------------


def test_k_center_greedy_picks_the_farthest_points_in_order():
    points = np.array([[0, 0], [10, 0], [0, 1], [5, 5], [10, 10], [2, 0]], dtype=float)
    # from (0,0): farthest is (10,10) (14.1); then (10,0) (min dist 10 vs 7.07 for (5,5)); then (5,5)
    # (7.07); then (2,0) (2) before (0,1) (1)
    assert k_center_greedy(points, 6, start=0) == [0, 4, 1, 3, 5, 2]
    # from (5,5): (0,0), (10,0) and (10,10) tie at 7.07 (the lower index wins), then (10,0) ties (10,10)
    assert k_center_greedy(points, 3, start=3) == [3, 0, 1]
    assert k_center_greedy(points, 1, start=2) == [2]


def test_kmeans_sampling_takes_the_point_nearest_each_centroid():
    rng = np.random.default_rng(0)
    blobs = [np.array(c) + 0.1 * rng.normal(size=(5, 2)) for c in ([0, 0], [10, 0], [0, 10])]
    points = np.vstack(blobs)
    chosen, _ = kmeans_sample(points, 3, seed=0)
    expected = set()
    for b in range(3):
        members = points[5 * b : 5 * b + 5]
        expected.add(5 * b + int(np.argmin(((members - members.mean(0)) ** 2).sum(1))))
    assert set(chosen) == expected


# --- the CLI ---------------------------------------------------------------------------------------


def _outputs(tmp_path):
    return [tmp_path / "out" / n for n in ("sel.jsonl", "selection.json", "selection.png")]


def test_cli_malformed_record_names_file_and_line_and_writes_nothing(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps(chat("a?", "b")) + "\n" + json.dumps(chat("c?", "d")) + "\n" + '{"messages": [}\n'
    )
    res = runner.invoke(app, ["select", str(data), str(tmp_path / "out" / "sel.jsonl"), "--budget", "1"])
    assert res.exit_code == 2 and f"{data}:3: invalid JSON" in res.output and "Traceback" not in res.output
    data.write_text(json.dumps(chat("a?", "b")) + "\n" + json.dumps({"messages": [{"role": "user"}]}) + "\n")
    res = runner.invoke(
        app, ["select", str(data), str(tmp_path / "out" / "sel.jsonl"), "--strategy", "dedup"]
    )
    assert res.exit_code == 2 and f"{data}:2: bad 'messages' record" in res.output
    assert not any(p.exists() for p in _outputs(tmp_path)) and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "9"], "budget 9 is larger than the data (3 records)"),
        (["--budget", "0"], "budget must be > 0"),
        (["--budget", "1.5"], "a fractional budget must be in (0, 1]"),
        (["--budget", "lots"], "budget must be a count N or a fraction in (0, 1], got 'lots'"),
        (
            ["--budget", "1", "--strategy", "dedup,qualty"],
            "unknown strategy 'qualty'; valid: dedup, quality, diversity",
        ),
        (["--strategy", "diversity"], "strategy 'diversity' needs a budget"),
        (
            ["--budget", "1", "-p", "near_treshold=0.5"],
            "unknown --param 'near_treshold' (did you mean 'near_threshold'?)",
        ),
        (
            ["--budget", "1", "-p", "near_threshold=2"],
            "--param near_threshold: Input should be less than or equal to 1",
        ),
    ],
)
def test_cli_bad_budget_strategy_or_param_is_one_message(tmp_path, args, message):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [chat("a?", "b"), chat("c?", "d"), chat("e?", "f")])
    res = runner.invoke(app, ["select", str(data), str(tmp_path / "out" / "sel.jsonl"), *args])
    assert res.exit_code == 2, res.output
    assert res.output.count("error:") == 1 and message in res.output, res.output
    assert not (tmp_path / "out").exists()


DISTINCT = [
    ("What is 12 + 30?", "42"),
    ("Name the capital of France.", "Paris"),
    ("Reverse the words: apple river stone", "stone river apple"),
    ("Which box holds the key if box A has the key?", "A"),
    ("Translate 'gato' from Spanish to English.", "cat"),
    ("How many legs does a spider have?", "eight"),
    ("Spell the word music backwards.", "cisum"),
    ("What colour is a ripe banana?", "yellow"),
    ("Give the chemical symbol of gold.", "Au"),
]


def _dirty_records() -> list[dict]:
    """Nine distinct records, then an exact copy of record 2 and a recased, re-punctuated record 4."""
    records = [chat(q, a) for q, a in DISTINCT]
    records.append(dict(records[2]))
    records.append(chat(DISTINCT[4][0].upper().replace("'", "") + "!!", DISTINCT[4][1]))
    return records


def test_cli_happy_path_writes_the_input_format_report_and_plot(tmp_path, tiny_dir):
    data = tmp_path / "d.jsonl"
    records = _dirty_records()
    data.write_text("".join(json.dumps(r, indent=None, separators=(",", ":")) + "\n" for r in records))
    out = tmp_path / "out" / "sel.jsonl"
    args = ["select", str(data), str(out), "--budget", "4", "--model", str(tiny_dir), "-p", "precision=fp32"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "selection.json").read_text())
    entries = report["records"]
    assert [e["index"] for e in entries] == list(range(11))
    assert [e["source"] for e in entries] == [f"{data}:{i + 1}" for i in range(11)]
    assert entries[9]["reason"] == "exact_duplicate of 2" and entries[10]["reason"] == "exact_duplicate of 4"
    kept = [e["index"] for e in entries if e["kept"]]
    assert len(kept) == 4 and report["summary"]["kept"] == 4
    assert sum(report["summary"]["reasons"].values()) == 11
    for e in entries:
        assert e["kept"] == (e["reason"] == "kept")
        scored = "duplicate" not in e["reason"]  # every record that reached the quality stage
        assert set(e["scores"]) == (
            {"ifd", "loss_with_prompt", "loss_answer_only", "perplexity"} if scored else set()
        )
        assert isinstance(e["cluster"], int)
    # OUT holds the kept input lines verbatim, in input order
    lines = data.read_text().splitlines()
    assert out.read_text().splitlines() == [lines[i] for i in kept]
    assert (tmp_path / "out" / "selection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run refuses to replace the outputs unless told to
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "already exists" in res.output
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


def test_select_keeps_csv_and_json_formats(tmp_path):
    records = _dirty_records()
    rows = [
        {"instruction": r["messages"][0]["content"], "output": r["messages"][1]["content"]} for r in records
    ]
    rows[3]["input"] = 'with "quotes", commas\nand a newline'
    src = tmp_path / "d.csv"
    with src.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(rows)
    opts = {"semantic": False, "progress": False}
    report = deltatune.select(src, tmp_path / "o" / "sel.csv", strategy="dedup", **opts)
    kept = [e["index"] for e in report["records"] if e["kept"]]
    assert kept == [i for i in range(11) if i not in (9, 10)]
    with (tmp_path / "o" / "sel.csv").open(newline="") as f:
        got = list(csv.DictReader(f))
    assert got == [{k: rows[i].get(k, "") for k in ("instruction", "input", "output")} for i in kept]
    src = tmp_path / "d.json"
    src.write_text(json.dumps(records))
    deltatune.select(src, tmp_path / "j" / "sel.json", strategy="dedup", **opts)
    assert json.loads((tmp_path / "j" / "sel.json").read_text()) == [records[i] for i in kept]
    with pytest.raises(SelectError, match="must have the input's format"):
        deltatune.select(src, tmp_path / "j" / "sel.jsonl", strategy="dedup", **opts)
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    deltatune.select(src, tmp_path / "p" / "sel.parquet", strategy="dedup", **opts)
    assert (
        pq.read_table(tmp_path / "p" / "sel.parquet").to_pylist() == pq.read_table(src).take(kept).to_pylist()
    )


# --- the train config's select: block --------------------------------------------------------------


def test_train_config_select_block_trains_on_the_selected_records(tmp_path, tiny_dir):
    from deltatune.train.config import ConfigError, build_config

    data = tmp_path / "d.jsonl"
    write_jsonl(data, _dirty_records())
    cfg = dict(
        model=str(tiny_dir),
        data=str(data),
        eval_samples=0,
        max_steps=1,
        batch_size=1,
        max_seq_len=64,
        save_every=0,
        precision="fp32",
        output=str(tmp_path / "run"),
    )
    summary = deltatune.train({**cfg, "select": {"strategy": "dedup", "options": {"semantic": False}}})
    assert summary["packing"]["samples"] == 9  # 11 records, 2 of them duplicates
    select = {
        "budget": 3,
        "strategy": ["dedup", "quality"],
        "options": {"semantic": False, "precision": "fp32"},
    }
    summary = deltatune.train({**cfg, "select": select, "output": str(tmp_path / "run2")})
    assert summary["packing"]["samples"] == 3
    with pytest.raises(ConfigError, match=r"config key 'select.options.near_treshold'"):
        build_config({"select": {"options": {"near_treshold": 0.5}}})
    with pytest.raises(ConfigError, match=r"config key 'select.strategy'.*unknown strategy 'qualty'"):
        build_config({"select": {"strategy": "qualty"}})
    with pytest.raises(ConfigError, match=r"config key 'select.budget'.*must be > 0"):
        build_config({"select": {"budget": 0}})


@pytest.mark.integration
def test_default_model_ifd_in_bf16_agrees_with_fp32():
    """The fast path (bf16 weights, batched, shared prefixes) against fp32 one record at a time."""
    from deltatune.train.loop import bf16_supported

    if not bf16_supported(torch.device("cpu")):
        pytest.skip("no bf16 on this CPU")
    pairs = [(r, f"d.jsonl:{i + 1}") for i, r in enumerate(_dirty_records()[:9])]
    common = {"progress": False, "device": "cpu"}
    fast = select_records(pairs, None, "quality", {**common, "precision": "bf16", "batch_size": 16})
    exact = select_records(pairs, None, "quality", {**common, "precision": "fp32", "batch_size": 1})
    # bf16 matmuls move a 1-3 token answer's mean loss by up to ~7% (measured: 4.40 vs 4.13) and IFD by
    # up to ~0.02; batching itself changes nothing (fp32: equal to 3 decimals, and the tiny-model test)
    for a, b in zip(fast.scores, exact.scores, strict=True):
        assert a["loss_with_prompt"] == pytest.approx(b["loss_with_prompt"], rel=0.1)
        assert a["ifd"] == pytest.approx(b["ifd"], abs=0.05)


# --- embeddings ------------------------------------------------------------------------------------


@pytest.mark.integration
def test_embeddings_match_sentence_transformers_and_are_cached(monkeypatch):
    from sentence_transformers import SentenceTransformer

    texts = ["What is 2 + 2?\n4", "Reverse: apple river\nriver apple", "A longer record " * 20]
    got = embed.embed_texts(texts, progress=False)
    want = SentenceTransformer(str(embed.model_dir()), device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(got, want, atol=1e-5)
    monkeypatch.setattr(embed, "_encode", lambda *a, **k: pytest.fail("the cache was not used"))
    stats = {}
    np.testing.assert_array_equal(embed.embed_texts(texts, progress=False, stats=stats), got)
    assert stats["cached"] == 1.0
    with pytest.raises(pytest.fail.Exception):  # another text is another key
        embed.embed_texts([*texts[:2], "something else"], progress=False)


def test_loss_outliers_by_hand():
    """Robust z-score on log losses: median 0, MAD of |logs| = ln 2, so the cut is 3 * 1.4826 * ln 2."""
    import math

    from deltatune.select.quality import loss_outliers

    losses = {0: 1.0, 1: 2.0, 2: 0.5, 3: 1.0, 4: 30.0, 5: 2.0, 6: 0.5}  # logs: 0, ±ln2 and ln 30
    cut = 3 * 1.4826 * math.log(2)
    assert math.log(30.0) > cut > math.log(2.0)
    assert loss_outliers(losses, 3.0) == {4}
    assert loss_outliers(losses, 0) == set()  # off
    assert loss_outliers({0: 1.0, 1: 1.0, 2: 9.0}, 3.0) == set()  # MAD 0: no scale, nothing dropped


def test_ifd_outliers_by_hand():
    """The IFD cut is a plain robust z-score: median 0.325, MAD 0.075, so the 1.5-MAD cut is 0.492."""
    from deltatune.select.quality import high_outliers

    ifd = {0: 0.25, 1: 0.30, 2: 0.35, 3: 0.30, 4: 0.40, 5: 0.42, 6: 0.95, 7: 0.20}
    # median 0.325 -> deviations .075 .025 .025 .025 .075 .095 .625 .125: MAD 0.075
    cut = 0.325 + 1.5 * 1.4826 * 0.075
    assert 0.42 < cut < 0.95
    assert high_outliers(ifd, 1.5) == {6}
    assert high_outliers(ifd, 0.5) == {4, 5, 6}
    assert high_outliers(ifd, 0) == set()
