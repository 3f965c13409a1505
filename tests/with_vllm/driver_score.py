"""Driver (run as a subprocess by test_score_vllm.py): `lmn.score` and lm-eval's `latent-merge` model on
engine="vllm" and engine="fast", on the toy pair.

Usage: driver_score.py OUT_DIR TASKS_DIR. Writes OUT_DIR/result.json: per recipe, both engines'
per-token logprobs and greedy flags of multiple-choice rows (contexts shared by their choices); lm-eval's
per-choice loglikelihoods (task `vllm_score_mc`) and generations (task `vllm_score_gen`) of the
toy-latent-slerp system with engine=vllm and engine=fast.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import latent_merge_nnsight as lmn  # noqa: E402
import latent_merge_nnsight.evaluation.lm_eval_model  # noqa: E402, F401  (registers latent-merge)
from latent_merge_nnsight.vllm_engine import run as vrun  # noqa: E402

SYSTEM = Path(__file__).resolve().parents[2] / "examples" / "systems" / "toy-latent-slerp.yaml"
QUESTIONS = ["Q: Compute 2+3.\nA:", "Q: What is the capital of France?\nA:"]
CHOICES = [[" 5", " 6", " 23 or so"], [" Paris", " Lyon, I think"]]
RECIPES = {
    "slerp-last": lmn.Recipe(op="slerp", layers={3: 0.5}),
    "slerp-last-alpha1": lmn.Recipe(op="slerp", layers={3: 1.0}),
    "base": None,
}


def main() -> None:
    out_dir, tasks = Path(sys.argv[1]), sys.argv[2]
    vrun.configure(block_size=32)
    base = lmn.load("toy-base", dtype="float32")
    ft = lmn.load("toy-reasoner", dtype="float32")
    evals = {}
    for engine in ("vllm", "fast"):
        out = lm_eval.simple_evaluate(
            model="latent-merge",
            model_args=f"system={SYSTEM},engine={engine}",
            tasks=["vllm_score_mc", "vllm_score_gen"],
            task_manager=TaskManager(include_path=tasks),
            log_samples=True,
            batch_size=4,
        )
        samples = out["samples"]
        mc = sorted(samples["vllm_score_mc"], key=lambda s: s["doc_id"])
        gen = sorted(samples["vllm_score_gen"], key=lambda s: s["doc_id"])
        evals[engine] = {
            "mc": [[float(r[0][0]) for r in s["resps"]] for s in mc],
            "gen": [s["resps"][0][0] for s in gen],
        }
    ctx = [q for q, options in zip(QUESTIONS, CHOICES, strict=True) for _ in options]
    cont = [c for options in CHOICES for c in options]
    scores = {}
    for name, recipe in RECIPES.items():
        src = None if recipe is None else ft
        got = {e: lmn.score(base, src, ctx, cont, recipe, engine=e) for e in ("fast", "vllm")}
        scores[name] = {e: {"logprobs": g.logprobs, "greedy": g.greedy} for e, g in got.items()}
    (out_dir / "result.json").write_text(json.dumps({"scores": scores, "lm_eval": evals}))
    vrun.shutdown()


if __name__ == "__main__":
    main()
