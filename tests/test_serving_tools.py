"""Tool calling through ``/v1/chat/completions``, driven by the official ``openai`` client.

What is end to end and what is not: the HTTP server (``create_app`` under uvicorn on a
loopback port), request validation, rendering the tools and past calls into the prompt
with a Qwen- or Mistral-style template, parsing the reply, and the client's reading of
``tool_calls`` are all the real code. The model is not: a tiny random model never writes
a tool call, so ``ScriptedEngine`` stands in for the engine and "generates" a given
reply (token by token, through the tokenizer) while recording the prompt ids it got.
``test_real_engine_generates_from_the_prompt_with_tools`` is fully end to end with a
tiny random model (it writes prose, not calls, so its reply comes back as content). The
served default template is exercised in test_serving_api.py (tool_choice "none" and the
refusal of tools by a template without a tool format).
"""

import copy
import json
import socket
import threading
import time

import pytest
from helpers.tool_templates import CONVERSATION, MISTRAL, QWEN, TOOLS, write_printable_tokenizer

from neox_jax.data.tokenizer import load_tokenizer
from neox_jax.finetune.chat import encode_chat
from neox_jax.serving.api import create_app
from neox_jax.serving.requests import Event

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")


class ScriptedEngine:
    """The engine interface the API uses; each request "generates" the next reply."""

    max_len, max_logprobs, prompt_logprobs = 4096, 5, False
    accepting, free_slots, queue_length = True, 1, 0

    def __init__(self, tokenizer):
        self.tokenizer, self.running = tokenizer, False
        self.replies: list[str] = []
        self.prompts: list[list[int]] = []

    def start(self):
        self.running = True

    def stop(self, timeout=None):
        self.running = False

    def submit_many(self, requests):
        for r in requests:
            self.prompts.append(list(r.prompt_ids))
            for i in self.tokenizer.encode(self.replies.pop(0)):
                r.sink(Event([i], self.tokenizer.decode([i]), []))
            r.sink(Event([], "", [], done=True, finish_reason="stop"))


class _Served:
    def __init__(self, engine, template):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        app = create_app(engine, model_name="m", chat_template=template)
        self.server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
        )

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_printable_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module", params=["qwen", "mistral"])
def served(request, tok):
    engine, template = ScriptedEngine(tok), {"qwen": QWEN, "mistral": MISTRAL}[request.param]
    s = _Served(engine, template)
    s.engine, s.family, s.template = engine, request.param, template
    yield s
    s.close()


def _call_text(family, args='{"city": "Paris"}'):
    if family == "qwen":
        return f'<tool_call>\n{{"name": "get_weather", "arguments": {args}}}\n</tool_call>'
    return f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {args}, "id": "abcDEF123"}}]'


def test_tools_are_rendered_and_calls_returned(served, tok):
    question = CONVERSATION[1:2]
    served.engine.replies = [_call_text(served.family)]
    out = served.client.chat.completions.create(
        model="m", messages=question, tools=TOOLS, tool_choice="auto"
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # The engine was given the conversation with the tools rendered by the template.
    assert served.engine.prompts[-1] == encode_chat(question, tok, served.template, tools=TOOLS)
    assert "get_time" in tok.decode(served.engine.prompts[-1])

    # The client sends the call back in OpenAI's form with the tool's result: the prompt
    # is the template's rendering of the same turns in transformers' form.
    served.engine.replies = ["It is 18 C."]
    result = {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 18}'}
    follow = [*question, choice.message.model_dump(exclude_none=True), result]
    out = served.client.chat.completions.create(model="m", messages=follow, tools=TOOLS)
    assert out.choices[0].message.content == "It is 18 C."
    assert out.choices[0].finish_reason == "stop"
    # (The client sends "arguments" before "name"; the template gets them in the order
    # the families write them, which Mistral's tojson of the function keeps.)
    hf_form = copy.deepcopy(follow)
    fn = {"name": "get_weather", "arguments": {"city": "Paris"}}
    hf_form[1] = {
        "role": "assistant",
        "tool_calls": [{"id": call.id, "type": "function", "function": fn}],
    }
    assert served.engine.prompts[-1] == encode_chat(hf_form, tok, served.template, tools=TOOLS)


def test_streamed_call_arrives_as_one_delta(served):
    served.engine.replies = ["Checking. " + _call_text(served.family)]
    chunks = list(
        served.client.chat.completions.create(
            model="m", messages=CONVERSATION[1:2], tools=TOOLS, stream=True
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert content == "Checking. "  # no marker text leaks into the prose
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
        (0, "get_weather", {"city": "Paris"})
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_and_malformed_calls(served, tok):
    served.engine.replies = [_call_text(served.family)]
    out = served.client.chat.completions.create(
        model="m", messages=CONVERSATION[1:2], tools=TOOLS, tool_choice="none"
    )  # not rendered, not parsed: the text comes back as it is
    assert out.choices[0].message.content == _call_text(served.family)
    assert not out.choices[0].message.tool_calls
    assert served.engine.prompts[-1] == encode_chat(CONVERSATION[1:2], tok, served.template)

    served.engine.replies = [_call_text(served.family, args='{"city": ')]
    with pytest.raises(openai.UnprocessableEntityError, match="not valid JSON") as e:
        served.client.chat.completions.create(model="m", messages=CONVERSATION[1:2], tools=TOOLS)
    assert e.value.body["code"] == "invalid_tool_call"
    served.engine.replies = [_call_text(served.family, args='{"city": ')]
    stream = served.client.chat.completions.create(
        model="m", messages=CONVERSATION[1:2], tools=TOOLS, stream=True
    )
    with pytest.raises(openai.APIError, match="could not be parsed"):
        list(stream)


def test_parallel_tool_calls_false_returns_the_first_call(served):
    """A reply with two calls: both by default; with ``parallel_tool_calls=False`` only
    the first (vLLM's rule), plain and streamed."""
    if served.family == "qwen":
        two = _call_text("qwen") + "\n" + _call_text("qwen", '{"city": "Oslo"}')
    else:
        two = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, ' \
              '{"name": "get_weather", "arguments": {"city": "Oslo"}}]'  # fmt: skip
    kw = dict(model="m", messages=CONVERSATION[1:2], tools=TOOLS)

    def cities(calls):
        return [json.loads(c.function.arguments)["city"] for c in calls]

    served.engine.replies = [two, two]
    assert cities(served.client.chat.completions.create(**kw).choices[0].message.tool_calls) == [
        "Paris", "Oslo"
    ]  # fmt: skip
    one = served.client.chat.completions.create(**kw, parallel_tool_calls=False).choices[0]
    assert cities(one.message.tool_calls) == ["Paris"] and one.finish_reason == "tool_calls"
    served.engine.replies = [two]
    chunks = list(served.client.chat.completions.create(**kw, parallel_tool_calls=False,
                                                        stream=True))  # fmt: skip
    assert cities(d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()) == [
        "Paris"
    ]  # fmt: skip


# The start of a call each family's template teaches (helpers/tool_templates.py), as
# OpenAI's forced tool_choice must make the model write it: "required" forces the marker,
# a named function the call up to its arguments.
_FORCED = {
    ("qwen", None): "<tool_call>\n",
    ("qwen", "get_time"): '<tool_call>\n{"name": "get_time", "arguments": ',
    ("mistral", None): "[TOOL_CALLS] [",
    ("mistral", "get_time"): '[TOOL_CALLS] [{"name": "get_time", "arguments": ',
}
_NAMED = {"type": "function", "function": {"name": "get_time"}}


def test_tool_choice_required_and_named_force_a_call(served, tok):
    """The forced prefix follows the prompt; the model's continuation completes the
    call, which comes back parsed (plain and streamed); a reply that does not complete
    a call (of the named function) is a 422, never prose."""
    question = CONVERSATION[1:2]
    rendered = encode_chat(question, tok, served.template, tools=TOOLS)
    whole = _call_text(served.family)  # a call of get_weather
    prefix = _FORCED[served.family, None]
    served.engine.replies = [whole[len(prefix) :]]
    out = served.client.chat.completions.create(
        model="m", messages=question, tools=TOOLS, tool_choice="required"
    )
    assert served.engine.prompts[-1] == rendered + tok.encode(prefix)
    (call,) = out.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather", {"city": "Paris"}
    )  # fmt: skip
    assert out.choices[0].finish_reason == "tool_calls"

    rest = '{"tz": "UTC"}}' + ("\n</tool_call>" if served.family == "qwen" else "]")
    for stream in (False, True):
        served.engine.replies = [rest]
        out = served.client.chat.completions.create(
            model="m", messages=question, tools=TOOLS, tool_choice=_NAMED, stream=stream
        )
        assert served.engine.prompts[-1] == rendered + tok.encode(
            _FORCED[served.family, "get_time"]
        )
        if stream:
            chunks = list(out)
            calls = [
                d.function for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()
            ]
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
        else:
            calls = [c.function for c in out.choices[0].message.tool_calls]
        assert [(f.name, json.loads(f.arguments)) for f in calls] == [("get_time", {"tz": "UTC"})]

    # The model does not finish the call (the generation stopped in it): 422, also when
    # streamed; a named choice whose reply goes on to call another function: 422.
    served.engine.replies = ["I cannot"]
    with pytest.raises(openai.UnprocessableEntityError) as e:
        served.client.chat.completions.create(
            model="m", messages=question, tools=TOOLS, tool_choice="required"
        )
    assert e.value.body["code"] == "invalid_tool_call"
    served.engine.replies = ["I cannot"]
    stream = served.client.chat.completions.create(
        model="m", messages=question, tools=TOOLS, tool_choice=_NAMED, stream=True
    )
    with pytest.raises(openai.APIError, match="could not be parsed"):
        list(stream)
    if served.family == "qwen":
        served.engine.replies = [rest + "\n" + _call_text("qwen")]
        with pytest.raises(openai.UnprocessableEntityError, match="names 'get_time' but"):
            served.client.chat.completions.create(
                model="m", messages=question, tools=TOOLS, tool_choice=_NAMED
            )

    # Requests that cannot be served: 400 before anything is generated.
    bad_choices = [
        ({"type": "function", "function": {"name": "get_news"}}, "not among the tools"),
        ({"type": "function"}, "a named choice must read"),
        ("sometimes", "is not one of"),
    ]
    for choice, match in bad_choices:
        with pytest.raises(openai.BadRequestError, match=match):
            served.client.chat.completions.create(
                model="m", messages=question, tools=TOOLS, tool_choice=choice
            )
    with pytest.raises(openai.BadRequestError, match="needs tools"):
        served.client.chat.completions.create(model="m", messages=question, tool_choice="required")


def test_real_engine_generates_from_the_prompt_with_tools(tmp_path):
    """A real ``Engine`` on a tiny random model with a 1024-position context (the Qwen
    tools prompt is 969 tokens): greedy content equals ``Generator.generate`` on the
    prompt with the tools rendered (exact tokens, as in test_serving_api.py), and the
    usage counts that prompt. Eight characters cannot spell a call marker."""
    from helpers.hf_reference import make_hf_model

    from neox_jax.convert import load_hf
    from neox_jax.inference import Generator, SamplingParams
    from neox_jax.serving.engine import Engine

    tok = load_tokenizer(write_printable_tokenizer(tmp_path))
    make_hf_model(tmp_path, vocab_size=tok.vocab_size, max_position_embeddings=1024)
    config, params = load_hf(tmp_path)
    question = CONVERSATION[1:2]
    ids = encode_chat(question, tok, QWEN, tools=TOOLS)
    want = Generator(config, params, tok, max_cache_len=1024).generate(
        [ids], SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    )[0]
    engine = Engine(config, params, tok, num_slots=1, max_len=1024, prefill_buckets=(1024,))
    served = _Served(engine, QWEN)
    try:
        out = served.client.chat.completions.create(
            model="m", messages=question, tools=TOOLS, max_tokens=8, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
    finally:
        served.close()
    assert out.usage.prompt_tokens == len(ids)
    assert out.choices[0].message.content == want.text and not out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "length"
