"""`vllm serve` of a toy system exported with `lmn export vllm`, answering the `openai` SDK on 127.0.0.1:
per-request alphas through `extra_body`, streaming included, checked against `engine="fast"`; the server
runs the compiled model (no --enforce-eager) and refuses a request its export cannot run."""

import json

import openai
import pytest
from serve_helpers import NEW, fast_text, question_messages, served


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with served(tmp_path_factory.mktemp("serve")) as (port, _, _):
        yield openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300
        )


@pytest.fixture(scope="module")
def question():
    return question_messages()


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
