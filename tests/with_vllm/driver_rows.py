"""Driver (run as a subprocess by test_rows.py): per-row recipes on engine="vllm" and engine="fast".

Usage: driver_rows.py OUT_DIR. Writes OUT_DIR/result.json: the per-row call's tokens on both engines, and
each row's tokens from a call with that row's recipe alone (fast engine), plus the base's tokens; the
same for per-row `delta` (steering) recipes ("steer_*").
"""

import json
import os
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

import latent_merge_nnsight as lmn  # noqa: E402
from latent_merge_nnsight.evaluation.tasks import CATEGORIES, chat_messages, make_eval_set  # noqa: E402
from latent_merge_nnsight.vllm_engine import run as vrun  # noqa: E402

NEW = 10

RECIPES = [
    lmn.Recipe(op="slerp", layers={3: 1.0, 4: 1.0}),
    lmn.Recipe(op="lerp", layers={4: 1.0}),
    None,
    lmn.Recipe(op="lerp", layers={2: 0.0}),
    lmn.Recipe(op="slerp", layers={2: 0.5, 3: 0.9}),
]
STEER = [  # `delta` rows: one set of steering vectors, per-row layers and alphas
    lmn.Recipe(op="delta", layers={3: 2.0, 4: 1.0}),
    lmn.Recipe(op="delta", layers={4: -2.0}),
    None,
    lmn.Recipe(op="delta", layers={2: 0.0}),
    lmn.Recipe(op="delta", layers={2: 1.5, 3: 1.5}),
]


def main() -> None:
    out_dir = sys.argv[1]
    vrun.configure(block_size=32)
    base = lmn.load("toy-base", dtype="float32")
    ft = lmn.load("toy-reasoner", dtype="float32")
    prompts = [chat_messages(make_eval_set(c, 1, seed=3)[0].prompt) for c in CATEGORIES]
    prompts = (prompts * 2)[: len(RECIPES)]
    kw = dict(max_new_tokens=NEW, ignore_eos=True)
    alone = [
        lmn.generate(base, ft if r is not None else None, prompts, r, engine="fast", **kw).tokens[i]
        for i, r in enumerate(RECIPES)
    ]
    out = {
        "alone": alone,
        "base": lmn.generate(base, None, prompts, None, engine="fast", **kw).tokens,
        "fast": lmn.generate(base, ft, prompts, RECIPES, engine="fast", **kw).tokens,
        "vllm": lmn.generate(base, ft, prompts, RECIPES, engine="vllm", **kw).tokens,
    }
    deltas = lmn.compute_deltas(base, ft, prompts, layers=[2, 3, 4])
    out["steer_alone"] = [
        lmn.generate(base, deltas, prompts, r, engine="fast", **kw).tokens[i] for i, r in enumerate(STEER)
    ]
    out["steer_fast"] = lmn.generate(base, deltas, prompts, STEER, engine="fast", **kw).tokens
    out["steer_vllm"] = lmn.generate(base, deltas, prompts, STEER, engine="vllm", **kw).tokens
    try:
        lmn.generate(
            base,
            ft,
            prompts[:2],
            [RECIPES[0], RECIPES[0].model_copy(update={"site": "post"})],
            engine="vllm",
            **kw,
        )
        out["mixed_sites"] = "ran"
    except lmn.LatentMergeError as e:
        out["mixed_sites"] = str(e)
    vrun.shutdown()
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
