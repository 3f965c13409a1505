"""`lmn serve`: an OpenAI-compatible HTTP server for any system, latent-merged ones included.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (``stream`` true or false,
``logprobs`` for the chosen tokens; completions take raw text, never chat-templated, or token ids, one
prompt or a list, and with ``echo`` score the prompt itself: `systems.echo`), ``GET /v1/models``,
``GET /v1/models/{id}``, vLLM's ``GET /tokenizer_info``, ``POST /tokenize`` and ``POST /detokenize``,
and ``GET /health``. A parameter the server does not implement is a 400 naming it, never ignored.
Any OpenAI client or evaluation harness can query it::

    url, stop = start_server("examples/systems/toy-latent-slerp.yaml")   # or run_serve(...) to block
    client = openai.OpenAI(base_url=url, api_key="unused")
    client.chat.completions.create(model="toy-latent-slerp", messages=[{"role": "user", "content": "hi"}])

Requests that arrive together are batched: a `Batcher` collects them for a few milliseconds (up to
``max_batch_size``) and runs one `generate` call in the system's single generation thread; prompts are
tokenised off the event loop. A request may carry its own recipe as `vllm serve` takes it (``latent_merge``
in ``vllm_xargs`` or the body: ``{"alpha": a}``, ``{"layers": {L: a}}``, ``"op"``; `request_recipe`),
checked against the system's recipe; requests with different recipes share a batch, a row each.
Every bad request gets an OpenAI-style error body
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status and ``param`` naming the field:
malformed JSON, an unknown model, integers out of range (``max_tokens``, ``seed``, ``top_k``), a
prompt over ``max_prompt_tokens``, ``max_tokens`` above ``max_tokens_limit`` or above what the model's
context leaves after the prompt, a body over ``max_body_bytes`` (413). A failed generation is a 500 (in
a stream: an error event, then ``data: [DONE]`` and a clean close); the server keeps serving either way.
As in OpenAI's API, a stop sequence that ended the reply is left out of it. Streaming sends the answer
token by token as OpenAI chunk events, as the generation loop chooses them (its step hook), holding back
text that could still become a stop string; a client that hangs up frees its row at the next step.
What cannot stream so is a 400 naming the parameter, never one chunk at the end: ``stream`` with
``logprobs`` or ``echo``, or on a ``backend: vllm`` system (`checks`).
With ``api_key`` (``--api-key`` or ``LMN_API_KEY``) every ``/v1`` request needs ``Authorization: Bearer
<key>`` (401 otherwise, compared in constant time); without one the server binds 127.0.0.1 unless told
otherwise, and warns on any other address (IPv4 or IPv6).
"""

from latent_merge_nnsight.serve.app import create_app as create_app
from latent_merge_nnsight.serve.run import run_serve as run_serve
from latent_merge_nnsight.serve.run import start_server as start_server
from latent_merge_nnsight.systems.batching import Batcher as Batcher
from latent_merge_nnsight.systems.batching import BatchStats as BatchStats
from latent_merge_nnsight.systems.batching import SystemCompleteFn as SystemCompleteFn

__all__ = ["BatchStats", "Batcher", "SystemCompleteFn", "create_app", "run_serve", "start_server"]
