"""JudgeBench (Tan et al., arXiv:2410.12784; hub dataset ``ScalerLab/JudgeBench``): pairs of responses
with an objective label, and the official protocol that scores a pairwise judge on them.

- `data`: the pairs (`load_judgebench`, `JudgePair`) and JudgeBench's pinned files (`lmn data judgebench`);
- `official`: the two-game accuracy and JudgeBench's output files (`official_accuracy`);
- `templates`: the prompts a pairwise judge renders and the parsers of its replies (`load_template`);
- `vanilla`: JudgeBench's own judge prompt, fetched once at a pinned commit and checked by its hash.
"""
