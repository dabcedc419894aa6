"""Tokenizer folders as other tools leave them, read against transformers' reading of them.

* a Llama/Mistral folder with only ``tokenizer.model`` (sentencepiece, Llama's trainer
  settings) and its ``tokenizer_config.json``;
* a ``tokenizer.json`` whose added tokens sit past the BPE vocabulary (as Qwen's do), some
  special, one not;
* a token declared only in ``tokenizer_config.json``'s ``added_tokens_decoder`` (transformers
  adds it on loading);
* a sentencepiece folder to which transformers added a token the model does not hold;
* GPT-2's vocab.json + merges.txt (a folder, its slow tokenizer's files, GPT-NeoX's names).
"""

import io
import json

import pytest
import sentencepiece as spm
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from neox_jax.data.tokenizer import copy_tokenizer, load_tokenizer

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world",
         "123", "4567", "café", "naïve"]  # fmt: skip
TEXTS = ["hello world", "hello  world ", "\nfox 123", "café naïve 🌍", "a</s>b", "", "x\n\n y"]


def _corpus():
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) for i in range(500)]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(  # Llama's settings: BPE, byte fallback, split digits
        sentence_iterator=iter(_corpus()), model_writer=model, vocab_size=300,
        model_type="bpe", byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
              "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "legacy": False}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_sentencepiece_only_llama_folder_reads_as_transformers_does(llama_dir):
    ref = transformers.AutoTokenizer.from_pretrained(str(llama_dir))
    assert not (llama_dir / "tokenizer.json").exists()
    tok = load_tokenizer(llama_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id, None)
    assert tok.vocab_size == len(ref) == 300
    sp = spm.SentencePieceProcessor(model_file=str(llama_dir / "tokenizer.model"))
    for text in TEXTS:
        # "</s>" in text is the eos id, as in transformers; the text around it is encoded
        # by sentencepiece piece by piece (as Meta's own chat code does), where transformers
        # 5 leaves out the dummy prefix of the piece after a special token.
        if "</s>" in text:
            before, after = text.split("</s>")
            assert tok.encode(text) == sp.encode(before) + [2] + sp.encode(after)
            continue
        assert tok.encode(text, add_special_tokens=True) == ref(text).input_ids, text
        assert tok.encode(text) == ref(text, add_special_tokens=False).input_ids == sp.encode(text)
        assert tok.decode(tok.encode(text)) == ref.decode(
            ref(text, add_special_tokens=False).input_ids
        )


def _bpe_json(vocab_size=270):
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    raw.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False))  # fmt: skip
    return json.loads(raw.to_str())


def _added(i, content, special=True):
    return {"id": i, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": not special, "special": special}  # fmt: skip


def _compare(folder, texts):
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok = load_tokenizer(folder)
    assert tok.vocab_size == len(ref)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)  # fmt: skip
    for text in texts:
        ids = ref(text).input_ids
        assert tok.encode(text, add_special_tokens=True) == ids, text
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip
            )
    return tok, ref


CHAT_TEXTS = ["<|im_start|>user\nhello<|im_end|>\n<think>fox</think>", "dog<|endoftext|>"]


@pytest.mark.parametrize("gap", [0, 50], ids=["contiguous", "declared_past_a_gap"])
def test_added_tokens_past_the_bpe_vocabulary(tmp_path, gap):
    spec = _bpe_json()
    base = len(spec["model"]["vocab"]) + gap
    names = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
             ("<think>", False)]  # fmt: skip
    spec["added_tokens"] = [_added(base + i, c, s) for i, (c, s) in enumerate(names)]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    # Qwen's tokenizer_config.json: no bos (null), though <|endoftext|> exists.
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok, ref = _compare(tmp_path, CHAT_TEXTS)
    assert tok.token_to_id("<|im_end|>") == ref.convert_tokens_to_ids("<|im_end|>")


def test_token_declared_only_in_tokenizer_config(tmp_path):
    spec = _bpe_json()
    n = len(spec["model"]["vocab"])
    spec["added_tokens"] = [_added(n, "<|im_end|>")]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    declared = {str(n): _added(n, "<|im_end|>"), str(n + 1): _added(n + 1, "<|pad|>")}
    for entry in declared.values():
        del entry["id"]
    config = {"eos_token": "<|im_end|>", "pad_token": "<|pad|>", "added_tokens_decoder": declared}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok, ref = _compare(tmp_path, ["fox<|pad|><|im_end|>"])
    assert tok.pad_id == ref.pad_token_id == n + 1


@pytest.mark.parametrize("extra", [[], ["<|im_start|>"]], ids=["pad", "pad_and_chat_token"])
def test_sentencepiece_folder_with_tokens_added_by_transformers_is_refused(
    llama_dir, tmp_path, extra
):
    ref = transformers.AutoTokenizer.from_pretrained(str(llama_dir))
    ref.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": extra})
    ref.save_pretrained(str(tmp_path))
    (tmp_path / "tokenizer.json").unlink()  # as older slow-tokenizer uploads ship it
    (tmp_path / "tokenizer.model").write_bytes((llama_dir / "tokenizer.model").read_bytes())
    assert ref("<pad>").input_ids[-1] == 300  # what transformers would train on
    with pytest.raises(
        ValueError, match=r"adds tokens that tokenizer.model does not hold.*save_pretrained"
    ):
        load_tokenizer(tmp_path)


def test_llama3_tiktoken_model_file_is_named(tmp_path):
    # Llama 3's original/tokenizer.model is tiktoken's BPE dump (tiktoken's
    # dump_tiktoken_bpe: base64 of each token, a space, its rank, one per line), not a
    # sentencepiece protobuf, though it has the same name.
    import base64

    ranks = [bytes([b]) for b in range(256)] + [b"he", b"ll", b"hello"]
    lines = [base64.b64encode(t) + b" " + str(r).encode() for r, t in enumerate(ranks)]
    (tmp_path / "tokenizer.model").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match="tiktoken BPE file.*tokenizer.json"):
        load_tokenizer(tmp_path)


GPT2_TEXTS = [*TEXTS, "a<|endoftext|>b", "  leading", "it's we'll", "x<|pad|>y", "<|endoftext|>"]


def _gpt2_files(folder, vocab="vocab.json", merges="merges.txt"):
    # GPT-2's (and GPT-NeoX's GPT2BPETokenizer's) vocab.json + merges.txt, as the tokenizers
    # library's ByteLevelBPETokenizer.save_model writes them, with no tokenizer.json.
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus(), vocab_size=300, show_progress=False,
                            special_tokens=["<|endoftext|>"])  # fmt: skip
    bpe.save_model(str(folder))
    if (vocab, merges) != ("vocab.json", "merges.txt"):
        (folder / "vocab.json").rename(folder / vocab)
        (folder / "merges.txt").rename(folder / merges)
    return folder


def _same_as(tok, ref, texts=GPT2_TEXTS):
    assert tok.vocab_size == len(ref)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)  # fmt: skip
    for text in texts:
        ids = ref(text).input_ids  # what the model is fed: the folder's added tokens too
        assert tok.encode(text, add_special_tokens=True) == ids, text
        assert tok.decode(ids) == ref.decode(ids), text


def test_gpt2_vocab_and_merges_folder_reads_as_transformers_does(tmp_path):
    folder = _gpt2_files(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "vocab.json"]
    tok = load_tokenizer(folder)
    _same_as(tok, transformers.GPT2Tokenizer.from_pretrained(str(folder)))
    assert tok.eos_id == tok.token_to_id("<|endoftext|>") == 0
    assert tok.encode("fox<|endoftext|>") == [*tok.encode("fox"), 0]  # kept whole


def test_gpt2_folder_with_its_slow_tokenizer_files(tmp_path):
    # What transformers' slow GPT2Tokenizer.save_pretrained left: a config that puts bos in
    # front of every text and names a pad token, and an added_tokens.json.
    folder = _gpt2_files(tmp_path)
    (folder / "added_tokens.json").write_text(json.dumps({"<|pad|>": 300}))
    config = {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True,
              "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
              "pad_token": "<|pad|>"}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    # Not a text that starts with the bos text: encode never puts bos in front of it twice.
    texts = [t for t in GPT2_TEXTS if not t.startswith("<|endoftext|>")]
    _same_as(tok, transformers.AutoTokenizer.from_pretrained(str(folder)), texts)
    assert tok.special_prefix == (0,) and tok.pad_id == 300

    # Saved (into a checkpoint, a run's tokenizer folder) as a tokenizer.json that reads
    # back to the same ids.
    saved = tmp_path / "saved"
    copy_tokenizer(folder, saved)
    assert (saved / "tokenizer.json").is_file() and not (saved / "vocab.json").exists()
    again = load_tokenizer(saved)
    assert type(again).__name__ == "HFTokenizer"
    for text in GPT2_TEXTS:
        assert again.encode(text, add_special_tokens=True) == tok.encode(
            text, add_special_tokens=True), text  # fmt: skip
    assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_gpt_neox_gpt2_vocab_file_finds_its_merges(tmp_path):
    # GPT-NeoX's configs name vocab_file: data/gpt2-vocab.json, merge_file:
    # data/gpt2-merges.txt; the vocab file alone finds its merges by name.
    folder = _gpt2_files(tmp_path, "gpt2-vocab.json", "gpt2-merges.txt")
    tok = load_tokenizer(folder / "gpt2-vocab.json")
    plain = tmp_path / "plain"  # the same files under transformers' names
    plain.mkdir()
    (plain / "vocab.json").write_bytes((folder / "gpt2-vocab.json").read_bytes())
    (plain / "merges.txt").write_bytes((folder / "gpt2-merges.txt").read_bytes())
    _same_as(tok, transformers.GPT2Tokenizer.from_pretrained(str(plain)))


def test_gpt2_files_that_do_not_make_a_tokenizer(tmp_path):
    folder = _gpt2_files(tmp_path)
    (folder / "added_tokens.json").write_text(json.dumps({"<|pad|>": 305}))
    with pytest.raises(ValueError, match="added_tokens.json.*305.*continue"):
        load_tokenizer(folder)
    (folder / "added_tokens.json").unlink()
    (folder / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="vocab.json without merges.txt"):
        load_tokenizer(folder)
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer.json"):
        load_tokenizer(folder / "vocab.json")  # a vocab whose merges are nowhere


def test_control_symbols_of_a_mistral_sentencepiece_model(tmp_path):
    # Mistral v0.3's tokenizer.model holds [INST] and [/INST] as control pieces: text never
    # encodes to them in sentencepiece, but transformers (and mistral-common) give their ids
    # where the chat template writes them. Between them, sentencepiece's own encoding.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, vocab_size=300,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        control_symbols=["[INST]", "[/INST]"], minloglevel=2,
    )  # fmt: skip
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    inst, end = ref.convert_tokens_to_ids(["[INST]", "[/INST]"])
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    tok = load_tokenizer(tmp_path)
    text = "[INST] hello fox [/INST] the dog</s>"
    ids = tok.encode(text)
    assert ids == [inst, *sp.encode(" hello fox "), end, *sp.encode(" the dog"), 2]
    assert [i for i in ref(text).input_ids if i in (inst, end, 2)] == [inst, end, 2]
    assert tok.decode(ids) == text
