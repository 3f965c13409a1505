"""Where the tests find JudgeBench's files: one setting, `$LMN_JUDGEBENCH_DATA`, defaulting to
``../shared/data/judgebench`` beside the repository (`lmn data judgebench DIR` fetches them)."""

import os
from pathlib import Path

DATA = Path(
    os.environ.get("LMN_JUDGEBENCH_DATA")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "judgebench"
)
GPT_FILE = DATA / "dataset=judgebench,response_model=gpt-4o-2024-05-13.jsonl"
CLAUDE_FILE = DATA / "dataset=judgebench,response_model=claude-3-5-sonnet-20240620.jsonl"
MISSING = (
    f"JudgeBench's files are not in {DATA}: fetch them with `lmn data judgebench DIR` and set "
    "LMN_JUDGEBENCH_DATA=DIR (default ../shared/data/judgebench beside the repository)"
)


def vanilla_copy() -> Path:
    """A local copy of JudgeBench's vanilla prompt: the fetched file, or the shared folder's quoting one."""
    fetched = DATA / "vanilla_prompt.jinja2"
    return fetched if fetched.is_file() else DATA / "PROMPTS.md"
