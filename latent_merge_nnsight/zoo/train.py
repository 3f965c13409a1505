"""Train the shipped toy pair from a seed: `toy-base` (an "instruct" model) and `toy-reasoner`.

Stage 1 trains a small `Qwen2ForCausalLM` from scratch on all four task categories of
`latent_merge_nnsight.evaluation.tasks`, with reasoning rare and answered *without* a scratchpad, so the
base knows facts, arithmetic and string tasks but is weak at multi-step word problems. Stage 2 continues
from it on reasoning *with* scratchpads plus a small replay of the other categories, so the fine-tune
becomes strong at reasoning and partly forgets the rest (like OpenThinker3 against Qwen2.5-Instruct).

Plain torch loop: AdamW, linear warmup then cosine decay to 10%, loss only on the assistant response
tokens (and its closing ``<|end|>``). Each batch of examples is packed into rows of `pack_width` tokens
(positions restart per example, attention stays within it: the same loss as one example at a time,
without padding), and the forward and backward run under bfloat16 autocast with float32 weights and
optimizer. The data stream, the initialisation and the order are seeded, and `torch.set_num_threads`
is set for the run: CPU results are bit-reproducible only at a fixed thread count.

Measured on 2 CPU cores (AMD EPYC with AVX512-BF16), the default configuration (1.51 M parameters; base
3,000 steps and fine-tune 1,500 steps of 64 examples): 557 s for the base and 459 s for the fine-tune,
17 min 3 s for the whole command with its held-out evaluation. Before packing and bf16 the same schedule
took about twice as long (a base step 0.35 s instead of 0.18 s). On a shared machine set
``OMP_WAIT_POLICY=PASSIVE`` (no number changes): busy-waiting OpenMP threads made steps up to ten times
slower. Command line::

    OMP_WAIT_POLICY=PASSIVE python -m latent_merge_nnsight.zoo.train --out DIR --seed 0
"""

import argparse
import dataclasses
import json
import math
import pathlib
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.evaluation.tasks import (
    CATEGORIES,
    MAX_NEW_TOKENS,
    Example,
    accuracy,
    chat_messages,
    direct_target,
    knowledge_pool_size,
    make_eval_set,
    sample_example,
)
from latent_merge_nnsight.models import quiet_hf_progress
from latent_merge_nnsight.zoo.tokenizer import build_tokenizer

IGNORE = -100


@dataclass(frozen=True)
class TrainConfig:
    """Model size and schedule of the two training stages (defaults: the shipped pair)."""

    hidden_size: int = 128
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    batch_size: int = 64
    base_steps: int = 3000
    ft_steps: int = 1500
    base_lr: float = 3e-3
    ft_lr: float = 1.5e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    base_mix: dict[str, float] = field(
        default_factory=lambda: {"knowledge": 0.25, "reasoning": 0.1, "math": 0.35, "coding": 0.3}
    )
    """Category probabilities of a stage-1 example; stage-1 reasoning targets have no scratchpad."""
    replay: float = 0.02
    """Probability that a stage-2 example is a replayed stage-1 example (drawn from `base_mix`)."""
    pack_width: int = 192
    """Tokens per packed row: a batch's examples are packed into as few rows as fit (see `pack`)."""
    bf16: bool = True
    """Run the forward and backward under bfloat16 autocast; weights and AdamW stay float32.

    Matrix products in bfloat16 are 4-5x faster on CPUs with AVX512-BF16 or AMX (and slower on CPUs
    without them: set False there). Either way the result is reproducible at a fixed thread count.
    """

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "batch_size",
            "pack_width",
        ):
            if getattr(self, name) < 1:
                raise LatentMergeError(f"{name}={getattr(self, name)!r} must be >= 1")
        for name in ("base_steps", "ft_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise LatentMergeError(f"{name}={getattr(self, name)!r} must be >= 0")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise LatentMergeError(
                f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}: expected hidden_size divisible by num_heads "
                "and num_heads divisible by num_kv_heads"
            )
        if not 0.0 <= self.replay <= 1.0:
            raise LatentMergeError(f"replay={self.replay!r} must be in [0, 1]")
        if set(self.base_mix) - set(CATEGORIES) or any(w < 0 for w in self.base_mix.values()):
            raise LatentMergeError(
                f"base_mix={self.base_mix!r}: expected non-negative weights keyed by {', '.join(CATEGORIES)}"
            )
        if sum(self.base_mix.values()) <= 0:
            raise LatentMergeError(f"base_mix={self.base_mix!r}: expected a positive total weight")


def build_model(config: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    """A freshly initialised Qwen2 causal LM sized by `config` (tied embeddings, GQA like Qwen2.5)."""
    qwen = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=tokenizer.model_max_length,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(qwen)
    model.generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=64,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def encode_example(
    tokenizer: PreTrainedTokenizerFast, example: Example, response: str
) -> tuple[list[int], list[int]]:
    """Token ids of the chat (prompt, `response`, ``<|end|>``) and labels that keep only the response."""
    prompt = tokenizer.apply_chat_template(
        chat_messages(example.prompt), add_generation_prompt=True, tokenize=False
    )
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p_ids + r_ids, [IGNORE] * len(p_ids) + r_ids


def pack(
    rows: Sequence[tuple[list[int], list[int]]], width: int, pad_id: int
) -> tuple[Int[Tensor, "row pos"], Int[Tensor, "row pos"], Int[Tensor, "row pos"]]:
    """Pack encoded examples into rows of `width` tokens: `(input_ids, labels, position_ids)`.

    First-fit decreasing: few rows and little padding (the toy examples are 30-110 tokens long, so one
    example per row wasted about 40% of a base step on padding). Positions restart at 0 for each example;
    with no attention mask, transformers reads the restarts as packed sequences and lets each token
    attend only within its own example, so a packed row computes exactly what the examples would alone.
    The tail of a row is padding with its own positions and ignored labels. An example longer than
    `width` widens every row to its length.
    """
    width = max([width] + [len(ids) for ids, _ in rows])
    bins: list[list[tuple[list[int], list[int]]]] = []
    used: list[int] = []
    for row in sorted(rows, key=lambda r: -len(r[0])):
        for i, n in enumerate(used):
            if n + len(row[0]) <= width:
                bins[i].append(row)
                used[i] += len(row[0])
                break
        else:
            bins.append([row])
            used.append(len(row[0]))
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    for i, members in enumerate(bins):
        start = 0
        for r_ids, r_labels in members:
            end = start + len(r_ids)
            ids[i, start:end] = torch.tensor(r_ids)
            labels[i, start:end] = torch.tensor(r_labels)
            positions[i, start:end] = torch.arange(len(r_ids))
            start = end
        positions[i, start:] = torch.arange(width - start)
    return ids, labels, positions


def response_loss(
    model: Qwen2ForCausalLM,
    ids: Int[Tensor, "row pos"],
    labels: Int[Tensor, "row pos"],
    positions: Int[Tensor, "row pos"] | None = None,
) -> Tensor:
    """Mean next-token cross-entropy over the labelled (response) positions.

    The first token of a packed example is a prompt token, so its label is ignored and no example is
    trained to predict the next one.
    """
    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    # under bf16 autocast, cross_entropy runs in float32 (autocast's own policy for it)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)


def _schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warmup, then cosine from 1 down to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _stage_examples(stage: str, config: TrainConfig, rng: random.Random) -> tuple[Example, str]:
    """One training example of `stage` ("base" or "ft") and the response to train on."""
    cats, weights = zip(*sorted(config.base_mix.items()), strict=True)
    if stage == "ft" and rng.random() >= config.replay:
        ex = sample_example("reasoning", rng, "train")
        return ex, ex.target
    ex = sample_example(rng.choices(cats, weights)[0], rng, "train")
    # stage-1 (and replayed) reasoning is answered directly: the base never sees a scratchpad
    return ex, direct_target(ex.answer) if ex.category == "reasoning" else ex.target


def _train_stage(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    stage: str,
    steps: int,
    lr: float,
    config: TrainConfig,
    rng: random.Random,
    bar: tqdm,
) -> float:
    """Run one stage in place; returns the mean loss of its last 50 steps (nan if no steps)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _schedule(s, steps, min(config.warmup_steps, steps))
    )
    recent: list[float] = []
    # eager attention: under bf16 autocast its backward is much faster on CPU than sdpa's
    attn = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        for _ in range(steps):
            rows = [
                encode_example(tokenizer, *_stage_examples(stage, config, rng))
                for _ in range(config.batch_size)
            ]
            ids, labels, positions = pack(rows, config.pack_width, tokenizer.pad_token_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                loss = response_loss(model, ids, labels, positions)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            recent = (recent + [loss.item()])[-50:]
            bar.update(1)
            bar.set_postfix(stage=stage, loss=f"{recent[-1]:.3f}")
    finally:
        model.set_attn_implementation(attn)
    model.eval()
    return sum(recent) / len(recent) if recent else float("nan")


def cpu_has_bf16() -> bool | None:
    """Whether this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX); None when unknown."""
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def _save(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, folder: pathlib.Path, info: dict
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _save_info(folder, info)


def held_out_accuracy(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, n_per_category: int, seed: int
) -> dict[str, float]:
    """Greedy exact-match accuracy of a checkpoint being trained on `n_per_category` held-out examples
    per category (knowledge asks at most its `knowledge_pool_size("eval")` held-out questions), answered
    by `lmn.generate` within each category's budget and scored by `tasks.accuracy`."""
    from latent_merge_nnsight.generation.run import generate

    result: dict[str, float] = {}
    for category in CATEGORIES:
        n = min(n_per_category, knowledge_pool_size("eval")) if category == "knowledge" else n_per_category
        examples = make_eval_set(category, n, seed)
        chats = [chat_messages(e.prompt) for e in examples]
        out = generate(model, None, chats, max_new_tokens=MAX_NEW_TOKENS[category], tokenizer=tokenizer)
        result.update(accuracy(examples, out.texts))
    return result


def _save_info(folder: pathlib.Path, info: dict) -> None:
    (folder / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")


def _check_training(config: TrainConfig, threads: int, eval_n: int) -> None:
    """`train_pair`'s arguments; a warning when bf16 training would be slow on this CPU."""
    if threads < 1:
        raise LatentMergeError(f"threads={threads!r} must be >= 1")
    if eval_n < 0:
        raise LatentMergeError(f"eval_n={eval_n!r} must be >= 0")
    if config.bf16 and cpu_has_bf16() is False:
        warnings.warn(
            "this CPU has no bfloat16 instructions (avx512_bf16 / amx_bf16): bf16 training will be slow "
            "here; pass --fp32 (TrainConfig(bf16=False)) to train in float32 (other numbers than the "
            "shipped pair)",
            stacklevel=3,
        )


def train_pair(
    out_dir: str | pathlib.Path,
    seed: int = 0,
    threads: int = 2,
    progress: bool = True,
    config: TrainConfig | None = None,
    eval_n: int = 0,
    eval_seed: int = 0,
) -> dict[str, dict]:
    """Train `toy-base` and `toy-reasoner` into `out_dir/toy-base` and `out_dir/toy-reasoner`.

    Each folder gets the safetensors weights, config.json, generation_config.json, the tokenizer files
    and a train_info.json (seed, threads, config, seconds, final loss, and held-out accuracies when
    `eval_n > 0`: greedy exact match on `eval_n` examples per category). Returns those infos by name.
    """
    config = config or TrainConfig()
    _check_training(config, threads, eval_n)
    out = pathlib.Path(out_dir)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # tiny values otherwise slow CPU float math by 10x or more
    try:
        torch.manual_seed(seed)
        tokenizer = build_tokenizer()
        model = build_model(config, tokenizer)
        common = {
            "seed": seed,
            "threads": threads,
            "parameters": sum(p.numel() for p in model.parameters()),
            "config": dataclasses.asdict(config),
            "torch": torch.__version__,
        }
        infos: dict[str, dict] = {}
        with tqdm(total=config.base_steps + config.ft_steps, disable=not progress, desc="toy pair") as bar:
            for name, stage, steps, lr in (
                ("toy-base", "base", config.base_steps, config.base_lr),
                ("toy-reasoner", "ft", config.ft_steps, config.ft_lr),
            ):
                t0 = time.perf_counter()
                loss = _train_stage(
                    model, tokenizer, stage, steps, lr, config, random.Random(f"{stage}:{seed}"), bar
                )
                info = {
                    **common,
                    "stage": stage,
                    "steps": steps,
                    "train_seconds": round(time.perf_counter() - t0, 1),
                }
                info["final_loss"] = round(loss, 4) if loss == loss else None
                _save(
                    model, tokenizer, out / name, info
                )  # before evaluating: keep the weights whatever happens
                if eval_n:
                    acc = held_out_accuracy(model, tokenizer, eval_n, eval_seed)
                    info["eval"] = {"n_per_category": eval_n, "seed": eval_seed, "accuracy": acc}
                    _save_info(out / name, info)
                infos[name] = info
        return infos
    finally:
        torch.set_num_threads(old_threads)
        torch.set_flush_denormal(False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The trainer's flags (shared by `lmn zoo train` and `python -m latent_merge_nnsight.zoo.train`)."""
    p.add_argument("--out", required=True, help="folder that receives toy-base/ and toy-reasoner/")
    p.add_argument("--seed", type=int, default=0, help="seed of the data stream and initialisation")
    p.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (results reproduce at a fixed count)"
    )
    p.add_argument("--base-steps", type=int, default=TrainConfig.base_steps, help="stage-1 steps")
    p.add_argument("--ft-steps", type=int, default=TrainConfig.ft_steps, help="stage-2 steps")
    p.add_argument("--replay", type=float, default=TrainConfig.replay, help="stage-2 replay fraction")
    p.add_argument("--hidden-size", type=int, default=TrainConfig.hidden_size, help="model width")
    p.add_argument("--num-layers", type=int, default=TrainConfig.num_layers, help="decoder blocks")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="examples per step")
    p.add_argument(
        "--fp32", action="store_true", help="train in float32 (for CPUs without bfloat16 instructions)"
    )
    p.add_argument(
        "--eval-n", type=int, default=100, help="held-out examples per category to score (0: skip)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Train the pair as the parsed flags of `add_arguments` say; print each model's time and accuracy."""
    config = TrainConfig(
        base_steps=args.base_steps,
        ft_steps=args.ft_steps,
        replay=args.replay,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        batch_size=args.batch_size,
        bf16=not args.fp32,
    )
    with quiet_hf_progress(args.no_progress):  # --no-progress: transformers' shard-writing bars too
        infos = train_pair(args.out, args.seed, args.threads, not args.no_progress, config, args.eval_n)
    for name, info in infos.items():
        print(name, f"{info['train_seconds']} s", json.dumps(info.get("eval", {}).get("accuracy", {})))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m latent_merge_nnsight.zoo.train --out DIR [--seed S] [--threads T]``."""
    p = argparse.ArgumentParser(
        prog="lmn zoo train",
        description="Train the toy base/reasoner pair from a seed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
