"""The shipped toy model pair: a small "instruct" base and a "reasoning" fine-tune of it.

Both are `Qwen2ForCausalLM` checkpoints (transformers' own Qwen2 code, like the real models) with a
character-level chat tokenizer, trained on the synthetic tasks of
`latent_merge_nnsight.evaluation.tasks` by `latent_merge_nnsight.zoo.train`. They mimic the paper's
pair (Qwen2.5-7B-Instruct and OpenThinker3-7B): the fine-tune gained a reasoning skill and partly lost
others. See zoo/README.md for sizes and accuracies.
"""

import pathlib
from dataclasses import dataclass

from latent_merge_nnsight.errors import LatentMergeError

ZOO_DIR = pathlib.Path(__file__).resolve().parent


@dataclass(frozen=True)
class ZooModel:
    """A shipped checkpoint: its folder name, what it is, and the zoo model it was fine-tuned from."""

    name: str
    description: str
    base: str | None = None


ZOO: dict[str, ZooModel] = {
    "toy-base": ZooModel(
        "toy-base",
        "Tiny Qwen2 'instruct' model: knows the fact table, arithmetic and string tasks; weak at reasoning.",
    ),
    "toy-reasoner": ZooModel(
        "toy-reasoner",
        "toy-base fine-tuned on scratchpad reasoning: strong at reasoning, partly forgot other skills.",
        base="toy-base",
    ),
}


def zoo_path(name: str) -> pathlib.Path:
    """The folder of the shipped checkpoint `name` (loadable with `from_pretrained`)."""
    if name not in ZOO:
        raise LatentMergeError(
            f"name={name!r} is not a zoo model; expected one of: {', '.join(sorted(ZOO))}",
            param="name",
            value=name,
        )
    return ZOO_DIR / name


__all__ = ["ZOO", "ZOO_DIR", "ZooModel", "zoo_path"]
