"""A multilingual corpus and a GPT-NeoX-style byte-level BPE trained on it (module
fixtures ``corpus_file``, ``hf_dir``, ``hf``), shared by the tokenizer tests."""

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from neox_jax.data import tokenizer as tk

# Word lists for a small generated corpus; the held-out texts use other words.
_SENTENCES = {
    "en": "the model reads tokens and predicts what comes next in every document",
    "zh": "我们 今天 学习 语言 模型 数据 训练 中文 文本 非常 重要",
    "ru": "модель читает текст и предсказывает следующее слово в документе",
    "ar": "النموذج يقرأ النص ويتوقع الكلمة التالية في الوثيقة",
    "hi": "मॉडल पाठ पढ़ता है और अगला शब्द बताता है",
    "emoji": "🙂 🚀 ✨ 🔥 👍",
}
_WORDS = {lang: sentence.split(" ") for lang, sentence in _SENTENCES.items()}
_CODE = [
    "def step(state, batch):",
    "    logits = model.apply(state.params, batch['tokens'])",
    "    loss = cross_entropy(logits, batch['targets'])  ",
    "\tif loss > 0:",
    "\t\treturn state, {'loss': loss}",
    "",
    "for i in range(10):  # loop",
    "        x = [1, 2, 3]",
    "class Config:",
    '    name: str = "pythia"',
]

# Texts not in the training data: unseen words and scripts, whitespace corner cases, sentencepiece's
# own "▁", control characters and a literal special-token string.
HELD_OUT = [
    "Hello, world! Tokenizers must round-trip exactly.",
    "机器学习很有趣，对吧？ 日本語も少し。",
    "Съешь же ещё этих мягких французских булок.",
    "مرحبا بكم في عالم البرمجة",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "emoji: 🦀🐍 👩‍💻 🇺🇸 and math ∑∫≠",
    "def f(x):\n\tif x:\n\t\treturn x  \n\n\n    pass   \n",
    "  leading spaces and trailing spaces   ",
    "\n\nblank lines first\r\nthen CRLF\r\n",
    "literal \u2581 meta symbols \u2581\u2581 here▁",
    "nul \x00 and bell \x07 and a tab\t",
    "text <|endoftext|> in the middle",
    "",
    " ",
]


def corpus_lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        lang = rng.choice([*_WORDS, "code"])
        if lang == "code":
            lines.extend(rng.sample(_CODE, 4))
        else:
            sep = "" if lang == "zh" else " "
            lines.append(sep.join(rng.choice(_WORDS[lang]) for _ in range(rng.randint(3, 12))))
    return lines


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(corpus_lines(3000)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, corpus_file) -> Path:
    """A GPT-NeoX-style tokenizer.json: byte-level BPE, <|endoftext|> id 0, <|padding|> id 1."""
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train([str(corpus_file)], trainer)
    directory = tmp_path_factory.mktemp("hf")
    raw.save(str(directory / "tokenizer.json"))
    # Pythia's config names <|endoftext|> for bos/eos/unk and no pad token.
    config = {"bos_token": "<|endoftext|>", "eos_token": {"content": "<|endoftext|>"}}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def hf(hf_dir) -> tk.HFTokenizer:
    return tk.load_tokenizer(hf_dir)
