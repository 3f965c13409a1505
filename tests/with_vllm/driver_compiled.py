"""Driver (run by test_compiled.py): the merged model compiled by vLLM (no enforce_eager).

Usage: driver_compiled.py OUT_DIR. vLLM on CPU compiles the forward once (dynamo, guards dropped; the
"eager" dynamo backend under VLLM_CPU_CI_ENV=1) and replays it for every batch, so anything of the batch
baked into the graph would give later requests wrong tokens. Three layouts (pre/last, post/all, a delta
export without sources), one vLLM engine each, kept across their cases. Writes OUT_DIR/result.json:
- "cases": per recipe, the fast engine's tokens and vLLM's;
- "batch" / "separate" / "batch_fast": 8 per-request alphas in one call, one call each, engine="fast";
- "mix_calls": during the per-request calls, the op's calls and its per-token tensor builds;
- "compiles": per layout, dynamo's and vLLM's compile counters after the first call and at the end.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model runs here: its counters too
os.environ.setdefault("VLLM_CPU_CI_ENV", "1")  # dynamo's "eager" backend (inductor is slow on 2 cores)

import torch  # noqa: E402

import latent_merge_nnsight as lmn  # noqa: E402
from latent_merge_nnsight.evaluation.tasks import CATEGORIES, chat_messages, make_eval_set  # noqa: E402
from latent_merge_nnsight.vllm_engine import run as vrun  # noqa: E402

NEW = 10
ALPHAS = [0.0, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0]
LAYOUTS = {  # the first recipe of each is exported; the others run on its engine
    "pre_last": [("lerp_pre_last", dict(op="lerp", layers={2: 0.7, 3: 0.7})),
                 ("slerp_pre_last", dict(op="slerp", layers={2: 0.9, 3: 0.9}))],
    "post_all": [("lerp_post_all", dict(op="lerp", layers={1: 0.6, 3: 0.6}, site="post",
                                        positions="all"))],
    "delta": [("delta_pre_last", dict(op="delta", layers={2: 1.5, 4: 1.0}))],  # no source: an empty list
}  # fmt: skip


def counts() -> dict[str, int]:
    """Compiles so far: dynamo's graphs, graph breaks, vLLM's backend compilations."""
    from torch._dynamo.utils import counters
    from vllm.compilation.counter import compilation_counter

    return {
        "dynamo_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "vllm_models_seen": compilation_counter.num_models_seen,
        "vllm_eager_compiles": compilation_counter.num_eager_compiles,
        "vllm_inductor_compiles": compilation_counter.num_inductor_compiles,
    }


def count_mixes() -> dict[str, int]:
    """Wrap the running model's mix: "sites" counts the op's calls, "builds" its per-token tensors."""
    from latent_merge_nnsight.vllm_engine.mix_op import MODELS

    (model,) = list(MODELS.values())
    calls = {"sites": 0, "builds": 0, "merged_layers": len(model.plan.alphas)}
    mix_now, build = model.mix_now, model._mix

    def counted_now(*args):
        calls["sites"] += 1
        return mix_now(*args)

    def counted_build(*args):
        calls["builds"] += 1
        return build(*args)

    model.mix_now, model._mix = counted_now, counted_build
    return calls


def per_request(base, ft, qs) -> dict:
    """8 prompts with 8 alphas (layers 2 and 3) on the kept pre/last engine: one batch, then one by one."""
    from vllm import SamplingParams

    plain = lmn.generate(base, None, qs, None, engine="fast", max_new_tokens=1)
    width = plain.prompt_width
    ids = [r[m.bool()].tolist() for r, m in zip(plain.sequences[:, :width], plain.attention_mask[:, :width],
                                               strict=True)]  # fmt: skip
    prompts = [{"prompt_token_ids": p} for p in ids]

    def params(a):
        return SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True,
                              extra_args={"latent_merge": {"alpha": a}})  # fmt: skip

    llm = vrun._KEPT["llm"]
    toks = lambda outs: [list(o.outputs[0].token_ids) for o in outs]  # noqa: E731
    fast = [
        lmn.generate(base, ft, [q], lmn.Recipe(op="lerp", layers={2: a, 3: a}), engine="fast",
                     max_new_tokens=NEW, ignore_eos=True).tokens[0]
        for q, a in zip(qs, ALPHAS, strict=True)
    ]  # fmt: skip
    return {
        "batch": toks(llm.generate(prompts, [params(a) for a in ALPHAS], use_tqdm=False)),
        "separate": [
            toks(llm.generate([p], params(a), use_tqdm=False))[0]
            for p, a in zip(prompts, ALPHAS, strict=True)
        ],  # fmt: skip
        "batch_fast": fast,
        "prompt_tokens": [len(p) for p in ids],
    }


def main() -> None:
    out_dir = sys.argv[1]
    vrun.configure(enforce_eager=False, block_size=32, enable_prefix_caching=True)
    base = lmn.load("toy-base", dtype="float32")
    ft = lmn.load("toy-reasoner", dtype="float32")
    ps = [chat_messages(make_eval_set(c, 1, seed=3)[0].prompt) for c in CATEGORIES]
    qs = [chat_messages(make_eval_set(c, 2, seed=5)[i].prompt) for c in CATEGORIES for i in range(2)][:8]
    kw = dict(max_new_tokens=NEW, ignore_eos=True)
    out: dict = {"base": lmn.generate(base, None, ps, None, engine="fast", **kw).tokens, "cases": {},
                 "compiles": {}, "torch": torch.__version__}  # fmt: skip
    for layout, cases in LAYOUTS.items():
        first = None
        for name, spec in cases:
            src = ft
            if spec["op"] == "delta":
                src, spec = None, spec | {"deltas": os.path.join(out_dir, "deltas.safetensors")}
                lmn.compute_deltas(base, ft, ps, layers=[2, 4]).save(spec["deltas"])
            recipe = lmn.Recipe(**spec)
            fast = lmn.generate(base, src, ps, recipe, engine="fast", **kw).tokens
            runs = [lmn.generate(base, src, ps, recipe, engine="vllm", **kw).tokens for _ in range(2)]
            first = first or counts()
            out["cases"][name] = {"fast": fast, "vllm": runs}
            print(name, "equal" if all(r == fast for r in runs) else "DIFFERENT", file=sys.stderr, flush=True)
        if layout == "pre_last":
            out["mix_calls"] = count_mixes()
            out.update(per_request(base, ft, qs))
        out["compiles"][layout] = {"first": first, "end": counts()}
    vrun.shutdown()
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
