"""`vllm serve --api-server-count 2`: each API server process checks a per-request recipe against the export.

Requests go on connections held open together, so vLLM's least-loaded accept spreads them over both API
servers; which process answered each is read from the process that holds the connection's socket. Every
recipe the export cannot run is a 400 naming the problem on both servers, good alphas give `engine="fast"`'s
text on both, and the worker never has to fall back to the export's recipe."""

import http.client
import json

import psutil
import pytest
from serve_helpers import NEW, fast_text, question_messages, served

FALLBACK = "request runs the export's recipe"  # the worker's warning (requests.RequestTable.update)
MAX_CONNECTIONS = 6  # held open at once, until both API servers have answered


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with served(tmp_path_factory.mktemp("servers"), "--api-server-count", "2") as (port, proc, log):
        servers = {
            p.pid for p in psutil.Process(proc.pid).children(recursive=True) if "APIServer" in p.name()
        }
        assert len(servers) == 2, f"expected two API server processes, found {servers}"
        yield port, servers, log


@pytest.fixture(scope="module")
def question():
    return question_messages()


def answering(conn: http.client.HTTPConnection, servers: set[int]) -> int:
    """The API server process that holds the other end of `conn`."""
    port = conn.sock.getsockname()[1]
    holders = [
        pid
        for pid in servers
        if any(c.raddr and c.raddr.port == port for c in psutil.Process(pid).net_connections("tcp"))
    ]
    assert len(holders) == 1, f"connection from port {port} held by {holders}"
    return holders[0]


def post(conn: http.client.HTTPConnection, question, recipe: dict | None) -> tuple[int, dict]:
    body = {
        "model": "toy-merge",
        "messages": question,
        "max_tokens": NEW,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    if recipe is not None:  # as the OpenAI SDK sends extra_body={"vllm_xargs": {...}}
        body["vllm_xargs"] = {"latent_merge": json.dumps(recipe)}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    return reply.status, json.loads(reply.read())


def on_both_servers(server, question, recipe: dict | None) -> list[tuple[int, int, dict]]:
    """`recipe` sent on fresh connections, each held open, until both API servers have answered:
    (answering pid, HTTP status, reply) for each."""
    port, servers, _ = server
    conns, answers = [], []
    try:
        while {pid for pid, _, _ in answers} != servers and len(conns) < MAX_CONNECTIONS:
            conns.append(http.client.HTTPConnection("127.0.0.1", port, timeout=300))
            status, reply = post(conns[-1], question, recipe)
            answers.append((answering(conns[-1], servers), status, reply))
    finally:
        for conn in conns:
            conn.close()
    assert {pid for pid, _, _ in answers} == servers, f"not both API servers answered: {answers}"
    return answers


@pytest.mark.parametrize(
    "recipe, says",
    [({"layers": {"5": 0.5}}, "latent_merge.layers [5] are not exported; this export merges layers [2, 3]"),
     ({"alpha": 1.5}, "latent_merge.layers[2]=1.5 is outside [0, 1] for op 'lerp'"),
     ({"alpha": 0.5, "op": "delta"}, "latent_merge.op='delta' cannot run on this live-source export"),
     ({"alpha": "x"}, "latent_merge.alpha='x' must be a finite number")],
)  # fmt: skip
def test_every_api_server_refuses_what_the_export_cannot_run(server, question, recipe, says):
    for pid, status, reply in on_both_servers(server, question, recipe):
        assert status == 400, (pid, reply)
        assert says in reply["error"]["message"], (pid, reply)


def test_every_api_server_runs_the_asked_alphas(server, question):
    texts = {}
    for alpha in (0.0, 0.9, None):
        want = fast_text(question, 0.5 if alpha is None else alpha)  # None: the export's own alpha
        recipe = None if alpha is None else {"alpha": alpha}
        for pid, status, reply in on_both_servers(server, question, recipe):
            assert status == 200, (pid, reply)
            assert reply["choices"][0]["message"]["content"] == want, (pid, alpha)
        texts[alpha] = want
    assert len(set(texts.values())) == 3, "alphas 0, 0.9 and 0.5 gave the same text: the check would be weak"


def test_the_worker_never_fell_back_to_the_exports_recipe(server, question):
    refused = on_both_servers(server, question, {"layers": {"7": 0.2}})  # refused at the front door
    assert {status for _, status, _ in refused} == {400}
    _, _, log = server
    assert FALLBACK not in log.read_text()
