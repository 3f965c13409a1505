"""JudgeBench's data files, fetched from JudgeBench's own repository with checksums (`lmn data judgebench`).

The files are JudgeBench's (ScalerLab/JudgeBench, MIT), not shipped here: the two response sets the
judges are scored on, the official judges' outputs (to check `judgebench-score` against), and the vanilla
judge prompt. Each is pinned by commit and sha256; a file whose hash differs is refused and never kept.
"""

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.judgebench import VANILLA_COMMIT, VANILLA_PATH, VANILLA_SHA256

__all__ = ["DATA_ENV", "JUDGEBENCH_FILES", "DataFile", "fetch_judgebench", "verify_judgebench"]

DATA_ENV = "LMN_JUDGEBENCH_DATA"
"""Environment variable naming the folder of JudgeBench's files (the tests read it; default
``../shared/data/judgebench`` beside the repository)."""
RAW_BASE = f"https://raw.githubusercontent.com/ScalerLab/JudgeBench/{VANILLA_COMMIT}"
MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class DataFile:
    """One file: where it goes under the folder, where it lies in JudgeBench's repository, its sha256."""

    path: str
    source: str
    sha256: str


_GPT = "dataset=judgebench,response_model=gpt-4o-2024-05-13"
_CLAUDE = "dataset=judgebench,response_model=claude-3-5-sonnet-20240620"
JUDGEBENCH_FILES: tuple[DataFile, ...] = (
    DataFile(
        f"{_GPT}.jsonl",
        f"data/{_GPT}.jsonl",
        "d5106306b38dead1b2e964ecf5534a3e7b2fc4b8d3b8da327599edfcebd76042",
    ),
    DataFile(
        f"{_CLAUDE}.jsonl",
        f"data/{_CLAUDE}.jsonl",
        "3b70504588e400613bf5744a20a345da8701b7150be9a30c9db0e6f3d7b70a62",
    ),
    DataFile(
        f"official_outputs/{_GPT},judge_name=arena_hard,judge_model=o1-mini-2024-09-12.jsonl",
        f"outputs/{_GPT},judge_name=arena_hard,judge_model=o1-mini-2024-09-12.jsonl",
        "5fddc275bebd4d006228e8f86616ae6058118ab68ad03e57fd957c1878f2d4e6",
    ),
    DataFile(
        f"official_outputs/{_CLAUDE},judge_name=arena_hard,judge_model=claude-3-haiku-20240307.jsonl",
        f"outputs/{_CLAUDE},judge_name=arena_hard,judge_model=claude-3-haiku-20240307.jsonl",
        "3d30281286053c875dd09cc2ee17de8c0900a99a001b2f03d571aade669414f4",
    ),
    DataFile("vanilla_prompt.jinja2", VANILLA_PATH, VANILLA_SHA256),
)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_judgebench(folder: str | Path, files: tuple[DataFile, ...] = JUDGEBENCH_FILES) -> list[str]:
    """What is wrong with `folder` (a missing file, a file whose sha256 differs); empty when all is well."""
    problems = []
    for f in files:
        path = Path(folder) / f.path
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif (digest := _sha256(path)) != f.sha256:
            problems.append(f"{path}: sha256 {digest[:16]}..., expected {f.sha256[:16]}...")
    return problems


def fetch_judgebench(
    folder: str | Path, *, files: tuple[DataFile, ...] = JUDGEBENCH_FILES, base_url: str = RAW_BASE
) -> list[Path]:
    """Fetch JudgeBench's files into `folder` (those already there with the right hash are kept); each is
    checked against its sha256 before it is written (atomically). Returns the files fetched."""
    fetched = []
    for f in files:
        path = Path(folder) / f.path
        if path.is_file() and _sha256(path) == f.sha256:
            continue
        url = f"{base_url}/{f.source}"
        try:
            with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - pinned https URLs
                data = response.read(MAX_BYTES + 1)
        except (urllib.error.URLError, OSError) as exc:
            raise LatentMergeError(
                f"cannot fetch {url} ({getattr(exc, 'reason', exc)}); JudgeBench's files need network once"
            ) from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != f.sha256:
            raise LatentMergeError(
                f"{url}: sha256 {digest[:16]}..., expected {f.sha256[:16]}... (JudgeBench at commit "
                f"{VANILLA_COMMIT[:12]}); not written"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        fetched.append(path)
    return fetched
