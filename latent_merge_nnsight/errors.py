"""The one exception type the package raises for bad input."""

_UNSET = object()


class LatentMergeError(ValueError):
    """Bad input to latent_merge_nnsight: the message names the parameter, the value and the valid range.

    The fields say the same for programs: `param` (the argument or field at fault, e.g. ``"temperature"``,
    ``"layers"``, ``"engine"``; None when no single one is), `value` (what it got) and `expected` (the
    valid range, in words). The CLI turns `param` into the flag the user typed and the server into
    OpenAI's ``param``, each through one table.
    """

    def __init__(
        self, message: str, *, param: str | None = None, value: object = _UNSET, expected: str | None = None
    ) -> None:
        super().__init__(message)
        self.param = param
        self.value = None if value is _UNSET else value
        self.expected = expected
