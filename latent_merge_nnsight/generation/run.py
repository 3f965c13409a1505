"""`lmn.generate`: lockstep merged generation, and the baselines, from one entry point.

    out = lmn.generate(base, ft, prompts, lmn.Recipe(op="slerp", layers={20: 0.5}), max_new_tokens=256)
    out.texts, out.finish_reasons, out.sequences

Every source model sees exactly the tokens the merged base produced, keeps its own KV cache, and stops
after the highest merged layer. Each step, in the paper's terms (site "pre", positions "last"):

    1. the source runs its blocks 0..L-1 on the step's tokens, giving h_src = its residual entering L;
    2. the base runs blocks 0..L-1, and its residual entering L becomes op(h_base, h_src, alpha) at
       the merged positions (the last real prompt token at prefill, every new token after that);
    3. the base runs its remaining blocks and head; the next token is chosen from its logits.

Two engines run the same plan and give the same greedy tokens:
- `engine="fast"` (the default through "auto"): a paired engine that calls the HF modules directly
  with static KV caches, drops finished rows, and on CUDA replays the decode step as a CUDA graph;
- `engine="nnsight"`: one nnsight `base.generate` trace with a `merge_into` per step (see `lmn.pair`
  to add your own interventions to such a trace); HF's decode loop keeps finished rows in the batch.

Baselines use the same call: `recipe=None` (base alone), the source as `base` (source alone),
`Ensemble(b=...)` (logit ensemble), `Recipe(op="delta", ...)` with `Deltas` (steering).

Memory: a source is needed only up to the highest merged layer, so load it with
`lmn.load(ft_id, up_to_layer=L)` (or `lmn.models.truncate(ft, L)`); its upper layers never exist.
"""

from collections.abc import Sequence

from latent_merge_nnsight._nnsight import is_traceable
from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.generation.fast import release_engine, run_fast
from latent_merge_nnsight.generation.loop import GenerationResult, StepHook, prepare_run
from latent_merge_nnsight.generation.nnsight import run_nnsight
from latent_merge_nnsight.generation.stack import fast_support
from latent_merge_nnsight.inputs import TokenIds
from latent_merge_nnsight.models import model_info
from latent_merge_nnsight.nouns import Model, Prompts, Tokenizer
from latent_merge_nnsight.ops import get_op
from latent_merge_nnsight.plan import Plan, RecipeLike, Sources, resolve_plan
from latent_merge_nnsight.recipe import Recipe

__all__ = ["ENGINES", "GenerationResult", "generate", "release_engine"]

ENGINES = ("auto", "fast", "nnsight", "vllm")

# ----------------------------------------------------------------------------------------------------


def _pick_engine(engine: str, base: Model, sources: list[Model], plan: Plan) -> str:
    if engine not in ENGINES:
        raise LatentMergeError(
            f"engine={engine!r}; expected one of: {', '.join(ENGINES)}", param="engine", value=engine
        )
    if engine == "vllm":  # vLLM reads the weights from disk: the models here may be CPU shells
        return engine
    info = model_info(base)
    if info.truncated:
        raise LatentMergeError(
            f"base {info.name} holds only {info.n_layers} of its {info.full_n_layers} layers "
            "(loaded up_to_layer); "
            "generate with the whole model"
        )
    models = [base, *(sources if plan.live_sources else [])]
    reasons = [r for r in (fast_support(m) for m in models) if r is not None]
    if engine == "fast" and reasons:
        raise LatentMergeError(
            f"engine='fast' cannot run this pair: {reasons[0]}; use engine='nnsight'",
            param="engine",
            value=engine,
        )
    if engine == "auto":
        engine = "fast" if not reasons else "nnsight"
    if engine == "nnsight":
        if not is_traceable(base):
            raise LatentMergeError(
                f"engine='nnsight' needs an nnsight model; base is a {type(base).__name__} "
                "(wrap it with lmn.wrap)",
                param="engine",
                value=engine,
            )
        live_reasons = [r for r in (fast_support(m) for m in models[1:]) if r is not None]
        if live_reasons:
            raise LatentMergeError(f"cannot step this source model in lockstep: {live_reasons[0]}")
    return engine


def _check_merge_happens(sources: Sources, recipe: RecipeLike) -> None:
    """A latent-merge recipe with no source would silently generate the base's own text: refuse it."""
    if isinstance(recipe, (list, tuple)):
        recipe = next((r for r in recipe if isinstance(r, Recipe)), None)
    if not isinstance(recipe, Recipe) or get_op(recipe.op).static_source:
        return
    if sources is None or (isinstance(sources, (list, tuple)) and not sources):
        raise LatentMergeError(
            f"recipe merges with op {recipe.op!r} at layers {recipe.layers}, but sources={sources!r}: "
            "nothing would be merged; pass the source model(s), or recipe=None for the base alone"
        )


def generate(
    base: Model,
    sources: Sources = None,
    prompts: Prompts | None = None,
    recipe: RecipeLike = None,
    *,
    max_new_tokens: int,
    input_ids: TokenIds | None = None,
    attention_mask: TokenIds | None = None,
    padding_side: str | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    ignore_eos: bool = False,
    num_beams: int = 1,
    engine: str = "auto",
    cuda_graphs: bool | None = None,
    keep_engine: bool = False,
    compile_step: bool = False,
    tokenizer: Tokenizer | None = None,
    chat: bool | None = None,
    sampler: str = "default",
    logprobs: int | None = None,
    on_step: StepHook | None = None,
) -> GenerationResult:
    """Generate from `base` with `sources` merged in lockstep according to `recipe`.

    Arguments:
        base: the model that generates (from `lmn.load` / `lmn.wrap`).
        sources: a source model, a list of them (RegMean), `Deltas` (op "delta"), or None (base alone).
            Sources loaded with `lmn.load(..., up_to_layer=L)` hold only the blocks a merge at L needs.
        prompts: a string, list of strings, chat(s) (the chat template is applied), or token ids. A plain
            string is sent as one user message through the tokenizer's chat template when the tokenizer
            has one (see `chat`).
        recipe: an `lmn.Recipe` (latent merge or delta steering), an `Ensemble` (logit ensemble), None,
            or a list with one recipe (or None: base alone) per prompt. Per-row recipes may differ in op,
            layers, alphas, site and positions and run in one pass; they share `sources`: all live-source
            ops, or all `delta` on one set of steering vectors. Row i's tokens equal a call with recipe[i]
            alone.
        max_new_tokens: new tokens per row at most (>= 1).
        input_ids, attention_mask: token ids (and mask; left or right padding) instead of prompts.
        padding_side: how to pad text prompts of different lengths ("left" or "right").
        do_sample, temperature, top_p, top_k, seed: sampling (greedy when do_sample=False); the same seed
            gives the same tokens on both engines.
        stop: strings that end a row when they appear in its new text.
        eos_token_id: tokens that end a row (default: the model's and tokenizer's EOS); ignore_eos=True
            generates exactly max_new_tokens.
        num_beams: must be 1 (beam search would need the sources' caches reordered with the base's).
        engine: "auto" (the fast engine when it supports the models, else nnsight), "fast", "nnsight", or
            "vllm" (vLLM runs the merge: `latent_merge_nnsight.vllm_engine.run`; needs the vllm extra).
        cuda_graphs: on CUDA, capture decode steps as CUDA graphs (default: yes): the fast engine's whole
            paired step; the nnsight engine's source steps (the base runs under nnsight's trace).
        keep_engine: fast engine on CUDA: keep its KV caches and captured graphs on the base after this
            call, so the next call with the same models and recipe layout (alphas and deltas may change)
            and a batch no larger skips the capture (a batch size not seen before costs one). The kept
            engine holds the sources and the caches in memory until a call with `keep_engine=False` (or
            with another layout) replaces it, or until `release_engine(base)` (from
            `latent_merge_nnsight.generation.run`).
        compile_step: fast engine: run the decode step through `torch.compile` (then, on CUDA, capture
            it as a graph). Fuses the many small kernels of a step, so a step runs closer to the time of
            reading the weights; costs a compilation (about a minute for a 7B pair) per batch size, so it
            pays off with `keep_engine=True` over many calls.
        tokenizer: overrides the base's tokenizer.
        chat: for string prompts: None (default) applies the chat template when the tokenizer has one,
            True always (an error without a template), False sends the raw text (e.g. a prompt already
            templated, or plain continuation).
        sampler: the top-p rule, "default" (keeps the token that crosses top_p) or "paper" (the paper's
            code: drops it); see `latent_merge_nnsight.sampling`.
        logprobs: engine="vllm" only: also report each new token's logprob and its `logprobs` most likely
            alternatives (vLLM's raw logprobs of the merged model) in `result.info["logprobs"]`, per row
            and token `(logprob, ((token_id, logprob), ...))`.
        on_step: a step hook, called as each step's tokens are chosen (`generation.loop.Run.on_step`:
            ``on_step(run, rows, tokens)`` may return rows to end now); engine="vllm" does not call it
            (vLLM generates the whole batch before its tokens come back).

    Everything is checked before any forward runs; a bad argument raises `LatentMergeError`.
    """
    _check_merge_happens(sources, recipe)
    if logprobs is not None and (type(logprobs) is not int or logprobs < 0 or engine != "vllm"):
        raise LatentMergeError(
            f"logprobs={logprobs!r} (engine={engine!r}); expected None, or an int >= 0 (alternatives per "
            "token) with engine='vllm' (other engines' tokens are scored by systems.logprobs)",
            param="logprobs",
            value=logprobs,
        )
    run = prepare_run(
        base,
        prompts,
        max_new_tokens=max_new_tokens,
        input_ids=input_ids,
        attention_mask=attention_mask,
        padding_side=padding_side,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=stop,
        eos_token_id=eos_token_id,
        ignore_eos=ignore_eos,
        num_beams=num_beams,
        tokenizer=tokenizer,
        chat=chat,
        sampler=sampler,
    )
    rows = run.batch.input_ids.shape[0]
    if isinstance(recipe, (list, tuple)) and len(recipe) != rows:
        raise LatentMergeError(
            f"recipe is a list of {len(recipe)} recipes for {rows} prompts; expected one recipe (or None) "
            "per prompt, or a single recipe for all"
        )
    plan, models = resolve_plan(base, sources, recipe, weights_on_disk=engine == "vllm")
    chosen = _pick_engine(engine, base, models, plan)
    run.recipe, run.plan, run.on_step = plan.recipe, plan, on_step
    if plan.live_sources and chosen != "vllm":  # (vLLM runs its export's source blocks)
        run.info["source_blocks_per_step"] = [plan.source_blocks(model_info(m).n_layers) for m in models]
    options = dict(cuda_graphs=cuda_graphs, keep_engine=keep_engine, compile_step=compile_step)
    if chosen == "fast":
        return run_fast(base, models, plan, run, options)
    if chosen == "vllm":  # vLLM runs the whole call (its own batching, KV caches and kernels)
        # imported here: vllm_engine.run needs vLLM, an optional dependency
        from latent_merge_nnsight.vllm_engine.run import run_vllm

        return run_vllm(base, models, plan, run, {"logprobs": logprobs})
    return run_nnsight(base, models, plan, run, options)
