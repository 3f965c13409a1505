"""Local lm-eval task YAMLs for the tests (offline: `dataset_path: json` over a JSONL file we write)."""

import json
from pathlib import Path

KINDS = {
    "multiple_choice": 'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_choice: "{{choices}}"\n'
    'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n',
    "loglikelihood_rolling": 'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
    "metric_list:\n  - metric: word_perplexity\n",
}


def write_task(root: Path, name: str, rows: list[dict], output_type: str, body: str | None = None) -> Path:
    """`root/NAME.yaml` (task NAME) over `root/NAME.jsonl` holding `rows`; `body` is the YAML after
    `output_type` (default: the usual one for multiple choice and rolling loglikelihood)."""
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = root / f"{name}.yaml"
    path.write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\noutput_type: {output_type}\n" + (KINDS[output_type] if body is None else body)
    )
    return path


def generate_until_body(target: str, until: str, max_gen_toks: int = 12) -> str:
    """A greedy `generate_until` task's YAML after `output_type`, scored by exact match."""
    return (
        f'doc_to_text: "Q: {{{{question}}}}\\nA:"\ndoc_to_target: "{target}"\n'
        f'generation_kwargs:\n  until: ["{until}"]\n  max_gen_toks: {max_gen_toks}\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
