"""Training: the loop (loop.py), its config (config.py), resume state (resume.py), evaluation.

`deltatune.train` is both this package and the verb `deltatune.train(config)`: importing a
submodule binds the package to the `train` attribute of `deltatune`, so the package itself is
callable and runs the loop.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self, config: Any) -> dict:
        """Run the training loop for a TrainConfig (or a dict of config keys); returns the summary."""
        from deltatune.train.loop import run

        return run(config)


sys.modules[__name__].__class__ = _CallableModule
