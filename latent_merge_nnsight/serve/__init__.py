"""`lmn serve`: an OpenAI-compatible HTTP server for any system, latent-merged ones included.

Routes: ``POST /v1/chat/completions`` (``stream`` true or false), ``GET /v1/models``,
``GET /v1/models/{id}`` and ``GET /health``. Any OpenAI client or evaluation harness can query it::

    url, stop = start_server("examples/systems/toy-latent-slerp.yaml")   # or run_serve(...) to block
    client = openai.OpenAI(base_url=url, api_key="unused")
    client.chat.completions.create(model="toy-latent-slerp", messages=[{"role": "user", "content": "hi"}])

Requests that arrive together are batched: a `Batcher` collects them for a few milliseconds (up to
``max_batch_size``) and runs one `generate` call in the system's single generation thread. Bad
requests (malformed JSON, an unknown model, a prompt over ``max_prompt_tokens``, ``n > 1``, a negative
``max_tokens``, a negative temperature, wrong types) get OpenAI-style error bodies
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status, and a failed generation a 500;
the server keeps serving either way. As in OpenAI's API, a stop sequence that ended the reply is left
out of it. Streaming sends the finished answer as OpenAI ``chat.completion.chunk`` events (the role,
the text, the finish reason, optional usage) and then ``data: [DONE]``: generation is batched, not
token by token. There is no authentication, so the server binds 127.0.0.1 unless told otherwise.
"""

from latent_merge_nnsight.serve.app import create_app as create_app
from latent_merge_nnsight.serve.app import run_serve as run_serve
from latent_merge_nnsight.serve.app import start_server as start_server
from latent_merge_nnsight.serve.batching import Batcher as Batcher
from latent_merge_nnsight.serve.batching import BatchStats as BatchStats
from latent_merge_nnsight.serve.batching import SystemCompleteFn as SystemCompleteFn

__all__ = ["BatchStats", "Batcher", "SystemCompleteFn", "create_app", "run_serve", "start_server"]
