"""A model vocabulary padded past its sentencepiece tokenizer's: padded ids never come out.

Models pad ``vocab_size`` to a multiple of 128 for speed, so ids past the tokenizer's last
piece have logits but no text; sentencepiece raised ``IndexError: piece id is out of
range`` on them. The model here is rigged so those ids hold all the probability: anything
but an explicit mask would draw them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

from neox_jax.data.tokenizer import load_tokenizer
from neox_jax.inference import Generator, SamplingParams
from neox_jax.inference.generate import generate_tokens
from neox_jax.model import ModelConfig, init_params

MODEL_VOCAB = 64


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    text = folder / "text.txt"
    text.write_text(
        "\n".join(f"the {w} sat on a mat {i}" for i, w in enumerate(["cat", "dog"] * 50))
    )
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(folder / "tok"), vocab_size=32, model_type="char",
        bos_id=-1, eos_id=1, unk_id=0, pad_id=-1,
    )  # fmt: skip
    tok = load_tokenizer(folder / "tok.model")
    assert tok.vocab_size < MODEL_VOCAB
    return tok


@pytest.fixture(scope="module")
def rigged(tokenizer):
    """Every position's logits: 0 on the tokenizer's ids, +hidden_size on the padded ones."""
    config = ModelConfig(
        vocab_size=MODEL_VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64,
    )  # fmt: skip
    params = init_params(config, jax.random.key(0))
    params["final_layer_norm"] = {"scale": jnp.zeros(32), "bias": jnp.ones(32)}  # h = 1
    padded = np.arange(MODEL_VOCAB) >= tokenizer.vocab_size
    params["embed_out"]["kernel"] = jnp.asarray(np.tile(padded, (32, 1)), jnp.float32)
    return config, params


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(max_new_tokens=8, temperature=1.0, seed=3, ignore_eos=True),
        SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True),
        SamplingParams(max_new_tokens=8, temperature=0.8, top_k=5, top_p=0.9, ignore_eos=True),
        SamplingParams(max_new_tokens=6, num_beams=3, ignore_eos=True),
    ],
    ids=["sample", "greedy", "top-k-p", "beam"],
)
def test_padded_ids_are_never_generated_and_text_decodes(tokenizer, rigged, sampling):
    config, params = rigged
    out = Generator(config, params, tokenizer).generate(["the cat"], sampling)[0]
    assert len(out.token_ids) == sampling.max_new_tokens
    assert max(out.token_ids) < tokenizer.vocab_size, out.token_ids
    assert isinstance(out.text, str)  # decoding did not raise


def test_without_a_limit_the_rigged_model_draws_padded_ids(tokenizer, rigged):
    """The control: the rig works, so the test above can fail."""
    config, params = rigged
    ids = np.asarray([tokenizer.encode("the cat")], np.int32)
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0, ignore_eos=True)
    free = generate_tokens(config, params, ids, sampling=sampling)
    assert (np.asarray(free.tokens)[0, :8] >= tokenizer.vocab_size).all()
    limited = generate_tokens(
        config, params, ids, sampling=sampling, vocab_limit=tokenizer.vocab_size
    )
    assert (np.asarray(limited.tokens)[0, :8] < tokenizer.vocab_size).all()


def test_decode_drops_ids_past_the_pieces(tokenizer):
    ids = tokenizer.encode("the dog")
    assert tokenizer.decode([*ids, MODEL_VOCAB - 1, 10_000]) == tokenizer.decode(ids) == "the dog"


def test_the_serving_engine_never_draws_padded_ids(tokenizer, rigged):
    from neox_jax.serving import Engine

    config, params = rigged
    engine = Engine(config, params, tokenizer, num_slots=2, max_len=32, prefill_buckets=(16,))
    sampling = SamplingParams(max_new_tokens=6, temperature=1.0, seed=1, ignore_eos=True)
    for ids, text, _ in engine.generate([tokenizer.encode("the cat")] * 2, sampling):
        assert len(ids) == 6 and max(ids) < tokenizer.vocab_size, ids
        assert isinstance(text, str)
