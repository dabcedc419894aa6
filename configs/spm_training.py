"""Training a sentencepiece tokenizer on which any text round-trips exactly.

  python -m neox_jax.data.spm_training --config=configs/spm_training.py \
      --config.input=a.txt,b.txt --config.vocab_size=4096 --config.output=spm.model

The old spellings (``--input= --output= --vocab_size= ...``) still work.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The sentencepiece training config (no presets)."""
    c = ml_collections.ConfigDict()
    # Comma-separated UTF-8 text files. Required.
    c.input = ""
    # The .model file to write (or a folder: spm.model inside it). Required.
    c.output = ""
    # Vocabulary size, including the 256 byte pieces and the specials.
    c.vocab_size = 32000
    # "bpe" or "unigram".
    c.model_type = "bpe"
    # Lines sampled for training (0 = all).
    c.input_sentence_size = 1_000_000
    # Seeds the line sample and sentencepiece.
    c.seed = 0
    if arg not in (None, ""):
        raise ValueError(f"Unknown preset {arg!r}; configs/spm_training.py has none.")
    return c
