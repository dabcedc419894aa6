"""A Hugging Face export's tokenizer reads, in transformers, into our ids and text (#14 item 2).

The reference is transformers' own ``AutoTokenizer.from_pretrained`` on the exported folder,
compared with our tokenizer (sentencepiece itself, or the ``tokenizers`` file) on varied text.
"""

import json

import jax
import pytest
from helpers.tokenizer import HELD_OUT
from transformers import AutoTokenizer, GenerationConfig

from neox_jax.convert import save_hf
from neox_jax.convert.hf_tokenizer import PROBE_TEXTS, write_hf_tokenizer
from neox_jax.data import spm_training
from neox_jax.data.tokenizer import load_tokenizer
from neox_jax.errors import UserError
from neox_jax.finetune.chat import ChatTemplate, run_chat_template
from neox_jax.model import ModelConfig, init_params

# The two documented differences of every `tokenizers` port of sentencepiece (see
# neox_jax/convert/hf_tokenizer.py): a literal "▁" and a special-token string in the text.
TEXTS = [t for t in (*PROBE_TEXTS, *HELD_OUT) if "\u2581" not in t and "<|endoftext|>" not in t]
TEXTS += ["def foo(x):\n    return x", "a\u00a0b \u3000c", "x" * 300, "\t\n \n\t " * 5]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory, corpus_file):  # noqa: F811
    out = tmp_path_factory.mktemp("spm_tok")
    spm_training.train_sentencepiece(corpus_file, 700, out / "spm.model", input_sentence_size=5000)
    return out


def _export(tokenizer_dir, out, chat_template=None, vocab=700):
    # A real export (config.json says gpt_neox, which alone made transformers pick
    # GPTNeoXTokenizer): the tokenizer must not depend on the model's type.
    config = ModelConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    params = jax.device_get(init_params(config, jax.random.key(0)))
    return save_hf(config, params, out, tokenizer_dir=tokenizer_dir, chat_template=chat_template)


def _assert_same(ours, theirs):
    for text in TEXTS:
        ids = ours.encode(text)
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids) == ours.decode(ids) == text, text
    assert theirs.eos_token_id == ours.eos_id
    assert theirs.pad_token_id == ours.pad_id
    with_specials = [ours.eos_id, *ours.encode("hi there"), ours.pad_id]
    assert theirs.decode(with_specials) == ours.decode(with_specials)
    skipped = ours.decode(with_specials, skip_special_tokens=True)
    assert theirs.decode(with_specials, skip_special_tokens=True) == skipped == "hi there"


def test_sentencepiece_export_loads_in_transformers_with_our_ids(spm_dir, tmp_path):
    out = _export(spm_dir, tmp_path / "export")
    ours = load_tokenizer(spm_dir)
    theirs = AutoTokenizer.from_pretrained(out)
    _assert_same(ours, theirs)
    # The issue's own example, and our loader on the export gives the same ids again.
    text = "def foo(x):\n    return x"
    assert theirs.decode(theirs(text)["input_ids"]) == text
    again = load_tokenizer(out)
    assert [again.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]


def test_tokenizer_json_export_loads_in_transformers_with_our_ids(hf_dir, hf, tmp_path):  # noqa: F811
    out = _export(hf_dir, tmp_path / "export", vocab=hf.vocab_size)
    theirs = AutoTokenizer.from_pretrained(out)
    # Pythia's config names no pad token; transformers then has none either.
    for text in TEXTS:
        ids = hf.encode(text)
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids) == hf.decode(ids) == text, text
    assert theirs.eos_token_id == hf.eos_id


def test_chat_run_export_carries_its_template(spm_dir, tmp_path):
    template = (
        "{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"data": {"source": "sft", "sft_chat_template": template}})
    )
    assert run_chat_template(run / "checkpoints" / "12") == template
    out = _export(spm_dir, tmp_path / "export", chat_template=run_chat_template(run))
    theirs = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ours = ChatTemplate.for_tokenizer(load_tokenizer(spm_dir), template)
    assert theirs.apply_chat_template(messages, tokenize=False) == ours.render(messages)
    prompt = theirs.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == ours.render(messages[:1], add_generation_prompt=True)


def test_run_chat_template_only_for_sft_runs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"data": {"source": "stdlib"}}))
    assert run_chat_template(tmp_path) is None
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "config.json").write_text(json.dumps({"data": {"source": "sft"}}))
    assert "<|assistant|>" in run_chat_template(sft)  # the default template
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    assert run_chat_template(model) is None


def test_unreproducible_sentencepiece_model_is_refused(corpus_file, tmp_path):  # noqa: F811
    # nmt_nfkc with whitespace removal normalizes the text around the "\n" symbol in a way a
    # `tokenizers` pipeline (which normalizes between added tokens) cannot reproduce: the
    # export must say so rather than write a tokenizer that gives other ids.
    src = tmp_path / "src"
    spm_training.train_sentencepiece(
        corpus_file, 700, src / "tokenizer.model", input_sentence_size=5000,
        normalization_rule_name="nmt_nfkc", add_dummy_prefix=True,
        remove_extra_whitespaces=True, allow_whitespace_only_pieces=False,
    )  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match="same ids"):
        write_hf_tokenizer(src, out)
    assert not (out / "tokenizer.json").exists()


def test_sentencepiece_with_add_bos_token_exports_its_bos_and_generation_config(
    corpus_file,  # noqa: F811
    tmp_path,
):
    """A Llama-style sentencepiece folder (``add_bos_token: true``) adds its bos to model
    input; the export's tokenizer.json does the same in transformers, and the folder's
    generation_config.json (two eos ids) comes along for ``generate``."""
    src = tmp_path / "src"
    spm_training.train_sentencepiece(
        corpus_file, 700, src / "tokenizer.model", input_sentence_size=5000, bos_token="<s>"
    )
    (src / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 4]}))
    ours = load_tokenizer(src)
    assert ours.add_bos_token and ours.special_prefix == (3,) and ours.eos_ids == (0, 4)
    out = _export(src, tmp_path / "export")
    theirs = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert theirs(text)["input_ids"] == ours.encode(text, add_special_tokens=True), text
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
    assert GenerationConfig.from_pretrained(out).eos_token_id == [0, 4]
    assert load_tokenizer(out).encode("hi", add_special_tokens=True)[0] == 3
    config = json.loads((out / "config.json").read_text())  # generate's fallback ids
    assert (config["bos_token_id"], config["eos_token_id"]) == (3, [0, 4])


def test_gpt2_bpe_files_export_as_a_tokenizer_json_with_their_ids(tmp_path):
    """GPT-2's vocab.json + merges.txt whose <|endoftext|> is not id 0: the export's
    tokenizer.json reads into our ids in transformers, and config.json names that eos."""
    from tokenizers import ByteLevelBPETokenizer

    src = tmp_path / "gpt2"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(HELD_OUT * 20, vocab_size=400, show_progress=False,
                            special_tokens=["<|pad|>", "<|endoftext|>"])  # fmt: skip
    src.mkdir()
    bpe.save_model(str(src))
    config = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    ours = load_tokenizer(src)
    assert (ours.eos_id, ours.pad_id) == (1, 0)
    out = _export(src, tmp_path / "export", vocab=512)
    assert not (out / "vocab.json").exists()
    _assert_same(ours, AutoTokenizer.from_pretrained(out))
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 1, 0)
