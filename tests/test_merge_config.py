"""Merge configs: mergekit's parameter semantics, and one clear error per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltatune.merge.config import (
    MergeConfigError,
    ParameterResolver,
    evaluate_setting,
    parse_config,
    parse_size,
)
from deltatune.merge.executor import run_merge
from deltatune.merge.registry import METHODS

TIES = """\
merge_method: ties
base_model: base
models:
  - model: a
    parameters: {weight: 0.5, density: 0.5}
"""


def error_of(text: str) -> str:
    with pytest.raises(MergeConfigError) as info:
        parse_config(text, "merge.yaml")
    return str(info.value)


def test_gradients_and_filters_follow_mergekit():
    # a gradient interpolates over t = layer / (L - 1)
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.25) == pytest.approx(0.5)
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    assert evaluate_setting([0.2, 0.4], "x", 1.0) == pytest.approx(0.4)
    # the first matching filter wins; a filter-less entry is the fallback
    t_setting = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.3}, {"value": 0.5}]
    assert evaluate_setting(t_setting, "model.layers.1.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate_setting(t_setting, "model.layers.1.self_attn.q_proj.weight", 1.0) == pytest.approx(1.0)
    assert evaluate_setting(t_setting, "model.layers.1.mlp.up_proj.weight", 0.0) == pytest.approx(0.3)
    assert evaluate_setting(t_setting, "model.norm.weight", 0.0) == pytest.approx(0.5)
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "model.norm.weight", 0.0) is None
    assert evaluate_setting([True, False], "x", 0.4) is True  # booleans step, they do not interpolate


def test_per_model_settings_win_over_global_ones_then_defaults():
    cfg = parse_config(
        "merge_method: ties\nbase_model: b\nmodels:\n"
        "  - model: a\n    parameters: {density: {filter: mlp, value: 0.2}}\n"
        "  - model: c\n    parameters: {weight: 2}\n"
        "parameters: {weight: 0.5, density: 0.7, lambda: 0.9}\n"
    )
    resolver = ParameterResolver(cfg.spec, cfg.parameters, [m.parameters for m in cfg.models], ["a", "c"])
    mlp = resolver.resolve("model.layers.0.mlp.up_proj.weight", 0.0)
    attn = resolver.resolve("model.layers.0.self_attn.q_proj.weight", 0.0)
    assert mlp["weight"] == [0.5, 2.0] and mlp["density"] == [0.2, 0.7] and mlp["lam"] == 0.9
    assert attn["density"] == [0.7, 0.7]  # the filter does not match: the global value applies
    assert attn["normalize"] is True  # ties' default, as in mergekit


def test_mergekit_keys_without_effect_are_accepted():
    cfg = parse_config(
        TIES + "parameters: {int8_mask: true, normalize: true}\ndtype: bfloat16\ntokenizer_source: base\n"
    )
    assert cfg.merge_method == "ties" and cfg.dtype == "bfloat16"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (TIES + "foo: 1\n", "merge.yaml:6: foo: unknown key 'foo'; allowed here: merge_method"),
        (
            TIES.replace("ties", "tie"),
            "merge.yaml:1: merge_method: unknown merge_method 'tie'; available: linear",
        ),
        (TIES.replace("density", "densty"), "merge.yaml:5: models[0].parameters.densty: unknown parameter"),
        (
            TIES.replace("density: 0.5", "density: 1.5"),
            "models[0].parameters.density: must be between 0.0 and 1.0",
        ),
        (TIES.replace("weight: 0.5", "weight: lots"), "models[0].parameters.weight: expected a number"),
        (TIES.replace("density: 0.5", "epsilon: 0.1"), "('epsilon' belongs to della)"),
        (TIES.replace("density: 0.5", "normalize: true"), "'normalize' is a global parameter"),
        (TIES + "slices: []\n", "merge.yaml:6: slices: mergekit's layer 'slices' are not supported"),
        (TIES + "tokenizer_source: union\n", "tokenizer_source: only 'base' is supported"),
        (TIES + "dtype: bf16\n", "dtype: unknown dtype 'bf16'"),
        (TIES + "parameters: {rescale: true}\n", "parameters.rescale: 'rescale: true' is not supported"),
        (TIES + "lines: {alpha: 1}\n", "lines: missing required key 'beta'"),
        (TIES.replace("ties", "linear") + "lines: {alpha: 1, beta: 1}\n", "lines: LiNeS scales task vectors"),
        (
            TIES.replace("ties", "dare_ties") + "dare_rescale: darex_q\n",
            "models[0]: dare_rescale: darex_q needs a 'q'",
        ),
        (
            TIES.replace("ties", "dare_ties").replace("density: 0.5", "q: 0.5"),
            "'q' is the DAREx-q rescale; it needs 'dare_rescale: darex_q'",
        ),
        (
            TIES.replace("ties", "slerp").replace("{weight: 0.5, density: 0.5}", "{}"),
            "needs the parameter 't'",
        ),
        (TIES + "shard_size: big\n", "shard_size: expected a size"),
        (
            "merge_method: linear\nmodels:\n  - modl: a\n",
            "merge.yaml:3: models[0]: missing required key 'model'",
        ),
        ("merge_method: linear\nmodels: [a, : b]\n", "merge.yaml:2: not valid YAML"),
    ],
)
def test_bad_configs_get_one_clear_error(text, expected):
    assert expected in error_of(text)


def test_missing_model_path_names_the_key_and_line(tmp_path: Path):
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"merge_method: linear\nmodels:\n  - model: {tmp_path}/nowhere\n    parameters: {{weight: 1}}\n"
    )
    with pytest.raises(MergeConfigError, match=r"merge.yaml:3: models\[0\]\.model: model not found"):
        run_merge(config, tmp_path / "out")
    with pytest.raises(MergeConfigError, match="cannot read merge config"):
        run_merge(tmp_path / "absent.yaml", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_every_method_has_mergekit_parameter_names():
    names = {p.name for spec in METHODS.values() for p in spec.params}
    mergekit = {"weight", "density", "gamma", "normalize", "lambda", "rescale", "q", "filter_wise", "t"}
    assert names == mergekit | {"common_space_fraction"}  # Iso-CTS, named as in fusion-bench


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000 and parse_size("2GiB") == 2 * 1024**3 and parse_size(123) == 123
