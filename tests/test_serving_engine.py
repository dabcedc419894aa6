"""The continuous-batching engine (neox_jax.serving) against ``Generator.generate``.

The reference for every request is ``Generator.generate`` on that request alone. Both
compute in fp32 with the same decode step, but the engine's batch holds other requests
and its cache is longer, so logits may differ in the last bits.
A greedy token could only flip where two logits are within that round-off (~1e-6) of
each other; the random O(1)-logit model of ``helpers.hf_reference.make_hf_model`` makes that
vanishingly rare, so the tokens must agree exactly (a real bug, e.g. a slot reading
another slot's cache or a wrong position, changes tokens within a step or two).
Sampled requests use the same per-request PRNG keys, so they must agree too (a flip
would need a uniform draw within ~1e-6 of a CDF boundary).
"""

import threading

import jax
import numpy as np
import pytest
from helpers.serving import serving_model

from neox_jax.errors import UserError
from neox_jax.inference import Generator, SamplingParams
from neox_jax.model import GPTNeoX
from neox_jax.serving import (
    Collector,
    Engine,
    EngineStopped,
    QueueFull,
    Request,
    mixed,
    prefill_batch,
)
from neox_jax.serving import slots as dev

TEXTS = ["the model reads tokens and predicts what comes next", "héllo wörld, ça va? 🙂"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return serving_model(tmp_path_factory.mktemp("serve_model"), TEXTS)


@pytest.fixture(scope="module")
def engine(model):
    config, params, tok = model
    # One step per call: the scheduler's admissions, retirements and moves run between
    # every two tokens (later tests run several steps per call).
    eng = Engine(
        config, params, tok, num_slots=3, max_len=64, prefill_buckets=(8, 16, 32), max_queue=40,
        slot_buckets=(1,), steps_per_call=1,
    )  # fmt: skip
    lines = []
    eng.warmup(progress=lines.append)
    # 4 buckets alone and batched in 2 and 3 rows, greedy and sampling steps on 1 and 3
    # slots, both with logprobs on 3, and the slot move
    assert lines[-1].startswith("compiled 19 programs in")
    return eng


_GENERATORS = {}


def _reference(model):
    """One ``Generator`` per model, with a fixed cache (fewer shapes to compile)."""
    config, params, tok = model
    key = id(params)
    if key not in _GENERATORS:
        _GENERATORS.clear()
        _GENERATORS[key] = Generator(config, params, tok, max_cache_len=64)
    return _GENERATORS[key]


def _prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(2, vocab, n)] for n in lengths]


def _cache_sizes():
    programs = (prefill_batch.prefill, dev.insert, dev.generate, dev.release, dev.prefill_chunk)
    programs += (dev.activate, dev.put_block, dev.get_block, dev.move)
    programs += (prefill_batch.prefill_many, prefill_batch.insert_many, mixed.generate)
    return [f._cache_size() for f in programs]


def test_concurrent_greedy_requests_equal_generator_alone(model, engine, monkeypatch):
    """More requests than slots, mixed prompt lengths and max_tokens (so slots retire
    and refill at different steps): each equals its own ``Generator.generate``. The
    first three prompts (one per slot) are prefilled in one call; when one request is
    left it moves to slot 0 and runs alone (``slot_buckets=(1,)``)."""
    config, params, tok = model
    before = _cache_sizes()
    moves, actives, batched = [], [], []
    move, generate, many = dev.move, dev.generate, prefill_batch.prefill_many
    monkeypatch.setattr(dev, "move", lambda s, a, b: moves.append((a, b)) or move(s, a, b))
    monkeypatch.setattr(prefill_batch, "prefill_many", lambda *a: batched.append(a[3]) or many(*a))
    monkeypatch.setattr(
        dev, "generate", lambda *a, **k: actives.append(k.get("active")) or generate(*a, **k)
    )
    gen = _reference(model)
    lengths = (1, 5, 30, 9, 17, 2, 12, 40)
    prompts = _prompts(config.vocab_size, lengths)
    samplings = [
        SamplingParams(max_new_tokens=m, ignore_eos=True) for m in (20, 3, 11, 24, 6, 15, 9, 13)
    ]
    collectors = [Collector() for _ in prompts]
    for p, s, c in zip(prompts, samplings, collectors, strict=True):
        engine.submit(Request(p, s, c))
    while engine.step():
        pass
    monkeypatch.undo()
    assert _cache_sizes() == before  # nothing compiled after warm-up
    for p, s, c in zip(prompts, samplings, collectors, strict=True):
        ids, text, reason = c.result(timeout=0)
        ref = gen.generate([p], s)[0]
        assert ids == ref.token_ids
        assert text == ref.text
        assert reason == "length" == ref.finish_reason
    assert engine.free_slots == engine.num_slots
    assert moves and set(actives) == {1, 3}
    assert batched and {len(lengths) for lengths in batched} == {3}  # rows: the slots


def test_sampling_knobs_eos_and_stops_equal_generator(model, engine):
    """Per-request temperature / top-k / top-p / penalty / seed, eos, stop ids and stop
    strings, all in one batch: each request equals the ``Generator`` alone."""
    config, params, tok = model
    gen = _reference(model)
    prompts = _prompts(config.vocab_size, (4, 11, 7, 3, 9), seed=3)
    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True)
    free = gen.generate(prompts[3:5], greedy)
    stop_id = free[0].token_ids[4]
    stop_text = free[1].text[3:5]
    assert len(stop_text) == 2
    samplings = [
        SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.8, seed=7, ignore_eos=True),
        SamplingParams(max_new_tokens=16, temperature=1.3, top_k=5, repetition_penalty=1.5),
        SamplingParams(max_new_tokens=16, repetition_penalty=2.0, ignore_eos=True),
        SamplingParams(max_new_tokens=12, stop_token_ids=(stop_id,), ignore_eos=True),
        SamplingParams(max_new_tokens=12, stop_strings=(stop_text,), seed=1, ignore_eos=True),
    ]
    samplings.append(SamplingParams(max_new_tokens=30))  # eos (tokenizer's) may end it
    prompts.append(prompts[0])
    results = engine.generate(prompts, samplings)
    for p, s, (ids, text, reason) in zip(prompts, samplings, results, strict=True):
        ref = gen.generate([p], s)[0]
        assert ids == ref.token_ids, s
        assert text == ref.text
        assert reason == ("length" if ref.finish_reason == "length" else "stop")
    assert results[3][0][-1] == stop_id and results[3][2] == "stop"
    assert stop_text not in results[4][1] and results[4][2] == "stop"


def test_logprobs_are_the_models_distribution(model, engine):
    config, params, tok = model
    prompt = _prompts(config.vocab_size, (6,), seed=9)[0]
    c = Collector()
    engine.submit(Request(prompt, SamplingParams(max_new_tokens=3, ignore_eos=True), c, 3))
    events = []
    while engine.step():
        pass
    while not c.events.empty():
        events.append(c.events.get())
    ids = prompt + [t for e in events for t in e.token_ids]
    logits = GPTNeoX(config).apply({"params": params}, np.asarray([ids]))[0]
    logp = jax.nn.log_softmax(logits, axis=-1)
    lps = [lp for e in events for lp in e.logprobs]
    assert len(lps) == 3
    for i, (chosen, top) in enumerate(lps):
        row = np.asarray(logp[len(prompt) - 1 + i])
        # fp32 log-softmax of the same logits through two code paths: 1e-4.
        assert chosen == pytest.approx(row[ids[len(prompt) + i]], abs=1e-4)
        assert [t for t, _ in top] == list(np.argsort(-row)[:3])
        assert top[0][0] == ids[len(prompt) + i]  # greedy takes the most likely
    # echo: the prompt's own tokens scored by the same distribution
    scored = engine.prompt_logprobs(prompt, 2)
    assert len(scored) == len(prompt) - 1
    for i, (chosen, top) in enumerate(scored):
        row = np.asarray(logp[i])
        assert chosen == pytest.approx(row[prompt[i + 1]], abs=1e-4)
        assert [t for t, _ in top] == list(np.argsort(-row)[:2])


def test_queue_bound_cancel_and_bad_requests(model, engine):
    config, _, _ = model
    prompt = _prompts(config.vocab_size, (5,))[0]
    long = SamplingParams(max_new_tokens=50, ignore_eos=True)
    first = [Request(prompt, long, Collector()) for _ in range(engine.num_slots)]
    for r in first:
        engine.submit(r)
    engine.step()  # all slots busy
    assert engine.free_slots == 0
    queued = [Request(prompt, long, Collector()) for _ in range(engine.max_queue)]
    engine.submit_many(queued)
    with pytest.raises(QueueFull, match="retry later"):
        engine.submit(Request(prompt, long, Collector()))
    first[1].cancel()
    for r in queued:
        r.cancel()
    engine.step()  # the cancelled slot is freed and refilled from the queue... if any
    assert first[1].sink.result(timeout=0)[2] == "cancelled"
    assert all(r.sink.result(timeout=0)[2] == "cancelled" for r in queued)
    assert engine.queue_length == 0 and engine.free_slots == 1
    for r in first:
        r.cancel()
    engine.step()
    assert engine.free_slots == engine.num_slots
    with pytest.raises(UserError, match="limit of 64 tokens"):
        engine.submit(Request(prompt, SamplingParams(max_new_tokens=60), Collector()))
    with pytest.raises(UserError, match="empty"):
        engine.submit(Request([], long, Collector()))
    with pytest.raises(UserError, match="outside the vocabulary"):
        engine.submit(Request([config.vocab_size], long, Collector()))


def test_background_thread_serves_concurrent_callers_and_stops(model, engine):
    """Runs last: it stops the module's engine."""
    config, params, tok = model
    eng = engine
    eng.start()
    prompts = _prompts(config.vocab_size, (3, 8, 5, 12, 2), seed=4)
    sampling = SamplingParams(max_new_tokens=8, ignore_eos=True)
    results = [None] * len(prompts)

    def call(i):
        c = Collector()
        eng.submit(Request(prompts[i], sampling, c))
        results[i] = c.result(timeout=120)[0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gen = _reference(model)
    assert results == [r.token_ids for r in gen.generate(prompts, sampling)]
    slow = Collector()
    eng.submit(Request(prompts[0], SamplingParams(max_new_tokens=25, ignore_eos=True), slow))
    eng.stop(timeout=0.0)  # cancel at once
    assert slow.result(timeout=10)[2] in ("cancelled", "length")
    assert eng.free_slots == eng.num_slots
    with pytest.raises(EngineStopped):
        eng.submit(Request(prompts[0], sampling, Collector()))


def test_chunked_prefill_equals_generator(model, monkeypatch):
    """Prompts longer than ``prefill_chunk`` are written chunk by chunk; while others
    decode, the chunks ride in the decode calls' products (``serving.mixed``); every
    request still equals the ``Generator`` alone (same tolerance argument as above)."""
    config, params, tok = model
    eng = Engine(config, params, tok, num_slots=3, max_len=64, prefill_chunk=16)
    assert eng.buckets == [16] and eng.mix_prefill  # nothing longer is bucketed
    lines = []
    eng.warmup(progress=lines.append)
    assert any("prefill chunk of 16" in line for line in lines)
    assert sum("step with a prefill chunk" in line for line in lines) == 2
    prompts = _prompts(config.vocab_size, (40, 3, 17, 33, 16, 48), seed=6)
    samplings = [
        SamplingParams(max_new_tokens=m, ignore_eos=True, repetition_penalty=r)
        for m, r in ((12, 1.0), (20, 1.0), (9, 1.3), (15, 1.0), (6, 1.0), (16, 1.2))
    ]
    before, mixed_lengths, generate = _cache_sizes(), [], mixed.generate
    monkeypatch.setattr(
        mixed, "generate", lambda *a, **k: mixed_lengths.append(int(a[6])) or generate(*a, **k)
    )
    results = eng.generate(prompts, samplings)
    monkeypatch.undo()
    assert _cache_sizes() == before
    # Chunks of long prompts rode in decode calls; short ones were bucketed.
    assert mixed_lengths and min(mixed_lengths) > 16
    gen = _reference(model)
    for p, s, (ids, text, _) in zip(prompts, samplings, results, strict=True):
        ref = gen.generate([p], s)[0]
        assert ids == ref.token_ids and text == ref.text
    assert eng.free_slots == eng.num_slots
    # A request cancelled half-way through its chunks frees its slot at the next step.
    c = Collector()
    r = eng.submit(Request(prompts[0], SamplingParams(max_new_tokens=5), c))
    eng.step()
    assert eng.free_slots == eng.num_slots - 1 and eng._prefilling  # one chunk written
    r.cancel()
    eng.step()
    assert c.result(timeout=0)[2] == "cancelled"
    assert eng.free_slots == eng.num_slots and not eng._prefilling
    with pytest.raises(UserError, match="divide max_len"):
        Engine(config, params, tok, num_slots=1, max_len=64, prefill_chunk=24)


def test_mixed_chunk_with_fewer_slots_computed(model, monkeypatch):
    """A request decodes alone in slot 0 while a long prompt's chunks ride in its calls
    into slot 1; the calls compute 2 of the 4 slots: both equal the ``Generator``
    alone."""
    config, params, tok = model
    eng = Engine(
        config, params, tok, num_slots=4, max_len=64, prefill_chunk=16, slot_buckets=(2,)
    )  # no warm-up: only what runs compiles
    a, b = _prompts(config.vocab_size, (5, 40), seed=14)
    sa, sb = (SamplingParams(max_new_tokens=m, ignore_eos=True) for m in (40, 10))
    calls, generate = [], mixed.generate
    monkeypatch.setattr(
        mixed,
        "generate",
        lambda *a, **k: calls.append((int(a[3]), k.get("active"))) or generate(*a, **k),
    )
    ca, cb = Collector(), Collector()
    eng.submit(Request(a, sa, ca))
    eng.step()  # a: prefilled alone, then decoding
    eng.submit(Request(b, sb, cb))
    while eng.step():
        pass
    monkeypatch.undo()
    assert calls == [(1, 2)] * 3  # 39 prompt tokens: 3 chunks of 16, 2 slots computed
    gen = _reference(model)
    assert ca.result(timeout=0)[0] == gen.generate([a], sa)[0].token_ids
    assert cb.result(timeout=0)[0] == gen.generate([b], sb)[0].token_ids
    assert eng.free_slots == eng.num_slots


def test_prefix_cache_reuses_shared_prompt_blocks(model):
    """Prompts sharing a 32-token beginning: later ones copy its cached blocks and
    prefill only the rest, and still equal the ``Generator`` alone; the LRU bound holds."""
    config, params, tok = model
    eng = Engine(
        config, params, tok, num_slots=3, max_len=64, prefill_chunk=16, prefix_cache_blocks=3
    )
    eng.warmup(progress=lambda _: None)
    shared = _prompts(config.vocab_size, (32,), seed=8)[0]
    tails = _prompts(config.vocab_size, (5, 12, 1, 9), seed=9)
    prompts = [shared + t for t in tails]
    sampling = SamplingParams(max_new_tokens=8, ignore_eos=True)
    before = _cache_sizes()
    first = eng.generate(prompts[:1], sampling)  # fills the cache: 2 blocks of 16
    assert eng.prefix_cache.hit_tokens == 0 and len(eng.prefix_cache) == 2
    rest = eng.generate(prompts[1:], sampling)
    assert eng.prefix_cache.hit_tokens == 3 * 32  # every later prompt reused both blocks
    assert _cache_sizes() == before
    gen = _reference(model)
    for p, (ids, text, _) in zip(prompts, first + rest, strict=True):
        ref = gen.generate([p], sampling)[0]
        assert ids == ref.token_ids and text == ref.text
    other = _prompts(config.vocab_size, (40,), seed=10)
    eng.generate(other, sampling)  # two new blocks: the LRU keeps 3
    assert len(eng.prefix_cache) == 3
    eng.generate(prompts[:1], sampling)  # its second block was evicted: one block reused
    assert eng.prefix_cache.hit_tokens == 3 * 32 + 16


@pytest.mark.parametrize("kv_cache", ["slots", "paged"])
def test_prefix_hit_in_a_used_slot_ignores_the_earlier_request(model, kv_cache):
    """One slot, the same 40-token prompt twice: the second copies both cached blocks
    and prefills the rest from column 32, so nothing clears the row from column 0; the
    first request's prompt and generated keys past the blocks must not be attended."""
    config, params, tok = model
    eng = Engine(
        config, params, tok, num_slots=1, max_len=64, prefill_chunk=16, prefix_cache_blocks=4,
        kv_cache=kv_cache, page_size=16, num_pages=4,
    )  # fmt: skip
    sampling = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompt = _prompts(config.vocab_size, (40,), seed=14)[0]
    want = _reference(model).generate([prompt], sampling)[0].token_ids
    assert eng.generate([prompt], sampling)[0][0] == want
    assert eng.generate([prompt], sampling)[0][0] == want
    assert eng.prefix_cache.hit_tokens == 32


def test_quantized_weights_are_served_like_the_generator(model):
    """int4 group-quantized weights (``neox_jax.quant``) run in the same decode step:
    each request equals the ``Generator`` on the same quantized params."""
    from neox_jax.quant import QuantConfig, quantize_params

    config, params, tok = model
    qparams = quantize_params(config, params, QuantConfig(bits=4, group_size=32))
    eng = Engine(config, qparams, tok, num_slots=2, max_len=64, prefill_buckets=(16,))
    prompts = _prompts(config.vocab_size, (4, 13, 7), seed=12)
    sampling = SamplingParams(max_new_tokens=8, ignore_eos=True)
    results = eng.generate(prompts, sampling)
    gen = Generator(config, qparams, tok, max_cache_len=64)
    for p, (ids, _, _) in zip(prompts, results, strict=True):
        assert ids == gen.generate([p], sampling)[0].token_ids


def test_several_steps_per_call_give_the_same_tokens(model):
    """``steps_per_call=4``: slots that finish or hit a stop string mid-call stop there."""
    config, params, tok = model
    eng = Engine(
        config, params, tok, num_slots=3, max_len=64, prefill_buckets=(8, 16, 32),
        steps_per_call=4,
    )  # fmt: skip
    prompts = _prompts(config.vocab_size, (3, 11, 25, 6), seed=13)
    free = _reference(model).generate([prompts[1]], SamplingParams(max_new_tokens=9))[0]
    samplings = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in (5, 9, 10, 2)]
    samplings[1] = SamplingParams(max_new_tokens=9, stop_strings=(free.text[3:5],))
    ours = eng.generate(prompts, samplings)
    gen = _reference(model)
    for p, s, (ids, text, _) in zip(prompts, samplings, ours, strict=True):
        ref = gen.generate([p], s)[0]
        assert ids == ref.token_ids and text == ref.text
    assert [len(ids) for ids, _, _ in ours][::3] == [5, 2]
    assert eng.free_slots == eng.num_slots


def test_calls_end_when_a_waiting_request_can_take_a_slot(model, monkeypatch):
    """``steps_per_call=8`` on 2 slots admitting one prompt per step: the first call runs
    one step (a request waits beside a free slot), the second ends with the step in
    which a request ends (another waits for its slot), the last when none runs. Every
    request still gets ``Generator.generate``'s tokens."""
    config, params, tok = model
    eng = Engine(
        config, params, tok, num_slots=2, max_len=32, prefill_buckets=(8,),
        max_prefills_per_step=1, steps_per_call=8,
    )  # fmt: skip
    ran, generate = [], dev.generate

    def counted(*a, **k):
        state, out = generate(*a, **k)
        ran.append(int(np.any(np.asarray(out.finish) != dev.SKIPPED, axis=1).sum()))
        return state, out

    monkeypatch.setattr(dev, "generate", counted)
    prompts = _prompts(config.vocab_size, (4, 7, 5), seed=3)
    samplings = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in (3, 4, 2)]
    ours = eng.generate(prompts, samplings)
    assert ran == [1, 2, 2]  # (8, 8, 8) if every call ran steps_per_call
    # Calls are timed (the first of each program is not: it may have compiled); with a
    # cap below one measured step every call runs one step, and the tokens stay.
    assert eng._step_seconds is not None and eng._step_seconds > 0
    eng.max_call_seconds, ran[:] = 1e-9, []
    assert eng.generate(prompts, samplings) == ours
    monkeypatch.undo()
    assert ran and set(ran) == {1} and len(ran) >= max(3, 4, 2)
    # The loader's numpy weights went to the device once, not with every call.
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(eng.params))
    gen = _reference(model)
    for p, s, (ids, _, _) in zip(prompts, samplings, ours, strict=True):
        assert ids == gen.generate([p], s)[0].token_ids
    assert eng.free_slots == eng.num_slots


def test_eight_slots_decode_input_major_with_xla_dots(model):
    """From ``fused.INPUT_MAJOR_ROWS`` slots (a slot cache on CPU) the engine holds the
    fused weights input-major and compiles its decode calls, and the decode steps that
    carry prefill chunks, with XLA's own dots; each request still equals the
    ``Generator`` alone (same tolerance argument as above)."""
    from neox_jax.inference import fused, step

    config, params, tok = model
    slots = fused.INPUT_MAJOR_ROWS
    eng = Engine(config, params, tok, num_slots=slots, max_len=64, prefill_chunk=16)
    assert step.uses_xla_dots(eng.params) and eng.mix_prefill
    assert eng.generate_program() is not dev.generate
    assert mixed.generate_program(eng.params) is not mixed.generate
    prompts = _prompts(config.vocab_size, (40, 3, 17, 33, 16, 48, 5, 9, 21, 2), seed=8)
    samplings = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in range(6, 16)]
    results = eng.generate(prompts, samplings)
    gen = _reference(model)
    for p, s, (ids, text, _) in zip(prompts, samplings, results, strict=True):
        ref = gen.generate([p], s)[0]
        assert ids == ref.token_ids and text == ref.text
    assert eng.free_slots == eng.num_slots
