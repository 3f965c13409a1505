"""Driver (run by test_backend.py): a system YAML with `backend: vllm` against the same system on `hf`.

Usage: driver_backend.py OUT_DIR. Loads both systems, answers the same chats (the vLLM one from the
system's own generation thread, as `lmn serve` and the judge callables call it) and writes
OUT_DIR/result.json with both answers and finish reasons.
"""

import json
import os
import sys
from dataclasses import asdict

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

from latent_merge_nnsight.evaluation.tasks import CATEGORIES, chat_messages, make_eval_set  # noqa: E402
from latent_merge_nnsight.systems import System  # noqa: E402
from latent_merge_nnsight.vllm_engine import run as vrun  # noqa: E402


def main() -> None:
    out_dir = sys.argv[1]
    spec = {
        "name": "toy-merge", "kind": "latent", "base": "toy-base", "sources": ["toy-reasoner"],
        "recipe": {"op": "slerp", "layers": {3: 0.7}}, "dtype": "float32",
        "sampling": {"max_new_tokens": 24, "stop": ["\n"]},
    }  # fmt: skip
    chats = [chat_messages(make_eval_set(c, 1, seed=7)[0].prompt) for c in CATEGORIES]
    hf = System.from_dict(spec).load()
    vl = System.from_dict(spec | {"backend": "vllm"}).load()
    result = {
        "hf": [asdict(c) for c in hf.complete(chats)],
        "vllm": [asdict(c) for c in vl._executor.submit(vl.complete, chats).result()],
    }
    vl.close()
    vrun.shutdown()
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f, default=str)


if __name__ == "__main__":
    main()
