"""The fast engine's CUDA-graph path, checked on a GPU (CI has none, so this is a script, not a test).

    python benchmarks/check_cuda.py [--out results.json]

On tiny float64 models on the GPU, for each recipe the greedy tokens of the fast engine replaying a
captured CUDA graph must equal those of the same engine stepping eagerly, of the nnsight engine (its
sources' decode steps replaying their own graphs), and of a plain-PyTorch forward-pre-hook loop (the
paper's algorithm, one row at a time). It also checks that the graphs were really used (no silent eager
fallback), that rows finishing early (the batch shrinking under
graphs), a kept engine reused with new alphas and sliding-window models give the same tokens, and that
50 generations leave GPU memory flat. Exits non-zero when any check fails.
"""

import argparse
import datetime
import gc
import json
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import beartype  # noqa: E402, F401  (before nnsight, as in the tests)
from reference_generate import lockstep_generate  # noqa: E402
from tiny import generate_raw as generate  # noqa: E402  (raw-text prompts, as the hook loop reads them)
from tiny import pair  # noqa: E402

import latent_merge_nnsight as lmn  # noqa: E402
from latent_merge_nnsight.models import hf_module  # noqa: E402

PROMPTS = ["hello there", "hi", "what is up with you", "one more prompt here"]
N_NEW = 12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--dry-run-cpu", action="store_true", help="run the script on CPU (no graphs)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.dry_run_cpu:
        sys.exit("check_cuda.py needs a CUDA device")
    dev = torch.device("cpu" if args.dry_run_cpu else "cuda")
    on_gpu = dev.type == "cuda"
    base, ft = pair("qwen2", n_layers=4, seed=0)
    _, ft2 = pair("qwen2", n_layers=4, seed=3)
    for m in (base, ft, ft2):
        hf_module(m).to(dev)
    tok = base.tokenizer
    deltas = lmn.compute_deltas(base, ft, PROMPTS, [1, 2])
    cases: dict[str, tuple[Any, Any, dict]] = {
        "slerp two layers": (ft, lmn.Recipe(op="slerp", layers={1: 0.3, 2: 0.6}), {}),
        "lerp site post": (ft, lmn.Recipe(op="lerp", layers={2: 0.5}, site="post"), {}),
        "slerp positions all": (ft, lmn.Recipe(op="slerp", layers={2: 0.5}, positions="all"), {}),
        "regmean weights": ([ft, ft2], lmn.Recipe(op="regmean", layers={2: 0.5}, weights=[0.7, 0.3]), {}),
        "regmean lam": ([ft, ft2], lmn.Recipe(op="regmean", layers=[2], lam=0.5), {}),
        "delta": (deltas, lmn.Recipe(op="delta", layers={1: 0.5, 2: 1.0}), {}),
        "ensemble": (ft, lmn.Ensemble(b=0.4), {}),
    }
    reference_args = {
        "slerp two layers": dict(merges={1: 0.3, 2: 0.6}, op="slerp"),
        "lerp site post": dict(merges={2: 0.5}, op="lerp", site="post"),
        "slerp positions all": dict(merges={2: 0.5}, op="slerp", positions="all"),
        "regmean weights": dict(merges={2: 0.5}, op="regmean", weights=[0.7, 0.3]),
        "regmean lam": dict(merges={2: None}, op="regmean", lam=0.5),
    }
    results: dict[str, Any] = {}
    failed = 0

    def check(name: str, fn: Any) -> None:
        nonlocal failed
        try:
            detail = fn()
            results[name] = {"ok": True, **(detail or {})}
            print(f"PASS {name}", flush=True)
        except Exception as e:  # report every check, then fail at the end
            failed += 1
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()

    for name, (sources, recipe, _) in cases.items():

        def one(sources: Any = sources, recipe: Any = recipe, name: str = name) -> dict:
            kw = dict(max_new_tokens=N_NEW, ignore_eos=True)
            graphs = generate(base, sources, PROMPTS, recipe, engine="fast", **kw)
            used = graphs.info["cuda_graphs"] or not on_gpu
            assert used, f"graphs not used: {graphs.info.get('cuda_graph_error')}"
            eager = generate(base, sources, PROMPTS, recipe, engine="fast", cuda_graphs=False, **kw)
            traced = generate(base, sources, PROMPTS, recipe, engine="nnsight", **kw)
            if "cuda_graphs" in traced.info:  # live sources: their decode steps replay CUDA graphs
                used = traced.info["cuda_graphs"] or not on_gpu
                assert used, f"source graphs not used: {traced.info.get('cuda_graph_error')}"
            assert graphs.tokens == eager.tokens, (graphs.tokens, eager.tokens)
            assert graphs.tokens == traced.tokens, (graphs.tokens, traced.tokens)
            if name in reference_args:
                srcs = sources if isinstance(sources, list) else [sources]
                for row, prompt in enumerate(PROMPTS):
                    expected = lockstep_generate(
                        hf_module(base),
                        [hf_module(s) for s in srcs],
                        tok(prompt)["input_ids"],
                        max_new_tokens=N_NEW,
                        **reference_args[name],
                    )
                    assert graphs.tokens[row] == expected, (row, graphs.tokens[row], expected)
            return {"tokens_row0": graphs.tokens[0]}

        check(f"graph == eager == nnsight with source graphs (== hook loop): {name}", one)

    def rows_finish_early() -> dict:
        recipe = lmn.Recipe(op="slerp", layers={1: 0.3, 2: 0.6})
        free = generate(base, ft, PROMPTS, recipe, max_new_tokens=N_NEW, ignore_eos=True)
        eos = free.tokens[0][2]  # row 0 ends at its third token; others when they produce it
        graphs = generate(base, ft, PROMPTS, recipe, max_new_tokens=N_NEW, eos_token_id=eos)
        eager = generate(base, ft, PROMPTS, recipe, max_new_tokens=N_NEW, eos_token_id=eos, cuda_graphs=False)
        assert graphs.info["cuda_graphs"] or not on_gpu
        assert graphs.tokens == eager.tokens, (graphs.tokens, eager.tokens)
        return {"lengths": [len(t) for t in graphs.tokens]}

    def kept_engine_reused() -> dict:
        first = lmn.Recipe(op="slerp", layers={1: 0.3, 2: 0.6})
        second = lmn.Recipe(op="slerp", layers={1: 0.9, 2: 0.1})
        kw = dict(max_new_tokens=N_NEW, ignore_eos=True)
        expected = generate(base, ft, PROMPTS[::-1], second, **kw)
        generate(base, ft, PROMPTS, first, keep_engine=True, **kw)
        again = generate(base, ft, PROMPTS[::-1], second, keep_engine=True, **kw)
        assert (again.info["engine_reused"] and again.info["cuda_graphs"]) or not on_gpu
        assert again.tokens == expected.tokens
        # a smaller batch runs on the same engine (one more capture, for its size)
        fewer = generate(base, ft, PROMPTS[::-1][:1], second, keep_engine=True, **kw)
        assert (fewer.info["engine_reused"] and fewer.info["cuda_graphs"]) or not on_gpu
        assert fewer.tokens == expected.tokens[:1]
        generate(base, ft, PROMPTS, first, max_new_tokens=2)  # lets the kept engine go
        return {}

    def memory_flat() -> dict:
        if not on_gpu:
            return {}
        recipe = lmn.Recipe(op="slerp", layers={2: 0.5})
        generate(base, ft, PROMPTS, recipe, max_new_tokens=N_NEW)  # warm-ups: what stays is not growth
        generate(base, ft, PROMPTS, recipe, max_new_tokens=N_NEW, engine="nnsight")
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(50):
            generate(base, ft, PROMPTS, recipe, max_new_tokens=N_NEW)
        torch.cuda.synchronize()
        after = torch.cuda.memory_allocated()
        gc.collect()
        after_gc = torch.cuda.memory_allocated()
        detail = {"allocated_before": before, "allocated_after": after, "allocated_after_gc": after_gc}
        # the nnsight engine captures its sources' steps afresh each generation and frees them after
        for _ in range(20):
            generate(base, ft, PROMPTS, recipe, max_new_tokens=N_NEW, engine="nnsight")
        torch.cuda.synchronize()
        detail["allocated_after_nnsight"] = torch.cuda.memory_allocated()
        assert after - before < 2**20, detail
        assert detail["allocated_after_nnsight"] - after < 2**20, detail
        return detail

    def compiled_step() -> dict:
        recipe = lmn.Recipe(op="slerp", layers={1: 0.3, 2: 0.6})
        kw = dict(max_new_tokens=N_NEW, ignore_eos=True)
        expected = generate(base, ft, PROMPTS, recipe, cuda_graphs=False, **kw)
        out = generate(base, ft, PROMPTS, recipe, compile_step=True, **kw)
        assert out.info["compiled_step"] and (out.info["cuda_graphs"] or not on_gpu), out.info
        assert out.tokens == expected.tokens
        return {}

    def sliding_windows() -> dict:
        """Windows shorter than the prompts (the bias of a captured step slides with the slot index).
        Prompts of one length: Gemma 2 in float64 turns a left pad's query NaN, in HF as in the engines."""
        prompts = ["hello there!", "what is up??", "one more one"]
        out = {}
        for arch in ("mistral", "gemma2"):
            wb, wf = pair(arch, n_layers=3, seed=5, window=3)
            for m in (wb, wf):
                hf_module(m).to(dev)
            recipe = lmn.Recipe(op="slerp", layers={1: 0.5})
            kw = dict(max_new_tokens=N_NEW, ignore_eos=True)
            graphs = generate(wb, wf, prompts, recipe, engine="fast", **kw)
            traced = generate(wb, wf, prompts, recipe, engine="nnsight", **kw)
            eager = generate(wb, wf, prompts, recipe, engine="fast", cuda_graphs=False, **kw)
            assert (graphs.info["cuda_graphs"] and traced.info["cuda_graphs"]) or not on_gpu
            assert graphs.tokens == eager.tokens == traced.tokens, (arch, graphs.tokens, eager.tokens)
            for row, prompt in enumerate(prompts):
                ids = tok(prompt)["input_ids"]
                expected = lockstep_generate(
                    hf_module(wb), [hf_module(wf)], ids, {1: 0.5}, "slerp", max_new_tokens=N_NEW
                )
                assert graphs.tokens[row] == expected, (arch, row, graphs.tokens[row], expected)
            out[arch] = graphs.tokens[0]
        return out

    def row_recipes() -> dict:
        """Per-row recipes (ops, layers, alphas, sites, positions; rows finishing early) under graphs equal
        the eager step and the nnsight engine; a kept engine takes new row alphas without a capture."""
        rows = [
            lmn.Recipe(op="slerp", layers={1: 0.3, 2: 0.6}),
            lmn.Recipe(op="lerp", layers={2: 0.5}, site="post"),
            None,
            lmn.Recipe(op="slerp", layers={2: 0.5}, positions="all"),
        ]
        free = generate(base, ft, PROMPTS, rows, max_new_tokens=N_NEW, ignore_eos=True)
        kw = dict(max_new_tokens=N_NEW, eos_token_id=free.tokens[0][2])
        graphs = generate(base, ft, PROMPTS, rows, keep_engine=True, **kw)
        eager = generate(base, ft, PROMPTS, rows, cuda_graphs=False, **kw)
        traced = generate(base, ft, PROMPTS, rows, engine="nnsight", **kw)
        assert graphs.info["cuda_graphs"] or not on_gpu, graphs.info.get("cuda_graph_error")
        assert graphs.tokens == eager.tokens == traced.tokens, (graphs.tokens, eager.tokens, traced.tokens)
        other = [rows[0].model_copy(update={"layers": {1: 0.9, 2: 0.1}}), rows[1], rows[3], None]
        again = generate(base, ft, PROMPTS, other, keep_engine=True, **kw)
        assert again.info["engine_reused"] or not on_gpu
        assert again.tokens == generate(base, ft, PROMPTS, other, cuda_graphs=False, **kw).tokens
        lmn.generation.run.release_engine(base)
        return {"lengths": [len(t) for t in graphs.tokens]}

    def rows_throughput() -> dict:
        """16 prompts x 8 alphas in one call against 8 calls of 16 prompts: decode tokens/s (Qwen2.5-7B
        shapes, random weights, on the GPU; the tiny shapes in a CPU dry run). Goal on a GPU: >= 4x."""
        import bench_rows

        preset = "qwen2.5-7b" if on_gpu else "tiny"
        big, src, layer, vocab = bench_rows.models_for(preset, dev)
        prompts = bench_rows.make_prompts(16 if on_gpu else 2, vocab, 64 if on_gpu else 8, dev)
        alphas, new, repeats = (8, 64, 2) if on_gpu else (2, 2, 1)  # the dry run only checks it runs
        out = bench_rows.compare(big, src, layer, prompts, alphas, new, repeats)
        del big, src
        gc.collect()
        return out

    check("per-row recipes under graphs (== eager == nnsight; kept engine, new row alphas)", row_recipes)
    check("16 prompts x 8 alphas in one call vs 8 calls (decode tokens/s)", rows_throughput)
    check("rows finishing early (batch shrinks under graphs)", rows_finish_early)
    check("kept engine reused with new alphas and a smaller batch", kept_engine_reused)
    check("50 (fast) + 20 (nnsight) generations leave GPU memory flat", memory_flat)
    check("compiled decode step (torch.compile, then captured)", compiled_step)
    check("sliding-window models (Mistral, Gemma 2) under graphs", sliding_windows)

    summary = {
        "check": "check_cuda",
        "device": torch.cuda.get_device_name() if on_gpu else "cpu (dry run)",
        "versions": {"torch": torch.__version__, "latent_merge_nnsight": lmn.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "failed": failed,
        "results": results,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{len(results) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
