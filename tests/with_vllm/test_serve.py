"""`vllm serve` of a toy system exported with `lmn export vllm`, answering the `openai` SDK on 127.0.0.1:
per-request alphas through `extra_body`, streaming included, checked against `engine="fast"`; the server
runs the compiled model (no --enforce-eager) and refuses a request its export cannot run."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import openai
import pytest
import yaml
from vllm_helpers import vllm_env

import latent_merge_nnsight as lmn
from latent_merge_nnsight.evaluation.tasks import chat_messages, make_eval_set

NEW = 12
LAYERS = [2, 3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, url: str, log, timeout: float = 420) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read()[-6000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail("vllm serve did not come up")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    system = tmp / "system.yaml"
    system.write_text(yaml.safe_dump({
        "name": "toy-merge", "kind": "latent", "base": "toy-base", "sources": ["toy-reasoner"],
        "recipe": {"op": "lerp", "layers": LAYERS, "alpha": 0.5}, "dtype": "float32",
    }))  # fmt: skip
    export = tmp / "export"
    env = vllm_env()
    done = subprocess.run(
        [sys.executable, "-m", "latent_merge_nnsight.cli", "export", "vllm", str(system), str(export)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    port = free_port()
    log = open(tmp / "serve.log", "w+")  # noqa: SIM115 - closed by the fixture's teardown
    cmd = [
        sys.executable, "-m", "latent_merge_nnsight.vllm_engine.cli", "serve", str(export),
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "toy-merge", "--dtype", "float32",
        "--max-model-len", "256", "--block-size", "32", "--gpu-memory-utilization", "0.05",
        "--kv-cache-memory-bytes", str(256 * 2**20),
    ]  # fmt: skip
    env["VLLM_CPU_CI_ENV"] = "1"  # compiled (no --enforce-eager), with dynamo's "eager" backend
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_up(proc, f"http://127.0.0.1:{port}/health", log)
        yield openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300
        )
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def question():
    return chat_messages(make_eval_set("reasoning", 1, seed=11)[0].prompt)


def fast_text(question, alpha: float) -> str:
    base = lmn.load("toy-base", dtype="float32")
    ft = lmn.load("toy-reasoner", dtype="float32")
    recipe = lmn.Recipe(op="lerp", layers=dict.fromkeys(LAYERS, alpha))
    return lmn.generate(
        base, ft, [question], recipe, engine="fast", max_new_tokens=NEW, ignore_eos=True
    ).texts[0]


def body(alpha: float | None) -> dict:
    extra = {"ignore_eos": True}
    if alpha is not None:
        extra["vllm_xargs"] = {"latent_merge": json.dumps({"alpha": alpha})}
    return extra


def ask(client, question, alpha, stream=False):
    reply = client.chat.completions.create(
        model="toy-merge",
        messages=question,
        max_tokens=NEW,
        temperature=0.0,
        stream=stream,
        extra_body=body(alpha),
    )
    if not stream:
        return reply.choices[0].message.content
    return "".join(chunk.choices[0].delta.content or "" for chunk in reply if chunk.choices)


def test_served_merge_answers_the_openai_sdk_with_per_request_alphas(server, question):
    assert [m.id for m in server.models.list().data] == ["toy-merge"]
    texts = {a: ask(server, question, a) for a in (0.0, 0.9)}
    assert texts[0.0] == fast_text(question, 0.0)
    assert texts[0.9] == fast_text(question, 0.9)
    assert texts[0.0] != texts[0.9], "alpha 0 and 0.9 gave one answer: the check would be weak"
    assert ask(server, question, None) == fast_text(question, 0.5)  # the export's own recipe


def test_streaming_gives_the_same_text(server, question):
    assert ask(server, question, 0.9, stream=True) == ask(server, question, 0.9)


def test_a_bad_per_request_alpha_is_a_400(server, question):
    with pytest.raises(openai.BadRequestError, match="latent_merge"):
        server.chat.completions.create(
            model="toy-merge", messages=question, max_tokens=2,
            extra_body={"vllm_xargs": {"latent_merge": json.dumps({"alpha": "x"})}},
        )  # fmt: skip


@pytest.mark.parametrize(
    "recipe, says",
    [({"layers": {"5": 0.5}}, "not exported"), ({"alpha": 1.5}, "latent_merge.layers"),
     ({"alpha": 0.5, "op": "delta"}, "cannot run on this live-source export")],
)  # fmt: skip
def test_a_request_the_export_cannot_run_is_a_400(server, question, recipe, says):
    with pytest.raises(openai.BadRequestError, match=says):
        server.chat.completions.create(
            model="toy-merge", messages=question, max_tokens=2,
            extra_body={"vllm_xargs": {"latent_merge": json.dumps(recipe)}},
        )  # fmt: skip
