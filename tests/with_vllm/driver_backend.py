"""Driver (run by test_backend.py): a system YAML with `backend: vllm` against the same system on `hf`.

Usage: driver_backend.py OUT_DIR. Loads both systems, answers the same chats (the vLLM one from the
system's own generation thread, as `lmn serve` and the judge callables call it), with and without
logprobs, serves both with `start_server` (what `lmn serve` runs) for one /v1/completions request with
logprobs, scores a sampled vLLM generation with the hf system, and writes OUT_DIR/result.json: answers,
logprobs, replies, and what the backend-vllm system holds in memory (blocks and parameters of each model,
next to the full depth its config on disk says).
"""

import dataclasses
import json
import os
import sys
from dataclasses import asdict

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

import httpx  # noqa: E402
from transformers import AutoConfig  # noqa: E402

import latent_merge_nnsight as lmn  # noqa: E402
from latent_merge_nnsight.evaluation.tasks import CATEGORIES, chat_messages, make_eval_set  # noqa: E402
from latent_merge_nnsight.models import hf_module  # noqa: E402
from latent_merge_nnsight.serve import start_server  # noqa: E402
from latent_merge_nnsight.sites import get_layers  # noqa: E402
from latent_merge_nnsight.systems import System, load_system  # noqa: E402
from latent_merge_nnsight.systems.logprobs import token_logprobs  # noqa: E402
from latent_merge_nnsight.vllm_engine import run as vrun  # noqa: E402
from latent_merge_nnsight.zoo import zoo_path  # noqa: E402

TOP = 3


def held(model, ref: str) -> dict:
    """What one loaded model holds, next to its full depth on disk."""
    module = hf_module(model)
    return {
        "ref": ref,
        "blocks": len(get_layers(module)),
        "disk_blocks": AutoConfig.from_pretrained(zoo_path(ref)).num_hidden_layers,
        "params": sum(p.numel() for p in module.parameters()),
        "devices": sorted({str(p.device) for p in module.parameters()}),
    }


def block_params(model) -> int:
    return sum(p.numel() for p in get_layers(hf_module(model))[1].parameters())


def served(system, prompt: str) -> dict:
    """One /v1/completions reply with logprobs, from a server of `system` (started, asked, stopped)."""
    url, stop = start_server(system)
    try:
        body = {"model": system.name, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 2}
        reply = httpx.post(f"{url}/completions", json=body, timeout=300)
    finally:
        stop()
    return {"status": reply.status_code, "body": reply.json()}


def sampled_scores(hf, vl, chats) -> dict:
    """A sampled (temperature 1.5) vLLM generation's logprobs, and the hf system's scores of its tokens."""
    result = vl._executor.submit(
        lmn.generate, vl.base, vl.sources[0], chats, vl.config.recipe, engine="vllm", logprobs=TOP,
        max_new_tokens=12, do_sample=True, temperature=1.5, seed=3,
    ).result()  # fmt: skip
    mine = [[asdict(t) for t in row] for row in token_logprobs(vl, result, TOP)]
    theirs = token_logprobs(hf, dataclasses.replace(result, info={}), TOP)  # scored by re-running HF
    return {"vllm": mine, "hf": [[asdict(t) for t in row] for row in theirs]}


def main() -> None:
    out_dir = sys.argv[1]
    spec = {
        "name": "toy-merge", "kind": "latent", "base": "toy-base", "sources": ["toy-reasoner"],
        "recipe": {"op": "slerp", "layers": {3: 0.7}}, "dtype": "float32",
        "sampling": {"max_new_tokens": 24, "stop": ["\n"]},
    }  # fmt: skip
    chats = [chat_messages(make_eval_set(c, 1, seed=7)[0].prompt) for c in CATEGORIES]
    hf = load_system(System.from_dict(spec))
    vl = load_system(System.from_dict(spec | {"backend": "vllm"}))

    def on_vllm(*args, **kw):
        return vl._executor.submit(vl.complete, *args, **kw).result()

    prompt = make_eval_set("reasoning", 1, seed=11)[0].prompt
    result = {
        "shells": [held(vl.base, "toy-base"), held(vl.sources[0], "toy-reasoner")],
        "hf_held": [held(hf.base, "toy-base"), held(hf.sources[0], "toy-reasoner")],
        "hf_block_params": [block_params(hf.base), block_params(hf.sources[0])],
        "provenance": vl.provenance()["models"]["loaded"],
        "context_length": [hf.context_length, vl.context_length],
        "hf": [asdict(c) for c in hf.complete(chats)],
        "vllm": [asdict(c) for c in on_vllm(chats)],
        "hf_logprobs": [asdict(c) for c in hf.complete(chats, logprobs=TOP)],
        "vllm_logprobs": [asdict(c) for c in on_vllm(chats, logprobs=TOP)],
        "hf_logprobs0": [asdict(c) for c in hf.complete(chats[:1], logprobs=0)],
        "vllm_logprobs0": [asdict(c) for c in on_vllm(chats[:1], logprobs=0)],
        "served": {"hf": served(hf, prompt), "vllm": served(vl, prompt)},
        "sampled": sampled_scores(hf, vl, chats),
    }
    vl.close()
    vrun.shutdown()
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f, default=str)


if __name__ == "__main__":
    main()
