"""Driver (run by test_families.py): vLLM's merged greedy tokens for the qwen3, llama and mistral families.

Usage: driver_families.py OUT_DIR. For each family, builds a tiny random base and a perturbed copy of it
(tests/tiny.py: 4 layers, hidden 128, 4 heads of 32, 2 KV heads; vLLM's CPU attention takes no head
size under 32), saves them with a character tokenizer, and writes OUT_DIR/result.json: per family and
recipe, the greedy tokens of engine="fast" and engine="vllm" on prompts of different lengths, and the
base's own tokens. The Mistral pair slides its attention over 8
tokens (shorter than the prompts), and its fast tokens without the window are written too. Both recipes
fit one export (same site and positions, layers among the first's), so vLLM starts once per family.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tiny models

import torch  # noqa: E402
from tiny import hf_pair, make_tokenizer  # noqa: E402

import latent_merge_nnsight as lmn  # noqa: E402
from latent_merge_nnsight.vllm_engine import run as vrun  # noqa: E402

FAMILIES = ("qwen3", "llama", "mistral")
WINDOW = {"mistral": 8}
NEW = 10
PROMPTS = ["hi", "merge these two models", "a longer prompt, with commas, of some forty chars"]
RECIPES = {
    "slerp": lmn.Recipe(op="slerp", layers={1: 0.7, 2: 0.5}),
    "lerp": lmn.Recipe(op="lerp", layers={2: 0.9}),
}


def save_pair(root: Path, family: str, window: int | None) -> tuple[Path, Path]:
    base, ft = hf_pair(family, n_layers=4, hidden=128, seed=5, dtype=torch.float32, window=window)
    paths = root / "base", root / "ft"
    for path, model in zip(paths, (base, ft), strict=True):
        model.save_pretrained(path)
        make_tokenizer().save_pretrained(path)
    return paths


def tokens(base, ft, recipe, engine: str) -> list[list[int]]:
    out = lmn.generate(
        base, ft, PROMPTS, recipe, engine=engine, max_new_tokens=NEW, ignore_eos=True, chat=False
    )
    return out.tokens


def family_result(root: Path, family: str) -> dict:
    window = WINDOW.get(family)
    base_dir, ft_dir = save_pair(root / family, family, window)
    base, ft = lmn.load(base_dir, dtype="float32"), lmn.load(ft_dir, dtype="float32")
    out: dict = {
        "prompt_lens": [len(r) for r in base.tokenizer(PROMPTS)["input_ids"]],
        "window": getattr(lmn.models.hf_module(base).config, "sliding_window", None),
        "base": tokens(base, None, None, "fast"),
        "fast": {name: tokens(base, ft, r, "fast") for name, r in RECIPES.items()},
        "vllm": {},
        "engines": [],  # the kept vLLM engine's scratch folder after each recipe (one start: one folder)
    }
    for name, recipe in RECIPES.items():
        out["vllm"][name] = tokens(base, ft, recipe, "vllm")
        out["engines"].append(str(vrun._KEPT["folder"]))
    vrun.shutdown()
    if window is not None:  # the same weights without the window: the window must change the tokens
        plain = save_pair(root / f"{family}-nowindow", family, None)
        pb, pf = (lmn.load(p, dtype="float32") for p in plain)
        out["fast_nowindow"] = tokens(pb, pf, RECIPES["slerp"], "fast")
    return out


def main() -> None:
    out_dir = Path(sys.argv[1])
    result = {family: family_result(out_dir, family) for family in FAMILIES}
    with open(out_dir / "result.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
