"""What real clients send to the OpenAI-compatible server, field by field: the official
``openai`` client (every field of its ``chat.completions.create`` and
``completions.create``) and lm-eval's ``local-chat-completions``.

The app is the real one (``create_app``) driven through FastAPI's ``TestClient``, which
the ``openai`` client takes as its HTTP client; ``ScriptedEngine`` (test_serving_tools.py)
stands in for the engine and records what each request asked of it. The rule checked:
a field that cannot change the output (``user``, ``metadata``, ``store``, ...) is
accepted and changes nothing the engine gets; one that would and is not served gets a
400 naming it; back-pressure answers say when to retry, and the client waits that long.
"""

import time

import pytest
from fastapi.testclient import TestClient
from helpers.tool_templates import write_printable_tokenizer
from test_serving_tools import ScriptedEngine

from neox_jax.data.tokenizer import load_tokenizer
from neox_jax.serving.api import create_app
from neox_jax.serving.requests import EngineStopped, QueueFull

openai = pytest.importorskip("openai")
CHAT = [{"role": "user", "content": "hi"}]


class _Recording(ScriptedEngine):
    """Records each call's requests; ``fail``: exceptions to raise on the next calls."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.calls, self.fail = [], []

    def submit_many(self, requests):
        if self.fail:
            raise self.fail.pop(0)
        self.calls.append([(r.prompt_ids, r.sampling, r.num_logprobs) for r in requests])
        self.replies = ["ok"] * len(requests)
        super().submit_many(requests)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tok = load_tokenizer(write_printable_tokenizer(tmp_path_factory.mktemp("tok")))
    engine = _Recording(tok)
    with TestClient(create_app(engine, model_name="m")) as http:
        client = openai.OpenAI(
            base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0
        )
        yield engine, http, client


def _same_as_plain(engine, create, **fields):
    """The engine gets the same prompt and sampling with ``fields`` as without (the
    seed fixed: unset, each request draws its own)."""
    create(seed=3)
    create(seed=3, **fields)
    assert engine.calls[-1] == engine.calls[-2]


def test_fields_that_cannot_change_the_output_are_accepted(served):
    engine, _, client = served
    chat = lambda **kw: client.chat.completions.create(model="m", messages=CHAT, **kw)  # noqa: E731
    _same_as_plain(
        engine, chat, user="u", metadata={"k": "v"}, store=False, service_tier="auto",
        parallel_tool_calls=False, prompt_cache_key="c", safety_identifier="s",
        prediction={"type": "content", "content": "ok"}, modalities=["text"],
        max_completion_tokens=None, logprobs=False,
    )  # fmt: skip
    legacy = lambda **kw: client.completions.create(model="m", prompt="hi", **kw)  # noqa: E731
    _same_as_plain(engine, legacy, user="u", best_of=1, suffix="", echo=False)
    assert chat(n=2, seed=1).choices[1].message.content == "ok"
    assert [len(c) for c in engine.calls[-1:]] == [2]  # n choices: n sequences


@pytest.mark.parametrize(
    "endpoint,fields,param",
    [
        ("chat", dict(functions=[{"name": "f", "parameters": {}}]), "functions"),
        ("chat", dict(function_call={"name": "f"}), "function_call"),
        ("chat", dict(modalities=["text", "audio"]), "modalities"),
        ("chat", dict(audio={"voice": "alloy", "format": "wav"}), "audio"),
        ("chat", dict(web_search_options={}), "web_search_options"),
        ("chat", dict(logit_bias={"5": 10}), "logit_bias"),
        ("chat", dict(top_logprobs=2), "top_logprobs"),  # without logprobs=true
        ("chat", dict(presence_penalty=2.5), "presence_penalty"),
        ("chat", dict(stream_options={"include_usage": True}), "stream_options"),
        ("completions", dict(best_of=3), "best_of"),
        ("completions", dict(suffix="end"), "suffix"),
        ("completions", dict(frequency_penalty=-2.1), "frequency_penalty"),
        ("completions", dict(stream_options={"include_usage": True}), "stream_options"),
    ],
)
def test_fields_that_would_change_it_are_refused_by_name(served, endpoint, fields, param):
    engine, _, client = served
    before = len(engine.calls)
    with pytest.raises(openai.BadRequestError) as e:
        if endpoint == "chat":
            client.chat.completions.create(model="m", messages=CHAT, **fields)
        else:
            client.completions.create(model="m", prompt="hi", **fields)
    assert e.value.body["param"] == param and param in e.value.body["message"]
    assert len(engine.calls) == before  # refused before anything was queued


def test_back_pressure_says_when_to_retry_and_the_client_waits(served):
    engine, http, client = served
    engine.fail = [QueueFull("4 requests are waiting (the limit); retry later.")]
    reply = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
    assert reply.status_code == 429 and reply.headers["retry-after"] == "1"
    engine.fail = [EngineStopped("the server is shutting down.")]
    reply = http.post("/v1/chat/completions", json={"messages": CHAT})
    assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
    assert "retry-after" not in http.post("/v1/completions", json={"prompt": ""}).headers
    # The openai client retries a 429 after Retry-After seconds (its own backoff would
    # wait ~0.5 s for a first retry), and then gets the answer.
    engine.fail = [QueueFull("full; retry later.")]
    start = time.monotonic()
    out = client.with_options(max_retries=1).completions.create(model="m", prompt="hi")
    assert out.choices[0].text == "ok" and time.monotonic() - start >= 1.0


def test_lm_eval_local_chat_completions_payload(served):
    """lm-eval's own request body for a generation task (``until`` as stop strings, its
    fixed seed, greedy) and its own parser of the reply."""
    lm_api = pytest.importorskip("lm_eval.models.openai_completions")
    engine, http, _ = served
    lm = type("LM", (), {"model": "m", "_max_gen_toks": 7, "think_end_token": None})()
    body = lm_api.LocalChatCompletion._create_payload(
        lm, CHAT, generate=True, gen_kwargs={"until": ["\n\n", "Q:"], "do_sample": False},
        eos="<|endoftext|>",
    )  # fmt: skip
    reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    assert lm_api.LocalChatCompletion.parse_generations(lm, reply.json()) == ["ok"]
    ((_, sampling, _),) = engine.calls[-1]
    assert sampling.stop_strings == ("\n\n", "Q:", "<|endoftext|>")
    assert (sampling.temperature, sampling.seed, sampling.max_new_tokens) == (0.0, 1234, 7)
