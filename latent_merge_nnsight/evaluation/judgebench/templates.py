"""The prompt templates a pairwise judge renders, and the parsers of its replies.

A `Template` renders the judge's chat messages from (question, answer_a, answer_b) and parses the judge's
reply into ``"A"``, ``"B"``, ``"tie"`` or ``None`` (invalid, never guessed). Shipped templates live in
``evaluation/templates/``; ``"vanilla"`` is JudgeBench's own prompt (`judgebench.vanilla`).
"""

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.judgebench.vanilla import VANILLA, vanilla_prompt

if TYPE_CHECKING:
    from jinja2 import Template as JinjaTemplate
    from jinja2.nodes import Template as JinjaAst
    from jinja2.sandbox import ImmutableSandboxedEnvironment

Verdict = Literal["A", "B", "tie"]
"""A parsed judgment: which of the two *shown* answers won, or a tie. ``None`` means invalid."""

TEMPLATE_DIR = Path(__file__).parents[1] / "templates"
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
def _compile_jinja(text: str) -> "tuple[ImmutableSandboxedEnvironment, JinjaTemplate, JinjaAst]":
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
