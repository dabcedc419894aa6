"""Generation: parity with transformers' generate, the KV-cache loop, batching, stops,
streaming, compilation reuse and input errors.

The reference is ``transformers.GPTNeoXForCausalLM.generate`` on random tiny models
(``helpers.hf_reference.make_hf_model``). Greedy decoding and beam search are deterministic, so
they must agree token for token: both sides compute in fp32 and a flipped argmax would
need two logits within round-off (~1e-6) of each other, which random O(1) logits make
vanishingly rare (any real bug changes tokens within a few steps).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers.generate import TEXTS, make_model_dir, train_byte_bpe
from helpers.hf_reference import assert_logits_close, make_hf_model

from neox_jax.convert import load_hf
from neox_jax.inference import (
    Generator,
    IncrementalDetokenizer,
    SamplingParams,
    generate_tokens,
    left_pad,
    step,
)
from neox_jax.inference.generate import plan_cache, prompt_positions
from neox_jax.model import GPTNeoX


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen_model")
    ref, tok = make_model_dir(path)
    config, params = load_hf(path)
    return ref, config, params, tok


def _prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(2, vocab, n)] for n in lengths]


def _hf_generate(ref, prompts, **kwargs):
    """transformers' generate on a left-padded batch; returns per-row generated ids."""
    plen = max(map(len, prompts))
    ids, mask = left_pad(prompts, plen)
    with torch.no_grad():
        out = ref.generate(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            pad_token_id=1,
            **kwargs,
        )
    return out.numpy()[:, plen:]


def _until_eos(row, eos):
    row = list(row)
    return row[: row.index(eos) + 1] if eos in row else row


def test_greedy_batch_matches_transformers(model):
    """Mixed prompt lengths, left padding, eos stops rows at different steps."""
    ref, config, params, _ = model
    prompts = _prompts(config.vocab_size, (3, 11, 7, 1))
    # Pick as eos a token the greedy outputs contain, so some rows stop early.
    free = _hf_generate(ref, prompts, max_new_tokens=16, eos_token_id=None)
    eos = int(free[0, 5])
    theirs = _hf_generate(ref, prompts, max_new_tokens=16, eos_token_id=eos)
    ours = Generator(config, params, eos_token_ids=[eos]).generate(
        prompts, SamplingParams(max_new_tokens=16)
    )
    for row, res in zip(theirs, ours, strict=True):
        assert res.token_ids == _until_eos(row, eos)
        assert res.finish_reason == ("eos" if eos in row else "length")
    assert ours[0].finish_reason == "eos"


def test_repetition_penalty_matches_transformers(model):
    ref, config, params, _ = model
    prompt = _prompts(config.vocab_size, (9,), seed=5)
    theirs = _hf_generate(ref, prompt, max_new_tokens=16, repetition_penalty=1.8, eos_token_id=None)
    sampling = SamplingParams(max_new_tokens=16, repetition_penalty=1.8, ignore_eos=True)
    ours = Generator(config, params).generate(prompt, sampling)
    assert ours[0].token_ids == list(theirs[0])
    plain = Generator(config, params).generate(prompt, sampling.replace(repetition_penalty=1.0))
    assert plain[0].token_ids != ours[0].token_ids  # the penalty did something


def test_presence_and_frequency_penalties_against_a_naive_loop(model):
    """transformers has no presence / frequency penalty: the reference is its model in a
    plain greedy loop (whole sequence each step) with OpenAI's rule applied by hand to
    the last logits, counting only generated tokens. Rows of one batch differ in their
    penalties (negative ones too), and the batch's neutral row is plain greedy."""
    ref, config, params, _ = model
    prompts = _prompts(config.vocab_size, (9, 4, 6), seed=7)
    knobs = [(0.6, 0.9), (-1.5, 0.0), (0.0, 0.0)]  # (presence, frequency) per row
    samplings = [
        SamplingParams(max_new_tokens=14, presence_penalty=p, frequency_penalty=f, ignore_eos=True)
        for p, f in knobs
    ]
    ours = Generator(config, params).generate(prompts, samplings)
    for prompt, (presence, frequency), res in zip(prompts, knobs, ours, strict=True):
        ids, out = list(prompt), []
        for _ in range(14):
            with torch.no_grad():
                logits = ref(torch.tensor([ids])).logits[0, -1].double()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=len(logits))
            logits -= frequency * counts + presence * (counts > 0)
            out.append(int(logits.argmax()))
            ids.append(out[-1])
        assert res.token_ids == out
    plain = Generator(config, params).generate(
        prompts[:2], SamplingParams(max_new_tokens=14, ignore_eos=True)
    )
    # the penalties did something
    assert all(p.token_ids != r.token_ids for p, r in zip(plain, ours, strict=False))


@pytest.mark.parametrize(
    "length_penalty,early_stopping", [(1.0, False), (2.0, True), (-0.5, "never")]
)
def test_beam_search_matches_transformers(model, length_penalty, early_stopping):
    ref, config, params, _ = model
    prompts = _prompts(config.vocab_size, (4, 9, 6), seed=2)
    kw = dict(num_beams=3, length_penalty=length_penalty, early_stopping=early_stopping)
    free = _hf_generate(ref, prompts, max_new_tokens=10, eos_token_id=None, **kw)
    eos = int(free[1, 3])  # a token some beam reaches: hypotheses end at different steps
    theirs = _hf_generate(ref, prompts, max_new_tokens=10, eos_token_id=eos, **kw)
    sampling = SamplingParams(max_new_tokens=10, **kw)
    ours = Generator(config, params, eos_token_ids=[eos]).generate(prompts, sampling)
    for row, res in zip(theirs, ours, strict=True):
        assert res.token_ids == _until_eos(row, eos)
        assert res.score is not None


def test_kv_cache_decode_equals_full_recomputation(model):
    """Each greedy token of the cached loop is the argmax of a full forward pass."""
    _, config, params, _ = model
    prompts = _prompts(config.vocab_size, (5, 8), seed=3)
    out = Generator(config, params).generate(prompts, SamplingParams(max_new_tokens=12))
    total = 8 + 12
    apply = jax.jit(lambda ids, mask: GPTNeoX(config).apply({"params": params}, ids, None, mask))
    for prompt, res in zip(prompts, out, strict=True):
        seq = prompt + res.token_ids
        ids = np.zeros((1, total), np.int32)
        mask = np.zeros((1, total), np.int32)
        ids[0, : len(seq)], mask[0, : len(seq)] = seq, 1  # right padding: never attended
        logits = np.asarray(apply(ids, mask))[0]
        expected = logits[len(prompt) - 1 : len(seq) - 1].argmax(-1)
        assert list(expected) == res.token_ids


@pytest.mark.parametrize(
    "overrides", [dict(), dict(tie_word_embeddings=True, use_parallel_residual=False)]
)
def test_cached_forward_matches_the_model(tmp_path, overrides):
    """Generation's unrolled forward (prefill, then one token at a time; stacked and
    split params) gives the model's logits; fp32 on both sides, so round-off only."""
    make_hf_model(tmp_path, **overrides)
    config, params = load_hf(tmp_path)
    ids, mask = left_pad(_prompts(config.vocab_size, (12, 9), seed=8), 12)
    positions = np.asarray(prompt_positions(jnp.asarray(mask)))
    full = np.asarray(GPTNeoX(config).apply({"params": params}, ids, positions, mask))
    fwd = jax.jit(step.forward, static_argnums=0, static_argnames="compute_logits")
    cache = step.layer_cache(config, 2, 16)
    _, cache = fwd(config, params, ids[:, :8], positions[:, :8], mask[:, :8], cache)
    split = step.split_params(params)
    # On CPU an untied head is also kept vocabulary-major, and that copy projects.
    assert (step.VOCAB_MAJOR_HEAD in split) == (not config.tie_word_embeddings)
    for t in range(8, 12):
        cols = slice(t, t + 1)
        logits, cache = fwd(config, split, ids[:, cols], positions[:, cols], mask[:, cols], cache)
        assert_logits_close(logits, full[:, t])


def test_no_recompile_within_a_bucket(model):
    _, config, params, _ = model
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_, **__: (
            compiles.append(event)
            if event == "/jax/core/compile/backend_compile_duration"
            else None
        )
    )
    gen = Generator(config, params)
    a, b = _prompts(config.vocab_size, (5, 13), seed=4)  # both in the 16 bucket
    assert plan_cache(config, 5, 20) == plan_cache(config, 13, 20)
    sampling = SamplingParams(max_new_tokens=20, temperature=0.7, top_p=0.9)
    gen.generate([a], sampling)
    before = len(compiles)
    gen.generate([b], sampling.replace(seed=3, temperature=1.3, top_p=0.5, max_new_tokens=17))
    assert len(compiles) == before, "a new prompt length in the same bucket recompiled"


def test_functional_core_and_batch_independence(model):
    """``generate_tokens`` on ids; a row's greedy output does not depend on its batch."""
    _, config, params, _ = model
    prompts = _prompts(config.vocab_size, (6, 2, 9), seed=6)
    ids, mask = left_pad(prompts, 9)
    out = generate_tokens(config, params, ids, mask, SamplingParams(max_new_tokens=8))
    assert out.tokens.shape[1] >= 8
    for row, p in enumerate(prompts):
        alone = generate_tokens(config, params, [p], sampling=SamplingParams(max_new_tokens=8))
        np.testing.assert_array_equal(alone.tokens[0, :8], out.tokens[row, :8])
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate_tokens(config, params, ids[:, ::-1], mask[:, ::-1])


def test_sampling_seeds_and_top_k_one(model):
    _, config, params, _ = model
    gen = Generator(config, params)
    prompt = _prompts(config.vocab_size, (6,), seed=7)
    base = SamplingParams(max_new_tokens=24, temperature=1.0, ignore_eos=True)
    first = gen.generate(prompt, base.replace(seed=11))[0].token_ids
    assert gen.generate(prompt, base.replace(seed=11))[0].token_ids == first
    assert gen.generate(prompt, base.replace(seed=12))[0].token_ids != first
    greedy = gen.generate(prompt, SamplingParams(max_new_tokens=24, ignore_eos=True))
    top1 = gen.generate(prompt, base.replace(top_k=1, seed=5))
    assert top1[0].token_ids == greedy[0].token_ids
    # Per-row parameters in one batch: row 0 greedy, row 1 sampled with seed 11.
    mixed = gen.generate(prompt * 2, [base.replace(temperature=0.0), base.replace(seed=11)])
    assert mixed[0].token_ids == greedy[0].token_ids
    assert len(mixed[1].token_ids) == 24


def test_stop_token_ids_and_stop_strings(model):
    _, config, params, tok = model
    gen = Generator(config, params, tok)
    prompt = "naïve café"
    free = gen.generate(prompt, SamplingParams(max_new_tokens=40, ignore_eos=True))[0]
    stop_id = free.token_ids[6]
    k = free.token_ids.index(stop_id)
    res = gen.generate(prompt, SamplingParams(max_new_tokens=40, stop_token_ids=[stop_id]))[0]
    assert res.finish_reason == "stop" and res.token_ids == free.token_ids[: k + 1]
    assert res.text == tok.decode(free.token_ids[:k], skip_special_tokens=True)

    text = free.text
    stop = text[len(text) // 3 : len(text) // 3 + 2]
    sampling = SamplingParams(max_new_tokens=40, ignore_eos=True, stop_strings=[stop, "\x00"])
    res = gen.generate([prompt], sampling)[0]
    assert res.finish_reason == "stop"
    assert res.text == text[: text.index(stop)]
    assert len(res.token_ids) < len(free.token_ids)  # generation stopped early
    assert stop in tok.decode(res.token_ids) and stop not in tok.decode(res.token_ids[:-1])
    pieces = list(gen.stream(prompt, sampling))
    assert "".join(pieces) == res.text


def test_stream_concatenates_to_full_text(model):
    _, config, params, tok = model
    gen = Generator(config, params, tok, stream_interval=3)
    for seed in range(3):
        sampling = SamplingParams(max_new_tokens=30, temperature=1.0, seed=seed)
        full = gen.generate("日本語", sampling)[0]
        it = gen.stream("日本語", sampling)
        pieces = []
        while True:
            try:
                pieces.append(next(it))
            except StopIteration as stop:
                result = stop.value
                break
        assert all(pieces) and "".join(pieces) == full.text
        assert result.token_ids == full.token_ids


def test_incremental_detokenizer_never_splits_characters(model):
    tok = model[3]
    # The tokenizer really does split characters across tokens here.
    assert any("\ufffd" in tok.decode([i]) for i in tok.encode(TEXTS[0]))
    for text in TEXTS:
        ids = tok.encode(text)
        detok = IncrementalDetokenizer(tok)
        pieces = [detok.add([i]) for i in ids] + [detok.flush()]
        assert not any("\ufffd" in p for p in pieces)
        assert "".join(pieces) == text


def test_max_cache_len_and_truncation(model):
    _, config, params, tok = model
    gen = Generator(config, params, tok, max_cache_len=64)
    res = gen.generate(["ab", "naïve café " * 3], SamplingParams(max_new_tokens=20))
    assert all(len(r.token_ids) <= 20 for r in res)
    long = list(range(2, 2 + 120))  # 120 + 20 > the 128-position context
    with pytest.raises(ValueError, match="context"):
        Generator(config, params).generate([long], SamplingParams(max_new_tokens=20))
    out = Generator(config, params).generate(
        [long], SamplingParams(max_new_tokens=20, truncate_prompt=True)
    )[0]
    assert out.prompt_token_ids == long[-108:]
    with pytest.raises(ValueError, match="max_cache_len"):
        gen.generate([long[:60]], SamplingParams(max_new_tokens=20))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(temperature=-0.1), "temperature"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=2, temperature=0.7), "beam search"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(presence_penalty=2.5), "presence_penalty must be in \\[-2, 2\\]"),
        (dict(frequency_penalty=-3), "frequency_penalty"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty"),
        (dict(num_beams=2, presence_penalty=0.5), "beam search"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(stop_strings=[""]), "stop_strings"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_inputs(model, tmp_path):
    _, config, params, tok = model
    gen = Generator(config, params, tok)
    with pytest.raises(ValueError, match="empty prompt"):
        gen.generate([""])
    with pytest.raises(ValueError, match="empty prompt"):
        gen.generate([[]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(["hi"], SamplingParams(max_new_tokens=500))
    with pytest.raises(ValueError, match="vocabulary"):
        gen.generate([[1, config.vocab_size]])
    with pytest.raises(TypeError, match="flat list"):
        gen.generate([1, 2, 3])
    with pytest.raises(ValueError, match="tokenizer"):
        Generator(config, params).generate(["text"])
    with pytest.raises(ValueError, match="tokenizer"):
        Generator(config, params).generate([[3]], SamplingParams(stop_strings=["x"]))
    big = train_byte_bpe(tmp_path, vocab_size=config.vocab_size + 40)
    with pytest.raises(ValueError, match="do not belong together"):
        Generator(config, params, big)
    with pytest.raises(ValueError, match="max_cache_len"):
        Generator(config, params, max_cache_len=1)


def test_bfloat16_generation_runs(model):
    """bf16 compute: the loop and cache work in bf16 (tokens may differ from fp32)."""
    _, config, params, _ = model
    out = generate_tokens(
        config.replace(dtype="bfloat16"), params, [[3, 4, 5]], sampling=SamplingParams(8)
    )
    assert out.tokens.dtype == jnp.int32 and int(out.lengths[0]) >= 1
