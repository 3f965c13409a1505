"""The one rule for each sampling setting, and the message naming it (no torch: the CLI checks its flags
with these before any model loads).

`check_sampling(name, value)` is used by `SamplingConfig` (`lmn.generate`), the pydantic `SamplingSpec`
(systems, and through them the server) and the CLI's sampling flags, so a setting is refused the same way
everywhere; the error carries `param=name`, `value` and `expected`.
"""

import math
from collections.abc import Callable
from typing import Any

from latent_merge_nnsight.errors import LatentMergeError

__all__ = ["SAMPLERS", "SAMPLING_SETTINGS", "check_sampling"]

SAMPLERS = ("default", "paper")
"""The top-p rules (`latent_merge_nnsight.sampling`)."""


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_new_tokens": (lambda v: _int(v) and v >= 1, "an int >= 1"),
    "do_sample": (lambda v: isinstance(v, bool), "True or False"),
    "temperature": (
        lambda v: _number(v) and math.isfinite(v) and v >= 0,
        "a finite number >= 0 (0 means greedy)",
    ),
    "top_p": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1] (1 keeps every token)"),
    "top_k": (lambda v: _int(v) and v >= 0, "an int >= 0 (0 keeps every token)"),
    "seed": (lambda v: v is None or (_int(v) and v >= 0), "None or an int >= 0"),
    "sampler": (lambda v: v in SAMPLERS, f"one of: {', '.join(SAMPLERS)}"),
}
SAMPLING_SETTINGS: tuple[str, ...] = tuple(_RULES)[1:]
"""The settings of `SamplingConfig` (every rule but `max_new_tokens`, a setting of the run)."""


def check_sampling(name: str, value: object) -> Any:
    """`value` if it is valid for the sampling setting `name`, else a `LatentMergeError` naming it."""
    ok, expected = _RULES[name]
    if not ok(value):
        raise LatentMergeError(
            f"{name}={value!r}; expected {expected}", param=name, value=value, expected=expected
        )
    return value
