"""Baselines to compare latent merging against, run from the same `lmn.generate` entry point.

- base alone: `lmn.generate(base, None, prompts, max_new_tokens=...)` (or `recipe=None`);
- source alone: `lmn.generate(ft, None, prompts, ...)`;
- logit ensemble (the paper's `ensemble_generate`): `lmn.generate(base, ft, prompts, Ensemble(b=0.5))`
  with `Ensemble` from `latent_merge_nnsight.ensemble`;
- delta steering: `lmn.generate(base, deltas, prompts, lmn.Recipe(op="delta", layers={L: 1.0}))`;
- weight-merged models: merge the weights, then generate with the merged model as the base.
"""
