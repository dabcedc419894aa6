"""A random tiny Hugging Face model folder with a byte-level BPE beside it."""

from helpers.hf_reference import make_hf_model, train_byte_level_bpe

TEXTS = [
    "héllo wörld, ça va? 日本語のテキスト 🙂🚀 — naïve café",
    "Съешь же ещё этих мягких булок 机器学习很有趣 ✨🔥👍",
    "the model reads tokens and predicts what comes next",
]


def train_byte_bpe(directory, vocab_size=300):
    """A GPT-NeoX-style byte-level BPE (<|endoftext|> = 0) with few merges, so most
    non-ASCII characters span several tokens. Returns the loaded tokenizer."""
    config = {"eos_token": "<|endoftext|>"}
    return train_byte_level_bpe(directory, TEXTS * 20, vocab_size, config)


def make_model_dir(path, **overrides):
    """A Hugging Face folder with a random tiny model and a byte-level BPE beside it."""
    path.mkdir(parents=True, exist_ok=True)
    tok = train_byte_bpe(path)
    ref = make_hf_model(path, vocab_size=tok.vocab_size, **overrides)
    return ref, tok
