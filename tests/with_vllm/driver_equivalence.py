"""Driver (run as a subprocess by test_equivalence.py): greedy tokens of engine="vllm" and engine="fast".

Usage: driver_equivalence.py OUT_DIR MODE. Writes OUT_DIR/result.json: for each case, the fast engine's
tokens, the base's, and vLLM's for two runs (the second hits the prefix cache). MODE "plain" uses vLLM's
default token budget, "chunked" a budget of 16 tokens, so every prompt's prefill is split into chunks.
One vLLM engine per layout is kept across the cases that fit it (layers among the exported ones).
"""

import json
import os
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

import custom_op  # noqa: E402, F401 - registers the op "half_lerp"

import latent_merge_nnsight as lmn  # noqa: E402
from latent_merge_nnsight.evaluation.tasks import CATEGORIES, chat_messages, make_eval_set  # noqa: E402
from latent_merge_nnsight.vllm_engine import run as vrun  # noqa: E402

NEW = 12


def prompts() -> list:
    """Toy questions of different lengths (one per category)."""
    return [chat_messages(make_eval_set(c, 1, seed=3)[0].prompt) for c in CATEGORIES]


def cases(deltas: str) -> list[tuple[str, list[str], dict]]:
    """(name, sources, recipe): the layouts first that later cases reuse (layers among the exported)."""
    r, b = "toy-reasoner", "toy-base"
    return [
        ("gradient_slerp_pre_last", [r], dict(op="slerp", layers="all", alpha=[0.0, 0.5, 1.0])),
        ("lerp_pre_last", [r], dict(op="lerp", layers={3: 0.8})),
        ("slerp_pre_last", [r], dict(op="slerp", layers={2: 0.7})),
        ("lerp_post_last", [r], dict(op="lerp", layers={4: 0.6}, site="post")),
        ("slerp_post_last", [r], dict(op="slerp", layers={1: 0.5}, site="post")),
        ("lerp_pre_all", [r], dict(op="lerp", layers={3: 0.4}, positions="all")),
        ("slerp_pre_all", [r], dict(op="slerp", layers={2: 0.3}, positions="all")),
        ("regmean_two_sources", [r, b], dict(op="regmean", layers={2: 0.9, 3: 0.9}, weights=[0.8, 0.2])),
        ("delta_pre", [], dict(op="delta", layers={2: 1.5, 4: 1.0}, deltas=deltas)),
        ("registered_op", [r], dict(op="half_lerp", layers={3: 1.0})),
    ]


def prefix_hits() -> float:
    """Prompt tokens the kept engine has found in its prefix cache so far."""
    metrics = vrun._KEPT["llm"].get_metrics()
    return sum(getattr(m, "value", 0) for m in metrics if m.name == "vllm:prefix_cache_hits")


def main() -> None:
    out_dir, mode = sys.argv[1], sys.argv[2]
    budget = {"max_num_batched_tokens": 32, "max_num_seqs": 8} if mode == "chunked" else {}
    vrun.configure(block_size=32, enable_prefix_caching=True, disable_log_stats=False, **budget)
    base = lmn.load("toy-base", dtype="float32")
    loaded = {"toy-base": base, "toy-reasoner": lmn.load("toy-reasoner", dtype="float32")}
    ps = prompts()
    deltas_path = os.path.join(out_dir, "deltas.safetensors")
    lmn.compute_deltas(base, loaded["toy-reasoner"], ps, layers=[2, 4]).save(deltas_path)
    kw = dict(max_new_tokens=NEW, ignore_eos=True)
    plain = lmn.generate(base, None, ps, None, engine="fast", **kw)
    prompt_tokens = plain.attention_mask[:, : plain.prompt_width].sum(dim=-1).tolist()
    out = {"base": plain.tokens, "prompt_tokens": prompt_tokens, "budget": budget, "cases": {}}
    for name, srcs, spec in cases(deltas_path):
        recipe = lmn.Recipe(**spec)
        sources = [loaded[s] for s in srcs]
        src = sources[0] if len(sources) == 1 else (sources or None)
        fast = lmn.generate(base, src, ps, recipe, engine="fast", **kw).tokens
        runs, hits = [], []
        for _ in range(2):
            runs.append(lmn.generate(base, src, ps, recipe, engine="vllm", **kw).tokens)
            hits.append(prefix_hits())
        out["cases"][name] = {"fast": fast, "vllm": runs, "second_run_prefix_hits": hits[1] - hits[0]}
        print(name, "equal" if all(r == fast for r in runs) else "DIFFERENT", file=sys.stderr, flush=True)
    vrun.shutdown()
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
