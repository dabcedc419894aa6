"""The fine-tuning tests' character tokenizer (``helpers.finetune``) does what they assume."""

import numpy as np
from helpers.finetune import EOS, char_ids, write_char_tokenizer

from neox_jax.data.tokenizer import load_tokenizer


def test_char_tokenizer_round_trips(tmp_path):
    tok = load_tokenizer(write_char_tokenizer(tmp_path))
    text = "What is 2 + 3?\nAnswer: 5."
    ids = tok.encode(text)
    assert ids == char_ids(tok, text) and tok.decode(ids) == text
    assert tok.eos_id == 0 and tok.pad_id == 1 and tok.vocab_size < 96
    assert tok.encode(EOS + "a") == [0, tok.token_to_id("a")]
    assert np.all(np.asarray(ids) > 2)
