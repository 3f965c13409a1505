"""Many merges in one pass: A alphas x P prompts as per-row recipes in one call, against A calls of P
prompts (one alpha each), in one run.

    python benchmarks/bench_rows.py --preset toy            # the shipped toy pair, CPU
    python benchmarks/bench_rows.py --preset medium         # bench_decode's medium shape, CPU
    python benchmarks/bench_rows.py --preset qwen2.5-7b --prompts 16   # one GPU, random weights

Both sides generate the same rows (`--new` tokens each, greedy, EOS ignored) with the fast engine; the
merge is slerp at the preset's layer with alphas evenly spread over (0, 1]. Reported: CPU time (user +
sys of this process, all threads) and wall time of each side, best of `--repeats` runs taken in turn,
their ratios (one call / the separate calls), decode tokens/s from wall time, and how many rows got the
same tokens both ways (float32: a near-tie may flip a row). `--write-results` writes the committed record
benchmarks/results/rows_<preset>_<device>.json.
"""

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import bench_decode  # noqa: E402  (the presets' shapes and random models)

import latent_merge_nnsight as lmn  # noqa: E402
from latent_merge_nnsight.generation.run import generate, release_engine  # noqa: E402
from latent_merge_nnsight.models import hf_module  # noqa: E402

TOY_LAYER = 3


def models_for(preset: str, device: torch.device) -> tuple[Any, Any, int, int | None]:
    """(base, source, merge layer, vocab size for random prompts; None: the toy pair's chat prompts)."""
    if preset == "toy":
        base, ft = lmn.load("toy-base"), lmn.load("toy-reasoner")
        for m in (base, ft):
            hf_module(m).to(device)
        return base, ft, TOY_LAYER, None
    shape = bench_decode.PRESETS[preset]
    base = bench_decode.build(shape, device, seed=0)
    ft = bench_decode.build(shape, device, seed=1, n_layers=shape["layer"] + 1)  # up to the merge layer
    return base, ft, shape["layer"], shape["vocab_size"]


def make_prompts(n: int, vocab: int | None, length: int, device: torch.device) -> dict[str, Any]:
    """`generate` keyword arguments for `n` prompts: toy questions as chats, or random token ids."""
    if vocab is None:
        from latent_merge_nnsight.evaluation.tasks import CATEGORIES, chat_messages, make_eval_set

        per = -(-n // len(CATEGORIES))
        examples = [ex for c in CATEGORIES for ex in make_eval_set(c, per, seed=1)][:n]
        return {"prompts": [chat_messages(ex.prompt) for ex in examples]}
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(3, vocab, (n, length), generator=g).to(device)}


def compare(
    base: Any, ft: Any, layer: int, prompt_kw: dict[str, Any], n_alphas: int, new: int, repeats: int
) -> dict[str, Any]:
    """Time one call of n_alphas x prompts rows against n_alphas calls of the prompts; tokens compared."""
    alphas = [round((i + 1) / n_alphas, 4) for i in range(n_alphas)]
    recipes = [lmn.Recipe(op="slerp", layers={layer: a}) for a in alphas]
    n_prompts = len(prompt_kw.get("prompts", prompt_kw.get("input_ids", [])))
    rows_kw = {
        k: (v * n_alphas if isinstance(v, list) else v.repeat(n_alphas, 1)) for k, v in prompt_kw.items()
    }
    row_recipes = [r for r in recipes for _ in range(n_prompts)]
    kw = dict(max_new_tokens=new, ignore_eos=True, engine="fast", keep_engine=True)
    device = next(hf_module(base).parameters()).device

    def together() -> list[list[int]]:
        return generate(base, ft, recipe=row_recipes, **rows_kw, **kw).tokens

    def separately() -> list[list[int]]:
        return [t for r in recipes for t in generate(base, ft, recipe=r, **prompt_kw, **kw).tokens]

    def timed(fn: Any) -> tuple[float, float, Any]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        cpu, wall = time.process_time(), time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.process_time() - cpu, time.perf_counter() - wall, out

    sides = {"one_call": together, "separate_calls": separately}
    best: dict[str, list[float]] = {}
    tokens: dict[str, Any] = {}

    def measure(name: str) -> None:
        cpu, wall, tokens[name] = timed(sides[name])
        old = best.get(name, [cpu, wall])
        best[name] = [min(old[0], cpu), min(old[1], wall)]

    if device.type == "cuda":  # in blocks: the kept engine (its captured graphs) serves one side's repeats
        for name in sides:
            sides[name]()  # warm-up: captures
            for _ in range(repeats):
                measure(name)
            release_engine(base)
    else:  # in turn, so that a change of load on a shared CPU hits both sides alike
        for name in sides:
            sides[name]()  # warm-up
        for _ in range(repeats):
            for name in sides:
                measure(name)
    release_engine(base)
    rows = n_alphas * n_prompts
    same = sum(a == b for a, b in zip(tokens["one_call"], tokens["separate_calls"], strict=True))
    out: dict[str, Any] = {"alphas": alphas, "prompts": n_prompts, "rows": rows, "new": new}
    for name, (cpu, wall) in best.items():
        out[name] = {"cpu_s": round(cpu, 4), "wall_s": round(wall, 4), "tok_s": round(rows * new / wall, 1)}
    out["cpu_ratio"] = round(best["one_call"][0] / best["separate_calls"][0], 4)
    out["wall_ratio"] = round(best["one_call"][1] / best["separate_calls"][1], 4)
    out["tok_s_speedup"] = round(best["separate_calls"][1] / best["one_call"][1], 3)
    out["rows_with_equal_tokens"] = f"{same}/{rows}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=["toy", *sorted(bench_decode.PRESETS)], default="toy")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--alphas", type=int, default=8)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64, help="random prompts' length (not toy)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    base, ft, layer, vocab = models_for(args.preset, device)
    prompt_kw = make_prompts(args.prompts, vocab, args.prompt_len, device)
    result = compare(base, ft, layer, prompt_kw, args.alphas, args.new, args.repeats)
    record = {
        "benchmark": "rows: A alphas x P prompts in one call (per-row recipes) vs A calls of P prompts",
        "preset": args.preset,
        "layer": layer,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "versions": {"torch": torch.__version__, "latent_merge_nnsight": lmn.__version__},
        "result": result,
    }
    path = args.out
    if args.write_results:
        path = ROOT / "benchmarks" / "results" / f"rows_{args.preset}_{device.type}.json"
    if path is not None:
        path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
