"""`latent-merge` in lm-evaluation-harness: lm-eval's own `hf` model is the reference.

Local tasks (`dataset_path: json` with `data_files` written into tmp_path; no network): a multiple-choice
task (loglikelihood), a perplexity task (loglikelihood_rolling) and a `generate_until` task. The toy base
alone through `latent-merge` must give `hf`'s per-choice loglikelihoods (1e-4), its rolling
loglikelihoods and its generations; under a merge, the loglikelihoods lm-eval reports are `lmn.score`'s
of the pairs lm-eval tokenized and differ from the base's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported by lm-eval
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval_tasks import generate_until_body, write_task  # noqa: E402

import latent_merge_nnsight as lmn  # noqa: E402
from latent_merge_nnsight.errors import LatentMergeError  # noqa: E402
from latent_merge_nnsight.evaluation.lm_eval_model import LatentMergeLM, parse_model_args  # noqa: E402
from latent_merge_nnsight.zoo import zoo_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ROOT / "examples" / "systems"

MC = [
    {"question": "2 + 2", "choices": ["4", "5", "22"], "label": 0},
    {"question": "the sky is", "choices": ["blue", "green"], "label": 0},
    {"question": "a b c", "choices": ["d", "e f", "z"], "label": 0},
    {"question": "Say yes", "choices": ["yes", "no"], "label": 0},
    {"question": "1, 2, 3,", "choices": [" 4", " 5"], "label": 0},
]
TEXTS = [
    {"text": "The quick brown fox jumps over the lazy dog. " * 3},
    {"text": "Merging models in latent space, token by token."},
]
GEN = [
    {"question": "What is 3 + 4?", "answer": "7"},
    {"question": "Name a colour.", "answer": "red"},
    {"question": "Count: 1 2 3", "answer": "4"},
]


def write_tasks(root: Path) -> Path:
    write_task(root, "toy_mc", MC, "multiple_choice")
    write_task(root, "toy_ppl", TEXTS, "loglikelihood_rolling")
    write_task(root, "toy_gen", GEN, "generate_until", generate_until_body("{{answer}}", "\\n"))
    return root


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def run(model, model_args, tasks: Path, names=("toy_mc", "toy_ppl", "toy_gen"), batch_size=4):
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=list(names),
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        batch_size=batch_size,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


def responses(results, task):
    """Per document, its raw responses (per choice: (loglikelihood, greedy); or the text / the total)."""
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def hf_reference(tasks):
    return run("hf", f"pretrained={zoo_path('toy-base')},device=cpu,dtype=float32", tasks)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_the_base_alone_gives_lm_evals_own_hf_numbers_and_generations(tasks, hf_reference, batch_size):
    ours = run("latent-merge", f"system={SYSTEMS / 'toy-base.yaml'}", tasks, batch_size=batch_size)
    for doc_ours, doc_ref in zip(responses(ours, "toy_mc"), responses(hf_reference, "toy_mc"), strict=True):
        assert len(doc_ours) == len(doc_ref)
        for (ll, greedy), (ll_ref, greedy_ref) in zip(
            (r[0] for r in doc_ours), (r[0] for r in doc_ref), strict=True
        ):
            assert ll == pytest.approx(ll_ref, abs=1e-4)
            assert greedy == greedy_ref
    rolling = [r[0][0] for r in responses(ours, "toy_ppl")]
    assert rolling == pytest.approx([r[0][0] for r in responses(hf_reference, "toy_ppl")], abs=1e-3)
    texts = responses(ours, "toy_gen")
    assert texts == responses(hf_reference, "toy_gen")
    assert any(t[0][0] for t in texts)  # something was generated
    assert ours["results"]["toy_mc"]["acc,none"] == hf_reference["results"]["toy_mc"]["acc,none"]


def test_a_merged_system_scores_what_lmn_score_gives_on_lm_evals_pairs(tasks, hf_reference):
    spec = SYSTEMS / "toy-latent-slerp.yaml"
    lm = LatentMergeLM(system=str(spec), batch_size=3)
    ours = run(lm, None, tasks, names=("toy_mc",))
    system = lm.system
    for doc, row in zip(responses(ours, "toy_mc"), MC, strict=True):
        for choice, resp in zip(row["choices"], doc, strict=True):
            ctx, cont = lm._encode_pair(f"Q: {row['question']}\nA:", " " + choice)
            want = system.score([ctx], [cont])
            # float32: the batch's padding and its shared context's forward round differently (~1e-6)
            assert resp[0][0] == pytest.approx(want.totals[0], abs=2e-5)
            assert resp[0][1] == want.all_greedy[0]
    ref = [r[0][0] for doc in responses(hf_reference, "toy_mc") for r in doc]
    got = [r[0][0] for doc in responses(ours, "toy_mc") for r in doc]
    assert max(abs(a - b) for a, b in zip(got, ref, strict=True)) > 1e-3  # the merge is applied


def test_model_args_take_a_base_sources_and_a_recipe_file(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("op: regmean\nlayers: [2]\nalpha: 0.5\n")
    args = parse_model_args(
        f"base=toy-base,source=toy-reasoner,source=toy-reasoner,recipe={recipe},dtype=float32"
    )
    assert args["source"] == ["toy-reasoner", "toy-reasoner"]
    lm = LatentMergeLM.create_from_arg_string(
        f"base=toy-base,source=toy-reasoner,source=toy-reasoner,recipe={recipe},dtype=float32",
        {"batch_size": 2},
    )
    assert lm.system.config.kind == "latent" and len(lm.system.sources) == 2
    got = lm._loglikelihood_tokens([(None, [5, 6, 7], [8, 9])])
    want = lmn.score(lm.system.base, lm.system.sources, [[5, 6, 7]], [[8, 9]], lm.system.config.recipe)
    assert got == [(pytest.approx(want.totals[0], abs=1e-9), want.all_greedy[0])]


def test_chat_template_hooks_use_the_tokenizer(tasks):
    lm = LatentMergeLM(system=str(SYSTEMS / "toy-base.yaml"))
    chat = [{"role": "user", "content": "hi"}]
    assert lm.apply_chat_template(chat) == lm.tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    assert lm.chat_template(True) == lm.tokenizer.chat_template
    assert lm.tokenizer_name


@pytest.mark.parametrize(
    "args, match",
    [
        ("system=a.yaml,base=toy-base", "not both"),
        ("base=toy-base,source=toy-reasoner", "needs recipe"),
        ("dtype=float32", "expected system=PATH"),
        ("system=x.yaml,system=y.yaml", "twice"),
        ("base=toy-base,engine=warp", "engine='warp'"),
        ("base=toy-base,colour=red", "unknown"),
    ],
)
def test_bad_model_args_are_named(args, match):
    with pytest.raises(LatentMergeError, match=match):
        LatentMergeLM.create_from_arg_string(args)


# ------------------------------------------------------------------------------------------- lmn eval


def lmn_eval(*args: str, cwd: Path = ROOT, prelude: str = "") -> subprocess.CompletedProcess:
    code = (
        prelude
        + "import sys; from latent_merge_nnsight.cli import main; raise SystemExit(main(sys.argv[1:]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "eval", *args], capture_output=True, text=True, cwd=cwd, timeout=900
    )


def test_lmn_eval_writes_lm_evals_results_with_the_tasks_metrics(tmp_path):
    out = tmp_path / "out"
    proc = lmn_eval(
        str(SYSTEMS / "toy-latent-slerp.yaml"), "--tasks", "toy_qa_mc,toy_qa_gen", "--limit", "4",
        "--include-path", str(ROOT / "examples" / "lm_eval_tasks"), "--batch-size", "4",
        "--output-path", str(out), "--log-samples", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    [results_file] = list(out.glob("toy-latent-slerp/results_*.json"))
    results = json.loads(results_file.read_text())
    assert 0.0 <= results["results"]["toy_qa_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["results"]["toy_qa_gen"]["exact_match,answer"] <= 1.0
    assert results["n-samples"]["toy_qa_mc"]["effective"] == 4
    samples = [
        json.loads(line) for f in out.glob("toy-latent-slerp/samples_toy_qa_mc_*.jsonl") for line in f.open()
    ]
    assert len(samples) == 4 and all(len(s["resps"]) == 3 for s in samples)  # three choices each
    assert "toy_qa_mc" in proc.stdout and "acc" in proc.stdout  # lm-eval's table


@pytest.mark.parametrize(
    "args, prelude, match",
    [
        (["--tasks", "no_such_task"], "", "lmn eval: error: --tasks: unknown task(s) ['no_such_task']"),
        (
            ["--tasks", "toy_qa_mc"],
            "__import__('sys').modules['lm_eval'] = None; ",
            "lmn eval: error: lm-eval is not installed; install the extra: "
            "pip install 'latent_merge_nnsight[lmeval]'",
        ),
        (["--tasks", ","], "", "lmn eval: error: --tasks ',' names no task"),
        (["--tasks", "toy_qa_mc", "--log-samples"], "", "lmn eval: error: --log-samples needs --output-path"),
    ],
)
def test_lmn_eval_errors_are_one_line_naming_the_flag(args, prelude, match):
    proc = lmn_eval(str(SYSTEMS / "toy-base.yaml"), *args, prelude=prelude)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(match), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
