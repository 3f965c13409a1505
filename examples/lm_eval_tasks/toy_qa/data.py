"""The toy tasks' documents: `toy_qa.jsonl` next to this file (so the tasks run from any folder, offline).

32 held-out problems of the toy pair (16 math, 16 reasoning word problems) from
`latent_merge_nnsight.evaluation.tasks.make_eval_set(category, 16, seed=0)`, each with its answer and two
wrong choices near it (for the multiple-choice task).
"""

from pathlib import Path

import datasets

HERE = Path(__file__).parent


def load(**_: object) -> datasets.DatasetDict:
    """lm-eval's `custom_dataset` hook (it passes the task's metadata, unused here)."""
    return datasets.load_dataset("json", data_files={"test": str(HERE / "toy_qa.jsonl")})
