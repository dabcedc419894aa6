"""A character tokenizer and jsonl writer for the fine-tuning tests.

The character tokenizer maps every character to one token, so expected token sequences
can be written by hand and compared token by token; its vocabulary (< 100) fits the
tiny models of ``helpers.hf_reference.make_hf_model``.
"""

import json
import string
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

EOS, PAD = "<|endoftext|>", "<|padding|>"
CHARS = string.ascii_letters + string.digits + " \n.,:;?!+-=<>|_/'()"
# ChatML with transformers' {% generation %} marker around what the assistant writes (its
# content and the end of its turn), and a message's optional name, as OpenAI's format allows.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] }}"
    "{% if m['name'] is defined %}{{ ' ' + m['name'] }}{% endif %}{{ '\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>\\n' }}"
    "{% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# A two-turn conversation with a system prompt, in OpenAI's messages format.
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Reverse abc"},
    {"role": "assistant", "content": "cba"},
]


def write_char_tokenizer(directory) -> Path:
    """A tokenizer.json (one token per character), tokenizer_config.json and a
    generation_config.json naming its eos in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {EOS: 0, PAD: 1, "<unk>": 2}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([EOS, PAD])
    tok.save(str(directory / "tokenizer.json"))
    config = {"eos_token": EOS, "pad_token": PAD, "bos_token": None}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    # The model's generation config names the same eos, as a folder saved with its
    # tokenizer does (without it the eos of make_hf_model's config.json, transformers'
    # default 2, would be the only stop: transformers' rule, data/generation_config.py).
    generation = {"eos_token_id": vocab[EOS], "pad_token_id": vocab[PAD]}
    (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory


def char_ids(tokenizer, text: str) -> list[int]:
    """The independent reference tokenization: one id per character, looked up directly."""
    return [tokenizer.token_to_id(c) for c in text]


def write_jsonl(path, records, extra_lines=()) -> str:
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    Path(path).write_text("\n".join(lines) + "\n")
    return str(path)
