"""`latent-merge`: a merged system as a model of lm-evaluation-harness (lm-eval 0.4.13 and later 0.4.x).

    lm_eval --model latent-merge --model_args system=examples/systems/toy-latent-slerp.yaml --tasks ...
    lmn eval examples/systems/toy-latent-slerp.yaml --tasks ...      # the same, through our CLI

`model_args`: `system=PATH` (a system YAML of any kind), or `base=MODEL,source=MODEL,recipe=PATH`
(`source` repeated for RegMean; no source: the base alone), plus `engine=` (auto, fast, nnsight; vllm
runs `generate_until` on vLLM), `dtype=`, `device=` (the models' `device_map`), `max_length=`,
`max_gen_toks=`, `add_bos_token=`.

- `loglikelihood`: `lmn.score` on the pairs lm-eval tokenized (its `_encode_pair`), batched by
  `batch_size`, longest first. The merge applies where generation would have applied it had the system
  generated the continuation (positions "last": the context's last token and every continuation token).
- `loglikelihood_rolling`: lm-eval's windows of `max_length` tokens, each scored like a continuation, so
  every scored token's prediction is merged as if the text had been generated.
- `generate_until`: `lmn.generate` in batches, with the request's `until` strings, `max_gen_toks`,
  greedy or sampling (`do_sample`, `temperature`, `top_p`, `top_k`, `seed`).
- `apply_chat_template`, `tokenizer_name`, `chat_template`: what `--apply_chat_template` calls.

**Many recipes in one pass.** `LatentMergeLM.from_models(base, sources, [r1, r2, ...])` serves several
recipes over the same models at once: each request lm-eval sends becomes one row per recipe, scored or
generated in shared batches of `batch_size` rows (`lmn.score` / `lmn.generate` with per-row recipes),
and every recipe's answers are kept. lm-eval sees the answers of the recipe chosen with `use_recipe(k)`,
so running lm-eval's evaluator once per recipe scores each with lm-eval's own metric code while the
models run once (`analysis.LmEvalTasks` does this for sweeps). Greedy answers equal a one-recipe run's;
sampled ones are drawn per row of the shared pass.

The class registers itself with lm-eval when this module is imported (lm-eval 0.4.13's CLI does not
read the `lm_eval.models` entry points; later releases do, and the package declares one).
"""

import json
import logging
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import lm_eval.models  # noqa: F401  (lm-eval loads its own models only into an empty registry: first)
from jaxtyping import Int
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)
from torch import Tensor
from tqdm import tqdm

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.system_args import system_from_args
from latent_merge_nnsight.generation import generate
from latent_merge_nnsight.generation.score import ScoreResult, score
from latent_merge_nnsight.models import hf_module
from latent_merge_nnsight.nouns import Model, Tokenizer
from latent_merge_nnsight.plan import RecipeLike, Sources, device_of
from latent_merge_nnsight.systems import LoadedSystem
from latent_merge_nnsight.systems.loaded import load_system

if TYPE_CHECKING:
    from latent_merge_nnsight.recipe import Recipe

__all__ = ["LatentMergeLM", "parse_model_args"]

log = logging.getLogger(__name__)

SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "seed")
DEFAULT_BATCH_SIZE = 16
"""Rows per forward when lm-eval asks for `batch_size=auto` (no probing for the largest that fits)."""

T = TypeVar("T")
ModelArg = str | int | float | bool | list[str] | None
"""A `model_args` value as lm-eval parses it (`source` may repeat: a list)."""
ScoreRequest = tuple[tuple[str, str] | None, list[int], list[int]]
"""(the request's text pair, or None for a rolling window; context ids; continuation ids)."""
GenArgs = tuple[str, dict[str, object]]
"""A `generate_until` request's args: (context, gen_kwargs)."""


def parse_model_args(arg_string: str) -> dict[str, ModelArg]:
    """`key=value,key=value` as lm-eval writes `model_args`; `source` may repeat (a list)."""
    out: dict[str, ModelArg] = {}
    sources: list[str] = []
    for item in (part.strip() for part in arg_string.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LatentMergeError(f"model_args item {item!r}; expected key=value")
        if key == "source":
            sources.append(value)
            out["source"] = sources
        elif key in out:
            raise LatentMergeError(f"model_args gives {key!r} twice; only `source` may repeat")
        else:
            out[key] = lm_utils.handle_arg_string(value)
    return out


def _batch_size(value: int | str | None) -> int:
    if value is None:
        return 1
    if isinstance(value, str) and value.startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise LatentMergeError(f"batch_size={value!r}; expected an int >= 1 or 'auto'") from None
    if size < 1:
        raise LatentMergeError(f"batch_size={value!r}; expected an int >= 1 or 'auto'")
    return size


@register_model("latent-merge")
class LatentMergeLM(TemplateLM):
    """A latent-merge system (any kind of system YAML) as an lm-eval model; see the module docstring.

    Attributes:
        system: the loaded system (None when built `from_models`).
        recipes: the recipes each request is answered under (one: the system's own).
    """

    def __init__(
        self,
        system: "str | Path | LoadedSystem | None" = None,
        base: str | None = None,
        source: str | Sequence[str] | None = None,
        recipe: str | None = None,
        engine: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        **unknown: object,
    ) -> None:
        super().__init__()
        if unknown:
            raise LatentMergeError(
                f"latent-merge model_args: unknown {sorted(unknown)}; expected system, base, source, recipe, "
                "engine, dtype, device, max_length, max_gen_toks, add_bos_token"
            )
        if isinstance(system, LoadedSystem):
            self.system: LoadedSystem | None = system
        else:
            config = system_from_args(system, base, source, recipe, engine=engine, dtype=dtype, device=device)
            self.system = load_system(config)
        sources, own = self.system.generation_setup()
        config = self.system.config
        self._setup(
            self.system.base, sources, [own], name=self.system.name,
            engine="vllm" if config.backend == "vllm" else (config.engine or "auto"),
            batch_size=batch_size, max_length=max_length, max_gen_toks=max_gen_toks,
            add_bos_token=add_bos_token,
        )  # fmt: skip

    @classmethod
    def from_models(
        cls,
        base: Model,
        sources: Sources,
        recipes: "Sequence[Recipe | None]",
        *,
        engine: str = "auto",
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
    ) -> "LatentMergeLM":
        """An lm-eval model over loaded models that answers every request under each of `recipes` (a
        `Recipe`, or None for the base alone) in shared passes; `use_recipe(k)` picks whose answers
        lm-eval sees. Several recipes share `sources`, so each takes a live-source op (not `delta`)."""
        recipes = list(recipes)
        if not recipes:
            raise LatentMergeError("recipes=[] is empty; expected at least one recipe (or None)")
        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        lm.system = None
        name = str(getattr(getattr(base, "tokenizer", None), "name_or_path", "") or "latent-merge")
        lm._setup(
            base, sources, recipes, name=name, engine=engine, batch_size=batch_size,
            max_length=max_length, max_gen_toks=max_gen_toks, add_bos_token=add_bos_token,
        )  # fmt: skip
        return lm

    def _setup(
        self,
        base: Model,
        sources: Sources,
        recipes: Sequence[RecipeLike],
        *,
        name: str,
        engine: str,
        batch_size: int | str | None,
        max_length: int | None,
        max_gen_toks: int,
        add_bos_token: bool | None,
    ) -> None:
        self._base = base
        self._sources = sources
        self.recipes: list[RecipeLike] = list(recipes)
        self._name = name
        self._engine = engine
        self.tokenizer: Tokenizer = base.tokenizer
        self._device = device_of(base)
        self._batch_size = _batch_size(batch_size)
        self._max_length = int(max_length) if max_length is not None else None
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self._recipe = 0
        self._answers: dict[Hashable, list[object]] = {}

    def use_recipe(self, k: int) -> None:
        """Answer lm-eval with recipe `k`'s answers (every recipe's are computed on first request)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(self.recipes):
            raise LatentMergeError(f"k={k!r}; expected an int in [0, {len(self.recipes) - 1}]")
        self._recipe = k

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, object] | None = None
    ) -> "LatentMergeLM":
        """lm-eval's `--model_args` string (`source=` may repeat), plus its batch size and device."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        args = parse_model_args(arg_string)
        device = extra.pop("device", None)  # lm-eval's --device: the models' device_map unless model_args say
        if device is not None and "device" not in args:
            args["device"] = device  # type: ignore[assignment]
        return cls(**args, **extra)  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------------------------
    # what lm-eval reads

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The context of a request with an empty one (lm-eval's rule: BOS, else EOS)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        return resolve_max_length(hf_module(self._base).config, self.tokenizer, default=2048)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self._name)).replace("/", "__")

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: object) -> list[int]:
        """Token ids as lm-eval's `hf` model encodes them (no second BOS before a text that has one)."""
        special = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        if add_special_tokens is None and _has_prefix(string, self.tokenizer, self.prefix_token_id):
            special = False
        kw = {} if special is None else {"add_special_tokens": special}
        return self.tokenizer.encode(string, **kw)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------------------
    # every recipe at once

    def _per_recipe(self, keys: list[Hashable], compute: Callable[[list[int]], list[list[T]]]) -> list[T]:
        """The chosen recipe's answer to each request (`keys`: one per request). `compute(indices)`
        answers those requests under every recipe (per request, one answer per recipe); with several
        recipes the answers are kept, so the other recipes' lm-eval runs find theirs."""
        if len(self.recipes) == 1:
            return [row[0] for row in compute(list(range(len(keys))))]
        missing: dict[Hashable, int] = {}  # each unanswered request once (its first index)
        for i, key in enumerate(keys):
            if key not in self._answers:
                missing.setdefault(key, i)
        if missing:
            for key, answers in zip(missing, compute(list(missing.values())), strict=True):
                self._answers[key] = answers
        return [self._answers[key][self._recipe] for key in keys]  # type: ignore[misc]

    def _rows_recipe(self, ks: Sequence[int]) -> "RecipeLike | list[Recipe | None]":
        """The `recipe` argument for rows answering recipes `ks`: the one recipe, or one per row."""
        if len(self.recipes) == 1:
            return self.recipes[0]
        return [self.recipes[k] for k in ks]  # type: ignore[misc]

    def _score(
        self, contexts: list[list[int]], continuations: list[list[int]], ks: Sequence[int]
    ) -> ScoreResult:
        """`lmn.score` of rows answering recipes `ks`: a loaded system scores itself, as it generates (on
        vLLM for `backend: vllm`, whose models here hold no weights); models score by the rows' recipes."""
        if self.system is not None:
            return score(self.system, None, contexts, continuations, None, batch_size=len(contexts))
        recipe = self._rows_recipe(ks)
        return score(self._base, self._sources, contexts, continuations, recipe, batch_size=len(contexts))

    # ------------------------------------------------------------------------------------------------
    # loglikelihood

    def _loglikelihood_tokens(
        self, requests: list[ScoreRequest], disable_tqdm: bool = False, **kwargs: object
    ) -> list[tuple[float, bool]]:
        """`lmn.score` on (context ids, continuation ids), longest first, `batch_size` rows a forward.
        A row longer than `max_length` keeps its last `max_length` tokens (as lm-eval's `hf` model)."""
        keys: list[Hashable] = [("loglikelihood", tuple(ctx), tuple(cont)) for _, ctx, cont in requests]
        out = self._per_recipe(keys, lambda idx: self._score_rows([requests[i] for i in idx], disable_tqdm))
        for (pair, _, _), answer in zip(requests, out, strict=True):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, answer)
        return out

    def _score_rows(self, requests: list[ScoreRequest], disable_tqdm: bool) -> list[list[tuple[float, bool]]]:
        """Per request, its (loglikelihood, greedy) under each recipe: one row per (request, recipe)."""
        n_recipes = len(self.recipes)
        rows = [(i, k) for i in range(len(requests)) for k in range(n_recipes)]
        tokens = [ctx + cont for _, ctx, cont in requests]
        order = Collator(rows, sort_fn=lambda row: (-len(tokens[row[0]]), tuple(tokens[row[0]]), row[1]))
        bar = tqdm(total=len(rows), disable=disable_tqdm, desc="Running loglikelihood requests")
        out: list[tuple[float, bool]] = []
        for chunk in order.get_batched(n=self.batch_size):
            contexts, continuations = [], []
            for i, _ in chunk:
                _, ctx, cont = requests[i]
                if len(cont) > self.max_length:
                    raise LatentMergeError(
                        f"a continuation of {len(cont)} tokens is longer than max_length={self.max_length}"
                    )
                whole = (ctx + cont)[-(self.max_length + 1) :]
                contexts.append(whole[: len(whole) - len(cont)])
                continuations.append(cont)
            got = self._score(contexts, continuations, [k for _, k in chunk])
            out += list(zip(got.totals, got.all_greedy, strict=True))
            bar.update(len(chunk))
        bar.close()
        answers = order.get_original(out)
        return [answers[i * n_recipes : (i + 1) * n_recipes] for i in range(len(requests))]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Each text as lm-eval's disjoint windows of `max_length` tokens (the first after the prefix
        token), every window scored like a continuation of its context; the sum per text."""
        windows: list[tuple[int, ScoreRequest]] = []
        for i, (text,) in enumerate(tqdm([r.args for r in requests], disable=disable_tqdm)):
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            windows += [(i, (None, *lm_utils.make_disjoint_window(w))) for w in rolling]
        scored = self._loglikelihood_tokens([w for _, w in windows], disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for (i, _), (value, _) in zip(windows, scored, strict=True):
            totals[i] += value
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    # ------------------------------------------------------------------------------------------------
    # generate_until

    def _encode_batch(self, texts: Sequence[str], keep: int) -> tuple[Int[Tensor, "b p"], Int[Tensor, "b p"]]:
        """Left-padded ids and mask, each row cut to its last `keep` tokens (lm-eval's `tok_batch_encode`)."""
        special: dict[str, bool] = {}
        if _has_prefix(texts[0], self.tokenizer, None):
            special = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.tokenizer(list(texts), padding="longest", return_tensors="pt", **special)
        finally:
            self.tokenizer.padding_side = side
        return enc["input_ids"][:, -keep:], enc["attention_mask"][:, -keep:]

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        args: list[GenArgs] = [r.args for r in requests]
        keys: list[Hashable] = [
            ("generate_until", ctx, json.dumps(kw, sort_keys=True, default=repr)) for ctx, kw in args
        ]
        out = self._per_recipe(keys, lambda idx: self._generate_rows([args[i] for i in idx], disable_tqdm))
        for request_args, text in zip(args, out, strict=True):
            self.cache_hook.add_partial("generate_until", request_args, text)
        return out

    def _generate_rows(self, args: list[GenArgs], disable_tqdm: bool) -> list[list[str]]:
        """Per request, its answer under each recipe: one row per (request, recipe), batched by
        `gen_kwargs`, longest context first."""
        n_recipes = len(self.recipes)
        lengths = [len(self.tok_encode(ctx)) for ctx, _ in args]
        order = Collator(
            [(i, k) for i in range(len(args)) for k in range(n_recipes)],
            sort_fn=lambda row: (-lengths[row[0]], args[row[0]][0], row[1]),
            group_by="gen_kwargs",
            group_fn=lambda row: args[row[0]][1],
        )
        bar = tqdm(total=len(args) * n_recipes, disable=disable_tqdm, desc="Running generate_until requests")
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        out: list[str] = []
        for chunk in order.get_batched(n=self.batch_size):
            contexts = [args[i][0] for i, _ in chunk]
            kwargs = normalize_gen_kwargs(dict(args[chunk[0][0]][1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            sampling = {k: kwargs.pop(k) for k in SAMPLING_KEYS if k in kwargs}
            if not sampling.get("do_sample"):
                sampling = {"do_sample": False}
            if kwargs:
                log.warning(
                    "latent-merge: generation kwargs %s are not supported and were ignored", sorted(kwargs)
                )
            if max_gen_toks >= self.max_length:
                raise LatentMergeError(
                    f"max_gen_toks={max_gen_toks} leaves no room for the context in "
                    f"max_length={self.max_length}"
                )
            ids, mask = self._encode_batch(contexts, self.max_length - max_gen_toks)
            result = generate(
                self._base, self._sources, None, self._rows_recipe([k for _, k in chunk]),
                input_ids=ids, attention_mask=mask, max_new_tokens=max_gen_toks,
                stop=[s for s in until if s] or None, engine=self._engine, **sampling,
            )  # fmt: skip
            out += [postprocess_generated_text(self.tok_decode(t), until, None) for t in result.tokens]
            bar.update(len(chunk))
        bar.close()
        answers = order.get_original(out)
        return [answers[i * n_recipes : (i + 1) * n_recipes] for i in range(len(args))]


def _has_prefix(text: str, tokenizer: Tokenizer, prefix_id: int | None) -> bool:
    """Whether `text` already starts with the prefix token (`prefix_id`) or the tokenizer's BOS text."""
    marker = tokenizer.decode(prefix_id) if prefix_id is not None else getattr(tokenizer, "bos_token", None)
    return bool(marker) and text.startswith(marker)
