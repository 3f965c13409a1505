"""`lmn.pair(base, ft)`: a base model traced with nnsight and source models stepped in lockstep with it.

    pair = lmn.pair(base, ft)
    with pair.generate(prompts, max_new_tokens=64) as tracer:
        states = list().save()
        for step in tracer.iter[:]:
            lmn.merge_into(layer=20, source=pair.ft, op="slerp", alpha=0.5)
            states.append(base.model.layers[24].output[:, -1].clone())  # your own reads and edits
    print(tracer.generation.texts)

The loop over `tracer.iter[:]` ends when generation ends, and nnsight then skips whatever follows it in
the block (with a warning); read results after the block (`tracer.generation`, saved values).

`pair.ft` is a `LiveSource`: inside the trace, `pair.ft.resid(layer, site)` waits until the base reaches
that site in the current forward, runs the source model on exactly the tokens the base is processing
now (plain torch, block by block, with its own KV cache), and returns its residual there. The source
stops after the highest block anyone asked for, so its upper layers are never computed (and need not
be loaded: `lmn.load(ft_id, up_to_layer=20)`). On CUDA each decode step of a source (its embedding and
all the blocks it runs) replays one captured CUDA graph, so the source costs no per-block Python work.

The trace is the nnsight engine's (`generation.nnsight`): token choice and stopping come from the
package's own sampler (`lmn.sampling`), so a seed gives the same tokens here as with
`lmn.generate(..., engine="fast")`. Beam search is not offered: it reorders the
base's cache between steps, and nothing reorders the source's in step with it.
"""

from latent_merge_nnsight._nnsight import is_traceable
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.generation.live import LiveSource
from latent_merge_nnsight.generation.loop import prepare_run
from latent_merge_nnsight.generation.nnsight import PairTracer, open_trace
from latent_merge_nnsight.models import check_compatible, model_info
from latent_merge_nnsight.nouns import Model, Prompts
from latent_merge_nnsight.plan import Sources

__all__ = ["LiveSource", "Pair", "PairTracer", "pair"]


class Pair:
    """A base model and its source models, for traces where the sources follow the base step by step.

    Attributes:
        base: the base model (nnsight).
        sources: one `LiveSource` per source model.
        ft: the first (usually only) live source; `sources` for RegMean.
    """

    def __init__(
        self,
        base: Model,
        sources: Sources,
        *,
        up_to_layer: int | None = None,
        cuda_graphs: bool | None = None,
    ):
        if not is_traceable(base):
            raise LatentMergeError(
                f"base has type {type(base).__name__}; lmn.pair needs an nnsight model from lmn.load "
                "or lmn.wrap"
            )
        models = list(sources) if isinstance(sources, (list, tuple)) else [sources]
        if not models:
            raise LatentMergeError("sources=[] is empty; give at least one source model")
        for m in models:
            check_compatible(base, m)
        self.base = base
        self.sources = [LiveSource(base, m, up_to_layer=up_to_layer, cuda_graphs=cuda_graphs) for m in models]

    @property
    def ft(self) -> LiveSource:
        return self.sources[0]

    def reset(self) -> None:
        for s in self.sources:
            s.reset()

    def __repr__(self) -> str:
        return f"Pair(base={model_info(self.base).name}, sources={self.sources})"

    def generate(
        self, prompts: Prompts | None = None, *, max_new_tokens: int, **options: object
    ) -> PairTracer:
        """Open a generation trace of the base with the sources in lockstep (use in a `with` block).

        Takes the prompt and sampling/stopping arguments of `lmn.generate` (`input_ids`, `attention_mask`,
        `padding_side`, `do_sample`, `temperature`, `top_p`, `top_k`, `seed`, `stop`, `eos_token_id`,
        `ignore_eos`). Loop `for step in tracer.iter[:]` in the block to act at every step; the result is
        `tracer.generation` after the block.
        """
        run = prepare_run(self.base, prompts, max_new_tokens=max_new_tokens, **options)
        return open_trace(self.base, self.sources, run)


def pair(
    base: Model, sources: Sources, *, up_to_layer: int | None = None, cuda_graphs: bool | None = None
) -> Pair:
    """Pair a base model with one source model (or a list, for RegMean) for lockstep generation traces.

    Inside `with pair.generate(...)`, `pair.ft` (or `pair.sources`) is the sources' live state, to pass
    as `source=` to `lmn.merge_into`. Sources loaded with `lmn.load(..., up_to_layer=L)` save memory.
    On CUDA each source's decode step runs as a captured CUDA graph unless `cuda_graphs=False`.
    """
    return Pair(base, sources, up_to_layer=up_to_layer, cuda_graphs=cuda_graphs)
