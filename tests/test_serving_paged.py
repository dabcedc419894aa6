"""The engine with a paged KV cache (``Engine(kv_cache="paged")``).

Reference: ``Generator.generate`` on each request alone, exact tokens. The paged decode
step gathers each slot's pages into the same ``[1, max_len, ...]`` row the contiguous
engine keeps and runs the same block on it, so the numbers are those of
test_serving_engine.py (why no tolerance is needed on this random O(1)-logit model is
explained there). The pool is made smaller than ``num_slots x max_len`` so that requests
wait for pages while slots are free: admission by pages, not slots, is exercised.
"""

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest
from helpers.serving import serving_model

from neox_jax.errors import UserError
from neox_jax.inference import Generator, SamplingParams
from neox_jax.serving import Collector, Engine, QueueFull, Request

TEXTS = ["the model reads tokens and predicts what comes next", "hello paged world"]
MAX_LEN, PAGE, PAGES, SLOTS, QUEUE = 64, 8, 18, 4, 6  # 144 pooled tokens < 4 x 64
# The paged kernel compiled (Triton) on a GPU, as experiments/gpu_check.sh runs this file;
# the Pallas interpreter elsewhere (its Mosaic lowering for TPU is not written).
KERNEL_MODE = "kernel" if jax.default_backend() == "gpu" else "interpret"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return serving_model(tmp_path_factory.mktemp("paged_model"), TEXTS)


@pytest.fixture(scope="module")
def engine(model):
    config, params, tok = model
    eng = Engine(
        config, params, tok, num_slots=SLOTS, max_len=MAX_LEN, prefill_buckets=(8, 16),
        max_queue=QUEUE, prefill_chunk=16, prefix_cache_blocks=4, kv_cache="paged",
        page_size=PAGE, num_pages=PAGES,
    )  # fmt: skip
    eng.warmup(progress=lambda line: None)
    return eng


def _prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(2, vocab, n)] for n in lengths]


def _assert_no_leak(engine):
    pool = engine.pages
    assert engine.free_slots == engine.num_slots and engine.queue_length == 0
    assert not any(pool.owned)
    assert sorted(pool._free) == list(range(1, PAGES + 1))  # each page once, scratch never


def test_paged_greedy_requests_equal_generator_alone(model, engine):
    """Short prompts (bucketed prefill), long ones (chunked, two sharing a 32-token
    prefix: the second copies the first's blocks from the prefix cache) and mixed
    max_tokens; more pages wanted than the pool has, so some wait with slots free."""
    config, params, tok = model
    prompts = _prompts(config.vocab_size, (1, 5, 30, 9, 17, 40, 12, 2))
    prompts.append(prompts[5][:32] + prompts[6][:4])  # shares 2 blocks with prompts[5]
    max_new = (20, 3, 11, 24, 6, 15, 9, 13, 10)
    samplings = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in max_new]
    collectors = [Collector() for _ in prompts]
    pending = [Request(p, s, c) for p, s, c in zip(prompts, samplings, collectors, strict=True)]
    waited_for_pages = False
    while pending or engine.queue_length or engine.free_slots < engine.num_slots:
        while pending and engine.queue_length < QUEUE:
            engine.submit(pending.pop(0))
        engine.step()
        waited_for_pages |= engine.queue_length > 0 and engine.free_slots > 0
        used = PAGES - engine.pages.free_pages
        assert used == sum(map(len, engine.pages.owned)) <= PAGES
    assert waited_for_pages
    assert engine.prefix_cache is not None and len(engine.prefix_cache) > 0
    gen = Generator(config, params, tok, max_cache_len=MAX_LEN)
    for p, s, c in zip(prompts, samplings, collectors, strict=True):
        ids, text, reason = c.result(timeout=0)
        ref = gen.generate([p], s)[0]
        assert ids == ref.token_ids
        assert text == ref.text
        assert reason == "length" == ref.finish_reason
    _assert_no_leak(engine)


def test_paged_kernel_in_the_engine_gives_the_gather_paths_tokens(model):
    """``paged_attention=KERNEL_MODE``: the decode step runs the Pallas paged kernel (in the
    interpreter on CPU, compiled on a GPU) instead of gathering pages into rows. Greedy
    tokens equal ``Generator.generate`` alone, as the gather path's do (the kernel's online
    softmax reorders fp32 sums, ~1e-7 relative: no argmax of this random O(1)-logit model is
    that close). The pool is small enough that a request waits for pages, and a chunked
    prompt and a short one decode side by side."""
    config, params, tok = model
    eng = Engine(
        config, params, tok, num_slots=3, max_len=MAX_LEN, prefill_buckets=(8, 16),
        max_queue=QUEUE, prefill_chunk=16, kv_cache="paged", page_size=PAGE, num_pages=10,
        paged_attention=KERNEL_MODE,
    )  # fmt: skip
    prompts = _prompts(config.vocab_size, (3, 30, 11, 6), seed=1)
    samplings = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in (9, 5, 7, 4)]
    got = eng.generate(prompts, samplings)
    gen = Generator(config, params, tok, max_cache_len=MAX_LEN)
    for p, s, (ids, _, reason) in zip(prompts, samplings, got, strict=True):
        assert ids == gen.generate([p], s)[0].token_ids and reason == "length"
    assert eng.free_slots == 3 and eng.pages.free_pages == 10
    with pytest.raises(UserError, match='needs kv_cache="paged"'):
        Engine(config, params, tok, num_slots=2, max_len=MAX_LEN, paged_attention="kernel")
    with pytest.raises(UserError, match="paged_attention must be one of"):
        Engine(
            config, params, tok, num_slots=2, max_len=MAX_LEN, kv_cache="paged",
            page_size=PAGE, num_pages=PAGES, paged_attention="pallas",
        )  # fmt: skip


def test_no_page_leaks_after_mixed_cancelled_and_bad_requests(model, engine):
    config, _, _ = model
    rng = np.random.default_rng(1)
    vocab = config.vocab_size
    accepted, refused, bad = [], 0, 0
    for i in range(40):
        n = int(rng.integers(1, 40))
        m = int(rng.integers(1, MAX_LEN - n + 1))
        prompt = [int(t) for t in rng.integers(2, vocab, n)]
        kind = i % 5
        if kind == 3:  # a bad request: too long, empty, or outside the vocabulary
            broken = [(prompt, SamplingParams(max_new_tokens=MAX_LEN)), ([], None)]
            broken.append(([vocab], None))
            ids, p = broken[i % 3]
            with pytest.raises(UserError):
                engine.submit(Request(ids, p or SamplingParams(max_new_tokens=2), Collector()))
            bad += 1
            continue
        r = Request(prompt, SamplingParams(max_new_tokens=m, ignore_eos=True), Collector())
        try:
            engine.submit(r)
            accepted.append(r)
        except QueueFull:
            refused += 1
        if kind == 4:  # cancel this one and an older one, running or waiting
            r.cancel()
            accepted[int(rng.integers(0, len(accepted)))].cancel()
        engine.step()
    while engine.queue_length or engine.free_slots < engine.num_slots:
        engine.step()
    assert bad == 8 and refused > 0
    reasons = [r.sink.result(timeout=0)[2] for r in accepted]
    assert "cancelled" in reasons and "length" in reasons
    assert set(reasons) <= {"cancelled", "length"}
    _assert_no_leak(engine)


def test_paged_config_errors(model):
    config, params, tok = model
    small = Engine(
        config, params, tok, num_slots=2, max_len=MAX_LEN, kv_cache="paged", page_size=PAGE,
        num_pages=3,
    )  # fmt: skip
    with pytest.raises(UserError, match="need 4 KV-cache pages of 8 tokens; this server has 3"):
        small.submit(Request([3] * 20, SamplingParams(max_new_tokens=10), Collector()))
    with pytest.raises(UserError, match="page_size >= 1 dividing max_len=64"):
        Engine(config, params, tok, max_len=MAX_LEN, kv_cache="paged", page_size=7, num_pages=9)
    with pytest.raises(UserError, match='kv_cache must be "slots" or "paged"'):
        Engine(config, params, tok, max_len=MAX_LEN, kv_cache="pages")


def test_out_of_pages_is_429_over_http_not_a_crash(model, engine):
    """Runs last (stops the module's engine). More concurrent requests than pages and
    queue hold: the surplus gets OpenAI-style 429 JSON and a Retry-After header, the rest
    complete, no page leaks."""
    uvicorn = pytest.importorskip("uvicorn")
    from neox_jax.serving.api import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(engine, model_name="m")
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)

    def post(i):
        body = {"model": "m", "prompt": [5 + i] * 30, "max_tokens": 30, "temperature": 0}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read()), reply.getheader("Retry-After")

    try:
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(post, range(16)))
    finally:
        server.should_exit = True
        thread.join(60)
    codes = [c for c, _, _ in replies]
    assert set(codes) == {200, 429}, codes
    for code, body, retry_after in replies:
        if code == 429:  # with the wait in whole seconds that the openai client honours
            assert "retry later" in body["error"]["message"] and retry_after == "1"
        else:
            assert retry_after is None
            assert body["usage"]["completion_tokens"] == 30
    _assert_no_leak(engine)
