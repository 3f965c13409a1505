"""JudgeBench's own "vanilla" judge prompt: JudgeBench's text, not ours, so it is not shipped.

It is read from a local copy, or fetched once from JudgeBench's repository at a pinned commit, checked
against its hash and cached.
"""

import hashlib
import logging
import os
import re
from pathlib import Path

from latent_merge_nnsight.errors import LatentMergeError

logger = logging.getLogger(__name__)

VANILLA = "vanilla"
VANILLA_COMMIT = "e2c52c284e735e139b3daa61c206ee208f36c461"
VANILLA_PATH = "utils/templates/vanilla_prompt.jinja2"
VANILLA_URL = f"https://raw.githubusercontent.com/ScalerLab/JudgeBench/{VANILLA_COMMIT}/{VANILLA_PATH}"
VANILLA_SHA256 = "45d0b0bd8304b032c9b34a2fece15ac9ad5c241ef296aff9896e5d5666d77026"
VANILLA_ENV = "LMN_JUDGEBENCH_PROMPT"
"""Environment variable naming a local copy of the vanilla prompt (the file itself, or a markdown file
quoting it in a ```` ```jinja ```` fence, like ``shared/data/judgebench/PROMPTS.md``)."""
_FENCE = re.compile(r"^(`{3,})jinja2?[ \t]*\n(.*?)\n\1[ \t]*$", re.S | re.M)


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "latent_merge_nnsight"


def _checked(data: bytes, where: str) -> str:
    digest = hashlib.sha256(data).hexdigest()
    if digest != VANILLA_SHA256:
        raise LatentMergeError(
            f"{where} is not JudgeBench's vanilla prompt at commit {VANILLA_COMMIT[:12]}: its sha256 is "
            f"{digest[:16]}..., expected {VANILLA_SHA256[:16]}...; remove it or point {VANILLA_ENV} at a "
            "faithful copy"
        )
    return data.decode("utf-8")


def _from_local(path: Path) -> str:
    if not path.is_file():
        raise LatentMergeError(f"{VANILLA_ENV} / local_copy={str(path)!r} does not exist or is not a file")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != VANILLA_SHA256:  # a markdown file quoting it?
        for match in _FENCE.finditer(data.decode("utf-8", errors="replace")):
            if hashlib.sha256(match.group(2).encode()).hexdigest() == VANILLA_SHA256:
                return match.group(2)
    return _checked(data, str(path))


def vanilla_prompt(local_copy: str | Path | None = None, *, cache_dir: str | Path | None = None) -> str:
    """JudgeBench's vanilla judge prompt (Jinja2 text), checked against its pinned sha256.

    From ``local_copy`` (or the file named by ``$LMN_JUDGEBENCH_PROMPT``) when given; else from the user
    cache (``$XDG_CACHE_HOME/latent_merge_nnsight``, or ``cache_dir``); else fetched once from
    JudgeBench's public repository at commit `VANILLA_COMMIT` (logged, with the URL and where it is
    cached). A copy whose hash differs is refused.
    """
    local = local_copy if local_copy is not None else os.environ.get(VANILLA_ENV)
    if local:
        return _from_local(Path(local))
    cached = Path(cache_dir) if cache_dir is not None else _cache_dir()
    cached = cached / f"judgebench-vanilla-{VANILLA_SHA256[:12]}.jinja2"
    if cached.is_file():
        return _checked(cached.read_bytes(), str(cached))
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(VANILLA_URL, timeout=30) as response:  # noqa: S310 - a pinned https URL
            data = response.read(1 << 20)
    except (urllib.error.URLError, OSError) as exc:
        raise LatentMergeError(
            f"template='vanilla': cannot fetch JudgeBench's prompt from {VANILLA_URL} "
            f"({getattr(exc, 'reason', exc)}); without network, point {VANILLA_ENV} at a local copy "
            "(or pass --template FILE)"
        ) from None
    text = _checked(data, VANILLA_URL)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, cached)
    logger.warning(
        "fetched JudgeBench's vanilla prompt (commit %s) from %s (sha256 %s...), cached at %s",
        VANILLA_COMMIT[:12],
        VANILLA_URL,
        VANILLA_SHA256[:16],
        cached,
    )
    return text
