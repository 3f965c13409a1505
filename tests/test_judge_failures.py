"""A judge that cannot judge says so: a `lmn judge` run whose every request the endpoint refused (prompts
over a real `lmn serve`'s context) exits non-zero naming the cause with its numbers, and its summary has
null statistics; `lmn judgebench-accuracy --judge-system` refuses judge prompts over the judge's context
before judging, as `lmn respond` refuses questions, with the same --truncate choice."""

import json
import subprocess
from pathlib import Path

from serve_load import env, lmn, start_serve

from latent_merge_nnsight.evaluation.judge_summary import summarize

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = ROOT / "examples" / "systems" / "toy-latent-slerp.yaml"
LONG = " ".join(f"word{i}" for i in range(400))  # far over the toy pair's context of 256 tokens


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        lmn(*args), capture_output=True, text=True, timeout=timeout, env=env(OPENAI_API_KEY="x")
    )


def long_responses(tmp: Path, n: int) -> tuple[Path, Path]:
    paths = []
    for system in ("latent", "base"):
        rows = [
            {"pair_id": f"p{i}", "question": f"Question {i}?", "response": f"{system} {LONG}",
             "system": system, "category": "reasoning"}
            for i in range(n)
        ]  # fmt: skip
        path = tmp / f"{system}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]


def test_a_judge_run_with_every_judgment_failed_exits_non_zero_with_the_cause(tmp_path):
    a, b = long_responses(tmp_path, 2)
    with start_serve(SYSTEM) as (_, url):
        out = run(
            "judge",
            str(a),
            str(b),
            "--judge-model",
            "toy-latent-slerp",
            "--base-url",
            url,
            "--out",
            str(tmp_path / "o"),
        )
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("lmn judge: error: every judgment failed (4 of 4")
    assert "the prompt has" in line and "256" in line  # the server's own numbers: prompt vs context
    assert "--base-url" not in line and "api-key" not in line  # not the connection's fault
    written = json.loads((tmp_path / "o" / "summary.json").read_text())  # {label: [summary]}
    stats = written["latent vs base"][0]["results"]["overall"]
    assert stats["failed"] == 4 and stats["order_consistency"] is None
    assert stats["win_rate_no_ties"] is None and stats["win_rate_ties_half"] is None


def test_order_consistency_counts_no_failed_request_as_a_judgment():
    common = {"judge_model": "j", "template_id": "t", "category": "math", "system_a": "a", "system_b": "b"}

    def judgment(pair, order, verdict, error=None):
        return common | {"pair_id": pair, "order": order, "reply": "", "verdict_shown": verdict,
                         "verdict": verdict, "error": error}  # fmt: skip

    stats = summarize([
        judgment("p0", "AB", "A"), judgment("p0", "BA", "A"),  # agree
        judgment("p1", "AB", "A"), judgment("p1", "BA", None, error="400: too long"),  # no second judgment
    ])["results"]["overall"]  # fmt: skip
    assert stats["order_consistency"] == 1.0 and stats["failed"] == 1


def judgebench_rows(tmp: Path, text: str) -> Path:
    rows = [
        {"pair_id": f"jb{i}", "original_id": i, "source": "mmlu-pro-math", "question": f"Q{i}: {text}",
         "response_model": "m", "response_A": f"A {text}", "response_B": f"B {text}", "label": "A>B"}
        for i in range(2)
    ]  # fmt: skip
    path = tmp / "jb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_judge_system_refuses_prompts_over_its_context_as_respond_does(tmp_path):
    data = judgebench_rows(tmp_path, LONG)
    flags = ["--judge-system", str(SYSTEM), "--template", "pairwise_abc", "--data", str(data)]
    refused = run("judgebench-accuracy", *flags, "--out", str(tmp_path / "r.jsonl"))
    assert refused.returncode == 2, refused.stderr[-2000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith(
        "lmn judgebench-accuracy: error: 4 of 4 judge prompts do not fit the model's context"
    )
    assert "256 tokens" in line and "--truncate left" in line and "Traceback" not in refused.stderr
    assert not (tmp_path / "r.jsonl").exists()  # refused before any judging
    cut = run("judgebench-accuracy", *flags, "--out", str(tmp_path / "c.jsonl"), "--truncate", "left")
    assert cut.returncode == 0, cut.stderr[-2000:]
    assert "indexing errors" not in cut.stderr  # the package cuts; transformers' warning is not for it
    records = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(len(r["judgments"]) == 2 for r in records)
