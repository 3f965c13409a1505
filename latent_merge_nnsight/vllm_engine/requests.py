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
vLLM tells the model nothing about requests, so `TABLE` keeps each request's prompt length and recipe:
- under the V1 model runner, keyed by its row of the persistent batch, kept in step by the logits
  processor `LatentMergeRequests` (its `update_state`); the token batch is in row order;
- under Model Runner V2 (vLLM's default on GPUs), keyed by its persistent request slot, kept by the
  model's V2 state (`runner_v2.LatentMergeModelState`: `add_request`, `remove_request`), which also hands
  over each step's batch position -> slot map (`idx_mapping`) before the forward.
The model turns that into per-token alphas. `LatentMergeRequests` implements both runners' logits-processor
interfaces and leaves the logits alone; it is no global plugin: the config hook lists it in our model's
own `logits_processors` (`attach_processor`), so vLLM never loads it for another model.
"""

import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.request_recipe import KEY, RequestRecipe, check_request, resolve_request
from latent_merge_nnsight.vllm_engine import ARCHITECTURE
from latent_merge_nnsight.vllm_engine.export import Export, read_export

if TYPE_CHECKING:  # vLLM is optional: its types for a type checker only
    from torch import Tensor
    from vllm import SamplingParams
    from vllm.config import VllmConfig
    from vllm.v1.sample.logits_processor import BatchUpdate

__all__ = [
    "KEY",
    "TABLE",
    "RequestRecipe",
    "RequestTable",
    "attach_processor",
    "cache_salt",
    "check_front",
    "check_request",
    "parse_request",
    "request_args",
]


def parse_request(value: object, export: Export) -> RequestRecipe:
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
    """Request -> `Row`: by persistent-batch row (V1 runner, `update`) or by request slot with this step's
    batch position -> slot map (Model Runner V2: `add_slot`, `remove_request`, `set_order`)."""

    def __init__(self) -> None:
        self.rows: dict[int, Row] = {}
        self.export: Export | None = None
        self.active = False
        self.slot_of: dict[str, int] = {}  # V2: request id -> slot
        self.order: list[int] | None = None  # V2: this step's batch position -> slot (None: no real batch)
        self.v2 = False

    def reset(self, export: Export | None, *, v2: bool) -> None:
        """Start empty for an engine running `export` (None: not a latent-merge model)."""
        self.rows.clear()
        self.slot_of.clear()
        self.export, self.active, self.v2, self.order = export, export is not None, v2, None

    def recipe(self, params: "SamplingParams") -> RequestRecipe | None:
        """The request's own recipe from its sampling parameters (None: the export's)."""
        raw = (getattr(params, "extra_args", None) or {}).get(KEY)
        if raw is None or self.export is None:
            return None
        try:
            return parse_request(raw, self.export)
        except LatentMergeError as e:  # the front end refuses these; never stop the engine
            _log().warning("request runs the export's recipe: %s", e)
            return None

    def row(self, position: int) -> Row | None:
        """The row of the request at `position` of this step's batch (None: a padding request)."""
        if not self.v2:
            return self.rows.get(position)
        if self.order is None or position >= len(self.order):
            return None
        return self.rows.get(int(self.order[position]))

    # V2: slots, and the step's batch order

    def add_slot(self, slot: int, req_id: str, prompt_len: int, params: "SamplingParams") -> None:
        """A request (new, or re-filled after preemption with its partial output) takes `slot`; whatever
        the slot held before is replaced."""
        self.slot_of[req_id] = slot
        self.rows[slot] = Row(prompt_len, self.recipe(params))

    def remove_request(self, req_id: str) -> None:
        """A request finished or was preempted: its slot is free."""
        slot = self.slot_of.pop(req_id, None)
        if slot is not None:
            self.rows.pop(slot, None)

    def set_order(self, idx_mapping: Iterable[int] | None, req_ids: Sequence[str] = ()) -> None:
        """This step's batch position -> slot (V2's `InputBatch.idx_mapping_np`, `req_ids` its requests).
        None, or a batch of requests never added (V2's dummy batches), mixes nothing."""
        real = idx_mapping is not None and all(r in self.slot_of for r in req_ids)
        self.order = [int(i) for i in idx_mapping] if real else None

    # V1: the persistent batch's rows

    def update(self, batch_update: "BatchUpdate | None") -> None:
        """Apply one `BatchUpdate` (removed, then added, then moved, as vLLM orders them)."""
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, prompt_ids, _ in batch_update.added:
            prompt_len = len(prompt_ids) if prompt_ids is not None else -1
            self.rows[index] = Row(prompt_len, self.recipe(params))
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


def note_export(vllm_config: "VllmConfig") -> None:
    """Remember the export of the config being built (`mix_op.LatentMergeConfig`)."""
    hf = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
    block = getattr(hf, "latent_merge", None)
    if block is not None:
        FRONT["export"] = read_export(block)


def check_front(sampling_params: "SamplingParams") -> None:
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


PROCESSOR = f"{__name__}:LatentMergeRequests"
"""The logits processor as vLLM's `logits_processors` lists it (a class path, loaded in each process)."""


def attach_processor(vllm_config: "VllmConfig") -> None:
    """List `LatentMergeRequests` in this model's `logits_processors` (the config hook runs this for our
    architecture only), so each front end checks requests with it and each worker builds it, under
    either model runner; other models never load it."""
    model_config = vllm_config.model_config
    listed = list(model_config.logits_processors or [])
    if PROCESSOR not in listed:
        model_config.logits_processors = [*listed, PROCESSOR]


def _interfaces() -> tuple[type, ...]:
    """vLLM's logits-processor base classes: the V1 runner's, and Model Runner V2's where vLLM has it."""
    # vllm is imported here only: this module stays importable without vLLM (an optional dependency)
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1

    try:
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2
    except ImportError:  # a vLLM without Model Runner V2's custom logits processors
        return (V1,)
    return (V1, V2)


def _logits_processor_class() -> type:
    class LatentMergeRequests(*_interfaces()):  # type: ignore[misc]
        """Checks requests at the front end (`validate_params`: a bad recipe is a 400) and, under the V1
        runner, keeps `TABLE` in step with the persistent batch. Never changes the logits.

        One class for both runners' interfaces: V1 builds it as `(vllm_config, device, is_pin_memory)`
        and calls `update_state` / `apply(logits)`; V2 builds it as `(vllm_config, req_states)` and calls
        `add_request` / `apply_staged_writes` / `apply(logits, ctx)` (V2's slots are kept by the model's
        V2 state, which also sees each step's batch order before the forward)."""

        @classmethod
        def validate_params(cls, sampling_params: "SamplingParams") -> None:
            check_front(sampling_params)

        def __init__(self, vllm_config: "VllmConfig", *runner_args: object) -> None:
            self.v1 = len(runner_args) == 2  # (device, is_pin_memory); V2 passes (req_states,)
            if self.v1:
                hf = vllm_config.model_config.hf_config
                ours = ARCHITECTURE in (getattr(hf, "architectures", None) or [])
                TABLE.reset(read_export(hf.latent_merge) if ours else None, v2=False)

        # the V1 runner
        def is_argmax_invariant(self) -> bool:
            return True

        def update_state(self, batch_update: "BatchUpdate | None") -> None:
            if TABLE.active and not TABLE.v2:
                TABLE.update(batch_update)

        # Model Runner V2
        def add_request(self, req_idx: int, sampling_params: "SamplingParams") -> bool:
            return False  # never changes this request's logits

        def apply_staged_writes(self) -> None:
            return None

        # both
        def apply(self, logits: "Tensor", ctx: object = None) -> "Tensor":
            return logits

    LatentMergeRequests.__qualname__ = "LatentMergeRequests"
    return LatentMergeRequests


def __getattr__(name: str) -> Any:  # the class needs vLLM: built on first use (by vLLM's loader)
    if name == "LatentMergeRequests":
        cls = _logits_processor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
