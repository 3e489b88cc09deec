"""FSDP (train/fsdp.py): two CPU processes under torchrun (gloo) against one process at the same
global batch, checkpoints and a resume under FSDP, and the configurations FSDP refuses.

Tolerance: every tensor (adapter weights, the checkpoint's delta and AdamW moments) within 1e-3 of
the single-process one in relative Frobenius norm, ||a - b|| / ||b||; logged loss and gradient norm
within rtol 1e-4. The same global batch gives the same gradients up to fp32 rounding only: under
FSDP the gradient norm for clipping is summed shard by shard, and the layers' matmuls read weights
gathered into one flat buffer, so the additions happen in another order. Adam then amplifies
those ~1e-7 relative differences where a gradient entry is small. Measured after 12 steps:
1.5e-5 on the adapter (1.3e-5 absolute on weights of ~0.18), 1.4e-4 at worst on a first moment,
4e-6 on loss and gradient norm (DDP, which adds the same numbers in the same order, is bitwise
equal). A real error is far above the tolerance: normalising each rank's loss by its own target
count instead of the step's gives 0.2 on the adapter and 0.8 on the moments.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from deltatune.cli import app
from deltatune.train.config import ConfigError, build_config

FLAGS = dict(
    task="addition",
    train_samples=64,
    eval_samples=0,
    batch_size=2,
    max_seq_len=128,
    precision="fp32",
    warmup_steps=1,
    lora_r=4,
    learning_rate=1e-2,
    max_steps=12,
    save_every=2,
    keep_checkpoints=10,
)
REL = 1e-3  # relative Frobenius error per tensor (see the module docstring)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def _flags(values: dict) -> list[str]:
    return [x for k, v in values.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def _train(args: list[str], processes: int = 1) -> subprocess.Popen:
    """`deltatune train` in one process, or under torchrun with `processes` ranks (a free port)."""
    launch = [sys.executable, "-m", "deltatune"]
    if processes > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launch += ["--nproc_per_node", str(processes), "-m", "deltatune"]
    return subprocess.Popen(
        [*launch, "train", *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    return log


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(path).items() if not k.startswith("rng.")}  # RNG: per rank


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].shape == v.shape, k  # whole tensors on disk, not one rank's shard
        error = float((got[k].double() - v.double()).norm() / v.double().norm().clamp_min(1e-30))
        assert error <= REL, f"{k}: relative error {error:.2e}"


def _logged(run: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_dir) -> Path:
    """One process, two micro-batches of 2 rows: the global batch of 2 ranks x 2 rows."""
    out = tmp_path_factory.mktemp("single") / "run"
    _finish(_train([*_flags(dict(FLAGS, model=tiny_dir, grad_accum=2)), "--output", str(out)]))
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_dir) -> tuple[Path, str]:
    """The same run in two FSDP ranks, one row each per step: (run directory, its log)."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    log = _finish(_train([*_flags(dict(FLAGS, model=tiny_dir)), "--fsdp", "true", "--output", str(out)], 2))
    return out, log


def test_fsdp_two_processes_match_single_process(single, sharded):
    out, log = sharded
    # the parameters really were sharded: rank 0 holds about half of them
    held, total = (
        int(x.replace(",", "")) for x in log.split("rank 0 holds ")[1].split(" parameter")[0].split(" of ")
    )
    assert 0.4 * total < held < 0.6 * total, log
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    got, want = _logged(out), _logged(single)
    assert [r[0] for r in got] == [r[0] for r in want] == [5, 10, 12]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=0)
    _assert_equal(
        _tensors(out / "adapter" / "adapter_model.safetensors"),
        _tensors(single / "adapter" / "adapter_model.safetensors"),
    )
    # checkpoints hold the whole delta and AdamW moments (gathered), equal to the single process's
    for step in ("step-000002", "step-000010"):
        _assert_equal(
            _tensors(out / "checkpoints" / step / "trainer_state.safetensors"),
            _tensors(single / "checkpoints" / step / "trainer_state.safetensors"),
        )


def test_fsdp_resume_matches_single_process(tmp_path, tiny_dir, single, sharded):
    """The FSDP run as a kill after step 4 leaves it (tests/test_train.py kills real runs; what is
    new here is loading a whole checkpoint into shards): resumed under FSDP it ends as one process."""
    done, cut = sharded[0], tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copy(done / "config.json", cut)
    shutil.copy(done / "metrics.jsonl", cut)
    shutil.copytree(done / "checkpoints" / "step-000004", cut / "checkpoints" / "step-000004")
    shutil.copytree(done / "checkpoints" / "step-000006", cut / "checkpoints" / "unconfirmed-step-000006")
    args = [*_flags(dict(FLAGS, model=tiny_dir)), "--fsdp", "true", "--output", str(cut), "--resume", "true"]
    log = _finish(_train(args, 2))
    assert "resumed from" in log and "step-000004" in log
    _assert_equal(
        _tensors(cut / "adapter" / "adapter_model.safetensors"),
        _tensors(single / "adapter" / "adapter_model.safetensors"),
    )
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 12], steps  # log_every 5: nothing after step 4 was logged twice


def test_fsdp_refuses_one_process_and_a_quantized_base(monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=r"config key 'fsdp': needs 2 or more processes"):
        build_config({"fsdp": True})
    res = CliRunner().invoke(app, ["train", "--fsdp", "true", "--output", str(tmp_path / "r")])
    assert res.exit_code == 2 and "config key 'fsdp'" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert build_config({"fsdp": True}).fsdp
    with pytest.raises(ConfigError, match=r"config key 'quantize': nf4 does not combine with fsdp"):
        build_config({"fsdp": True, "quantize": "nf4"})
    assert build_config({"quantize": "nf4"}).quantize == "nf4"  # DDP over a quantized base is fine
    with pytest.raises(ConfigError, match=r"config key 'fsdp': method 'prompt_tuning' does not train"):
        build_config({"fsdp": True, "method": "prompt_tuning"})
    assert build_config({"fsdp": True, "method": "prefix_tuning"}).fsdp
