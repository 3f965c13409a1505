"""Append-only JSONL files that survive a kill mid-write (judgment caches, responses, sweep results)."""

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from latent_merge_nnsight.errors import LatentMergeError

__all__ = ["read_resumable"]


def read_resumable(path: str | Path, *, repair: bool = True) -> Iterator[tuple[int, Any]]:
    """Yield `(line_number, object)` for each complete line of an append-only JSONL file.

    A torn last line (the writer died mid-line) is dropped with a warning, and with `repair=True` cut
    from the file so later appends stay valid JSONL; a complete last record that lacks only its newline
    is kept (and given one). Any other line that is not JSON is an error naming it.
    """
    path = Path(path)
    raw = path.read_bytes()
    cut = raw.rfind(b"\n") + 1
    body, tail = raw[:cut], raw[cut:]
    if tail.strip():
        try:
            json.loads(tail)
            body = raw
            if repair:
                with path.open("ab") as fh:
                    fh.write(b"\n")
        except json.JSONDecodeError:
            warnings.warn(
                f"{path}: dropping an incomplete last line ({len(tail)} bytes; an interrupted write)",
                stacklevel=2,
            )
            if repair:
                with path.open("r+b") as fh:
                    fh.truncate(cut)
    # split on "\n" only: str.splitlines would also split on U+2028 inside a JSON string
    for lineno, line in enumerate(body.decode("utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise LatentMergeError(
                f"{path}: line {lineno} is not valid JSON ({exc.msg}); only a damaged last line is "
                "repaired automatically, fix or remove this one"
            ) from None
