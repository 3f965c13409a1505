"""Per-request recipes: a request's own alphas and op, carried in `SamplingParams.extra_args`.

    SamplingParams(max_tokens=64, extra_args={"latent_merge": {"alpha": 0.3}})
    client.chat.completions.create(..., extra_body={"vllm_xargs": {"latent_merge": '{"alpha": 0.3}'}})

A request's `latent_merge` value (a mapping, or its JSON text) holds:
- `alpha`: one alpha for every layer of the export, or `layers` / `alphas`: `{layer: alpha}` over some of
  the export's layers (the others get alpha 0, i.e. the base there);
- `op` (optional): another op the export can run (a live-source op for a live-source export; `delta` only
  for a delta export); `allow_extrapolation` (optional) for alphas outside [0, 1];
- `merge_from` (optional; alone it keeps the export's alphas and op): a token index; the merge covers every
  position >= it instead of the export's positions, so an echoed prompt (prompt logprobs) is scored as
  generation from its first `merge_from + 1` tokens would merge it. A prompt-logprobs request to an
  export whose positions are not "all" must give it (`check_prompt_logprobs`).
Requests without one use the export's recipe; alpha 0 everywhere is the base. Site and positions are the
export's.

The front end refuses a request its export cannot run (`FRONT`, `check_front`, run by
`LatentMergeRequests.validate_params`); every front-end process builds its own vLLM config, so each knows
the export (`vllm serve --api-server-count N`: each API server), and one that does not refuses.
vLLM tells the model nothing about requests, so a logits processor (`LatentMergeRequests`, a
`vllm.logits_processors` plugin that does nothing for other models) keeps, for each row of vLLM's
persistent batch, the request's prompt length and recipe; the model turns that into per-token alphas.
"""

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.request_recipe import KEY, RequestRecipe, check_request, resolve_request
from latent_merge_nnsight.vllm_engine import ARCHITECTURE
from latent_merge_nnsight.vllm_engine.export import Export, read_export

__all__ = [
    "KEY",
    "TABLE",
    "RequestRecipe",
    "RequestTable",
    "cache_salt",
    "check_front",
    "check_request",
    "parse_request",
    "request_args",
]


def parse_request(value: Any, export: Export) -> RequestRecipe:
    """A request's `latent_merge` value checked against the export it runs on (the checks themselves are
    `request_recipe.resolve_request`'s, which `lmn serve` runs against its system)."""
    return resolve_request(value, export.recipe, export.layers, len(export.sources), holder="export")


def check_prompt_logprobs(export: Export, recipe: RequestRecipe | None) -> None:
    """Refuse prompt logprobs (echo) that would score the base: an export merged at positions other than
    "all" mixes, without `merge_from`, only at the prompt's last token, whose prediction is not part of
    the prompt's logprobs."""
    if export.recipe is None or (recipe is not None and recipe.merge_from is not None):
        return
    positions = export.recipe_obj().resolved_positions()
    if positions != "all":
        raise LatentMergeError(
            f"prompt_logprobs (echo): this export merges at positions {positions!r}, which depend on where "
            "the context ends; scored as one prompt it would merge only at the last token, whose "
            f"prediction is not scored, and report the base's numbers. Send {KEY}.merge_from (the index of "
            "the context's last token: generation merges there and after it), e.g. "
            f'vllm_xargs={{"{KEY}": "{{\\"merge_from\\": 11}}"}}, or export positions "all"'
        )


def request_args(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """`SamplingParams.extra_args` carrying `recipe` (e.g. `{"alpha": 0.3}`)."""
    return {KEY: dict(recipe)}


def cache_salt(recipe: RequestRecipe | None) -> str | None:
    """A prefix-cache salt for a request with its own recipe, so cached blocks never mix recipes (None: the
    export's recipe, which every unsalted request shares)."""
    if recipe is None:
        return None
    return "lmn-" + hashlib.sha256(recipe.key().encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# the persistent batch, as the model sees it


@dataclass
class Row:
    """One row of vLLM's persistent batch: its prompt length and its recipe (None: the export's; its
    ``merge_from``, when set, replaces the export's positions)."""

    prompt_len: int
    recipe: RequestRecipe | None


class RequestTable:
    """Batch row -> `Row`, kept in step with vLLM's persistent batch by `LatentMergeRequests`."""

    def __init__(self) -> None:
        self.rows: dict[int, Row] = {}
        self.export: Export | None = None
        self.active = False

    def update(self, batch_update: Any) -> None:
        """Apply one `BatchUpdate` (removed, then added, then moved, as vLLM orders them)."""
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, prompt_ids, _ in batch_update.added:
            raw = (getattr(params, "extra_args", None) or {}).get(KEY)
            recipe = None
            if raw is not None and self.export is not None:
                try:
                    recipe = parse_request(raw, self.export)
                except LatentMergeError as e:  # the front end refuses these; never stop the engine
                    _log().warning("request runs the export's recipe: %s", e)
            self.rows[index] = Row(len(prompt_ids) if prompt_ids is not None else -1, recipe)
        for a, b, direction in batch_update.moved:
            if direction.name == "SWAP":
                ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
                if ra is not None:
                    self.rows[b] = ra
                if rb is not None:
                    self.rows[a] = rb
            else:
                row = self.rows.pop(a, None)
                if row is not None:
                    self.rows[b] = row


def _log() -> Any:
    return logging.getLogger("latent_merge_nnsight.vllm")


TABLE = RequestTable()
"""This process's table (each vLLM worker process has one model and one persistent batch)."""
FRONT: dict[str, Export] = {}
"""The export whose vLLM config this process built last ("export"; set by the model's config hook), so
the front end checks a request against it (layers, alphas, op) and refuses a bad one with a 400 (HTTP)
or a ValueError (`LLM.generate`). vLLM builds the config in every front-end process (the `LLM`'s, the
API server of `vllm serve`, each of `--api-server-count N`'s), so each of them sets it."""


def note_export(vllm_config: Any) -> None:
    """Remember the export of the config being built (`mix_op.LatentMergeConfig`)."""
    hf = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
    block = getattr(hf, "latent_merge", None)
    if block is not None:
        FRONT["export"] = read_export(block)


def check_front(sampling_params: Any) -> None:
    """The front end's check of a request's `latent_merge` value against `FRONT`'s export: a `ValueError`
    (vLLM's 400) naming the problem. A process that knows no export (the model is not a latent-merge
    export, or vLLM gave this front end a config built elsewhere) refuses every such value: the worker
    would otherwise run the export's recipe instead, or no merge at all."""
    raw = (getattr(sampling_params, "extra_args", None) or {}).get(KEY)
    export = FRONT.get("export")
    scores_prompt = getattr(sampling_params, "prompt_logprobs", None) is not None
    try:
        if raw is None:
            if export is not None and scores_prompt:
                check_prompt_logprobs(export, None)
            return
        if export is None:
            raise LatentMergeError(
                f"{KEY}: this process knows no latent-merge export (the model is not one, or its config "
                "hook did not run here), so it cannot check or honour a per-request recipe"
            )
        recipe = parse_request(raw, export)
        if scores_prompt:
            check_prompt_logprobs(export, recipe)
    except LatentMergeError as e:
        raise ValueError(str(e)) from None


def _logits_processor_class() -> type:
    # vllm is imported here only: this module stays importable without vLLM (an optional dependency)
    from vllm.v1.sample.logits_processor import LogitsProcessor

    class LatentMergeRequests(LogitsProcessor):
        """Keeps `TABLE` in step with the persistent batch; leaves the logits alone."""

        @classmethod
        def validate_params(cls, sampling_params: Any) -> None:
            check_front(sampling_params)

        def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
            hf = vllm_config.model_config.hf_config
            TABLE.active = ARCHITECTURE in (getattr(hf, "architectures", None) or [])
            TABLE.rows.clear()
            TABLE.export = read_export(hf.latent_merge) if TABLE.active else None

        def is_argmax_invariant(self) -> bool:
            return True

        def update_state(self, batch_update: Any) -> None:
            if TABLE.active:
                TABLE.update(batch_update)

        def apply(self, logits: Any) -> Any:
            return logits

    return LatentMergeRequests


def __getattr__(name: str) -> Any:  # the class needs vLLM: built on first use (the plugin entry point)
    if name == "LatentMergeRequests":
        cls = _logits_processor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
