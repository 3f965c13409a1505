"""Lockstep merged generation: `generate()` and its engines.

- `run.py`: `generate()`, the entry point: checks, resolves the `Plan` (`latent_merge_nnsight.plan`)
  and picks an engine;
- `loop.py`: the loop skeleton every engine shares: `prepare_run` (checks, encoding), `Run.choose_next`
  (ensemble mix + sample + track), `GenerationResult`;
- `fast.py`: the fast engine: `PairedEngine` (base and sources stepped block by block with static KV
  caches, merging with `Plan.apply` at each merged layer) and its decode loop `run_fast`;
- `nnsight.py`: the nnsight engine: one `base.generate` trace, merging with `merge.apply_plan`;
- `stepper.py`: `Stepper`, one model stepped block by block with its own KV cache (run to a depth,
  a fixed-shape decode step, dropping rows): the runner of every model in both engines;
- `live.py`: `LiveSource`, a source on a `Stepper` following a traced base (nnsight engine, `lmn.pair`);
- `stack.py`: a causal LM as embed / block i / head with a package-owned `KVCache`, built from the
  architecture registry of `latent_merge_nnsight.sites`;
- `prefix.py`: `share_prompt_states`, opt-in reuse of the unmerged prompt blocks between fast-engine
  calls on the same prompts (a grid of merges, e.g. the demo);
- `graphs.py`: fixed-shape steps captured as CUDA graphs (eager stand-ins off CUDA);
- `score.py`: `lmn.score`, teacher-forced log-probabilities of continuations, merged where generation
  would have merged, run on the fast engine's paired stepper (`PairedEngine.score_states`; rows sharing
  a context run it once and go on from its caches, `PairedEngine.branch`);
- `score_vllm.py`: `lmn.score(..., engine="vllm")`, vLLM's prompt logprobs with `merge_from`.
"""

from latent_merge_nnsight.generation.fast import release_engine as release_engine
from latent_merge_nnsight.generation.loop import GenerationResult as GenerationResult
from latent_merge_nnsight.generation.run import ENGINES as ENGINES
from latent_merge_nnsight.generation.run import generate as generate

__all__ = ["ENGINES", "GenerationResult", "generate", "release_engine"]
