"""The CLI's help and option checks, generated from and validated by the pydantic models."""

import json
import os
import subprocess
import sys
import typing

import pytest
from typer.testing import CliRunner

import deltatune.serve.app
from deltatune.cli import app
from deltatune.deltas import get_method
from deltatune.serve.engine import EngineOptions
from deltatune.train.config import TrainConfig

runner = CliRunner()


def _help_lines(args: list[str]) -> list[str]:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return res.output.splitlines()


def _assert_listed(lines: list[str], fields: dict, flags: bool = True) -> None:
    """Each field has one line with its name, type, default and (where it has one) description."""
    for name, field in fields.items():
        key = f"--{name.replace('_', '-')}" if flags else name
        line = next((ln for ln in lines if ln.split()[:1] == [key]), None)
        assert line is not None, f"{key} missing from help"
        annotation = field.annotation
        if isinstance(annotation, type):
            assert f"<{annotation.__name__}>" in line, line
        for choice in typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else ():
            assert (json.dumps(choice) if isinstance(choice, bool) else choice) in line, line
        default = field.get_default(call_default_factory=True)
        if default is not None:
            shown = json.dumps(default) if isinstance(default, bool | list | dict) else default
            assert f"[default: {shown}]" in line, line
        assert (field.description or "") in line


def test_train_help_lists_every_core_key_and_the_default_methods_keys():
    lines = _help_lines(["train", "--help"])
    core = {k: v for k, v in TrainConfig.model_fields.items() if k != "method_args"}  # internal
    assert all(field.description for field in core.values())
    _assert_listed(lines, core)
    _assert_listed(lines, get_method("lora").config_class.model_fields)


def test_train_help_for_a_method_lists_its_keys_only():
    dora = get_method("dora").config_class.model_fields
    _assert_listed(_help_lines(["train", "--method", "dora", "--help"]), dora)
    ia3 = _help_lines(["train", "--method=ia3", "--help"])
    _assert_listed(ia3, get_method("ia3").config_class.model_fields)
    assert not any(line.split()[:1] == ["--lora-r"] for line in ia3)
    res = runner.invoke(app, ["train", "--method", "nope", "--help"])
    assert res.exit_code == 2 and "unknown method 'nope'" in res.output


def test_serve_help_lists_every_engine_option():
    _assert_listed(_help_lines(["serve", "--help"]), EngineOptions.model_fields, flags=False)


@pytest.fixture
def served(monkeypatch):
    """Records what `deltatune serve` would pass to the server (which would load the model)."""
    calls = []
    monkeypatch.setattr(deltatune.serve.app, "serve", lambda *args, **kwargs: calls.append(kwargs))
    return calls


@pytest.mark.parametrize(
    ("option", "named"),
    [("nonexistent=1", "--option nonexistent: unknown engine option"), ("max_batch=notanumber", "max_batch")],
)
def test_serve_rejects_a_bad_engine_option_before_loading(served, option, named):
    res = runner.invoke(app, ["serve", "-o", option])
    assert res.exit_code == 2 and named in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert served == []


def test_serve_passes_validated_engine_options(served):
    res = runner.invoke(app, ["serve", "-o", "max_batch=8", "-o", "prepack=false", "-o", "dtype=bfloat16"])
    assert res.exit_code == 0, res.output
    assert served == [
        dict(
            host="127.0.0.1",
            port=8000,
            api_key=None,
            allowed_adapter_dirs=[],
            routers={},
            max_batch=8,
            prepack=False,
            dtype="bfloat16",
        )
    ]


def test_import_does_not_load_torch():
    code = "import sys, deltatune.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "env, expected",
    [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"), ({"DELTATUNE_OMP_DEFAULTS": "0"}, "unset")],
)
def test_cli_sets_omp_passive_before_torch_loads(env, expected):
    """The CLI picks OMP_WAIT_POLICY=PASSIVE before torch is imported, unless the user chose."""
    code = (
        "import os, sys\n"
        "import deltatune.cli as cli\n"
        "assert 'torch' not in sys.modules, 'torch imported before the CLI could set the OpenMP policy'\n"
        "cli.omp_defaults()\n"
        "print(os.environ.get('OMP_WAIT_POLICY', 'unset'))\n"
    )
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "DELTATUNE_OMP_DEFAULTS")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=base | env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == expected
