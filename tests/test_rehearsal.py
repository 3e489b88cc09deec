"""Self-rehearsal (train/rehearsal.py): the base's own answers, their rows, each step's share, the
cache and resume, on tiny random models."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import deltatune
from deltatune.data import DataError, PackedRows, PackStats
from deltatune.models import load_tokenizer
from deltatune.train import cost
from deltatune.train.config import ConfigError, build_config
from deltatune.train.evaluate import generations, read_prompts
from deltatune.train.loop import build_data
from deltatune.train.rehearsal import (
    REHEARSAL_FILE,
    Rehearsal,
    RehearsalMix,
    rehearsal_rows_before,
    rehearsal_sample,
    row_share,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN = dict(
    task="addition",
    train_samples=48,
    eval_samples=0,
    batch_size=2,
    grad_accum=2,
    max_seq_len=128,
    save_every=0,
    precision="fp32",
    warmup_steps=1,
    lora_r=4,
    learning_rate=1e-2,
    max_steps=12,
    log_every=1,
    cost_metrics=False,
    rehearsal=0.3,
    rehearsal_max_new_tokens=12,
)


def fake_mix(task_rows: int, rehearsal_rows: int, share: float) -> RehearsalMix:
    n = task_rows + rehearsal_rows
    rows = PackedRows(
        torch.zeros(n, 4, dtype=torch.long),
        torch.zeros(n, 4, dtype=torch.long),
        torch.zeros(n, 4, dtype=torch.long),
        PackStats(0, n, 0, 0, 0, 0, 0),
    )
    return RehearsalMix(rows, task_rows, rehearsal_rows, share, share, {"answers": []}, "")


def test_each_step_takes_its_share_of_rows_from_each_stream():
    mix = fake_mix(10, 3, 0.25)
    seen_task, seen_rehearsal = [], []
    for step in range(30):
        idx = mix.rows_for_step(step, 4, seed=0).tolist()
        assert len(idx) == 4 and sum(i >= 10 for i in idx) == 1  # 4 rows x 0.25: exactly one per step
        seen_task += [i for i in idx if i < 10]
        seen_rehearsal += [i - 10 for i in idx if i >= 10]
    # every epoch of a stream is a permutation of its rows
    assert all(sorted(seen_task[e * 10 : (e + 1) * 10]) == list(range(10)) for e in range(9))
    assert all(sorted(seen_rehearsal[e * 3 : (e + 1) * 3]) == [0, 1, 2] for e in range(10))
    thin = fake_mix(10, 3, 0.1)  # 0.4 rows a step: some steps have none, and the total keeps the share
    counts = [int((thin.rows_for_step(s, 4, 0) >= 10).sum()) for s in range(50)]
    assert set(counts) == {0, 1}
    for s in range(1, 51):
        assert abs(sum(counts[:s]) - 0.4 * s) <= 0.5
    assert rehearsal_rows_before(50, 4, 0.1) == 20


def test_row_share_gives_the_target_token_share():
    q = row_share(0.25, task_density=10, rehearsal_density=30)
    assert q == pytest.approx(0.25 * 10 / (0.25 * 10 + 0.75 * 30))
    assert q * 30 / (q * 30 + (1 - q) * 10) == pytest.approx(0.25)  # targets from rehearsal rows
    assert row_share(0.0, 10, 30) == 0.0 and row_share(0.4, 7, 7) == pytest.approx(0.4)


def test_a_cut_off_answer_is_not_taught_to_stop():
    tok = load_tokenizer()
    prompt = [{"role": "user", "content": "Say hi."}]
    done = rehearsal_sample(tok, prompt, "Hi there.", finished=True)
    cut = rehearsal_sample(tok, prompt, "Hi there.", finished=False)
    targets = [i for i, t in enumerate(done.labels) if t != -100]
    assert done.input_ids == cut.input_ids
    assert done.labels[targets[-1]] == tok.convert_tokens_to_ids("<|im_end|>")
    assert cut.labels[: targets[-1]] == done.labels[: targets[-1]] and cut.labels[targets[-1]] == -100


def _samples_of(rows: torch.Tensor, positions: torch.Tensor, pad: int) -> list[list[int]]:
    """The samples in packed rows, split where the position ids restart (padding dropped)."""
    out = []
    for ids, pos in zip(rows.tolist(), positions.tolist(), strict=True):
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:], strict=False):
            sample = ids[a:b]
            if any(t != pad for t in sample):
                out.append(sample)
    return out


def test_a_run_trains_on_the_base_answers_at_the_share(tiny_dir, tmp_path):
    out = tmp_path / "r"
    summary = deltatune.train(dict(RUN, model=str(tiny_dir), output=str(out)))
    tok = load_tokenizer(str(tiny_dir))
    prompts = read_prompts(cost.GENERAL_PROMPTS)
    # the cached answers are the base model's own greedy answers (generated here independently)
    plain = deltatune.load(str(tiny_dir))
    expected = generations(plain, tok, prompts, 12)
    cached = json.loads((out / REHEARSAL_FILE).read_text())["answers"]
    assert [a["answer"] for a in cached] == [g.text for g in expected]
    assert [a["prompt"] for a in cached] == prompts
    assert [a["finished"] for a in cached] == [g.finished for g in expected]

    cfg = build_config(dict(RUN, model=str(tiny_dir), output=str(out)))
    train_rows, _, _ = build_data(cfg, tok)
    mix = Rehearsal(cfg).mix(plain, tok, train_rows, tmp_path / "again")  # regenerated: the same rows
    assert mix.rows.input_ids[: mix.task_rows].equal(train_rows.input_ids)
    # the rehearsal rows hold exactly the (prompt, base answer) chats, and no task sample
    reh = slice(mix.task_rows, None)
    packed = _samples_of(mix.rows.input_ids[reh], mix.rows.position_ids[reh], tok.pad_token_id)
    wanted = [rehearsal_sample(tok, a["prompt"], a["answer"], a["finished"]).input_ids for a in cached]
    assert sorted(packed) == sorted(wanted)
    # the loop trained on the mixed steps: its logged token counts are those of the mixed rows
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = [r["tokens"] for r in log if "tokens" in r]
    real = mix.rows.input_ids != tok.pad_token_id
    per_step = [int(real[mix.rows_for_step(s, 4, cfg.seed)].sum()) for s in range(cfg.max_steps)]
    assert tokens == [sum(per_step[: s + 1]) for s in range(cfg.max_steps)]
    r = summary["rehearsal"]
    assert r["prompts"] == 64 and r["rows"] == mix.rehearsal_rows
    assert abs(r["target_token_share"] - 0.3) < 0.08  # asked 30% of the target tokens
    targets = (mix.rows.labels[:, 1:] != -100).sum(1)
    chosen = torch.cat([mix.rows_for_step(s, 4, cfg.seed) for s in range(cfg.max_steps)])
    assert r["target_token_share"] == pytest.approx(
        float(targets[chosen[chosen >= mix.task_rows]].sum() / targets[chosen].sum())
    )
    assert "## Rehearsal" in (out / "report.md").read_text()


def test_resume_reuses_the_cached_answers_and_refuses_edited_ones(tiny_dir, tmp_path):
    cfg = dict(RUN, model=str(tiny_dir), max_steps=6, save_every=2, schedule="constant")
    whole = tmp_path / "whole"
    deltatune.train(dict(cfg, output=str(whole)))
    cut = tmp_path / "cut"  # the same run, stopped after its step-4 checkpoint
    shutil.copytree(whole, cut)
    (cut / "summary.json").unlink()
    shutil.rmtree(cut / "adapter")
    deltatune.train(dict(cfg, output=str(cut), resume=True))
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (whole, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    edited = tmp_path / "edited"
    shutil.copytree(whole, edited)
    (edited / "summary.json").unlink()
    record = json.loads((edited / REHEARSAL_FILE).read_text())
    record["answers"][0]["answer"] += " changed"
    (edited / REHEARSAL_FILE).write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="rehearsal data differ"):
        deltatune.train(dict(cfg, output=str(edited), resume=True))


def test_bad_rehearsal_prompts_fail_before_anything_is_written(tiny_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hello"}\n{"answer": "no prompt"}\n')
    out = tmp_path / "r"
    with pytest.raises(DataError, match=r"p\.jsonl:2"):
        deltatune.train(dict(RUN, model=str(tiny_dir), output=str(out), rehearsal_prompts=str(prompts)))
    assert not out.exists()
    with pytest.raises(ConfigError, match="rehearsal_prompts.*only applies with rehearsal > 0"):
        build_config(dict(RUN, rehearsal=0.0, rehearsal_prompts=str(prompts)))


def test_ddp_ranks_train_on_rank_zero_answers_like_one_process(tiny_dir, tmp_path):
    """Rank 0 generates and broadcasts the answers; two processes equal one with grad_accum 2."""
    flags = [
        x
        for k, v in dict(RUN, model=tiny_dir, max_steps=4, grad_accum=1).items()
        for x in (f"--{k.replace('_', '-')}", str(v))
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "deltatune", "train", *flags]
    one = subprocess.run(
        [*run, "--grad-accum", "2", "--output", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stdout + one.stderr
    ddp = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547"]
    two = subprocess.run(
        [*ddp, "-m", "deltatune", "train", *flags, "--output", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("one", "two"))
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, atol=1e-5, rtol=1e-4)
    assert (tmp_path / "one" / REHEARSAL_FILE).read_text() == (tmp_path / "two" / REHEARSAL_FILE).read_text()
