"""The training loop on a tiny random model: loss math, accumulation, resume, DDP, divergence, CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import deltatune
from deltatune.cli import app
from deltatune.models import load_tokenizer, tiny_llama
from deltatune.train.config import ConfigError, build_config, load_config, parse_overrides
from deltatune.train.loop import CausalLMLoss, TrainingDiverged, lr_factor, param_groups, rows_for_step

FAST = dict(
    task="addition",
    train_samples=64,
    eval_samples=0,
    batch_size=2,
    max_seq_len=128,
    save_every=0,
    precision="fp32",
    warmup_steps=1,
    lora_r=4,
    learning_rate=1e-2,
)


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _cli(*args, env_extra=None, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "deltatune", "train", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _flags(values: dict) -> list[str]:
    return [x for k, v in values.items() for x in (f"--{k.replace('_', '-')}", str(v))]


# --- loss and schedule math -------------------------------------------------------------------------


def test_chunked_loss_equals_full_cross_entropy():
    model = tiny_llama(seed=1).eval()
    ids = torch.randint(0, 49152, (3, 20), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :7] = -100
    labels[1, 15:] = -100
    pos = torch.arange(20).expand(3, -1)
    ours = CausalLMLoss(model, chunk_tokens=5)(ids, pos, labels)
    logits = model(ids).logits[:, :-1]
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)


def test_lr_schedule_and_loraplus_groups():
    cfg = build_config(dict(max_steps=100, warmup_steps=10, learning_rate=1e-3, lora_plus_ratio=16, lora_r=4))
    assert lr_factor(0, cfg) == pytest.approx(1 / 11)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    model = deltatune.add_delta(tiny_llama(), "lora", cfg.delta_config())
    groups = param_groups(model, cfg)
    assert [g["lr"] for g in groups] == [1e-3, 1.6e-2]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


def test_rows_for_step_covers_each_epoch_once():
    seen = torch.cat([rows_for_step(s, 10, 5, seed=3) for s in range(2)])
    assert sorted(seen.tolist()) == list(range(10))
    assert not torch.equal(rows_for_step(2, 10, 5, seed=3), rows_for_step(0, 10, 5, seed=3))


# --- config validation ------------------------------------------------------------------------------


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown config key 'lerning_rate' \(did you mean 'learning_rate'\?\)"
    ):
        build_config({"lerning_rate": 1e-3})
    with pytest.raises(ConfigError, match="config key 'learning_rate': .*got 'fast'"):
        build_config({"learning_rate": "fast"})
    with pytest.raises(ConfigError, match="config key 'lora_r': Input should be greater than or equal to 1"):
        build_config({"lora_r": 0})
    with pytest.raises(ConfigError, match="config key 'method': unknown method 'lorax'; valid: lora, dora"):
        build_config({"method": "lorax"})
    assert parse_overrides(["--learning-rate", "1e-3", "--use-rslora", "true", "--max-steps=5"]) == {
        "learning_rate": 1e-3,
        "use_rslora": True,
        "max_steps": 5,
    }
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: lora\nlearning_rate: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ invalid YAML"):
        load_config(bad)
    (tmp_path / "c.yaml").write_text("max_steps: 3\nlora_alpha: -1\n")
    with pytest.raises(ConfigError, match="c.yaml: config key 'lora_alpha'"):
        load_config(tmp_path / "c.yaml")


def test_cli_bad_config_and_bad_data_write_nothing(tmp_path, tiny_dir):
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--model", str(tiny_dir), "--max-stepz", "3", "--output", str(out)])
    assert res.exit_code == 2 and "unknown config key 'max_stepz'" in res.output
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n')
    res = runner.invoke(app, ["train", "--model", str(tiny_dir), "--data", str(data), "--output", str(out)])
    assert res.exit_code == 2 and "d.jsonl:2" in res.output
    res = runner.invoke(app, ["train", "--model", str(tmp_path / "nope"), "--output", str(out)])
    assert res.exit_code == 2 and "model not found" in res.output
    assert not out.exists()


# --- the loop ---------------------------------------------------------------------------------------


def test_grad_accumulation_matches_one_big_batch(tmp_path, tiny_dir):
    """Normalising by the step's real target tokens makes the split of a step irrelevant."""
    runs = {}
    for bs, accum in [(4, 1), (2, 2), (1, 4)]:
        cfg = dict(
            FAST,
            model=str(tiny_dir),
            max_steps=3,
            batch_size=bs,
            grad_accum=accum,
            output=str(tmp_path / f"r{bs}"),
        )
        deltatune.train(cfg)
        runs[bs] = _adapter(tmp_path / f"r{bs}")
    for bs in (2, 1):
        for k, v in runs[4].items():
            torch.testing.assert_close(runs[bs][k], v, atol=2e-5, rtol=1e-4)


def test_training_reduces_loss_and_writes_run_dir(tmp_path, tiny_dir):
    cfg = dict(
        FAST,
        model=str(tiny_dir),
        max_steps=25,
        eval_samples=8,
        eval_every=10,
        output=str(tmp_path / "r"),
        precision="auto",
        lora_r=8,
        learning_rate=1e-2,
    )
    summary = deltatune.train(cfg)
    log = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.8 * losses[0]
    assert any("eval_loss" in r for r in log)
    for key in (
        "trainable_params",
        "total_params",
        "tokens_per_second",
        "peak_memory_bytes",
        "final_loss",
        "eval",
    ):
        assert key in summary
    assert set(summary["eval"]["addition"]) == {"before", "after"}
    assert (tmp_path / "r" / "loss.png").stat().st_size > 1000
    # the saved adapter reproduces the trained model's outputs through the public API
    ids = torch.randint(0, 49152, (1, 10))
    loaded = deltatune.load(str(tiny_dir), adapter=tmp_path / "r" / "adapter")
    assert loaded(ids).logits.isfinite().all()


@pytest.mark.parametrize("base_dtype", ["bf16", "fp32"])
def test_base_dtype_sets_the_frozen_weights_autocast_sees(tmp_path, tiny_dir, base_dtype):
    """Step 1's loss is the base model's (B = 0): with base_dtype fp32 it is the fp32 base under bf16
    autocast (what peft + Trainer with bf16=True computes), with bf16 the base held in bf16."""
    from deltatune import attention
    from deltatune.data import pack, task_samples
    from deltatune.models import load_model

    cfg = FAST | dict(model=str(tiny_dir), precision="bf16", base_dtype=base_dtype, max_steps=1, log_every=1)
    summary = deltatune.train(cfg | dict(output=str(tmp_path / "run"), cost_metrics=False))
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert summary["base_dtype"] == base_dtype

    tok = load_tokenizer(str(tiny_dir))
    rows = pack(task_samples("addition", "train", 64, tok, seed=0), 128, tok.pad_token_id, order="shuffled")
    idx = rows_for_step(0, rows.input_ids.shape[0], 2, 0)
    batch = [t[idx] for t in (rows.input_ids, rows.position_ids, rows.labels)]
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(str(tiny_dir), dtype=dtype)
        attention.use_packed_attention(model)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            losses[dtype] = (CausalLMLoss(model, 1024)(*batch) / int((batch[2][:, 1:] != -100).sum())).item()
    assert losses[torch.float32] != losses[torch.bfloat16]  # the two bases differ on this model
    assert logged == pytest.approx(
        losses[torch.float32 if base_dtype == "fp32" else torch.bfloat16], rel=1e-6
    )


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_dir):
    cfg = dict(
        FAST,
        model=str(tiny_dir),
        max_steps=30,
        save_every=1,
        keep_checkpoints=30,
        learning_rate=1e30,
        max_grad_norm=0,
        warmup_steps=0,
        schedule="constant",
        output=str(tmp_path / "r"),
    )
    # step 1 leaves lora_B near 1e30 (finite) and step 2's loss is NaN: step 1 was never good, so its
    # checkpoint, written only once step 2 proves it, is not kept (tests/test_reliability_train.py)
    with pytest.raises(TrainingDiverged, match="loss became nan .* at step 2; .* no checkpoint was kept"):
        deltatune.train(cfg)
    assert not list((tmp_path / "r" / "checkpoints").glob("step-*"))
    assert not (tmp_path / "r" / "summary.json").exists()


def assert_sigkill_resume_matches_uninterrupted(tmp_path, flags: list[str], kill_after: str) -> None:
    """Train `flags` to the end; train again, SIGKILL once checkpoint `kill_after` exists, resume:
    the resumed adapter must equal the uninterrupted one."""
    ref = _cli(*flags, "--output", tmp_path / "ref")
    assert ref.wait(timeout=300) == 0, ref.stdout.read()

    victim = _cli(*flags, "--output", tmp_path / "cut")
    deadline = time.time() + 300
    while not list((tmp_path / "cut" / "checkpoints").glob(kill_after)) and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "cut" / "summary.json").exists(), "the run was killed before it finished"

    resumed = _cli(*flags, "--output", tmp_path / "cut", "--resume", "true")
    log = resumed.stdout.read()
    assert resumed.wait(timeout=300) == 0, log
    assert "resumed from" in log
    ref_w, cut_w = _adapter(tmp_path / "ref"), _adapter(tmp_path / "cut")
    assert ref_w.keys() == cut_w.keys()
    for k, v in ref_w.items():
        torch.testing.assert_close(cut_w[k], v, atol=1e-6, rtol=0)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_dir):
    flags = _flags(dict(FAST, model=tiny_dir, max_steps=16, save_every=2, lora_dropout=0.1))
    assert_sigkill_resume_matches_uninterrupted(tmp_path, flags, "step-000006")


def test_ddp_two_processes_match_single_process(tmp_path, tiny_dir):
    base = dict(FAST, model=tiny_dir, max_steps=4, batch_size=2)
    single = _cli(*_flags(dict(base, grad_accum=2)), "--output", tmp_path / "one")
    assert single.wait(timeout=300) == 0, single.stdout.read()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "deltatune",
        "train",
        *map(str, _flags(base)),
        "--output",
        str(tmp_path / "two"),
    ]
    ddp = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2
    one, two = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    for k, v in one.items():  # same global batch; only the fp32 summation order differs
        torch.testing.assert_close(two[k], v, atol=1e-5, rtol=1e-4)


def test_export_merged_loads_in_plain_transformers(tmp_path, tiny_dir):
    model = deltatune.add_delta(AutoModelForCausalLM.from_pretrained(tiny_dir), "dora", lora_r=4)
    with torch.no_grad():
        for p in deltatune.deltas.named_delta_parameters(model).values():
            p.add_(0.1 * torch.randn_like(p))
    deltatune.save_delta(model, tmp_path / "a")
    res = CliRunner().invoke(
        app,
        [
            "export",
            str(tmp_path / "m"),
            "--model",
            str(tiny_dir),
            "--adapter",
            str(tmp_path / "a"),
            "--merge",
        ],
    )
    assert res.exit_code == 0, res.output
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 49152, (2, 9))
    torch.testing.assert_close(plain(ids).logits, model.eval()(ids).logits, atol=1e-4, rtol=0)


def test_export_keeps_bias_deltas(tmp_path, tiny_dir):
    """BitFit adds biases to bias-free Llama linears; the exported model must still carry them."""
    model = deltatune.add_delta(AutoModelForCausalLM.from_pretrained(tiny_dir), "bitfit")
    with torch.no_grad():
        for p in deltatune.deltas.named_delta_parameters(model).values():
            p.add_(0.1 * torch.randn_like(p))
    deltatune.save_delta(model, tmp_path / "a")
    from deltatune.export import export_merged

    export_merged(str(tiny_dir), tmp_path / "a", tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 49152, (2, 9))
    torch.testing.assert_close(plain(ids).logits, model.eval()(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["pissa", "vera", "graft", "mixlora"])
def test_resume_restores_raw_training_state(method, tmp_path, tiny_dir):
    """Methods with buffers (VeRA, PiSSA) or a save-time selection (graft) resume exactly too."""
    cfg = dict(
        FAST, model=str(tiny_dir), method=method, max_steps=6, save_every=3, output=str(tmp_path / "r")
    )
    cfg.pop("lora_r")
    deltatune.train(cfg)
    straight = _adapter(tmp_path / "r")
    (tmp_path / "r" / "summary.json").unlink()
    deltatune.train(dict(cfg, resume=True))  # continues from the step-3 checkpoint
    for k, v in straight.items():
        torch.testing.assert_close(_adapter(tmp_path / "r")[k], v, atol=1e-6, rtol=0)


def test_activation_checkpointing_gives_the_same_training(tmp_path, tiny_dir):
    runs = {}
    for ckpt in (False, True):
        cfg = dict(
            FAST,
            model=str(tiny_dir),
            max_steps=3,
            gradient_checkpointing=ckpt,
            output=str(tmp_path / f"c{ckpt}"),
        )
        deltatune.train(cfg)
        runs[ckpt] = _adapter(tmp_path / f"c{ckpt}")
    for k, v in runs[False].items():
        torch.testing.assert_close(runs[True][k], v, atol=1e-6, rtol=1e-5)


def test_generate_and_eval_cli(tmp_path, tiny_dir):
    runner = CliRunner()
    res = runner.invoke(app, ["generate", "What is 2+2?", "--model", str(tiny_dir), "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    from deltatune.train.evaluate import generate

    expected = generate(
        model, load_tokenizer(str(tiny_dir)), [[{"role": "user", "content": "What is 2+2?"}]], 4
    )[0]
    assert res.stdout.rstrip("\n") == expected
    res = runner.invoke(app, ["eval", "--model", str(tiny_dir), "--task", "addition", "--n", "4"])
    assert res.exit_code == 0 and "exact match: 0.0% of 4" in res.output, res.output
    res = runner.invoke(app, ["eval", "--model", str(tiny_dir), "--task", "algebra"])
    assert res.exit_code == 2 and "addition" in res.output  # the error lists the valid tasks
