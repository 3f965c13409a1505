"""Token choice and stopping, shared by every generation engine.

`Sampler` turns next-token logits into tokens: greedy argmax, or temperature / top-k / top-p sampling
by the Gumbel-max trick with noise drawn from its own seeded generator. The noise is drawn for every
row of the original batch at every step, so a row's tokens depend only on (seed, row, step, logits):
the same seed gives the same tokens whichever engine runs and however finished rows are dropped.

The noise rule, exactly (what an independent reference needs): a CPU or device `torch.Generator`
seeded once with `seed`; at step t (0 = the token after the prompt) one draw
`u = torch.rand(n_rows, vocab, generator=g)` over the *original* batch (rows that finished still take
their share), clamped to `[float32 tiny, 1 - 1e-7]`; row r's token is
`argmax(filter_logits(logits_r / temperature) - log(-log(u[r])))`.

Two top-p rules (`SamplingConfig.sampler`):
- `"default"`: keep a token while the mass ranked above it is below `top_p`, so the token whose mass
  crosses `top_p` is kept (the smallest set whose mass reaches `top_p`, as HF does);
- `"paper"`: the paper's code: keep a token only while the cumulative mass up to and including it is at
  most `top_p`, so the token that crosses `top_p` is dropped (the most likely token is always kept).

`Tracker` records each row's new tokens and decides when a row is done: an EOS token ("eos"), a stop
string in the new text ("stop"), or `max_new_tokens` reached ("length"): `FINISH_REASONS`, the one list
of them, also on `lmn serve`'s wire (`lmn serve --openai-finish-reasons` folds "eos" into "stop" for
strict OpenAI clients: `openai_finish_reason`).

Temperature 0 means greedy, everywhere the package takes sampling settings (`lmn.generate`, a system's
`sampling`, the CLI, the server): `SamplingConfig.greedy` is the one place that says so.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from latent_merge_nnsight.nouns import Tokenizer
from latent_merge_nnsight.sampling_rules import SAMPLERS, SAMPLING_SETTINGS, check_sampling

__all__ = [
    "FINISH_REASONS",
    "SAMPLERS",
    "Sampler",
    "SamplingConfig",
    "Tracker",
    "filter_logits",
    "openai_finish_reason",
]

FINISH_REASONS = ("eos", "stop", "length")
"""Why a row ended: an EOS token, a stop string, or `max_new_tokens`. The one vocabulary of
`GenerationResult.finish_reasons`, `Completion.finish_reason`, the respond files and the server."""


def openai_finish_reason(reason: str) -> str:
    """A `FINISH_REASONS` entry as OpenAI's API says it: "length", or "stop" (an EOS or a stop string)."""
    return "length" if reason == "length" else "stop"


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token. Greedy when `do_sample=False` or `temperature=0` (temperature, top-k
    and top-p are then unused); see `greedy`."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    sampler: str = "default"

    def __post_init__(self) -> None:
        for name in SAMPLING_SETTINGS:  # the one rule per setting (`sampling_rules`)
            check_sampling(name, getattr(self, name))

    @property
    def greedy(self) -> bool:
        """Whether tokens are chosen by argmax: no sampling, or sampling at temperature 0."""
        return not self.do_sample or self.temperature == 0

    def canonical(self) -> "SamplingConfig":
        """The same choice spelled one way: a greedy config as `do_sample=False, temperature=1.0`."""
        if self.greedy:
            return SamplingConfig(False, 1.0, self.top_p, self.top_k, self.seed, self.sampler)
        return self


def filter_logits(
    logits: Float[Tensor, "batch vocab"], top_k: int = 0, top_p: float = 1.0, sampler: str = "default"
) -> Float[Tensor, "batch vocab"]:
    """Set to -inf every token outside the top-k, then outside the top-p set.

    `sampler="default"`: top-p keeps a token while the probability mass of the tokens ranked above it is
    below `top_p` (the smallest set whose mass reaches top_p). `sampler="paper"`: it keeps a token while
    the mass up to and including it is at most `top_p` (the paper's code; the crossing token is dropped).
    Either way the most likely token is always kept.
    """
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ranked, order = logits.sort(dim=-1, descending=True)
        probs = ranked.softmax(dim=-1)
        mass = probs.cumsum(dim=-1)
        drop_ranked = mass > top_p if sampler == "paper" else (mass - probs) >= top_p
        drop_ranked[..., 0] = False
        drop = torch.zeros_like(drop_ranked).scatter(-1, order, drop_ranked)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class Sampler:
    """Picks next tokens for a batch of `n_rows` rows, step after step."""

    def __init__(self, config: SamplingConfig, n_rows: int, device: str | torch.device):
        self.config = config
        self.n_rows = n_rows
        self.generator: torch.Generator | None = None
        if not config.greedy:
            seed = config.seed if config.seed is not None else int(torch.randint(0, 2**62, (1,)))
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)

    def __call__(
        self, logits: Float[Tensor, "rows vocab"], rows: Int[Tensor, " rows"]
    ) -> Int[Tensor, " rows"]:
        """Tokens for the batch rows `rows` (indices into the original batch) from their logits.

        Call exactly once per generation step: each call draws the step's noise for all rows.
        """
        logits = logits.float()
        if self.generator is None:
            return logits.argmax(dim=-1)
        c = self.config
        vocab = logits.shape[-1]
        uniform = torch.rand(self.n_rows, vocab, generator=self.generator, device=logits.device)
        uniform = uniform[rows.to(logits.device)].clamp_(min=torch.finfo(torch.float32).tiny, max=1 - 1e-7)
        gumbel = -torch.log(-torch.log(uniform))
        scores = filter_logits(logits / c.temperature, c.top_k, c.top_p, c.sampler)
        return (scores + gumbel).argmax(dim=-1)


class Tracker:
    """Each row's new tokens and whether (and why) it finished.

    Arguments:
        n_rows: batch size.
        max_new_tokens: a row that reaches this many new tokens finishes with "length".
        eos_ids: tokens that end a row ("eos"); the EOS token is kept in `tokens` but not in the text.
        stop: strings that end a row when they appear in its new text ("stop").
        tokenizer: decodes new tokens (needed for stop strings and texts).
    """

    def __init__(
        self,
        n_rows: int,
        max_new_tokens: int,
        eos_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
        tokenizer: Tokenizer | None = None,
    ):
        self.n_rows = n_rows
        self.max_new_tokens = max_new_tokens
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.stop = tuple(stop)
        self.tokenizer = tokenizer
        self.tokens: list[list[int]] = [[] for _ in range(n_rows)]
        self.reasons: list[str | None] = [None] * n_rows
        self._stop_window = 2 * max((len(s) for s in self.stop), default=0) + 8
        self.steps = 0

    @property
    def done(self) -> list[bool]:
        return [r is not None for r in self.reasons]

    @property
    def all_done(self) -> bool:
        return all(r is not None for r in self.reasons)

    def active_rows(self) -> list[int]:
        return [i for i, r in enumerate(self.reasons) if r is None]

    def push(self, rows: Int[Tensor, " rows"] | Sequence[int], tokens: Int[Tensor, " rows"]) -> list[int]:
        """Append one token to each listed row (rows already done are skipped); return the rows that
        just finished."""
        self.steps += 1
        row_list = rows.tolist() if isinstance(rows, Tensor) else list(rows)
        finished = []
        for row, token in zip(row_list, tokens.tolist(), strict=True):
            if self.reasons[row] is not None:
                continue
            self.tokens[row].append(int(token))
            reason = self._finish_reason(row, int(token))
            if reason is not None:
                self.reasons[row] = reason
                finished.append(row)
        return finished

    def _finish_reason(self, row: int, token: int) -> str | None:
        if token in self.eos_ids:
            return "eos"
        if self.stop:
            tail = self.tokenizer.decode(self.tokens[row][-self._stop_window :], skip_special_tokens=False)
            if any(s in tail for s in self.stop):
                return "stop"
        if len(self.tokens[row]) >= self.max_new_tokens:
            return "length"
        return None

    def text(self, row: int) -> str:
        """The row's new text: EOS left out; cut before the first stop string when it stopped on one (the
        stop string itself is left out, as OpenAI's and vLLM's servers do; `tokens` still hold it)."""
        if self.tokenizer is None:
            return ""
        toks = self.tokens[row]
        if self.reasons[row] == "eos":
            toks = toks[:-1]
        text = self.tokenizer.decode(toks, skip_special_tokens=True)
        if self.reasons[row] == "stop":
            cut = min((text.find(s) for s in self.stop if s in text), default=len(text))
            text = text[:cut]
        return text
