"""Driver (run by test_tensor_parallel.py): the merge on vLLM with tensor parallel 2 against engine="fast".

Usage: driver_tensor_parallel.py OUT_DIR. Two CPU workers (one core each: VLLM_CPU_OMP_THREADS_BIND) split
every layer's heads and MLP of the base and the source, each running the compiled model (no enforce_eager;
dynamo's "eager" backend, VLLM_CPU_CI_ENV=1) with the mix op in its own process; writes
OUT_DIR/result.json with both engines' greedy tokens and the base's.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
os.environ.setdefault("VLLM_CPU_CI_ENV", "1")

import latent_merge_nnsight as lmn  # noqa: E402
from latent_merge_nnsight.evaluation.tasks import CATEGORIES, chat_messages, make_eval_set  # noqa: E402
from latent_merge_nnsight.vllm_engine import run as vrun  # noqa: E402


def main() -> None:
    out_dir = sys.argv[1]
    base = lmn.load("toy-base", dtype="float32")
    ft = lmn.load("toy-reasoner", dtype="float32")
    ps = [chat_messages(make_eval_set(c, 1, seed=3)[0].prompt) for c in CATEGORIES]
    recipe = lmn.Recipe(op="slerp", layers={2: 0.8, 3: 0.8})
    kw = dict(max_new_tokens=12, ignore_eos=True)
    result = {
        "fast": lmn.generate(base, ft, ps, recipe, engine="fast", **kw).tokens,
        "base": lmn.generate(base, None, ps, None, engine="fast", **kw).tokens,
    }
    vrun.configure(tensor_parallel_size=2, distributed_executor_backend="mp", enforce_eager=False)
    result["vllm_tp2"] = lmn.generate(base, ft, ps, recipe, engine="vllm", **kw).tokens
    vrun.shutdown()
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
