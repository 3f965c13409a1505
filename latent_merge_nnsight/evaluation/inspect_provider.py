"""`latent-merge/<system.yaml>`: a system as an Inspect AI model, generating through `lmn.generate`.

    inspect eval task.py --model latent-merge/examples/systems/toy-latent-slerp.yaml [-M engine=fast]

Inspect finds the provider through the package's `inspect_ai` entry point (this module; importing it
registers the provider). The model name after `latent-merge/` is a system YAML path; `-M` model args
are `engine=`, `dtype=`, `device=` (as `lmn eval`'s) and `max_batch_size=` (concurrent samples batched
into one `generate` call). Messages go through the tokenizer's chat template; Inspect's `max_tokens`,
`temperature`, `top_p`, `top_k`, `seed` and `stop_seqs` set the sampling (greedy unless temperature
> 0). Tool calls are not supported (the toy and paper models do not make them).
"""

import asyncio

from inspect_ai.model import (
    ChatMessage,
    GenerateConfig,
    ModelAPI,
    ModelOutput,
    ModelUsage,
    modelapi,
)
from inspect_ai.tool import ToolChoice, ToolInfo

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.system_args import system_from_args
from latent_merge_nnsight.systems import Batcher, LoadedSystem
from latent_merge_nnsight.systems.loaded import load_system

__all__ = ["LatentMergeAPI"]

STOP_REASONS = {"eos": "stop", "stop": "stop", "length": "max_tokens"}
"""Our finish reasons in Inspect's words."""


class LatentMergeAPI(ModelAPI):
    """Inspect's model API over a loaded system (`model_name`: the system YAML's path)."""

    def __init__(
        self,
        model_name: str,
        base_url: str | None = None,
        api_key: str | None = None,
        config: GenerateConfig | None = None,
        **model_args: str | int | float | bool,
    ) -> None:
        config = config if config is not None else GenerateConfig()
        super().__init__(model_name=model_name, base_url=base_url, api_key=api_key, config=config)
        batch = int(model_args.pop("max_batch_size", 8))
        known = {"engine", "dtype", "device"}
        unknown = sorted(set(model_args) - known)
        if unknown:
            raise LatentMergeError(
                f"latent-merge model args {unknown} are unknown; expected some of "
                f"{sorted(known | {'max_batch_size'})}"
            )
        config_ = system_from_args(model_name, **{k: model_args[k] for k in known if k in model_args})
        self.system: LoadedSystem = load_system(config_)
        self.max_batch_size = batch
        self._batcher: Batcher | None = None

    def max_connections(self) -> int:
        """Concurrent samples Inspect sends: enough to fill a batch."""
        return self.max_batch_size

    async def generate(
        self,
        input: list[ChatMessage],
        tools: list[ToolInfo],
        tool_choice: ToolChoice,
        config: GenerateConfig,
    ) -> ModelOutput:
        if tools:
            raise LatentMergeError("latent-merge models do not call tools; run the task without tools")
        chat = [{"role": m.role, "content": m.text} for m in input]
        loop = asyncio.get_running_loop()
        if self._batcher is None or self._batcher.loop is not loop:
            self._batcher = Batcher(self.system, max_batch_size=self.max_batch_size, max_wait_ms=5.0)
            self._batcher.start()
        done = await self._batcher.submit(chat, _sampling(config))
        output = ModelOutput.from_content(
            model=self.model_name, content=done.text, stop_reason=STOP_REASONS[done.finish_reason]
        )
        output.usage = ModelUsage(
            input_tokens=done.prompt_tokens,
            output_tokens=done.completion_tokens,
            total_tokens=done.prompt_tokens + done.completion_tokens,
        )
        return output


def _sampling(config: GenerateConfig) -> dict[str, object]:
    """Inspect's generation settings as `LoadedSystem.complete` overrides (unset: the system's own)."""
    out: dict[str, object] = {}
    if config.max_tokens is not None:
        out["max_new_tokens"] = config.max_tokens
    if config.temperature is not None:
        out["temperature"] = config.temperature
        out["do_sample"] = config.temperature > 0
    for ours, theirs in (("top_p", config.top_p), ("top_k", config.top_k), ("seed", config.seed)):
        if theirs is not None:
            out[ours] = theirs
    if config.stop_seqs:
        out["stop"] = list(config.stop_seqs)
    return out


@modelapi(name="latent-merge")
def latent_merge() -> type[ModelAPI]:
    """The provider Inspect registers for `latent-merge/<system.yaml>`."""
    return LatentMergeAPI
