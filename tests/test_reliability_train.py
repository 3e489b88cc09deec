"""Hostile input for train, merge, compress and export (issue 11): resume refuses what it cannot
continue, divergence keeps only good checkpoints, and every expected failure is one line, exit 2,
no traceback, nothing written."""

import ctypes
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import deltatune
from deltatune.atomic import OutputPathError, check_writable
from deltatune.cli import app
from deltatune.data import IGNORE_INDEX, Sample, pack
from deltatune.models import load_tokenizer, tiny_llama
from deltatune.train import resume
from deltatune.train.loop import TrainingDiverged

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
FAST = dict(
    task="addition",
    train_samples=32,
    eval_samples=0,
    batch_size=2,
    max_seq_len=128,
    precision="fp32",
    warmup_steps=1,
    schedule="constant",
    lora_r=4,
    learning_rate=1e-2,
)


def _flags(values: dict) -> list[str]:
    return [x for k, v in values.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def _train(*args):
    return CliRunner().invoke(app, ["train", *map(str, args)])


def _one_line_failure(res, *needles: str) -> str:
    """Exit 2 through the CLI's error policy: one `error:` line, last, no traceback; returns it."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and res.stderr.strip().splitlines()[-1] == errors[0], res.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _snapshot(path: Path) -> dict[str, str]:
    """Every file under `path` (hidden ones too) with a hash of its bytes: equal means nothing written."""
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(path.rglob("*"))
    }


def _interrupted_run(out: Path, tiny_dir: Path, **overrides) -> dict:
    """A run killed after its last checkpoint: train it, then remove what only the end writes."""
    cfg = dict(FAST, model=str(tiny_dir), max_steps=4, save_every=2, output=str(out), **overrides)
    deltatune.train(cfg)
    for name in ("summary.json", "loss.png"):
        (out / name).unlink()
    for f in (out / "adapter").iterdir():
        f.unlink()
    (out / "adapter").rmdir()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    return cfg


# --- resume -----------------------------------------------------------------------------------------


def test_resume_refuses_every_result_changing_key_in_one_message(tmp_path, tiny_dir):
    out = tmp_path / "run"
    cfg = _interrupted_run(out, tiny_dir)
    before = _snapshot(out)
    changed = dict(lora_alpha=7, use_rslora=True, seed=1, max_seq_len=96, lora_r=8, learning_rate=0.02)
    res = _train(*_flags(dict(cfg, **changed)), "--resume", "true")
    line = _one_line_failure(res, "cannot continue", "step-000002", "start a new run")
    for key in changed:
        assert f"{key} " in line, (key, line)
    for key in ("eval_every", "log_every", "max_steps"):  # the message says what may change
        assert key in line
    assert _snapshot(out) == before  # config.json is not overwritten


def test_resume_with_allowed_changes_continues_the_same_run(tmp_path, tiny_dir):
    """Bookkeeping keys may change, and max_steps extends a constant-schedule run: the result is the
    uninterrupted run of the new length."""
    out = tmp_path / "run"
    cfg = _interrupted_run(out, tiny_dir)
    res = _train(
        *_flags(dict(cfg, max_steps=5, log_every=1, eval_every=3, keep_checkpoints=3)), "--resume", "true"
    )
    assert res.exit_code == 0, res.output
    assert "resumed from" in res.output and "step-000002" in res.output
    straight = dict(cfg, max_steps=5, output=str(tmp_path / "straight"))
    deltatune.train(straight)
    got = load_file(out / "adapter" / "adapter_model.safetensors")
    want = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0)
    assert json.loads((out / "config.json").read_text())["max_steps"] == 5


def test_config_changes_by_hand():
    stored = {
        "max_steps": 10,
        "schedule": "cosine",
        "seed": 0,
        "eval_every": 0,
        "output": "a",
        "resume": False,
    }
    assert resume.config_changes(stored, dict(stored, eval_every=5, output="b", resume=True), step=4) == []
    assert resume.config_changes(stored, dict(stored, max_steps=20), step=4) == [
        "max_steps 10 -> 20 (the cosine decay depends on it)"
    ]
    constant = dict(stored, schedule="constant")
    assert resume.config_changes(constant, dict(constant, max_steps=20), step=4) == []
    assert resume.config_changes(constant, dict(constant, max_steps=3), step=4) == [
        "max_steps 10 -> 3 is below the checkpoint's step 4"
    ]
    assert resume.config_changes(stored, dict(stored, seed=1, lora_r=8), step=4) == [
        "lora_r unset -> 8",
        "seed 0 -> 1",
    ]
    # a key added to deltatune after the run was made counts as its default
    assert resume.config_changes(stored, dict(stored, lora_r=16), step=4, defaults={"lora_r": 16}) == []
    assert resume.config_changes(stored, dict(stored, lora_r=8), step=4, defaults={"lora_r": 16}) == [
        "lora_r 16 -> 8"
    ]


def test_resume_of_a_finished_run_says_so_and_writes_nothing(tmp_path, tiny_dir):
    out = tmp_path / "run"
    cfg = dict(FAST, model=str(tiny_dir), max_steps=2, save_every=1, output=str(out))
    deltatune.train(cfg)
    before = _snapshot(out)
    for mode in ("true", "auto"):
        _one_line_failure(_train(*_flags(cfg), "--resume", mode), "is finished", "2 steps")
    assert _snapshot(out) == before


def test_resume_without_a_checkpoint_is_an_error_and_auto_starts_fresh(tmp_path, tiny_dir):
    out = tmp_path / "new"
    flags = _flags(dict(FAST, model=tiny_dir, max_steps=3, save_every=2, output=out))
    _one_line_failure(_train(*flags, "--resume", "true"), "no checkpoint to resume", "--resume auto")
    assert not out.exists()
    _one_line_failure(_train(*flags[:-2], "--resume", "true"), "config key 'resume': needs --output")
    res = _train(*flags, "--resume", "auto")  # nothing to resume: a fresh run
    assert res.exit_code == 0 and "resumed from" not in res.output, res.output
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_resume_auto_continues_an_interrupted_run(tmp_path, tiny_dir):
    out = tmp_path / "run"
    cfg = _interrupted_run(out, tiny_dir)
    res = _train(*_flags(cfg), "--resume", "auto")
    assert res.exit_code == 0 and "resumed from" in res.output, res.output


def test_resume_refuses_changed_data_under_the_same_path(tmp_path, tiny_dir):
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": f"{i} plus {i} is", "completion": f" {2 * i}"} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cfg = _interrupted_run(out, tiny_dir, data=str(data), task=None)
    data.write_text("".join(json.dumps(dict(r, completion=" no")) + "\n" for r in rows))
    before = _snapshot(out)
    _one_line_failure(
        _train(*_flags({k: v for k, v in cfg.items() if v is not None}), "--resume", "true"),
        "training data differ",
    )
    assert _snapshot(out) == before


# --- divergence -------------------------------------------------------------------------------------


def _forward_loss(tiny_dir: Path, ckpt: Path) -> float:
    model = deltatune.load(str(tiny_dir), adapter=ckpt).eval()
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


def test_exploding_learning_rate_keeps_no_poisoned_checkpoint(tmp_path, tiny_dir):
    """lr 1e30 puts lora_B near 1e29 after one step: finite, but the next forward is NaN. That
    step's checkpoint must not be kept as good; here no step was good, and the message says so."""
    out = tmp_path / "run"
    flags = _flags(dict(FAST, model=tiny_dir, max_steps=10, save_every=1, learning_rate=1e30, output=out))
    _one_line_failure(_train(*flags), "loss became nan", "no checkpoint was kept")
    kept = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else []
    for ckpt in kept:  # (none are expected; any that exists must work)
        assert all(t.isfinite().all() for t in load_file(ckpt / resume.STATE_TENSORS).values())
        assert torch.isfinite(torch.tensor(_forward_loss(tiny_dir, ckpt)))
    assert kept == []
    assert not (out / "summary.json").exists()


class _PoisonedAdamW(torch.optim.AdamW):
    """AdamW whose third step leaves an infinite second moment (the parameters stay finite)."""

    def step(self, closure=None):
        out = super().step(closure)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 3:
            next(iter(self.state.values()))["exp_avg_sq"].fill_(float("inf"))
        return out


def test_nonfinite_optimizer_state_is_caught_before_it_is_checkpointed(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", _PoisonedAdamW)
    out = tmp_path / "run"
    cfg = dict(FAST, model=str(tiny_dir), max_steps=8, save_every=1, keep_checkpoints=10, output=str(out))
    with pytest.raises(TrainingDiverged) as err:
        deltatune.train(cfg)
    message = str(err.value)
    assert "(optimizer exp_avg_sq) became non-finite at step 3" in message
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-000002'}" in message
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept == ["step-000001", "step-000002"]
    for name in kept:
        assert all(
            t.isfinite().all() for t in load_file(out / "checkpoints" / name / resume.STATE_TENSORS).values()
        )


# --- data that truncation empties -------------------------------------------------------------------


def test_pack_drops_samples_whose_targets_are_all_truncated():
    m = IGNORE_INDEX
    keep = Sample([1, 2, 3], [m, 2, 3])
    cut = Sample([4, 5, 6, 7, 8, 9], [m, m, m, m, 8, 9])  # its targets start after max_len 4
    packed = pack([cut, keep], max_len=4, pad_id=0)
    assert packed.input_ids.tolist() == [[1, 2, 3, 0]]
    assert (packed.stats.samples, packed.stats.dropped_samples, packed.stats.target_tokens) == (1, 1, 2)
    edge = Sample([4, 5, 6, 7, 8], [m, m, m, 7, 8])  # target token 7 is the 4th token: kept
    assert pack([edge], max_len=4, pad_id=0).stats.dropped_samples == 0


def _long_prompt(n_words: int) -> dict:
    return {"prompt": " ".join(["lorem"] * n_words), "completion": " ipsum"}


def test_data_whose_only_sample_truncation_empties_fails_before_writing(tmp_path, tiny_dir):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps(_long_prompt(3000)) + "\n")
    out = tmp_path / "run"
    flags = _flags(dict(FAST, model=tiny_dir, data=data, max_seq_len=64, max_steps=2, output=out))
    _one_line_failure(_train(*flags), "long.jsonl", "lose every target token", "max_seq_len 64")
    assert not out.exists()


def test_truncation_emptied_samples_are_dropped_and_counted(tmp_path, tiny_dir):
    data = tmp_path / "mixed.jsonl"
    short = {"prompt": "two plus two is", "completion": " four"}
    data.write_text("".join(json.dumps(r) + "\n" for r in [_long_prompt(3000), short, short]))
    out = tmp_path / "run"
    res = _train(*_flags(dict(FAST, model=tiny_dir, data=data, max_seq_len=64, max_steps=2, output=out)))
    assert res.exit_code == 0, res.output
    assert "2 samples" in res.output and "1 dropped" in res.output
    packing = json.loads((out / "summary.json").read_text())["packing"]
    assert (packing["samples"], packing["dropped_samples"]) == (2, 1)


# --- outputs that cannot be written -----------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Inputs for merge, compress and export: two tiny models and a LoRA adapter with nonzero B."""
    root = tmp_path_factory.mktemp("inputs")
    for seed in (0, 1):
        tiny_llama(seed=seed).save_pretrained(root / f"m{seed}")
    load_tokenizer().save_pretrained(root / "m0")
    model = deltatune.add_delta(tiny_llama(seed=0), "lora", lora_r=2)
    with torch.no_grad():
        for p in deltatune.deltas.named_delta_parameters(model).values():
            p.add_(0.1)
    deltatune.save_delta(model, root / "lora")
    (root / "merge.yaml").write_text(
        f"merge_method: linear\nmodels:\n  - model: {root / 'm0'}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {root / 'm1'}\n    parameters: {{weight: 0.5}}\ndtype: float32\n"
    )
    return root


def _verbs(a: Path, out: Path, tiny_dir: Path) -> dict[str, list[str]]:
    return {
        "train": ["train", *_flags(dict(FAST, model=tiny_dir, max_steps=1, output=out))],
        "merge": ["merge", str(a / "merge.yaml"), str(out)],
        "compress": ["compress", str(a / "lora"), str(out)],
        "export": ["export", str(out), "--model", str(a / "m0"), "--adapter", str(a / "lora"), "--merge"],
        "export-gguf": ["export", f"{out}.gguf", "--model", str(a / "m0"), "--format", "gguf"],
    }


VERBS = ("train", "merge", "compress", "export", "export-gguf")


@pytest.mark.parametrize("verb", VERBS)
def test_output_under_a_file_is_one_line(verb, tmp_path, artifacts, tiny_dir):
    (tmp_path / "file").write_text("not a directory")
    out = tmp_path / "file" / "sub" / "out"
    before = _snapshot(tmp_path)
    res = CliRunner().invoke(app, _verbs(artifacts, out, tiny_dir)[verb])
    _one_line_failure(res, str(out), f"{tmp_path / 'file'} is not a directory")
    assert _snapshot(tmp_path) == before


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory nothing can be created in: chmod 555 for a user; for root (whom permission bits
    do not stop) the immutable attribute, or a skip where the container does not allow it."""
    path = tmp_path / "locked"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root without CAP_LINUX_IMMUTABLE: no directory can be made unwritable")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("verb", VERBS)
def test_unwritable_output_directory_is_one_line(verb, unwritable_dir, artifacts, tiny_dir):
    out = unwritable_dir / "out"
    res = CliRunner().invoke(app, _verbs(artifacts, out, tiny_dir)[verb])
    _one_line_failure(res, str(out), f"cannot create files in {unwritable_dir}")
    assert list(unwritable_dir.iterdir()) == []


def test_check_writable_names_the_path(tmp_path):
    check_writable(tmp_path / "a" / "b")  # missing parents are fine: they will be made
    assert not (tmp_path / "a").exists() and list(tmp_path.iterdir()) == []  # the probe is gone
    (tmp_path / "f").write_text("")
    with pytest.raises(
        OutputPathError, match=re.escape(f"output {tmp_path / 'f'}: {tmp_path / 'f'} is not a directory")
    ):
        check_writable(tmp_path / "f")


# --- unreadable model files (permission bits, so root must give up its override) -----------------------


def _drop_file_permission_override() -> None:
    """In the child: give up CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so root obeys permission bits."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _run_without_override(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    try:
        return subprocess.run(
            [sys.executable, "-m", "deltatune", *args],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=_drop_file_permission_override if os.geteuid() == 0 else None,
        )
    except subprocess.SubprocessError as err:
        if "preexec_fn" in str(err):
            pytest.skip(f"root cannot drop CAP_DAC_OVERRIDE here, so permission bits cannot be tested: {err}")
        raise


def test_unreadable_model_file_says_permission_denied(tmp_path, tiny_dir):
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    (model / "model.safetensors").chmod(0)
    out = tmp_path / "run"
    res = _run_without_override(["train", *_flags(dict(FAST, model=model, max_steps=1, output=out))])
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: permission denied: {model / 'model.safetensors'}"], res.stderr
    assert not out.exists()
