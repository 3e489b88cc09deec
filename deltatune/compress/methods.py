"""The registry of compression methods, keyed by the name used in configs and on the CLI.

Adding a method = one module defining a `Codec` + one entry below. Methods that can refine their
encoding with a model and data (BitDelta's scale distillation) say so (`Codec.calibrated`).
"""

from __future__ import annotations

from typing import Any

from deltatune.compress.base import RAW, Codec, MethodParams
from deltatune.compress.bitdelta import BITDELTA
from deltatune.compress.compeft import COMPEFT
from deltatune.compress.delta_come import DELTA_COME

CODECS: dict[str, Codec] = {c.name: c for c in (COMPEFT, BITDELTA, DELTA_COME, RAW)}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown compression method {name!r}; valid methods: {', '.join(CODECS)}") from None


def validate_params(codec: Codec, params: dict[str, Any]) -> MethodParams:
    """Parameters as the method's pydantic model; the error names the method and the bad key."""
    from pydantic import ValidationError

    try:
        return codec.params.model_validate(params)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(params)'}: {e['msg']}" for e in err.errors()
        )
        raise ValueError(f"method {codec.name!r}: invalid parameters: {problems}") from None
