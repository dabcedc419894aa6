"""The OpenAI-compatible server, end to end: a real ``python -m neox_jax.serve`` process
on a free loopback port, driven by the official ``openai`` client and raw HTTP.

One tiny random model and one server process for the module. Greedy outputs are
compared with ``Generator.generate`` in this process (exact tokens: see
test_serving_engine.py for why no tolerance is needed on this model).
"""

import concurrent.futures
import http.client
import json
import signal
import time
import types

import pytest
import torch
import transformers
from helpers.hf_reference import make_hf_model, train_byte_level_bpe
from helpers.serving import Server

from neox_jax.convert import load_hf
from neox_jax.data.tokenizer import load_tokenizer
from neox_jax.finetune.chat import encode_chat
from neox_jax.inference import Generator, SamplingParams

openai = pytest.importorskip("openai")

SLOTS, MAX_LEN, QUEUE = 2, 64, 4
FLAGS = [
    f"--config.num_slots={SLOTS}", f"--config.max_len={MAX_LEN}",
    f"--config.max_queue={QUEUE}", "--config.prefill_buckets=(16,)",
    "--config.shutdown_timeout=20",
]  # fmt: skip
TEXTS = ["the model reads tokens and predicts what comes next", "hello world, hello model"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("served")
    tok = train_byte_level_bpe(path, TEXTS * 20, 120, {"eos_token": "<|endoftext|>"})
    make_hf_model(path, vocab_size=tok.vocab_size, max_position_embeddings=96)
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("log") / "server.log", FLAGS)
    yield s
    if s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused")


@pytest.fixture(scope="module")
def generator(model_dir):
    config, params = load_hf(model_dir)
    return Generator(config, params, load_tokenizer(model_dir), max_cache_len=MAX_LEN)


def test_startup_progress_and_models(server, client):
    log = server.log.read_text()
    # buckets 16 and 64, alone and in batches of 2 (the slots), 4 steps
    assert "compiling prefill bucket 16" in log and "compiled 8 programs in" in log
    (card,) = client.models.list().data
    assert card.id == server.name and card.owned_by == "neox_jax"


def test_completion_equals_generator_and_usage(server, client, generator):
    prompt = "the model reads"
    r = client.completions.create(
        model=server.name, prompt=prompt, max_tokens=12, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    ref = generator.generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "length"
    n_prompt = len(ref.prompt_token_ids)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 12)
    assert r.usage.total_tokens == n_prompt + 12
    # Token ids as the prompt, a batch of two prompts, n=2 choices each.
    ids = ref.prompt_token_ids
    r = client.completions.create(
        model=server.name, prompt=[ids, ids[:3]], max_tokens=5, n=2, temperature=0.8, seed=4
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    # each prompt counted once, however many choices (OpenAI's and vLLM's usage)
    assert r.usage.prompt_tokens == len(ids) + 3 and r.usage.completion_tokens <= 20
    assert r.choices[0].text != r.choices[1].text  # two choices draw independently


def test_stream_equals_non_stream(server, client):
    kw = dict(model=server.name, prompt="hello world", max_tokens=10, temperature=0.7, seed=11)
    whole = client.completions.create(**kw).choices[0]
    chunks = list(
        client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    assert chunks[-1].usage.completion_tokens == 10 or whole.finish_reason == "stop"


def test_chat_stream_and_stop(server, client, generator):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    kw = dict(model=server.name, messages=messages, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw)
    ids = encode_chat(messages, generator.tokenizer)
    ref = generator.generate([ids], SamplingParams(max_new_tokens=12))[0]
    assert whole.choices[0].message.content == ref.text
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    if len(ref.text) > 3:  # a stop string cuts the text before it
        stop = ref.text[2:4]
        cut = client.chat.completions.create(**kw, stop=[stop]).choices[0]
        assert cut.message.content == ref.text[: ref.text.index(stop)]
        assert cut.finish_reason == "stop"


def test_chat_with_tools_on_the_real_engine(server, client, generator):
    """The served default template has no tool format: tools are refused with a 400 that
    says how to serve them, tool_choice "none" serves the plain chat, and a tool_choice
    the server cannot honour is refused (parsing is tested in test_serving_tools.py)."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    kw = dict(model=server.name, messages=[{"role": "user", "content": "hello"}], max_tokens=6,
              temperature=0)  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="no tool-call format"):
        client.chat.completions.create(**kw, tools=[tool])
    plain = client.chat.completions.create(**kw).choices[0]
    none = client.chat.completions.create(**kw, tools=[tool], tool_choice="none").choices[0]
    assert none.message.content == plain.message.content and not none.message.tool_calls
    assert none.finish_reason == plain.finish_reason
    named = {"type": "function", "function": {"name": "f"}}  # forced, but in no format
    with pytest.raises(openai.BadRequestError, match="no tool-call format"):
        client.chat.completions.create(**kw, tools=[tool], tool_choice=named)


def test_presence_and_frequency_penalties_equal_generator(server, client, generator):
    """The openai client's presence_penalty / frequency_penalty: greedy, the same tokens
    as ``Generator.generate`` with those SamplingParams (for completions and chat)."""
    kw = dict(presence_penalty=1.5, frequency_penalty=-0.5)
    want = generator.generate(["hello"], SamplingParams(max_new_tokens=12, ignore_eos=True, **kw))
    got = client.completions.create(
        model=server.name, prompt="hello", max_tokens=12, temperature=0,
        extra_body={"ignore_eos": True}, **kw,
    )  # fmt: skip
    assert got.choices[0].text == want[0].text
    plain = generator.generate(["hello"], SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert plain[0].text != want[0].text  # the penalties did something
    messages = [{"role": "user", "content": "hi"}]
    ids = encode_chat(messages, generator.tokenizer)
    want = generator.generate([ids], SamplingParams(max_new_tokens=8, frequency_penalty=2.0))
    chat = client.chat.completions.create(
        model=server.name, messages=messages, max_tokens=8, temperature=0, frequency_penalty=2
    )
    assert chat.choices[0].message.content == want[0].text


def test_logprobs_and_echo(server, client):
    r = client.completions.create(
        model=server.name, prompt="hello model", max_tokens=4, temperature=0, logprobs=2,
        echo=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    c = r.choices[0]
    lp = c.logprobs
    n_prompt = r.usage.prompt_tokens
    assert c.text.startswith("hello model")
    assert len(lp.tokens) == len(lp.token_logprobs) == n_prompt + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, n_prompt + 4):
        # The 2 likeliest and, always, the chosen token (OpenAI: up to logprobs + 1).
        assert lp.token_logprobs[i] <= 0 and len(lp.top_logprobs[i]) <= 3
        assert lp.top_logprobs[i][lp.tokens[i]] == lp.token_logprobs[i]
        # greedy: each generated token is the most likely one. (Alternatives are keyed by
        # their text, so two tokens that decode alike, e.g. partial UTF-8, share a key.)
        if i >= n_prompt:
            assert lp.token_logprobs[i] >= max(lp.top_logprobs[i].values()) - 1e-6
    # logprobs=0: no alternatives, but the chosen tokens' logprobs, the same as above.
    zero = client.completions.create(
        model=server.name, prompt="hello model", max_tokens=4, temperature=0, logprobs=0,
        echo=True, extra_body={"ignore_eos": True},
    ).choices[0].logprobs  # fmt: skip
    assert zero.tokens == lp.tokens and zero.token_logprobs[0] is None
    for i in range(1, n_prompt + 4):  # the same program scores both: equal to round-off
        assert zero.token_logprobs[i] == pytest.approx(lp.token_logprobs[i], rel=1e-5)
        assert zero.top_logprobs[i] == {zero.tokens[i]: zero.token_logprobs[i]}
    chat = client.chat.completions.create(
        model=server.name, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True},
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)


BAD = [
    ({"model": "other", "prompt": "x"}, 404, "does not exist"),
    ({"model": "{m}", "prompt": "x" * 80}, 400, f"limit is {MAX_LEN}"),
    ({"model": "{m}", "prompt": "x", "max_tokens": 0}, 400, "at least 1"),
    ({"model": "{m}", "prompt": "x", "max_tokens": 500}, 400, f"limit of {MAX_LEN}"),
    ({"model": "{m}", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "{m}", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": "{m}", "prompt": "x", "n": 99}, 400, "n must be"),
    ({"model": "{m}", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "{m}", "prompt": ""}, 400, "empty"),
    ({"model": "{m}", "prompt": []}, 400, "empty"),
    ({"model": "{m}"}, 400, "prompt"),
    ({"model": "{m}", "prompt": "x", "logprobs": 9}, 400, "logprobs"),
    ({"model": "{m}", "prompt": [10**6]}, 400, "outside the vocabulary"),
    # only scored (echo, max_tokens 0), still checked as a generation would be
    ({"model": "{m}", "prompt": [10**6], "echo": True, "max_tokens": 0}, 400, "vocabulary"),
    ({"model": "{m}", "prompt": "x", "stop": [str(i) for i in range(33)]}, 400, "stop"),
    # fields that would change the output and are not implemented: refused, not ignored
    ({"model": "{m}", "prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ({"model": "{m}", "prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty must"),
    ({"model": "{m}", "prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty must"),
    ({"model": "{m}", "prompt": "x", "stream_options": {}}, 400, "only allowed when stream"),
    ({"model": "{m}", "prompt": "x", "response_format": {"type": "json_object"}}, 400, "format"),
    ({"model": "{m}", "prompt": "x", "max_tokens": 4, "min_tokens": 2}, 400, "ignore_eos"),
]


def _bad(server, body):
    return json.loads(json.dumps(body).replace("{m}", server.name))


@pytest.mark.parametrize("body,status,fragment", BAD)
def test_bad_requests_get_openai_errors(server, body, status, fragment):
    code, reply = server.post("/v1/completions", _bad(server, body))
    assert code == status, reply
    assert fragment in reply["error"]["message"]
    assert reply["error"]["type"] == "invalid_request_error"


def test_malformed_json_chat_errors_and_oversized_call(server):
    code, reply = server.post("/v1/completions", raw=b'{"model": ')
    assert code == 400 and "not valid JSON" in reply["error"]["message"]
    code, reply = server.post("/v1/chat/completions", {"model": server.name, "messages": []})
    assert code == 400 and "messages" in reply["error"]["message"]
    bad_role = {"model": server.name, "messages": [{"role": "wizard", "content": "x"}]}
    assert server.post("/v1/chat/completions", bad_role)[0] == 400
    # More sequences than the queue could ever hold (prompts x n): a 400 saying what to
    # send instead, not a 429 that a client would retry in vain.
    code, reply = server.post(
        "/v1/completions", {"model": server.name, "prompt": ["x", "y"], "n": 3}
    )
    assert code == 400 and f"queues at most {QUEUE}" in reply["error"]["message"]


def test_lm_eval_loglikelihood_requests(server, client, model_dir):
    """lm-eval's local-completions scoring continuations: its own request body (a batch
    of token-id prompts, echo, logprobs=1, max_tokens=1) and its own parser, against
    transformers' log-probabilities of the same tokens; then the prompt alone
    (max_tokens=0 with echo, as OpenAI's legacy API and vLLM serve it) via the client."""
    lm_api = pytest.importorskip("lm_eval.models.openai_completions").LocalCompletionsAPI
    tok = load_tokenizer(model_dir)
    pairs = [("hello world,", " hello model"), ("the model reads", " tokens and predicts")]
    ctxs, conts = [tok.encode(c) for c, _ in pairs], [tok.encode(x) for _, x in pairs]
    prompts = [c + x for c, x in zip(ctxs, conts, strict=True)]
    lm = types.SimpleNamespace(model=server.name)  # all _create_payload reads of its model
    code, out = server.post("/v1/completions", lm_api._create_payload(lm, prompts))
    assert code == 200, out
    got = lm_api.parse_logprobs(out, prompts, [len(c) for c in ctxs])
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(model_dir).eval()
    for (ll, greedy), c, ids in zip(got, ctxs, prompts, strict=True):
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
        cont = torch.tensor(ids[len(c) :])
        want = lp[len(c) - 1 : len(ids) - 1]
        # fp32 on both sides: per-token round-off ~1e-5, summed over < 12 tokens
        assert ll == pytest.approx(want.gather(-1, cont[:, None]).sum().item(), abs=1e-3)
        assert greedy == bool((want.argmax(-1) == cont).all())
    bare = client.completions.create(
        model=server.name, prompt=prompts, max_tokens=0, echo=True, logprobs=1
    )
    assert bare.usage.completion_tokens == 0
    assert bare.usage.prompt_tokens == sum(map(len, prompts))
    for choice, scored, ids in zip(bare.choices, out["choices"], prompts, strict=True):
        assert choice.text == tok.decode(ids) and choice.finish_reason == "length"
        # the same scoring program as above: equal, not close
        assert choice.logprobs.token_logprobs == scored["logprobs"]["token_logprobs"][:-1]


def test_lm_eval_remote_tokenizer(server, model_dir):
    """lm-eval's local-completions tokenizes through the server by default when it has
    vLLM's /tokenizer_info, /tokenize and /detokenize: lm-eval's own client against the
    served tokenizer and chat template."""
    from neox_jax.finetune.chat import ChatTemplate

    lm_utils = pytest.importorskip("lm_eval.utils")
    url = f"http://127.0.0.1:{server.port}/v1/completions"
    assert lm_utils.check_remote_tokenizer_support(url)
    remote, tok = lm_utils.RemoteTokenizer(url), load_tokenizer(model_dir)
    text = "hello world, hello model"
    assert remote.encode(text) == tok.encode(text) and remote.decode(tok.encode(text)) == text
    assert remote.eos_token_id == tok.eos_id
    chat = [{"role": "user", "content": "hi"}]
    assert remote.apply_chat_template(chat) == ChatTemplate.for_tokenizer(tok).render(chat, True)
    code, reply = server.post("/detokenize", {"tokens": [10**6]})
    assert code == 400 and "outside the tokenizer's vocabulary" in reply["error"]["message"]


def test_lm_eval_generation_with_many_stop_strings(server, model_dir):
    """lm-eval's local-completions sends a task's whole ``until`` list and the eos text as
    ``stop`` (OpenAI takes 4, vLLM any number): a fifth stop string still cuts."""
    lm_api = pytest.importorskip("lm_eval.models.openai_completions").LocalCompletionsAPI
    lm = types.SimpleNamespace(model=server.name, _max_gen_toks=16)

    def generate(until):
        body = lm_api._create_payload(
            lm, ["hello world"], generate=True, gen_kwargs={"until": until}, eos="<|endoftext|>"
        )
        code, out = server.post("/v1/completions", body)
        assert code == 200, out
        return lm_api.parse_generations(out)[0]

    whole = generate([])
    until = ["\n\nQuestion:", "Q:", "</s>", "<|im_end|>"]
    assert not any(s in whole for s in until)
    piece = next(ch for ch in whole[3:] if ch.isascii())  # a character the model wrote
    assert generate([*until, piece]) == whole[: whole.index(piece)]


def test_chat_content_parts_roles_and_limits(server, client):
    """Content as a list of text parts (the openai client's typed form, vLLM's benchmark)
    is the parts joined by newlines; "developer" is the system role; image parts,
    max_completion_tokens=0 and an assistant prefill are refused; usage counts the prompt
    once for n choices."""
    kw = dict(model=server.name, max_tokens=6, temperature=0)
    plain = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi\nyou"}]
    text = [{"type": "text", "text": "hi"}, {"type": "text", "text": "you"}]
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": text},
    ]
    want = client.chat.completions.create(messages=plain, **kw)
    got = client.chat.completions.create(messages=parts, n=2, **kw)
    assert got.usage.prompt_tokens == want.usage.prompt_tokens
    assert [c.message.content for c in got.choices] == [want.choices[0].message.content] * 2
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    with pytest.raises(openai.BadRequestError, match="text only"):
        client.chat.completions.create(messages=[{"role": "user", "content": [image]}], **kw)
    r = client.chat.completions.create(
        messages=plain, max_completion_tokens=3, extra_body={"ignore_eos": True}, **kw
    )
    assert r.usage.completion_tokens == 3  # max_completion_tokens wins over max_tokens
    with pytest.raises(openai.BadRequestError, match="at least 1"):
        client.chat.completions.create(messages=plain, max_completion_tokens=0, **kw)
    # vLLM's assistant prefill would continue the last message: not served, so refused
    with pytest.raises(openai.BadRequestError, match="continue_final_message"):
        client.chat.completions.create(
            messages=plain, extra_body={"continue_final_message": True}, **kw
        )


def test_streamed_logprobs_offsets_and_ids(server, client):
    """A stream's chunks share one id and creation time, and their ``text_offset``s run
    on from the echoed prompt as in the whole response (not from 0 in each chunk)."""
    kw = dict(model=server.name, prompt="hello model", max_tokens=6, temperature=0, echo=True,
              logprobs=1, extra_body={"ignore_eos": True})  # fmt: skip
    whole = client.completions.create(**kw).choices[0].logprobs
    chunks = list(client.completions.create(**kw, stream=True))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    streamed = [c.choices[0].logprobs for c in chunks if c.choices]
    assert [t for lp in streamed for t in lp.tokens] == whole.tokens
    assert [o for lp in streamed for o in lp.text_offset] == whole.text_offset
    assert whole.text_offset[-1] > len("hello model")


def test_routes_methods_and_body_errors(server, client):
    """OpenAI's error JSON for what no handler serves: an unknown route (404), a wrong
    method (405 with Allow), a body that is not sent as JSON, an empty body; a model card
    by id (the client's models.retrieve); neutral values of unserved fields accepted."""
    assert client.models.retrieve(server.name).id == server.name
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("other")
    code, text = server.request("POST", "/v1/nothing", {})
    error = json.loads(text)["error"]
    assert code == 404 and "Invalid URL (POST /v1/nothing)" in error["message"]
    assert error["type"] == "invalid_request_error"
    code, text = server.get("/v1/completions")
    error = json.loads(text)["error"]
    assert code == 405 and {k.lower(): v for k, v in server.last_headers.items()}["allow"] == "POST"
    assert error["type"] == "invalid_request_error" and "takes POST" in error["message"]
    body = {"model": server.name, "prompt": "x", "max_tokens": 1}
    form = {"Content-Type": "application/x-www-form-urlencoded"}  # curl -d without -H
    code, text = server.request(
        "POST", "/v1/completions", raw=json.dumps(body).encode(), headers=form
    )
    assert code == 400 and "Content-Type: application/json" in json.loads(text)["error"]["message"]
    code, reply = server.post("/v1/completions", raw=b"")
    assert code == 400 and "body is empty" in reply["error"]["message"]
    neutral = {"logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0, "best_of": 1,
               "response_format": {"type": "text"}, "user": "u", "suffix": None}  # fmt: skip
    code, reply = server.post("/v1/completions", {**body, **neutral})
    assert code == 200, reply
    del body["model"]  # vLLM serves its model to a request that names none
    code, reply = server.post("/v1/completions", body)
    assert code == 200 and reply["model"] == server.name, reply


def test_many_mixed_requests_leave_every_slot_free(server):
    """~200 requests, a third bad, four at a time; streams dropped half-way too."""
    good = {"model": server.name, "prompt": "hello", "max_tokens": 6, "temperature": 0.5}

    def one(i):
        if i % 3 == 0:
            body = _bad(server, BAD[i % len(BAD)][0])
            return server.post("/v1/completions", body)[0]
        if i % 10 == 1:  # read the first event of a stream, then hang up
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            body = dict(good, stream=True, max_tokens=40)
            headers = {"Content-Type": "application/json"}
            conn.request("POST", "/v1/completions", json.dumps(body), headers)
            resp = conn.getresponse()
            resp.readline()
            conn.close()
            return resp.status
        return server.post("/v1/completions", dict(good, seed=i))[0]

    with concurrent.futures.ThreadPoolExecutor(QUEUE) as pool:
        codes = list(pool.map(one, range(200)))
    assert set(codes) <= {200, 400, 404, 429}
    assert codes.count(200) > 100
    deadline = time.monotonic() + 30  # dropped streams are noticed within the poll
    while time.monotonic() < deadline:
        health = json.loads(server.get("/health")[1])
        if health["free_slots"] == SLOTS and health["queue"] == 0:
            break
        time.sleep(0.2)
    assert health == {"status": "ok", "free_slots": SLOTS, "queue": 0}
    metrics = server.get("/metrics")[1]
    assert "neox_jax_active_slots 0.0" in metrics and "neox_jax_queue_length 0.0" in metrics
    for name in ("time_to_first_token_seconds_count", "time_per_output_token_seconds_count"):
        assert f"neox_jax_{name}" in metrics
    assert "neox_jax_tokens_per_second" in metrics


def test_sigterm_finishes_in_flight_and_exits_0(server):
    """Runs last: stops the module's server. A stream in flight at SIGTERM completes."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"model": server.name, "prompt": "hi", "max_tokens": 40, "ignore_eos": True}
    body["stream"] = True
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = resp.readline()
    assert first.startswith(b"data: {")
    server.proc.send_signal(signal.SIGTERM)
    events = [first] + [line for line in resp.read().splitlines() if line.startswith(b"data:")]
    conn.close()
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(60) == 0


@pytest.mark.parametrize(
    "flag,fragment",
    [
        ("--config.num_slots=0", "num_slots must be an integer >= 1"),
        ("--config.max_queue=-1", "max_queue must be an integer >= 0"),
        ("--config.page_size=0", "page_size must be an integer >= 1"),
        ("--config.max_call_seconds=-1.0", "max_call_seconds must be a number >= 0"),
        ("--config.prefill_buckets=(1,)", "prefill_buckets"),
        ("--config.port=70000", "port must be in"),
        ("--config.paged_attention=pallas", "paged_attention must be one of"),
        ("--config.nslots=2", "did you mean --config.num_slots"),
    ],
)
def test_cli_rejects_bad_config_before_loading(model_dir, capsys, flag, fragment):
    from neox_jax.serve import COMMAND

    assert COMMAND(["neox_jax.serve", f"--config.checkpoint={model_dir}", flag]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neox_jax.serve: error:") and fragment in err
