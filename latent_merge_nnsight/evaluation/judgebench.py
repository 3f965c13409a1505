"""JudgeBench data, its official two-game accuracy, and the prompt templates a pairwise judge renders.

JudgeBench (Tan et al., arXiv:2410.12784; hub dataset ``ScalerLab/JudgeBench``) holds response pairs
with an objective label ``"A>B"`` or ``"B>A"``. A judge is run twice per pair, once as (A, B) and once
with the responses swapped; JudgeBench stores the second game's decision as the judge said it (in the
swapped frame), so it is flipped before it is compared with the label. Each game then scores +1 when it
agrees with the label, -1 when it says the opposite and 0 for a tie or no decision; a pair is correct
when the sum is positive. Ties therefore never make a pair correct on their own, and a judge that flips
with the order gets the pair wrong.

Templates: a `Template` renders the judge's chat messages from (question, answer_a, answer_b) and
parses the judge's reply into ``"A"``, ``"B"``, ``"tie"`` or ``None`` (invalid, never guessed).
"""

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from latent_merge_nnsight.errors import LatentMergeError

logger = logging.getLogger(__name__)

HF_DATASET = "ScalerLab/JudgeBench"
SPLITS: tuple[str, ...] = ("gpt", "claude")
CATEGORIES: tuple[str, ...] = ("knowledge", "reasoning", "math", "coding")
LABELS: tuple[str, ...] = ("A>B", "B>A")
DECISIONS: tuple[str, ...] = ("A>B", "B>A", "A=B")
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

Verdict = Literal["A", "B", "tie"]
"""A parsed judgment: which of the two *shown* answers won, or a tie. ``None`` means invalid."""


def category_of(source: str) -> str:
    """Map a JudgeBench ``source`` (``mmlu-pro-law``, ``livebench-math``, ...) to its category."""
    for prefix, category in _SOURCE_PREFIXES:
        if source.startswith(prefix):
            return category
    prefixes = ", ".join(f"{p}* -> {c}" for p, c in _SOURCE_PREFIXES)
    raise LatentMergeError(f"source={source!r} is not a JudgeBench source; expected one of: {prefixes}")


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------


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


def pair_from_row(row: Any, where: str) -> JudgePair:
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
# Official protocol: accuracy of a judge on labelled pairs, JudgeBench's output format
# ---------------------------------------------------------------------------------------------------


def flip_decision(decision: str | None) -> str | None:
    """Swap ``A>B`` and ``B>A``; a tie (``A=B``) or ``None`` is unchanged."""
    return {"A>B": "B>A", "B>A": "A>B"}.get(decision, decision) if decision is not None else None


def verdict_to_decision(verdict: str | None) -> str | None:
    """``"A"`` -> ``"A>B"``, ``"B"`` -> ``"B>A"``, ``"tie"`` -> ``"A=B"``, ``None`` -> ``None``."""
    return {"A": "A>B", "B": "B>A", "tie": "A=B", None: None}[verdict]


def _check_official_record(record: Any, where: str) -> tuple[str, str, list[str | None]]:
    """Return (category, label, decisions as stored) of one official output record, or raise."""
    if not isinstance(record, Mapping):
        raise LatentMergeError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in ("label", "source", "judgments"):
        if field not in record:
            raise LatentMergeError(
                f"{where}: field {field!r} is missing; an official output needs label, source, judgments"
            )
    label = record["label"]
    if label not in LABELS:
        raise LatentMergeError(f"{where}: field 'label' = {label!r} is invalid; expected one of {LABELS}")
    if not isinstance(record["source"], str):
        raise LatentMergeError(f"{where}: field 'source' must be a string, got {record['source']!r:.60}")
    try:
        category = category_of(record["source"])
    except LatentMergeError as exc:
        raise LatentMergeError(f"{where}: field 'source': {exc}") from None
    judgments = record["judgments"]
    if not isinstance(judgments, list) or not 1 <= len(judgments) <= 2:
        raise LatentMergeError(
            f"{where}: field 'judgments' must be a list of 1 or 2 games, got {type(judgments).__name__} "
            f"of length {len(judgments) if isinstance(judgments, list) else '-'}"
        )
    decisions: list[str | None] = []
    for game, judgment in enumerate(judgments):
        if judgment is None:  # JudgeBench stores a failed game as null
            decisions.append(None)
            continue
        if not isinstance(judgment, Mapping) or "decision" not in judgment:
            raise LatentMergeError(
                f"{where}: judgments[{game}] must be null or an object with a 'decision' field"
            )
        decision = judgment["decision"]
        if decision is not None and decision not in DECISIONS:
            raise LatentMergeError(
                f"{where}: judgments[{game}].decision = {decision!r} is invalid; "
                f"expected one of {DECISIONS} or null"
            )
        decisions.append(decision)
    return category, label, decisions


def load_official_outputs(path: str | Path) -> list[dict[str, Any]]:
    """Read a JudgeBench judge output file (JSONL: dataset row + ``judge_name`` + ``judgments``)."""
    records = []
    for lineno, record in read_jsonl(path):
        _check_official_record(record, f"{path}: line {lineno}")
        records.append(record)
    if not records:
        raise LatentMergeError(f"path={str(path)!r} holds no records")
    return records


def write_official_outputs(records: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write records in JudgeBench's output format, one JSON object a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def official_accuracy(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Score judge outputs the JudgeBench way; accuracy is a fraction in [0, 1] over *all* pairs.

    (JudgeBench's own script prints percent; ours is its value / 100, like every accuracy here.)

    Game 1 is compared with the label as stored; game 2 (responses swapped) is flipped first. Each game
    scores +1 (agrees), -1 (opposite) or 0 (tie / null); a pair is correct iff the sum is > 0, incorrect
    iff < 0, else tied. Returns ``{category: {...}, ..., "overall": {...}}`` with ``accuracy``, ``n``,
    ``correct``, ``incorrect``, ``tied`` for each category present (in `CATEGORIES` order).
    """
    if not records:
        raise LatentMergeError("records is empty; official_accuracy needs at least one judged pair")
    tallies: dict[str, dict[str, int]] = {}
    for i, record in enumerate(records):
        where = (
            f"record {i} (pair_id={record.get('pair_id')!r})"
            if isinstance(record, Mapping)
            else f"record {i}"
        )
        category, label, decisions = _check_official_record(record, where)
        in_label_frame = [decisions[0]] + [flip_decision(d) for d in decisions[1:]]
        total = sum(1 if d == label else -1 if d == flip_decision(label) else 0 for d in in_label_frame)
        outcome = "correct" if total > 0 else "incorrect" if total < 0 else "tied"
        for key in (category, "overall"):
            tally = tallies.setdefault(key, {"n": 0, "correct": 0, "incorrect": 0, "tied": 0})
            tally["n"] += 1
            tally[outcome] += 1
    order = [c for c in CATEGORIES if c in tallies] + ["overall"]
    return {key: {"accuracy": tallies[key]["correct"] / tallies[key]["n"], **tallies[key]} for key in order}


# ---------------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------------

TEMPLATE_DIR = Path(__file__).with_name("templates")
TEMPLATE_VARIABLES: tuple[str, ...] = ("question", "answer_a", "answer_b")
PARSERS: tuple[str, ...] = ("abc", "output_ab")
_JINJA_SUFFIXES = (".jinja", ".jinja2", ".j2")
_JINJA_MARK = re.compile(r"\{%|\{\{-?\s*(?:question|answer_a|answer_b)\s*-?\}\}")
_FORMAT_FIELD = re.compile(r"\{(question|answer_a|answer_b)\}")
_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_LEAD = re.compile(r"^\s*(?:(?:final|my)\s+)?(?:answer|verdict|decision|choice)\s*(?:is)?\s*[:\-]?\s*", re.I)
_ABC_BARE = {"a": "A", "b": "B", "c": "tie", "tie": "tie"}
_ABC_LETTER = re.compile(r"(?<![A-Za-z0-9_])([ABC])(?![A-Za-z0-9_+#'])")
_TIE_WORD = re.compile(r"\btie\b", re.I)
_OUTPUT_BARE = re.compile(r"output\s*\(?\s*([ab])\s*\)?", re.I)
_OUTPUT_ANY = re.compile(r"output\s*\(\s*([ab])\s*\)", re.I)


def _clean_reply(reply: str) -> str:
    """Drop reasoning blocks, markdown emphasis and heading marks, and a leading 'Answer:'-style label."""
    text = _THINK.sub(" ", reply)
    text = re.sub(r"[*`_]", "", text)
    text = re.sub(r"(?m)^\s*#+\s*", "", text).strip()
    return _LEAD.sub("", text, count=1).strip()


def parse_abc(reply: str | None) -> Verdict | None:
    """Parse an A / B / C(tie) verdict; ``None`` when the reply names no verdict or more than one.

    Tolerates case, whitespace, markdown bold, brackets, a trailing period and a leading
    ``Answer:``/``Verdict:``. In a longer reply, uppercase standalone ``A``/``B``/``C`` and the word
    ``tie`` count as mentions; exactly one distinct verdict must be mentioned.
    """
    if not reply:
        return None
    text = _clean_reply(reply)
    bare = text.strip(" \t\r\n\"'()[]{}.!:").lower()
    if bare in _ABC_BARE:
        return _ABC_BARE[bare]  # type: ignore[return-value]
    found = {"tie" if m == "C" else m for m in _ABC_LETTER.findall(text)}
    if _TIE_WORD.search(text):
        found.add("tie")
    return found.pop() if len(found) == 1 else None  # type: ignore[return-value]


def parse_output_ab(reply: str | None) -> Verdict | None:
    """Parse JudgeBench's vanilla format, ``Output (a)`` or ``Output (b)``; it has no tie.

    JudgeBench itself accepts only the exact stripped strings; this also tolerates case, markdown,
    quotes and a trailing period, and a longer reply that names exactly one of the two outputs.
    """
    if not reply:
        return None
    text = _clean_reply(reply)
    bare = text.strip(" \t\r\n\"'[]{}.!:")
    match = _OUTPUT_BARE.fullmatch(bare)
    if match:
        return "A" if match.group(1).lower() == "a" else "B"
    found = {m.lower() for m in _OUTPUT_ANY.findall(text)}
    if len(found) == 1:
        return "A" if found.pop() == "a" else "B"
    return None


_PARSE_FNS = {"abc": parse_abc, "output_ab": parse_output_ab}


@lru_cache(maxsize=32)
def _compile_jinja(text: str) -> Any:
    try:
        import jinja2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise LatentMergeError("Jinja templates need jinja2; install latent_merge_nnsight[eval]") from exc
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Same whitespace handling as JudgeBench's renderer; StrictUndefined turns a typo into an error. The
    # sandbox keeps a template file from reaching Python internals (`cycler.__init__.__globals__.os`).
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined, autoescape=False
    )
    try:
        return env, env.from_string(text), env.parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise LatentMergeError(
            f"template has a Jinja syntax error at line {exc.lineno}: {exc.message}"
        ) from None


@dataclass(frozen=True)
class Template:
    """A pairwise judge prompt: renders chat messages and parses the judge's reply.

    ``syntax="format"`` substitutes ``{question}``, ``{answer_a}``, ``{answer_b}`` (other braces are
    left alone); ``syntax="jinja"`` renders Jinja2 with the same variables. ``parser`` is ``"abc"``
    (A, B or C for a tie) or ``"output_ab"`` (``Output (a)``/``Output (b)``).
    """

    name: str
    text: str
    syntax: Literal["format", "jinja"] = "format"
    parser: Literal["abc", "output_ab"] = "abc"
    system: str | None = None

    def __post_init__(self) -> None:
        if self.syntax not in ("format", "jinja"):
            raise LatentMergeError(f"syntax={self.syntax!r} is invalid; expected 'format' or 'jinja'")
        if self.parser not in PARSERS:
            raise LatentMergeError(f"parser={self.parser!r} is invalid; expected one of {PARSERS}")
        if self.syntax == "jinja":
            import jinja2.meta

            env, _, ast = _compile_jinja(self.text)
            used = set(jinja2.meta.find_undeclared_variables(ast))
            extra = sorted(used - set(TEMPLATE_VARIABLES))
            if extra:
                raise LatentMergeError(
                    f"template {self.name!r} uses unknown variables {extra}; "
                    f"the variables are {TEMPLATE_VARIABLES}"
                )
            self.render("q", "a", "b")  # refuses unsafe attribute access now, not mid-run
        else:
            used = set(_FORMAT_FIELD.findall(self.text))
        missing = [v for v in TEMPLATE_VARIABLES if v not in used]
        if missing:
            spell = "{{ name }}" if self.syntax == "jinja" else "{name}"
            raise LatentMergeError(
                f"template {self.name!r} ({self.syntax} syntax) does not use {missing}; a pairwise template "
                f"must contain each of {TEMPLATE_VARIABLES}, written {spell}"
            )

    @property
    def template_id(self) -> str:
        """Name plus a hash of everything that shapes a judgment, so an edited template is a new id."""
        blob = json.dumps([self.text, self.syntax, self.parser, self.system])
        return f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def render(self, question: str, answer_a: str, answer_b: str) -> str:
        """The user message for one (question, shown-first answer, shown-second answer)."""
        values = {"question": question, "answer_a": answer_a, "answer_b": answer_b}
        if self.syntax == "jinja":
            from jinja2.exceptions import SecurityError, UndefinedError

            try:
                return _compile_jinja(self.text)[1].render(**values)
            except (SecurityError, UndefinedError) as exc:
                raise LatentMergeError(
                    f"template {self.name!r} is refused: {exc}; a judge template may only use "
                    f"{TEMPLATE_VARIABLES} and plain Jinja (it renders in a sandbox)"
                ) from None
        # One pass, so an answer that happens to contain "{answer_b}" is never substituted again.
        return _FORMAT_FIELD.sub(lambda m: values[m.group(1)], self.text)

    def messages(self, question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
        """OpenAI-style chat messages: an optional system message, then the rendered user message."""
        user = {"role": "user", "content": self.render(question, answer_a, answer_b)}
        return ([{"role": "system", "content": self.system}] if self.system else []) + [user]

    def parse(self, reply: str | None) -> Verdict | None:
        """``"A"``/``"B"``/``"tie"`` for the answer shown first/second or a tie; ``None`` if invalid."""
        return _PARSE_FNS[self.parser](reply)


# JudgeBench's own "vanilla" judge prompt is JudgeBench's text, not ours: it is not shipped. It is fetched
# once from JudgeBench's repository at a pinned commit, checked against its hash and cached.
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


def builtin_templates() -> list[str]:
    """Names of the templates shipped in ``evaluation/templates/``."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*") if p.is_file() and not p.name.startswith("."))


def load_template(
    name_or_path: str | Path,
    *,
    parser: str | None = None,
    syntax: str | None = None,
    system: str | None = None,
    local_copy: str | Path | None = None,
) -> Template:
    """A shipped template by name (see `builtin_templates`), ``"vanilla"`` (JudgeBench's own prompt, see
    `vanilla_prompt`; ``local_copy`` points at a copy), or a user file by path.

    Syntax is Jinja for ``.jinja``/``.jinja2``/``.j2`` files or text with ``{{ question }}``-style
    variables or ``{% %}`` blocks, else ``{question}`` substitution. The parser is ``"output_ab"`` when
    the text asks for "Output (a)" (JudgeBench's vanilla prompt), else ``"abc"``; both can be forced.
    """
    path = Path(name_or_path)
    builtin = {p.stem: p for p in TEMPLATE_DIR.glob("*") if p.is_file()}
    if str(name_or_path) == VANILLA and not path.is_file():
        text = vanilla_prompt(local_copy)
        return Template(
            name=VANILLA,
            text=text,
            syntax=syntax or "jinja",  # type: ignore[arg-type]
            parser=parser or "output_ab",  # type: ignore[arg-type]
            system=system,
        )
    if str(name_or_path) in builtin:
        path = builtin[str(name_or_path)]
    elif not path.is_file():
        raise LatentMergeError(
            f"template={str(name_or_path)!r} is neither a shipped template "
            f"({', '.join(builtin_templates())}), 'vanilla' (JudgeBench's prompt) nor an existing file"
        )
    text = path.read_text(encoding="utf-8")
    if syntax is None:
        syntax = "jinja" if path.suffix.lower() in _JINJA_SUFFIXES or _JINJA_MARK.search(text) else "format"
    if parser is None:
        parser = "output_ab" if "output (a)" in text.lower() else "abc"
    return Template(name=path.stem, text=text, syntax=syntax, parser=parser, system=system)  # type: ignore[arg-type]
