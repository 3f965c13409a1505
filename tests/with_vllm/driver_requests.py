"""Driver (run by test_requests.py): per-request alphas in one vLLM batch, and alpha 0 against plain vLLM.

Usage: driver_requests.py OUT_DIR. Exports toy-base + toy-reasoner (lerp at layers 2 and 3, alpha 0.5) to
OUT_DIR/export, runs it with vLLM and writes OUT_DIR/result.json:
- "batch": 8 prompts, each with its own alpha, in one `generate` call; "separate": the same rows one
  call each; "fast": `lmn.generate(engine="fast")` of each row at its alpha;
- "default": the rows without a per-request recipe (the export's alpha 0.5), "at_export_alpha": with 0.5;
- "alpha0": the rows at alpha 0 on the merged model, "plain_base": vLLM's own Qwen2 model of toy-base;
- "refused": the error of a request whose latent_merge value is malformed.
"""

import gc
import json
import os
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import latent_merge_nnsight as lmn  # noqa: E402
from latent_merge_nnsight.evaluation.tasks import CATEGORIES, chat_messages, make_eval_set  # noqa: E402
from latent_merge_nnsight.vllm_engine.export import check_export, write_export  # noqa: E402
from latent_merge_nnsight.vllm_engine.run import llm_defaults  # noqa: E402
from latent_merge_nnsight.zoo import zoo_path  # noqa: E402

NEW = 12
ALPHAS = [0.0, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0]
LAYERS = [2, 3]


def start(model: str):
    from vllm import LLM

    kw = llm_defaults("float32", 256) | {"block_size": 32, "distributed_executor_backend": "uni"}
    return LLM(model=model, **kw)


def stop(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def main() -> None:
    from vllm import SamplingParams

    out_dir = sys.argv[1]
    base = lmn.load("toy-base", dtype="float32")
    ft = lmn.load("toy-reasoner", dtype="float32")
    qs = [chat_messages(make_eval_set(c, 2, seed=5)[i].prompt) for c in CATEGORIES for i in range(2)][:8]
    plain = lmn.generate(base, None, qs, None, engine="fast", max_new_tokens=1)
    ids = [
        row[m.bool()].tolist()
        for row, m in zip(
            plain.sequences[:, : plain.prompt_width],
            plain.attention_mask[:, : plain.prompt_width],
            strict=True,
        )
    ]
    prompts = [{"prompt_token_ids": p} for p in ids]
    fast = [
        lmn.generate(base, ft, [q], lmn.Recipe(op="lerp", layers=dict.fromkeys(LAYERS, a)), engine="fast",
                     max_new_tokens=NEW, ignore_eos=True).tokens[0]
        for q, a in zip(qs, ALPHAS, strict=True)
    ]  # fmt: skip
    export = check_export(str(zoo_path("toy-base")), [str(zoo_path("toy-reasoner"))],
                          lmn.Recipe(op="lerp", layers=LAYERS, alpha=0.5))  # fmt: skip
    folder = write_export(export, os.path.join(out_dir, "export"), dtype="float32")

    def params(alpha=None, raw=None):
        extra = (
            {"latent_merge": raw if raw is not None else {"alpha": alpha}}
            if (alpha, raw) != (None, None)
            else None
        )
        return SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, extra_args=extra)

    llm = start(str(folder))
    tokens = lambda outs: [list(o.outputs[0].token_ids) for o in outs]  # noqa: E731
    result = {"prompt_tokens": [len(p) for p in ids], "fast": fast}
    result["batch"] = tokens(llm.generate(prompts, [params(a) for a in ALPHAS], use_tqdm=False))
    result["separate"] = [
        tokens(llm.generate([p], params(a), use_tqdm=False))[0] for p, a in zip(prompts, ALPHAS, strict=True)
    ]
    result["default"] = tokens(llm.generate(prompts, params(), use_tqdm=False))
    result["at_export_alpha"] = tokens(llm.generate(prompts, params(0.5), use_tqdm=False))
    result["alpha0"] = tokens(llm.generate(prompts, params(0.0), use_tqdm=False))
    try:
        llm.generate(prompts[:1], params(raw={"alpha": "half"}), use_tqdm=False)
        result["refused"] = None
    except Exception as e:  # noqa: BLE001 - vLLM's validation error type differs across versions
        result["refused"] = f"{type(e).__name__}: {e}"
    stop(llm)
    llm = start(str(zoo_path("toy-base")))
    result["plain_base"] = tokens(
        llm.generate(
            prompts, SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True), use_tqdm=False
        )
    )
    stop(llm)
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
