"""A loaded system: its models in memory, generation in one worker thread, provenance, judge callables.

`load_system(system)` gives a `LoadedSystem` whose `generate(prompts)` returns texts and
whose `complete(prompts)` also returns finish reasons and token counts. A merge source is loaded only up
to the recipe's highest layer (its upper blocks are never needed). A `backend: vllm` system holds light
CPU shells of its models (block 0, for the tokenizer, config and provenance): vLLM reads the weights.
All generation of one loaded system runs in one worker thread behind one lock: an nnsight model must not
be traced from two threads.
`complete_fn()` wraps it as the async judge callable, batching concurrent calls (`systems.batching`)
(`evaluation.judge_system` runs JudgeBench's official protocol with a system as the judge).
"""

import asyncio
import importlib
import importlib.metadata
import platform
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from tokenizers import Tokenizer

from latent_merge_nnsight._nnsight import is_wrapped
from latent_merge_nnsight.baselines.weights import merge_weights
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.generation import generate
from latent_merge_nnsight.generation.score import ScoreResult, score
from latent_merge_nnsight.inputs import is_chat, is_token_ids
from latent_merge_nnsight.models import hf_module, load, model_info
from latent_merge_nnsight.nouns import Tokenizer as HfTokenizer
from latent_merge_nnsight.ops import get_op
from latent_merge_nnsight.recipe import Recipe
from latent_merge_nnsight.request_recipe import KEY, as_recipe, resolve_request
from latent_merge_nnsight.systems.batching import Completion, SystemCompleteFn, TokenLogprob
from latent_merge_nnsight.systems.echo import check_echo, score_echo
from latent_merge_nnsight.systems.logprobs import supports_logprobs, token_logprobs
from latent_merge_nnsight.systems.spec import (
    SamplingSpec,
    System,
    WeightMergeSpec,
    explain_errors,
)

__all__ = [
    "Completion",
    "LoadedSystem",
    "TokenLogprob",
    "load_system",
]

_VERSIONED_PACKAGES = ("torch", "transformers", "nnsight", "latent_merge_nnsight", "pydantic")


def load_system(system: "str | Path | System | LoadedSystem") -> "LoadedSystem":
    """A `LoadedSystem` from a YAML path, a `System`, or one already loaded (returned as is)."""
    if isinstance(system, LoadedSystem):
        return system
    if isinstance(system, System):
        return LoadedSystem(system)
    if isinstance(system, str | Path):
        return LoadedSystem(System.from_file(system))
    raise LatentMergeError(
        f"system has type {type(system).__name__}; expected a YAML path, a System or a LoadedSystem"
    )


def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class LoadedSystem:
    """A `System` with its models in memory, ready to generate.

    Attributes:
        config: the `System` it was loaded from.
        name: the system's name.
        base: the nnsight model that generates (the weight-merged model for kind ``weight``).
        sources: the source models (latent and ensemble kinds).
        tokenizer: the base model's tokenizer.
    """

    streams_tokens = True
    """`complete` takes the generation loop's step hook (``on_step``), so `lmn serve` streams tokens."""

    def __init__(self, config: System) -> None:
        self.config = config
        self.name = config.name
        load_kwargs: dict[str, Any] = {"dtype": config.dtype}
        if config.device_map is not None:
            load_kwargs["device_map"] = config.device_map
        if config.quantization is not None:
            load_kwargs["quantization"] = config.quantization
        base_ref = config.resolve(config.base)
        source_refs = [config.resolve(s) for s in config.sources]
        self.sources: list[Any] = []
        if config.backend == "vllm":  # vLLM reads the weights from disk: light CPU shells here
            self.base = _shell(base_ref, config.dtype)
            self.sources = [_shell(ref, config.dtype) for ref in source_refs]
        elif config.kind == "weight":
            assert config.weight_merge is not None
            self.base = _weight_merged(base_ref, source_refs, config.weight_merge, config, load_kwargs)
        else:
            self.base = load(base_ref, **load_kwargs)
        if config.kind in ("latent", "ensemble") and config.backend == "hf":
            up_to = config.source_up_to_layer(model_info(self.base).full_n_layers)
            extra = {"up_to_layer": up_to} if up_to is not None else {}
            self.sources = [load(ref, **load_kwargs, **extra) for ref in source_refs]
        recipe = config.recipe
        if recipe is not None and recipe.op == "delta" and not self.sources and recipe.deltas is None:
            raise LatentMergeError(
                f"system {config.name!r}: op 'delta' without sources needs recipe.deltas "
                "(a safetensors file from lmn.compute_deltas(...).save(path))"
            )  # the file itself is read by the plan (`lmn.generate`), next to the YAML file
        self.tokenizer = self.base.tokenizer
        self._encode = _private_encoder(self.tokenizer)
        self._lock = threading.Lock()
        self._counter_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lmn-{config.name}")
        self.generate_calls = 0

    def __repr__(self) -> str:
        return f"LoadedSystem(name={self.name!r}, kind={self.config.kind!r}, base={self.config.base!r})"

    # ------------------------------------------------------------------------------------------------

    @property
    def supports_logprobs(self) -> bool:
        """Whether ``complete(..., logprobs=k)`` can score this system's tokens (`systems.logprobs`)."""
        return supports_logprobs(self.config)

    @property
    def context_length(self) -> int | None:
        """The longest prompt the base model is meant for (config or tokenizer limit), if known."""
        limits = [getattr(hf_module(self.base).config, "max_position_embeddings", None)]
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and tok_max < 10**7:  # transformers uses ~1e30 for "no limit"
            limits.append(tok_max)
        limits = [x for x in limits if isinstance(x, int) and x > 0]
        return min(limits) if limits else None

    def count_prompt_tokens(self, prompt: str | Sequence[Mapping[str, Any]] | Sequence[int]) -> int:
        """Tokens of one prompt as `complete` runs it (chat template applied to a chat; a string as is,
        with the tokenizer's special tokens; token ids as given).

        Safe to call from any thread while the model generates: it uses a private copy of the tokenizer.
        """
        if is_chat(prompt):
            text = self.tokenizer.apply_chat_template(
                list(prompt), add_generation_prompt=True, tokenize=False
            )
            special = False
        elif isinstance(prompt, str):
            text, special = prompt, True
        elif is_token_ids(prompt):
            vocab = hf_module(self.base).config.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise LatentMergeError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
            return len(prompt)
        else:
            raise LatentMergeError(
                f"prompt has type {type(prompt).__name__}; expected a string, a chat or token ids"
            )
        with self._counter_lock:
            return len(self._encode(text, special))

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The token ids of ``text`` (with the tokenizer's special tokens unless told otherwise), as
        `complete` runs a raw string prompt. Safe from any thread, like `count_prompt_tokens`."""
        with self._counter_lock:
            return self._encode(text, add_special_tokens)

    def sampling(self, **overrides: object) -> SamplingSpec:
        """The system's sampling settings with ``overrides`` applied (validated)."""
        unknown = sorted(set(overrides) - set(SamplingSpec.model_fields))
        if unknown:
            raise LatentMergeError(
                f"unknown sampling overrides {unknown}; expected some of {sorted(SamplingSpec.model_fields)}",
                param=unknown[0],
            )
        try:
            return SamplingSpec.model_validate(self.config.sampling.model_dump() | overrides)
        except ValidationError as exc:
            loc = exc.errors()[0]["loc"]
            raise LatentMergeError(
                f"sampling overrides are invalid:\n{explain_errors(exc)}", param=str(loc[0]) if loc else None
            ) from None

    def request_recipe(self, value: object) -> Recipe | None:
        """A request's own recipe (vLLM's per-request ``latent_merge``: `request_recipe`): the system's
        recipe with the request's op and alphas, or None when the value sets neither (``merge_from``
        alone). A `LatentMergeError` naming the field for a layer the system does not merge, an alpha out
        of the op's range, an op of another kind, or a system without a live-source latent merge."""
        recipe = self.config.recipe if self.config.kind == "latent" else None
        if recipe is None:
            raise LatentMergeError(
                f"{KEY}: system {self.name!r} (kind {self.config.kind!r}) has no latent merge to set "
                "alphas for; per-request recipes need a latent system"
            )
        if get_op(recipe.op).static_source:
            raise LatentMergeError(
                f"{KEY}: system {self.name!r} steers with static vectors (op {recipe.op!r}); lmn serve runs "
                "per-request recipes on live sources (one pass shares them); serve its export with "
                "`vllm serve` for per-request steering alphas"
            )
        layers = sorted(recipe.layer_alphas(model_info(self.base).full_n_layers))
        return as_recipe(
            resolve_request(value, recipe.to_dict(), layers, len(self.sources), holder="system"), recipe
        )

    def check_echo(self, logprobs: int | None, max_new_tokens: int, merge_from: int | None) -> None:
        """Whether `complete(..., echo=True)` can serve these arguments (`systems.echo.check_echo`)."""
        check_echo(self, logprobs, max_new_tokens, merge_from)

    def complete(
        self,
        prompts: Sequence[Any],
        *,
        recipes: Sequence[Recipe | None] | None = None,
        on_step: Callable[..., Any] | None = None,
        **overrides: object,
    ) -> list[Completion]:
        """Generate one answer per prompt (strings are used as is, chats get the chat template, token-id
        lists are the tokens themselves).

        ``overrides`` replace the system's sampling settings for this call (``max_new_tokens``,
        ``temperature``, ``seed``, ``stop``, ...). Thread-safe: calls run one at a time.
        ``recipes`` (one per prompt; None: the system's own) run each row with its request's recipe
        (`request_recipe`) in the same pass. ``on_step`` is the generation loop's step hook
        (`generation.loop.Run.on_step`: each row's token as it is chosen; not called for echo).
        ``echo=True`` scores the prompts instead (`systems.echo.score_echo`: ``max_new_tokens`` 0 or 1,
        the merge from ``merge_from``).
        """
        if isinstance(prompts, str) or is_chat(prompts):
            raise LatentMergeError(
                "prompts must be a list of prompts (strings or chats), not a single prompt"
            )
        prompts = list(prompts)
        if not prompts:
            return []
        rows = self._row_recipes(recipes, len(prompts))
        top = overrides.pop("logprobs", None)  # alternatives per token (0: the chosen one), or None
        if overrides.pop("echo", False):
            return self._echo(prompts, top, overrides, rows)
        sampling = self.sampling(**overrides)
        with self._lock:
            self.generate_calls += 1
            result = self._generate(prompts, sampling, top, rows, on_step)
        texts, reasons = list(result.texts), list(result.finish_reasons)
        if len(texts) != len(prompts) or len(reasons) != len(prompts):
            raise RuntimeError(f"generate returned {len(texts)} texts for {len(prompts)} prompts")
        # prompt tokens: the real ones in the prompt columns; new tokens: each row's ids (with a final EOS)
        prompt_tokens = result.attention_mask[:, : result.prompt_width].sum(dim=-1).tolist()
        new_tokens = [len(t) for t in result.tokens]
        logprobs: list[Any] = [None] * len(prompts)
        if top is not None:
            with self._lock:
                logprobs = token_logprobs(self, result, top, rows)
        return [
            Completion(t, r, int(p), n, lp)
            for t, r, p, n, lp in zip(texts, reasons, prompt_tokens, new_tokens, logprobs, strict=True)
        ]

    def _row_recipes(self, recipes: Sequence[Any] | None, n: int) -> list[Recipe] | None:
        """Each row's recipe (the system's where a row names none), or None when no row names one."""
        if recipes is None or all(r is None for r in recipes):
            return None
        if len(recipes) != n or self.config.kind != "latent" or self.config.recipe is None:
            raise LatentMergeError(
                f"recipes: {len(recipes)} per-row recipes for {n} prompts on system {self.name!r} (kind "
                f"{self.config.kind!r}); expected one per prompt, on a latent system"
            )
        return [self.config.recipe if r is None else r for r in recipes]

    def generate(self, prompts: Sequence[Any], **overrides: object) -> list[str]:
        """The answer texts for `prompts` (see `complete` for finish reasons and token counts)."""
        return [c.text for c in self.complete(prompts, **overrides)]

    def _echo(
        self, prompts: list[Any], top: int | None, overrides: dict[str, Any], rows: list[Recipe] | None
    ) -> list[Completion]:
        merge_from = overrides.pop("merge_from", None)
        budget = overrides.pop("max_new_tokens", 1)
        kwargs = self.sampling(**overrides).generate_kwargs()
        kwargs.pop("max_new_tokens")
        with self._lock:
            return score_echo(
                self,
                prompts,
                top=top,
                max_new_tokens=budget,
                merge_from=merge_from,
                sampling=kwargs,
                recipes=rows,
            )

    def generation_setup(self) -> tuple[Any, Any]:
        """The `sources` and `recipe` that `lmn.generate` / `lmn.score` take for this system's kind."""
        kind = self.config.kind
        if kind == "ensemble":
            assert self.config.ensemble is not None
            return self.sources[0], self.config.ensemble.build()
        if kind == "latent":
            return (self.sources[0] if len(self.sources) == 1 else self.sources), self.config.recipe
        return None, None

    def scoring_setup(self) -> tuple[Any, Any, Any]:
        """(base, sources, recipe) for `lmn.score(system, ...)`: teacher-forced scoring as this system
        generates (a `backend: vllm` system holds no weights here to score with)."""
        if self.config.backend == "vllm":
            raise LatentMergeError(
                f"system {self.name!r} has backend vllm: its models here are shells without weights; "
                "score it with backend hf"
            )
        return (self.base, *self.generation_setup())

    def score(
        self,
        contexts: Sequence[str | Sequence[int]],
        continuations: Sequence[str | Sequence[int]],
        **kwargs: object,
    ) -> ScoreResult:
        """`lmn.score` of (context, continuation) rows under this system, one call at a time."""
        with self._lock:
            return score(self, None, contexts, continuations, None, **kwargs)

    def _generate(
        self,
        prompts: list[Any],
        sampling: SamplingSpec,
        top: int | None = None,
        rows: list[Recipe] | None = None,
        on_step: Callable[..., Any] | None = None,
    ) -> Any:
        """One `lmn.generate` call in this system's mode (on vLLM for backend vllm, which also reports
        the ``top`` logprobs of each token when asked), with per-row recipes when ``rows`` is given."""
        kwargs = sampling.generate_kwargs() | {"chat": False}  # strings as they are: chats are templated
        if on_step is not None:
            kwargs["on_step"] = on_step
        if self.config.engine is not None:
            kwargs["engine"] = self.config.engine
        sources, recipe = self.generation_setup()
        if rows is not None and self.config.kind == "latent":
            recipe = rows
        if self.config.backend == "vllm":
            # vLLM reads the weights from disk; the shells give the tokenizer, limits and provenance
            kwargs.update(engine="vllm", logprobs=top)
        return generate(self.base, sources, prompts, recipe, **kwargs)

    # ------------------------------------------------------------------------------------------------

    def provenance(self) -> dict[str, Any]:
        """What produced an output: the system file's content, models, recipe, sampling, seed, versions."""

        def describe(model: object, ref: str | None) -> dict[str, Any]:
            if not is_wrapped(model) and not hasattr(model, "config"):  # e.g. steering Deltas
                return {"ref": ref, "type": type(model).__name__}
            info = model_info(model)
            out = {"ref": ref, "n_layers": info.n_layers, "full_n_layers": info.full_n_layers}
            if self.config.backend == "vllm":  # n_layers: the shell's; vLLM runs the model from disk
                out["weights"] = "read by vLLM from disk (this process holds a CPU shell: block 0)"
            return out

        refs: list[str | None] = (
            list(self.config.sources) if self.config.kind in ("latent", "ensemble") else []
        )
        loaded = [describe(self.base, self.config.base)]
        loaded += [describe(m, r) for m, r in zip(self.sources, refs, strict=True)]
        recipe = self.config.recipe
        if recipe is not None and recipe.deltas is not None and not refs:  # steering vectors from a file
            loaded.append({"ref": recipe.deltas, "type": "Deltas"})
        return {
            "system": self.config.to_dict(),
            "name": self.name,
            "kind": self.config.kind,
            "models": {
                "base": self.config.base,
                "sources": list(self.config.sources),
                "loaded": loaded,
            },
            "recipe": self.config.recipe.to_dict() if self.config.recipe is not None else None,
            "weight_merge": self.config.weight_merge.model_dump() if self.config.weight_merge else None,
            "ensemble": self.config.ensemble.model_dump() if self.config.ensemble else None,
            "sampling": self.config.sampling.model_dump(),
            "seed": self.config.sampling.seed,
            "versions": _package_versions(),
        }

    # ------------------------------------------------------------------------------------------------

    def run_in_worker(self, fn: Callable[[], Any]) -> "asyncio.Future[Any]":
        """Run ``fn`` in this system's single generation thread (from a running event loop)."""
        return asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def complete_fn(
        self, *, max_batch_size: int = 8, max_wait_ms: float = 5.0, **overrides: object
    ) -> SystemCompleteFn:
        """An async ``messages -> reply text`` callable (a judge's `CompleteFn`) that batches calls.

        Concurrent calls (e.g. `judgebench_accuracy` with ``concurrency=8``) are collected into one
        `generate` call of up to ``max_batch_size`` prompts. ``overrides`` set sampling for every call.
        """
        self.sampling(**overrides)  # validate now, not on the first call
        return SystemCompleteFn(
            self, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, overrides=overrides
        )

    def close(self) -> None:
        """Stop the generation thread (the models stay in memory until the object is dropped)."""
        self._executor.shutdown(wait=True)


def _shell(ref: str, dtype: str) -> Any:
    """A `backend: vllm` system's copy of a model: on the CPU, block 0 only (no untied head), so this
    process holds the tokenizer, the config (limits, vocabulary, EOS ids, dtype) and where the model came
    from, while vLLM reads the weights from disk itself."""
    return load(ref, dtype=dtype, up_to_layer=0)


def _private_encoder(tokenizer: HfTokenizer) -> Callable[[str, bool], list[int]]:
    """An encoding function over a private copy of the tokenizer's backend (rebuilt from its JSON, so
    counting never touches the padding state that batched encoding sets on the shared tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        private = Tokenizer.from_str(backend.to_str())
        private.no_padding()
        private.no_truncation()
        return lambda text, special: list(private.encode(text, add_special_tokens=special).ids)
    lock = threading.Lock()

    def encode(text: str, special: bool) -> list[int]:  # a slow tokenizer: serialise its use
        with lock:
            return list(tokenizer(text, add_special_tokens=special)["input_ids"])

    return encode


def _weight_merged(
    base_ref: str, source_refs: list[str], spec: WeightMergeSpec, config: System, load_kwargs: dict[str, Any]
) -> Any:
    """Merge in weight space (mergekit or RegMean) and load the merged checkpoint like any model.

    With ``spec.out`` the checkpoint is kept there and reused by later loads; without it the merge goes
    to a temporary directory that is removed once the model is in memory.
    """

    def merge(out: Path) -> None:
        merge_weights(
            base_ref,
            source_refs,
            spec.method,
            spec.alpha,
            weights=spec.weights,
            out=out,
            load=False,
            dtype=spec.merge_dtype,
            device=spec.merge_device,
            allow_extrapolation=spec.allow_extrapolation,
            **spec.params,
        )

    if spec.out is not None:
        out = Path(spec.out)
        out = out if out.is_absolute() or config._base_dir is None else config._base_dir / out
        if not (out / "config.json").is_file():
            merge(out)
        return load(out, **load_kwargs)
    with tempfile.TemporaryDirectory(prefix="lmn-system-merge-") as scratch:
        merge(Path(scratch) / "merged")
        return load(Path(scratch) / "merged", **load_kwargs)
