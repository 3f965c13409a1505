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

The class registers itself with lm-eval when this module is imported (lm-eval 0.4.13's CLI does not
read the `lm_eval.models` entry points; later releases do, and the package declares one).
"""

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval loads its own models only into an empty registry: first)
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)
from tqdm import tqdm

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.system_args import system_from_args
from latent_merge_nnsight.generation import generate
from latent_merge_nnsight.generation.score import score
from latent_merge_nnsight.models import hf_module
from latent_merge_nnsight.plan import device_of
from latent_merge_nnsight.systems import LoadedSystem
from latent_merge_nnsight.systems.loaded import load_system

__all__ = ["LatentMergeLM", "parse_model_args"]

log = logging.getLogger(__name__)

SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "seed")
DEFAULT_BATCH_SIZE = 16
"""Rows per forward when lm-eval asks for `batch_size=auto` (no probing for the largest that fits)."""


def parse_model_args(arg_string: str) -> dict[str, Any]:
    """`key=value,key=value` as lm-eval writes `model_args`; `source` may repeat (a list)."""
    out: dict[str, Any] = {}
    for item in (part.strip() for part in arg_string.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LatentMergeError(f"model_args item {item!r}; expected key=value")
        if key == "source":
            out.setdefault("source", []).append(value)
        elif key in out:
            raise LatentMergeError(f"model_args gives {key!r} twice; only `source` may repeat")
        else:
            out[key] = lm_utils.handle_arg_string(value)
    return out


def _batch_size(value: Any) -> int:
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
    """A latent-merge system (any kind of system YAML) as an lm-eval model; see the module docstring."""

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
        batch_size: Any = 1,
        max_batch_size: Any = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise LatentMergeError(
                f"latent-merge model_args: unknown {sorted(unknown)}; expected system, base, source, recipe, "
                "engine, dtype, device, max_length, max_gen_toks, add_bos_token"
            )
        if isinstance(system, LoadedSystem):
            self.system = system
        else:
            config = system_from_args(system, base, source, recipe, engine=engine, dtype=dtype, device=device)
            self.system = load_system(config)
        self.tokenizer = self.system.tokenizer
        self._device = device_of(self.system.base)
        self._batch_size = _batch_size(batch_size)
        self._max_length = int(max_length) if max_length is not None else None
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        config = self.system.config
        self._engine = "vllm" if config.backend == "vllm" else (config.engine or "auto")

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict | None = None
    ) -> "LatentMergeLM":
        """lm-eval's `--model_args` string (`source=` may repeat), plus its batch size and device."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        args = parse_model_args(arg_string)
        device = extra.pop("device", None)  # lm-eval's --device: the models' device_map unless model_args say
        if device is not None and "device" not in args:
            args["device"] = device
        return cls(**args, **extra)

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
        return resolve_max_length(hf_module(self.system.base).config, self.tokenizer, default=2048)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self.system.name)).replace("/", "__")

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids as lm-eval's `hf` model encodes them (no second BOS before a text that has one)."""
        special = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        if add_special_tokens is None and _has_prefix(string, self.tokenizer, self.prefix_token_id):
            special = False
        kw = {} if special is None else {"add_special_tokens": special}
        return self.tokenizer.encode(string, **kw)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------------------
    # loglikelihood

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """`lmn.score` on (context ids, continuation ids), longest first, `batch_size` rows a forward.
        A row longer than `max_length` keeps its last `max_length` tokens (as lm-eval's `hf` model)."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        out: list[tuple[float, bool]] = []
        for chunk in order.get_batched(n=self.batch_size):
            contexts, continuations = [], []
            for _, ctx, cont in chunk:
                if len(cont) > self.max_length:
                    raise LatentMergeError(
                        f"a continuation of {len(cont)} tokens is longer than max_length={self.max_length}"
                    )
                whole = (ctx + cont)[-(self.max_length + 1) :]
                contexts.append(whole[: len(whole) - len(cont)])
                continuations.append(cont)
            got = score(self.system, None, contexts, continuations, None, batch_size=len(chunk))
            for (pair, _, _), total, greedy in zip(chunk, got.totals, got.all_greedy, strict=True):
                answer = (total, greedy)
                out.append(answer)
                if pair is not None:
                    self.cache_hook.add_partial("loglikelihood", pair, answer)
                bar.update(1)
        bar.close()
        return order.get_original(out)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text as lm-eval's disjoint windows of `max_length` tokens (the first after the prefix
        token), every window scored like a continuation of its context; the sum per text."""
        windows: list[tuple[int, tuple[None, list[int], list[int]]]] = []
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

    def _encode_batch(self, texts: Sequence[str], keep: int) -> tuple[torch.Tensor, torch.Tensor]:
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

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        order = Collator(
            [r.args for r in requests],
            sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
            group_by="gen_kwargs",
            group_fn=lambda r: r[1],
        )
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        sources, recipe = self.system.generation_setup()
        out: list[str] = []
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk, strict=True)
            kwargs = normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks)
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
                self.system.base, sources, None, recipe, input_ids=ids, attention_mask=mask,
                max_new_tokens=max_gen_toks, stop=[s for s in until if s] or None,
                engine=self._engine, **sampling,
            )  # fmt: skip
            for context, gen_kwargs, tokens in zip(contexts, all_kwargs, result.tokens, strict=True):
                text = postprocess_generated_text(self.tok_decode(tokens), until, None)
                out.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(1)
        bar.close()
        return order.get_original(out)


def _has_prefix(text: str, tokenizer: Any, prefix_id: int | None) -> bool:
    """Whether `text` already starts with the prefix token (`prefix_id`) or the tokenizer's BOS text."""
    marker = tokenizer.decode(prefix_id) if prefix_id is not None else getattr(tokenizer, "bos_token", None)
    return bool(marker) and text.startswith(marker)
