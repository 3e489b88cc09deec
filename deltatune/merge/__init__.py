"""Merging models and adapters: mergekit-compatible configs, paper-exact math, a streaming executor.

    from deltatune.merge import run_merge
    report = run_merge(Path("merge.yaml"), Path("out/merged"))

`methods` and `spectral` hold the math (one pure function per method), `registry` names them,
`config` the YAML schema, `executor`
the tensor-by-tensor merge of full models, `adapters` the merge of PEFT LoRA adapters.
"""

from deltatune.merge.config import MergeConfig, MergeConfigError, load_config, parse_config
from deltatune.merge.executor import run_merge
from deltatune.merge.inputs import MergeReport
from deltatune.merge.registry import METHODS

__all__ = [
    "METHODS",
    "MergeConfig",
    "MergeConfigError",
    "MergeReport",
    "load_config",
    "parse_config",
    "run_merge",
]
