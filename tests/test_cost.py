"""What fine-tuning cost (train/cost.py): KL, perplexity, general exact match, ECE, against hand
computations on tiny random models; generation stops and first-token probabilities; `deltatune
eval` flags; the training summary's before/after table and report.md."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import deltatune
from deltatune.cli import app
from deltatune.data import DataError, load_samples
from deltatune.data.tokenize import prompt_ids
from deltatune.deltas import disable_delta
from deltatune.formats.peft import save_delta
from deltatune.models import load_tokenizer, tiny_llama
from deltatune.train import cost
from deltatune.train.evaluate import eval_items_from_task, generate, generations, read_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = (
    "The river runs past the old mill and under the stone bridge. In spring the water is high and "
    "brown; by late summer it is low and clear, and children wade across to the island."
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def lora(seed: int = 3, scale: float = 0.0, **kw):
    """An untied tiny model (varied greedy outputs) with LoRA; B scaled to `scale` (0: the base)."""
    model = deltatune.add_delta(tiny_llama(seed=seed, tie_word_embeddings=False), "lora", lora_r=4, **kw)
    if scale:
        torch.manual_seed(7)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn_like(p) * scale
    return model.eval()


def hand_kl(model, tok, text: str, window: int) -> float:
    """Mean KL(base || tuned) over positions from full logits, explicit sum p * log(p / q) in float64."""
    ids = tok(text, add_special_tokens=False).input_ids
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), window):
            x = torch.tensor([ids[i : i + window]])
            q = torch.softmax(model(x).logits[0].double(), -1)
            with disable_delta(model):
                p = torch.softmax(model(x).logits[0].double(), -1)
            total += float((p * (p.log() - q.log())).sum())
            count += x.shape[1]
    return total / count


# --- forgetting KL ----------------------------------------------------------------------------------


def test_kl_is_zero_for_the_base_against_itself(tok):
    model = lora()  # lora_B starts at zero: the tuned model is the base
    assert cost.forgetting_kl(model, tok, TEXT, window=16)["kl"] == 0.0
    moved = lora(scale=0.5)
    with disable_delta(moved):  # switched off on both sides
        assert cost.forgetting_kl(moved, tok, TEXT, window=16)["kl"] == 0.0


def test_kl_equals_hand_computation_over_windows_and_chunks(tok):
    model = lora(scale=0.5)
    n = len(tok(TEXT, add_special_tokens=False).input_ids)
    result = cost.forgetting_kl(model, tok, TEXT, window=16, batch_size=2, chunk_tokens=7)
    assert result["tokens"] == n and n % 16 != 0  # a shorter last window, chunks across windows
    expected = hand_kl(model, tok, TEXT, window=16)
    assert expected > 1e-3
    assert result["kl"] == pytest.approx(expected, rel=1e-4)
    # the same through F.kl_div on one chunk of logits, as kl_sum computes it
    logits_p, logits_q = torch.randn(5, 50), torch.randn(5, 50) * 2
    reference = F.kl_div(logits_q.log_softmax(-1), logits_p.log_softmax(-1), log_target=True, reduction="sum")
    assert cost.kl_sum(logits_p, logits_q).item() == pytest.approx(reference.item(), rel=1e-5)


def test_kl_against_a_separate_base_for_a_merged_delta(tok):
    model = lora(scale=0.5)
    merged = deltatune.merge_delta(copy.deepcopy(model))  # the delta is in the weights: no switch
    base = tiny_llama(seed=3, tie_word_embeddings=False).eval()
    expected = cost.forgetting_kl(model, tok, TEXT, window=16)["kl"]
    assert cost.forgetting_kl(merged, tok, TEXT, window=16, base=base)["kl"] == pytest.approx(
        expected, rel=1e-3
    )


def test_shipped_general_text_and_questions(tok):
    windows = cost.general_windows(tok)
    assert 2000 <= sum(map(len, windows)) <= 4000
    questions = cost.general_questions()
    assert len(questions) == 32 and all(q[-1]["role"] == "user" for q in questions)
    prompts = read_prompts(cost.GENERAL_PROMPTS)
    assert len(prompts) == 64
    assert not {q[-1]["content"] for q in questions} & {p[-1]["content"] for p in prompts}


# --- general exact match of the base's own answers --------------------------------------------------


def test_general_exact_match_is_one_for_the_base_and_drops_with_a_delta(tok, tmp_path):
    questions = cost.general_questions()[:8]
    model = lora(scale=2.0)
    plain = tiny_llama(seed=3, tie_word_embeddings=False).eval()
    references = cost.base_answers(model, tok, questions, cache=tmp_path / "answers.json")
    assert references == generate(plain, tok, questions, cost.GENERAL_MAX_NEW_TOKENS)  # delta switched off
    with disable_delta(model):
        assert cost.general_exact_match(model, tok, references, questions)["exact_match"] == 1.0
    tuned = cost.general_exact_match(model, tok, references, questions)
    assert tuned["exact_match"] < 1.0 and tuned["n"] == 8
    # cached: a second call does not generate (a model with other answers gets the cached ones)
    other = tiny_llama(seed=5, tie_word_embeddings=False).eval()
    assert cost.base_answers(other, tok, questions, cache=tmp_path / "answers.json") == references
    assert cost.base_answers(other, tok, questions[:4], cache=tmp_path / "answers.json") != references[:4]


def test_answer_cache_path_is_per_model_files_dtype_and_quantization(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    a = cost.answer_cache_path(str(tiny_dir), torch.float32, "none")
    assert a.parent == tmp_path / "general_answers"
    assert a == cost.answer_cache_path(str(tiny_dir), torch.float32, "none")
    assert a != cost.answer_cache_path(str(tiny_dir), torch.bfloat16, "none")
    assert a != cost.answer_cache_path(str(tiny_dir), torch.float32, "nf4")


# --- calibration ------------------------------------------------------------------------------------


def test_ece_equals_hand_computation(tmp_path):
    confidence = [0.05, 0.15, 0.15, 0.55, 0.95, 1.0, 0.1]
    correct = [False, True, False, False, True, True, True]
    # bins: [0,.1): .05 wrong; [.1,.2): .15 right, .15 wrong, .1 right; [.5,.6): .55 wrong; [.9,1]: .95, 1.0 right
    expected = (1 * abs(0 - 0.05) + 3 * abs(2 / 3 - 0.4 / 3) + 1 * abs(0 - 0.55) + 2 * abs(1 - 0.975)) / 7
    assert cost.expected_calibration_error(confidence, correct) == pytest.approx(expected, abs=1e-12)
    bins = cost.reliability_bins(confidence, correct)
    assert [b["count"] for b in bins] == [1, 3, 0, 0, 0, 1, 0, 0, 0, 2]
    assert bins[2]["accuracy"] is None
    assert cost.expected_calibration_error([0.8] * 5, [True] * 4 + [False]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="not a probability"):
        cost.reliability_bins([1.5], [True])
    cost.plot_reliability({"base": bins, "tuned": bins}, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_first_token_probability_and_stopping(tok):
    """The confidence is softmax(logits)[greedy token] of the prompt's last position; a row that
    emits a stop token is finished, and a batch whose rows all stop at once costs one forward."""
    model = lora(scale=0.5)
    prompts = [it.prompt for it in eval_items_from_task("addition", 3)] + ["Once upon a time"]
    firsts, probs = [], []
    with torch.no_grad():
        for p in prompts:
            probs_p = torch.softmax(model(torch.tensor([prompt_ids(tok, p)])).logits[0, -1].float(), -1)
            firsts.append(int(probs_p.argmax()))
            probs.append(float(probs_p.max()))
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    found = generations(model, tok, prompts, max_new_tokens=6, batch_size=4, stop_token_ids=firsts)
    hook.remove()
    assert len(calls) == 1  # prefill only: every row stopped at its first token
    assert [g.text for g in found] == [""] * 4 and all(g.finished for g in found)
    assert [g.first_token_prob for g in found] == pytest.approx(probs, rel=1e-4)
    unstopped = generations(model, tok, prompts, max_new_tokens=3, stop_token_ids=[-1])
    assert not any(g.finished for g in unstopped)
    assert [g.first_token_prob for g in unstopped] == pytest.approx(probs, rel=1e-4)


def test_read_prompts_formats_and_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    chat = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
    records = [{"messages": chat}, {"instruction": "Do it.", "input": "x"}, {"prompt": "raw text"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert read_prompts(path) == [chat[:1], [{"role": "user", "content": "Do it.\n\nx"}], "raw text"]
    path.write_text(json.dumps(records[0]) + "\n" + json.dumps({"question": "?"}) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:2: not a prompt record"):
        read_prompts(path)


# --- perplexity -------------------------------------------------------------------------------------


def test_perplexity_equals_exp_of_hand_mean_cross_entropy(tok, tmp_path):
    path = tmp_path / "held_out.jsonl"
    records = [
        {
            "messages": [
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."},
            ]
        },
        {"text": TEXT},
        {"prompt": "2+2=", "completion": "4"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    model = lora(scale=0.5)
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in load_samples(path, tok):  # each sample alone: chat answer, every text token, completion
            logits = model(torch.tensor([sample.input_ids])).logits[0, :-1].double()
            labels = torch.tensor(sample.labels[1:])
            total += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    result = cost.perplexity(model, tok, path, max_seq_len=128, batch_size=2)
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


# --- deltatune eval ---------------------------------------------------------------------------------


def test_eval_cli_cost_flags(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    model = deltatune.add_delta(deltatune.load(str(tiny_dir)), "lora", lora_r=4)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn_like(p) * 0.3
    save_delta(model, tmp_path / "adapter", base_model=str(tiny_dir))
    held_out = tmp_path / "held.jsonl"
    held_out.write_text(json.dumps({"text": TEXT}) + "\n")
    runner = CliRunner()
    base = ["eval", "--model", str(tiny_dir), "--adapter", str(tmp_path / "adapter")]
    plot = tmp_path / "rel.png"
    res = runner.invoke(
        app,
        [*base, "--task", "addition", "--n", "6", "--max-new-tokens", "4", "--calibration"]
        + ["--reliability-plot", str(plot), "--perplexity", str(held_out), "--forgetting"],
    )
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()  # progress bars go to stderr
    assert [line.split(":")[0] for line in lines] == [
        "exact match",
        "calibration",
        f"perplexity on {held_out}",
        "forgetting",
        "forgetting",
    ]
    kl = float(next(line for line in lines if "KL(base || tuned)" in line).split("tuned) ")[1].split()[0])
    assert kl > 0 and plot.read_bytes()[:4] == b"\x89PNG"
    assert len(list((tmp_path / "cache" / "general_answers").glob("*.json"))) == 1  # base answers cached
    for args, message in [
        (["eval", "--model", str(tiny_dir)], "give --task or --data"),
        ([*base, "--forgetting", "--calibration"], "--calibration scores the answers"),
        ([*base, "--task", "addition", "--reliability-plot", str(plot)], "needs --calibration"),
    ]:
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and message in res.output, res.output
    held_out.write_text('{"text": "fine"}\n{"txt": 1}\n')
    res = runner.invoke(app, [*base, "--perplexity", str(held_out)])
    assert res.exit_code == 2 and "held.jsonl:2" in res.output and "Traceback" not in res.output


# --- the training run: summary.json and report.md ---------------------------------------------------

RUN = dict(
    task="addition",
    train_samples=48,
    eval_samples=8,
    batch_size=2,
    max_seq_len=128,
    save_every=0,
    precision="fp32",
    warmup_steps=1,
    lora_r=4,
    learning_rate=2e-2,
    max_steps=6,
    eval_max_new_tokens=4,
)


def test_training_summary_has_before_after_cost_metrics_and_report(tiny_dir, tmp_path):
    summary = deltatune.train(dict(RUN, model=str(tiny_dir), output=str(tmp_path / "r")))
    table = summary["eval"]
    assert set(table) == {"addition", "perplexity", "forgetting_kl", "general_exact_match", "ece"}
    assert table["forgetting_kl"]["before"] == 0.0 and table["forgetting_kl"]["after"] > 0
    assert table["general_exact_match"]["before"] == 1.0
    assert 0.0 <= table["general_exact_match"]["after"] <= 1.0
    assert table["perplexity"]["after"] == pytest.approx(math.exp(summary["eval_loss"]), rel=1e-9)
    assert table["perplexity"]["before"] > table["perplexity"]["after"]  # it trained on this task
    assert all(0.0 <= table["ece"][k] <= 1.0 for k in ("before", "after"))
    run = tmp_path / "r"
    # the KL in the summary is the tuned adapter's against the base, recomputed from the saved files
    tuned = deltatune.load(str(tiny_dir), adapter=run / "adapter")
    tok = load_tokenizer(str(tiny_dir))
    assert cost.forgetting_kl(tuned, tok)["kl"] == pytest.approx(table["forgetting_kl"]["after"], rel=1e-4)
    answers = json.loads((run / "general_answers.json").read_text())["answers"]
    plain = deltatune.load(str(tiny_dir))
    assert [a["base"] for a in answers] == generate(plain, tok, cost.general_questions(), 24)
    report = (run / "report.md").read_text()
    for text in ("perplexity", "KL(base", "general answers kept", "ECE", "reliability.png", "loss.png"):
        assert text in report
    assert (run / "reliability.png").stat().st_size > 1000


def test_perplexity_data_without_the_other_cost_metrics(tiny_dir, tmp_path):
    held_out = tmp_path / "held.jsonl"
    held_out.write_text(
        json.dumps({"text": TEXT}) + "\n" + json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n"
    )
    cfg = dict(RUN, model=str(tiny_dir), cost_metrics=False, perplexity_data=str(held_out))
    summary = deltatune.train(dict(cfg, output=str(tmp_path / "r")))
    assert set(summary["eval"]) == {"addition", "perplexity"}
    assert not (tmp_path / "r" / "reliability.png").exists()
    tok = load_tokenizer(str(tiny_dir))
    for when, adapter in (("before", None), ("after", tmp_path / "r" / "adapter")):
        model = deltatune.load(str(tiny_dir), adapter=adapter)
        expected = cost.perplexity(model, tok, held_out, max_seq_len=128)["perplexity"]
        assert summary["eval"]["perplexity"][when] == pytest.approx(expected, rel=1e-4)
    held_out.write_text('{"text": "fine"}\n{"text": ""}\n')
    with pytest.raises(DataError, match=r"held\.jsonl:2"):
        deltatune.train(dict(cfg, output=str(tmp_path / "bad")))
    assert not (tmp_path / "bad").exists()
