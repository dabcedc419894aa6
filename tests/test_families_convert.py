"""``python -m neox_jax.convert`` on each family (Llama, Mistral, Qwen2, Qwen3) both ways,
and the families' ``tokenizer.json`` kinds through the one tokenizer interface.

The CLI runs in-process (``COMMAND([prog, *flags])``: the flag parsing and the body of
``python -m neox_jax.convert``; tests/test_convert.py runs it as a subprocess). A
transformers checkpoint goes to a neox_jax checkpoint and back: every tensor must come
back bit-identical and the config must say the same model to transformers.

The tokenizers are tiny ones trained here with the ``tokenizers`` library in each
family's published construction: Qwen2/Qwen3's and Llama 3's byte-level BPE (their
pre-tokenizer regexes, their special tokens; Llama 3 adds ``<|begin_of_text|>``),
Mistral's sentencepiece-style BPE (``▁`` metaspace, ``<0xNN>`` byte fallback, ``<s>``).
The reference is transformers' ``PreTrainedTokenizerFast`` on the same folder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file
from test_families import make_family_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from neox_jax.convert.__main__ import COMMAND
from neox_jax.data.tokenizer import load_tokenizer
from neox_jax.loading import find_tokenizer

CORPUS = [
    "The weather in Paris is 18 C today, isn't it?",
    "Qwen, Llama and Mistral read their tokenizer.json files.\n\nNew lines too.",
    "naïve café in Zürich costs 12345 francs; 東京 is far.",
] * 4
TEXTS = ["The weather in Zürich isn't 18 C.", "two  spaces\nand 東京 12345 ü", "tokenizer"]
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = _QWEN_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")  # digits in threes
# Per family: its model options, the tokenizer kind and tokenizer_config.json's tokens.
FAMILIES = {
    "llama": (dict(num_key_value_heads=1, rope_scaling={"rope_type": "llama3", "factor": 8.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 32}), "llama3",
              {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}),
    "mistral": (dict(sliding_window=6), "mistral", {"bos_token": "<s>", "eos_token": "</s>"}),
    "qwen2": (dict(tie_word_embeddings=True), "qwen", {"eos_token": "<|im_end|>"}),
    "qwen3": (dict(head_dim=24), "qwen", {"eos_token": "<|im_end|>"}),
}  # fmt: skip
SPECIALS = {
    "qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
    "mistral": ["<unk>", "<s>", "</s>"],
}


def _byte_level(split: str, specials: list[str], bos: str | None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=alphabet
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos:  # Llama 3 starts every encoding with <|begin_of_text|>
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def _sentencepiece_bpe() -> Tokenizer:
    """Mistral's kind: BPE over ``▁``-joined words, unknown characters as <0xNN> bytes."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=SPECIALS["mistral"])
    tok.train_from_iterator([t for t in CORPUS if "東" not in t], trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for b in range(256):  # byte tokens after the specials, as sentencepiece lays them out
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    data["model"].update(byte_fallback=True, fuse_unk=True)
    data["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    tok = Tokenizer.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


def write_family_tokenizer(kind: str, folder, tokens: dict) -> None:
    tok = {
        "qwen": lambda: _byte_level(_QWEN_SPLIT, SPECIALS["qwen"], None),
        "llama3": lambda: _byte_level(_LLAMA3_SPLIT, SPECIALS["llama3"], "<|begin_of_text|>"),
        "mistral": _sentencepiece_bpe,
    }[kind]()
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    options, kind, tokens = FAMILIES[request.param]
    path = tmp_path_factory.mktemp(request.param) / "hf"
    make_family_model(request.param, path, vocab_size=384, **options)
    write_family_tokenizer(kind, path, tokens)
    return request.param, kind, path


def _convert(src, dst, to):
    flags = [f"--config.src={src}", f"--config.dst={dst}", f"--config.to={to}"]
    assert COMMAND(["neox_jax.convert", *flags]) == 0


def _effective(config, ignore) -> dict:
    """config.to_dict() with what does not change the model normalised: head_dim spelled
    out when it is hidden / heads, max_window_layers dropped when no window is used."""
    d = {k: v for k, v in config.to_dict().items() if k not in ignore}
    d["head_dim"] = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
    if not d.get("use_sliding_window", True):
        d.pop("max_window_layers", None)
    return d


def test_convert_cli_both_ways_is_exact(family, tmp_path):
    name, _, hf = family
    _convert(hf, tmp_path / "ours", "neox")
    _convert(tmp_path / "ours", tmp_path / "back", "hf")
    original, back = load_file(str(hf / "model.safetensors")), {}
    for f in (tmp_path / "back").glob("*.safetensors"):
        back.update(load_file(str(f)))
    assert set(back) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    # transformers reads the same model from both config.json files.
    # (initializer_range only seeds a fresh model's weights; ours is not kept.)
    ignore = {"transformers_version", "torch_dtype", "dtype", "_name_or_path", "initializer_range"}
    configs = [
        _effective(transformers.AutoConfig.from_pretrained(p), ignore)
        for p in (hf, tmp_path / "back")
    ]
    keys = configs[0].keys() | configs[1].keys()
    differ = {k: (configs[0].get(k), configs[1].get(k)) for k in keys
              if configs[0].get(k) != configs[1].get(k)}  # fmt: skip
    assert not differ, differ
    assert configs[1]["model_type"] == name
    # The family's tokenizer travels with the checkpoint both ways, ids unchanged.
    want = [load_tokenizer(hf).encode(t) for t in TEXTS]
    for folder in (tmp_path / "ours", tmp_path / "back"):
        assert [load_tokenizer(find_tokenizer(folder)).encode(t) for t in TEXTS] == want


def test_family_tokenizer_json_through_the_tokenizer_interface(family):
    """Ids, decoding, special tokens and bos/eos as transformers reads the same folder."""
    _, kind, hf = family
    ours, ref = load_tokenizer(hf), transformers.AutoTokenizer.from_pretrained(hf)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ids) == ref.decode(ids) == text
    assert ours.eos_id == ref.eos_token_id is not None
    if kind != "qwen":  # Llama 3 and Mistral start encodings with their bos
        assert ours.encode(TEXTS[0], add_bos=True) == ref(TEXTS[0]).input_ids
        assert ours.bos_id == ref.bos_token_id
    chat = {"qwen": "<|im_start|>user\nhi<|im_end|>", "llama3": "<|begin_of_text|>hi<|eot_id|>",
            "mistral": "hi</s>"}[kind]  # fmt: skip
    assert ours.encode(chat) == ref(chat, add_special_tokens=False).input_ids
    assert ours.decode(ours.encode(chat)) == chat
