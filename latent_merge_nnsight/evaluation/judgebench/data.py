"""JudgeBench's pairs, validated row by row, and its files fetched with checksums (`lmn data judgebench`).

A pair holds a question, two responses and an objective label ``"A>B"`` or ``"B>A"``. The files are
JudgeBench's (ScalerLab/JudgeBench, MIT), not shipped here: the two response sets the judges are scored
on, the official judges' outputs (to check `judgebench-score` against), and the vanilla judge prompt.
Each is pinned by commit and sha256; a file whose hash differs is refused and never kept.
"""

import hashlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.judgebench.vanilla import VANILLA_COMMIT, VANILLA_PATH, VANILLA_SHA256

HF_DATASET = "ScalerLab/JudgeBench"
SPLITS: tuple[str, ...] = ("gpt", "claude")
CATEGORIES: tuple[str, ...] = ("knowledge", "reasoning", "math", "coding")
LABELS: tuple[str, ...] = ("A>B", "B>A")
PAIR_FIELDS: tuple[str, ...] = (
    "pair_id",
    "original_id",
    "source",
    "question",
    "response_model",
    "response_A",
    "response_B",
    "label",
)
_SOURCE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("mmlu-pro", "knowledge"),
    ("livebench-reasoning", "reasoning"),
    ("livebench-math", "math"),
    ("livecodebench", "coding"),
)


def category_of(source: str) -> str:
    """Map a JudgeBench ``source`` (``mmlu-pro-law``, ``livebench-math``, ...) to its category."""
    for prefix, category in _SOURCE_PREFIXES:
        if source.startswith(prefix):
            return category
    prefixes = ", ".join(f"{p}* -> {c}" for p, c in _SOURCE_PREFIXES)
    raise LatentMergeError(f"source={source!r} is not a JudgeBench source; expected one of: {prefixes}")


@dataclass(frozen=True)
class JudgePair:
    """One JudgeBench row: a question, two responses from ``response_model`` and the correct order."""

    pair_id: str
    original_id: int | str | None
    source: str
    question: str
    response_model: str
    response_A: str
    response_B: str
    label: Literal["A>B", "B>A"]

    @property
    def category(self) -> str:
        """``knowledge``, ``reasoning``, ``math`` or ``coding``, from the source prefix."""
        return category_of(self.source)

    def to_dict(self) -> dict[str, Any]:
        """The row in JudgeBench's own field order."""
        return asdict(self)


def pair_from_row(row: object, where: str) -> JudgePair:
    """Validate one raw row (a mapping) into a `JudgePair`; ``where`` names file and line for errors."""
    if not isinstance(row, Mapping):
        raise LatentMergeError(
            f"{where}: expected a JSON object with fields {PAIR_FIELDS}, got {type(row).__name__}"
        )
    for field in PAIR_FIELDS:
        if field not in row:
            raise LatentMergeError(
                f"{where}: field {field!r} is missing; a JudgeBench row needs {', '.join(PAIR_FIELDS)}"
            )
        value = row[field]
        if field == "original_id":
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | str)):
                raise LatentMergeError(
                    f"{where}: field 'original_id' = {value!r} must be an int, a string or null"
                )
        elif not isinstance(value, str):
            raise LatentMergeError(
                f"{where}: field {field!r} must be a string, got {type(value).__name__} {value!r:.60}"
            )
    if not row["pair_id"]:
        raise LatentMergeError(f"{where}: field 'pair_id' is empty")
    if row["label"] not in LABELS:
        raise LatentMergeError(
            f"{where}: field 'label' = {row['label']!r} is invalid; expected one of {LABELS}"
        )
    try:
        category_of(row["source"])
    except LatentMergeError as exc:
        raise LatentMergeError(f"{where}: field 'source': {exc}") from None
    return JudgePair(**{field: row[field] for field in PAIR_FIELDS})


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object)`` for each non-blank line; a bad line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise LatentMergeError(f"path={str(path)!r} does not exist or is not a file")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise LatentMergeError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from None


def _rows_from_path(path: Path) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        for lineno, row in read_jsonl(path):
            yield f"{path}: line {lineno}", row
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise LatentMergeError(
                "reading Parquet needs pyarrow; install it with `pip install latent_merge_nnsight[eval]`"
            ) from exc
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}: row {i}", row
    else:
        raise LatentMergeError(
            f"path={str(path)!r} has suffix {suffix!r}; expected .jsonl, .json or .parquet"
        )


def load_judgebench(
    split: str = "gpt", path: str | Path | None = None, *, revision: str | None = None
) -> list[JudgePair]:
    """Load a JudgeBench split as validated `JudgePair`s.

    Reads ``path`` (JSONL or Parquet) when given, else the hub dataset ``ScalerLab/JudgeBench``
    (``split`` is ``"gpt"``, 350 pairs, or ``"claude"``, 270 pairs; ``revision`` pins a hub commit).
    Every row is checked against the schema; a bad one raises naming the file, line and field.
    """
    if split not in SPLITS:
        raise LatentMergeError(f"split={split!r} is not a JudgeBench split; expected one of {SPLITS}")
    if path is not None:
        rows: Iterable[tuple[str, Any]] = _rows_from_path(Path(path))
    else:
        try:
            from datasets import load_dataset
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise LatentMergeError(
                "loading JudgeBench from the hub needs `datasets`; install latent_merge_nnsight[eval] "
                "or pass path= to a local JSONL/Parquet copy"
            ) from exc
        try:
            dataset = load_dataset(HF_DATASET, split=split, revision=revision)
        except Exception as exc:  # offline, hub down, no such revision: one clear message
            raise LatentMergeError(
                f"cannot load {HF_DATASET} split={split!r} from the hub ({type(exc).__name__}: "
                f"{str(exc)[:200]}); without network pass path= (--data FILE) with a local JSONL/Parquet copy"
            ) from None
        rows = ((f"{HF_DATASET} split={split} row {i}", row) for i, row in enumerate(dataset))
    pairs: list[JudgePair] = []
    seen: dict[str, str] = {}
    for where, row in rows:
        pair = pair_from_row(row, where)
        if pair.pair_id in seen:
            raise LatentMergeError(f"{where}: pair_id {pair.pair_id!r} repeats {seen[pair.pair_id]}")
        seen[pair.pair_id] = where
        pairs.append(pair)
    if not pairs:
        raise LatentMergeError(f"no JudgeBench rows found in {path if path is not None else HF_DATASET}")
    return pairs


# ---------------------------------------------------------------------------------------------------
# JudgeBench's files, pinned by commit and sha256
# ---------------------------------------------------------------------------------------------------

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
