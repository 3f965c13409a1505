"""Decode throughput and peak memory of lockstep merged generation, against its baselines, in one run.

    python benchmarks/bench_decode.py --preset tiny            # CPU, well under a minute
    python benchmarks/bench_decode.py --preset medium          # CPU, a few minutes
    python benchmarks/bench_decode.py --preset qwen2.5-7b      # one GPU; bf16

Methods (same prompts, greedy, exactly `--new` tokens per row):
- `hf_eager`: HF `generate` of the base alone (dynamic cache);
- `hf_static_compile`: HF `generate` of the base alone with a static cache (transformers compiles the
  decode step; CUDA only);
- `hook_loop`: a plain-PyTorch re-implementation of the paper's loop: two full models, forward-pre-hooks,
  one row at a time, its own decode loop with a KV cache per model;
- `nnsight`: `lmn.generate(engine="nnsight")`, the source loaded only up to the merge layer;
- `fast`: `lmn.generate(engine="fast")`, the source loaded only up to the merge layer.

Models are randomly initialised with the real shapes (nothing is downloaded): the same bytes and FLOPs as
the real checkpoints, so the speed and memory are those of the real models; the tokens are meaningless.

Decode tokens/s is `batch * (new - 1) / (t(new) - t(1))`: the time of a run of `new` tokens minus that
of a 1-token run (prefill), so prompt processing is left out. A merged step does the base's work plus
the source's blocks below L, so its ideal cost is `(1 + L / n_layers)` times the base's own decode step;
the table shows each method's step time over the base's (HF eager) and over that ideal.
"""

import argparse
import datetime
import inspect
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import latent_merge_nnsight as lmn  # noqa: E402
from latent_merge_nnsight.generate import generate  # noqa: E402
from latent_merge_nnsight.models import hf_module, truncate  # noqa: E402
from latent_merge_nnsight.ops import slerp  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    # Qwen2 shapes. `layer` is the merge layer L.
    "tiny": dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=2048,
        layer=5,
        dtype="float32",
        prompt=128,
        new=128,
        batches=[1, 16],
        repeats=2,
    ),
    "medium": dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=14,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=8192,
        layer=10,
        dtype="float32",
        prompt=128,
        new=128,
        batches=[1, 16],
        repeats=2,
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        layer=20,
        dtype="bfloat16",
        prompt=128,
        new=128,
        batches=[1, 16],
        repeats=2,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        hook_rows=4,  # the hook loop runs rows one by one: its rate does not depend on how many
    ),
}
SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "rope_theta",
    "max_position_embeddings",
)


# ----------------------------------------------------------------------------------------------------
# models


def make_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer over the whole vocabulary (`t<i>`), built locally: generate gets token ids,
    the tokenizer only decodes and pads."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<pad>"
    )


def build(preset: dict[str, Any], device: torch.device, seed: int, n_layers: int | None = None) -> Any:
    """A randomly initialised Qwen2 causal LM of the preset's shape, wrapped for lmn."""
    kw = {k: preset[k] for k in SHAPE_KEYS if k in preset}
    if n_layers is not None:
        kw["num_hidden_layers"] = n_layers
    config = transformers.Qwen2Config(
        **kw, pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, preset["dtype"]))
    hf.eval()
    hf.generation_config.eos_token_id = None
    return lmn.wrap(
        hf,
        make_tokenizer(preset["vocab_size"]),
        name=f"random-qwen2-{preset['num_hidden_layers']}L-seed{seed}",
    )


def param_bytes(*models: Any) -> int:
    return sum(p.numel() * p.element_size() for m in models for p in hf_module(m).parameters())


# ----------------------------------------------------------------------------------------------------
# the methods: each runs `new` tokens for every row of `ids` and returns nothing


def run_hf(base: Any, ids: torch.Tensor, new: int, static: bool = False) -> None:
    kw: dict[str, Any] = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"
    hf_module(base).generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)


def run_hook_loop(
    base: Any, ft_full: Any, ids: torch.Tensor, new: int, layer: int, alpha: float = 0.5
) -> None:
    """The paper's loop: per row, both full models step with their own cache; a pre-hook on the FT's block
    L keeps its input, a pre-hook on the base's block L mixes it in at the last token (then each new one)."""
    hb, hf_ = hf_module(base), hf_module(ft_full)
    cache_kw = "cache" if "cache" in inspect.signature(type(hb).forward).parameters else "past_key_values"
    for row in range(ids.shape[0]):
        state: dict[str, torch.Tensor] = {}

        def keep(module: Any, args: tuple, state: dict = state) -> None:
            state["ft"] = args[0]

        def mix(module: Any, args: tuple, state: dict = state) -> tuple:
            h = args[0].clone()
            h[:, -1] = slerp(h[:, -1], state["ft"][:, -1], alpha)
            return (h, *args[1:])

        handles = [
            hf_.model.layers[layer].register_forward_pre_hook(keep),
            hb.model.layers[layer].register_forward_pre_hook(mix),
        ]
        try:
            caches = [transformers.DynamicCache(), transformers.DynamicCache()]
            cur = ids[row : row + 1]
            for _ in range(new):
                hf_(input_ids=cur, use_cache=True, **{cache_kw: caches[1]})
                logits = hb(input_ids=cur, use_cache=True, **{cache_kw: caches[0]}).logits
                cur = logits[:, -1].argmax(dim=-1, keepdim=True)
        finally:
            for h in handles:
                h.remove()


def run_lmn(base: Any, ft: Any, ids: torch.Tensor, new: int, layer: int, engine: str) -> None:
    recipe = lmn.Recipe(op="slerp", layers={layer: 0.5})
    out = generate(base, ft, None, recipe, input_ids=ids, max_new_tokens=new, ignore_eos=True, engine=engine)
    assert all(len(t) == new for t in out.tokens)


# ----------------------------------------------------------------------------------------------------
# measuring


def rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Peak:
    """Peak memory during a block: CUDA allocator peak on GPU, sampled RSS above the start on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "Peak":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.start, self.peak, self._stop = rss(), rss(), False
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop = True
            self._thread.join()
            self.bytes = self.peak - self.start


def timed(fn: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def measure_round_robin(
    cases: list[dict[str, Any]], new: int, repeats: int, device: torch.device
) -> list[dict[str, Any]]:
    """Time every case `repeats` times, cycling through the cases so that a change of machine load hits all of
    them alike; each case keeps its best times.

    A case is `{"run": fn(n_new_tokens), "rows_timed": rows, "method": ..., "batch": ...}`. Decode tokens/s
    comes from the runs of `new` tokens and of 1 token (the prefill); the peak memory is taken over the
    `new`-token runs.
    """
    for case in cases:
        case["run"](2)  # warm-up (and compilation, for the compiled baseline)
        case.update(full=[], prefill=[], peak_bytes=0)
    for _ in range(repeats):
        for case in cases:
            case["prefill"].append(timed(lambda c=case: c["run"](1), device))
            with Peak(device) as p:
                case["full"].append(timed(lambda c=case: c["run"](new), device))
            case["peak_bytes"] = max(case["peak_bytes"], p.bytes)
    rows = []
    for case in cases:
        decode = min(case["full"]) - min(case["prefill"])
        stats = {
            "decode_tok_s": case["rows_timed"] * (new - 1) / decode,
            # per decode step of the whole batch (rows the hook loop did not time would run one after another)
            "step_ms": 1000 * decode / (new - 1) * case["batch"] / case["rows_timed"],
            "total_s": min(case["full"]),
            "total_s_median": statistics.median(case["full"]),
            "prefill_s": min(case["prefill"]),
            "peak_bytes": case["peak_bytes"],
        }
        keep = {k: v for k, v in case.items() if k in ("method", "batch", "rows_timed", "model_bytes")}
        rows.append({**keep, **stats})
        print(
            f"  measured {case['method']:<18} batch {case['batch']:>2}: {stats['decode_tok_s']:9.1f} tok/s",
            flush=True,
        )
    return rows


# ----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--batches", type=int, nargs="*", help="batch sizes (default: the preset's)")
    parser.add_argument("--prompt", type=int, help="prompt length (default 128)")
    parser.add_argument("--new", type=int, help="new tokens (default 128)")
    parser.add_argument("--repeats", type=int, help="timed runs per method (the best counts)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (CPU runs)")
    parser.add_argument(
        "--hook-rows",
        type=int,
        help="rows the hook loop runs (one by one, so its rate does not depend on how many; "
        "default: the whole batch, 4 for qwen2.5-7b)",
    )
    parser.add_argument(
        "--methods", nargs="*", default=["hf_eager", "hf_static_compile", "hook_loop", "nnsight", "fast"]
    )
    parser.add_argument(
        "--out", type=Path, help="JSON path (default benchmarks/results/decode_<preset>_<device>.json)"
    )
    args = parser.parse_args()

    preset = dict(PRESETS[args.preset])
    for key in ("prompt", "new", "repeats", "hook_rows"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    batches = args.batches or preset["batches"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    n_layers, layer, new = preset["num_hidden_layers"], preset["layer"], preset["new"]
    ideal = 1 + layer / n_layers
    print(
        f"preset {args.preset}: random-initialised Qwen2 of the real shape (no download; "
        "same bytes and FLOPs, "
        f"meaningless tokens); merge slerp at layer {layer} of {n_layers}; "
        f"prompt {preset['prompt']}, {new} new "
        f"tokens; device {device}; load average {os.getloadavg()[0]:.1f}"
    )
    methods = [m for m in args.methods if not (m == "hf_static_compile" and device.type != "cuda")]

    gen = torch.Generator().manual_seed(0)
    prompts = {
        b: torch.randint(3, preset["vocab_size"], (b, preset["prompt"]), generator=gen).to(device)
        for b in batches
    }
    base = build(preset, device, seed=0)
    # the hook loop runs two full models; the engines run the source only up to the merge layer. On the GPU
    # each set of models is loaded only for its own methods, so the peak counts just the models in use.
    on_gpu = device.type == "cuda"
    engines = [m for m in methods if m in ("nnsight", "fast")]
    alone = [m for m in methods if m.startswith("hf_")]
    ft_full = build(preset, device, seed=1) if "hook_loop" in methods and not on_gpu else None
    ft = build(preset, device, seed=1, n_layers=layer + 1) if engines and not on_gpu else None

    def cases_for(names: list[str]) -> list[dict[str, Any]]:
        cases = []
        for batch in batches:
            ids = prompts[batch]
            hook_rows = min(batch, preset.get("hook_rows") or batch)
            for m in names:
                if m == "hf_eager":
                    run, used, rows_timed = (lambda n, ids=ids: run_hf(base, ids, n)), (base,), batch
                elif m == "hf_static_compile":
                    run, used, rows_timed = (
                        (lambda n, ids=ids: run_hf(base, ids, n, static=True)),
                        (base,),
                        batch,
                    )
                elif m == "hook_loop":
                    run = lambda n, ids=ids[:hook_rows]: run_hook_loop(base, ft_full, ids, n, layer)  # noqa: E731
                    used, rows_timed = (base, ft_full), hook_rows
                else:
                    run = lambda n, ids=ids, m=m: run_lmn(base, ft, ids, n, layer, m)  # noqa: E731
                    used, rows_timed = (base, ft), batch
                cases.append(
                    {
                        "method": m,
                        "batch": batch,
                        "rows_timed": rows_timed,
                        "model_bytes": param_bytes(*used),
                        "run": run,
                    }
                )
        return cases

    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        if on_gpu:
            rows += measure_round_robin(cases_for(alone), new, preset["repeats"], device)
            if "hook_loop" in methods:
                ft_full = build(preset, device, seed=1)
                rows += measure_round_robin(cases_for(["hook_loop"]), new, preset["repeats"], device)
            if engines:
                if ft_full is not None:
                    ft = truncate(ft_full, layer)  # drops the blocks above L: their memory is freed
                else:
                    ft = build(preset, device, seed=1, n_layers=layer + 1)
                ft_full = None
                torch.cuda.empty_cache()
                rows += measure_round_robin(cases_for(engines), new, preset["repeats"], device)
        else:
            rows += measure_round_robin(cases_for(methods), new, preset["repeats"], device)

    # ratios against the base's own decode step (HF eager, same batch)
    base_step = {r["batch"]: r["step_ms"] for r in rows if r["method"] == "hf_eager"}
    hook_tok = {r["batch"]: r["decode_tok_s"] for r in rows if r["method"] == "hook_loop"}
    for r in rows:
        if r["batch"] in base_step:
            r["step_over_base"] = r["step_ms"] / base_step[r["batch"]]
            r["step_over_ideal"] = r["step_over_base"] / ideal
        if r["batch"] in hook_tok:
            r["speedup_over_hook_loop"] = r["decode_tok_s"] / hook_tok[r["batch"]]
    mem = "peak GPU memory" if device.type == "cuda" else "weights + peak RSS growth"
    print(
        f"\nideal merged step = (1 + {layer}/{n_layers}) = {ideal:.3f} x the base's own decode step "
        "(hf_eager)"
    )
    header = f"{'method':<18}{'batch':>6}{'tok/s':>10}{'ms/step':>10}{'x base':>8}{'x ideal':>9}{'x hook':>8}"
    print(header + f"  {mem}")
    for r in rows:
        memory = r["peak_bytes"] if device.type == "cuda" else r["model_bytes"] + r["peak_bytes"]
        print(
            f"{r['method']:<18}{r['batch']:>6}{r['decode_tok_s']:>10.1f}{r['step_ms']:>10.2f}"
            f"{r.get('step_over_base', float('nan')):>8.2f}{r.get('step_over_ideal', float('nan')):>9.2f}"
            f"{r.get('speedup_over_hook_loop', float('nan')):>8.2f}  {memory / 2**30:.2f} GiB"
        )
    checks = {}
    for r in rows:
        if r["method"] == "fast" and "step_over_ideal" in r:
            checks[f"fast_within_1.1x_ideal_batch{r['batch']}"] = r["step_over_ideal"] <= 1.1
    print("targets:", checks)

    result = {
        "benchmark": "bench_decode",
        "preset": args.preset,
        "shape": {k: preset[k] for k in SHAPE_KEYS if k in preset},
        "dtype": preset["dtype"],
        "merge": {"op": "slerp", "layer": layer, "n_layers": n_layers, "alpha": 0.5, "ideal_ratio": ideal},
        "prompt": preset["prompt"],
        "new_tokens": new,
        "repeats": preset["repeats"],
        "weights": "random init of the real shape (no download): same bytes and FLOPs, meaningless tokens",
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "load_average_1min_at_end": os.getloadavg()[0],
        "note": "methods timed round-robin, best of the repeats"
        + (
            ""
            if device.type == "cuda"
            else "; CPU run on a machine shared with other jobs (load average above); memory is weight bytes "
            "+ sampled RSS growth during the run (all models stay loaded)"
        ),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "nnsight": __import__("nnsight").__version__,
            "latent_merge_nnsight": lmn.__version__,
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "results": rows,
        "targets": checks,
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"decode_{args.preset}_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
