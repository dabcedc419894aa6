"""Tests for neox_jax.data.tokenizer: both backends, batching, training, loading and errors."""

import json
import pickle

import numpy as np
import pytest
from helpers.tokenizer import HELD_OUT, corpus_lines
from tokenizers import Tokenizer as RawTokenizer

from neox_jax.data import spm_training
from neox_jax.data import tokenizer as tk


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory, corpus_file) -> tk.SentencePieceTokenizer:
    out = tmp_path_factory.mktemp("spm") / "spm.model"
    return spm_training.train_sentencepiece(corpus_file, 700, out, input_sentence_size=5000)


# --- Hugging Face backend -------------------------------------------------------------------


def test_hf_special_ids_and_vocab(hf, hf_dir):
    assert isinstance(hf, tk.HFTokenizer)
    assert (hf.eos_id, hf.bos_id, hf.pad_id) == (0, 0, 1)
    assert hf.vocab_size == RawTokenizer.from_file(str(hf_dir / "tokenizer.json")).get_vocab_size()
    assert hf.id_to_token(1) == "<|padding|>"
    assert hf.token_to_id("<|endoftext|>") == 0
    assert hf.token_to_id("not a token at all") is None


@pytest.mark.parametrize("text", HELD_OUT)
def test_hf_round_trip(hf, text):
    ids = hf.encode(text)
    assert all(0 <= i < hf.vocab_size for i in ids)
    assert hf.decode(ids) == text
    assert hf.decode(np.asarray(ids, np.int32)) == text


def test_hf_matches_transformers(hf, hf_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    for text in HELD_OUT[:8]:
        assert hf.encode(text) == ref.encode(text, add_special_tokens=False), text


def test_special_ids_without_config(hf_dir, tmp_path):
    # Without tokenizer_config.json the ids come from the added tokens by string.
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    tok = tk.load_tokenizer(tmp_path / "tokenizer.json")
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (0, 0, 1)


def test_config_overrides_and_bad_config(hf_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"pad_token": {"content": "<|endoftext|>"}, "eos_token": None}))
    tok = tk.load_tokenizer(tmp_path)
    assert (tok.eos_id, tok.pad_id) == (0, 0)
    config.write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="eos_token '</s>'"):
        tk.load_tokenizer(tmp_path)
    config.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        tk.load_tokenizer(tmp_path)


# --- shared interface (run on both backends) ------------------------------------------------


@pytest.fixture(params=["hf", "spm"])
def tok(request, hf, spm_tok) -> tk.Tokenizer:
    return hf if request.param == "hf" else spm_tok


def test_add_bos_eos_and_decode_specials(tok):
    ids = tok.encode("the model", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids[1:-1] == tok.encode("the model")
    assert tok.decode(ids) == "<|endoftext|>the model<|endoftext|>"
    assert tok.decode(ids, skip_special_tokens=True) == "the model"
    with pytest.raises(ValueError, match="1-D"):
        tok.decode([ids, ids])


def test_encode_batch_right_padding(tok):
    texts = ["the model reads", "", "token"]
    ids, mask = tok.encode_batch(texts)
    seqs = [tok.encode(t) for t in texts]
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids.shape == mask.shape == (3, max(map(len, seqs)))
    for row, seq in enumerate(seqs):
        n = len(seq)
        assert ids[row, :n].tolist() == seq
        assert (ids[row, n:] == tok.pad_id).all()
        assert mask[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)


def test_encode_batch_left_padding_max_length(tok):
    texts = ["the model reads tokens", "next"]
    ids, mask = tok.encode_batch(
        texts, max_length=32, padding="max_length", padding_side="left", add_eos=True
    )
    assert ids.shape == (2, 32)
    for row, text in enumerate(texts):
        seq = tok.encode(text, add_eos=True)
        assert ids[row, 32 - len(seq) :].tolist() == seq
        assert (ids[row, : 32 - len(seq)] == tok.pad_id).all()
        assert mask[row].sum() == len(seq) and mask[row, -1] == 1


def test_encode_batch_truncation_and_lists(tok):
    text = "the model reads tokens and predicts what comes next"
    full = tok.encode(text)
    assert len(full) > 4
    ids, mask = tok.encode_batch([text, "a"], max_length=4, truncation=True)
    assert ids.shape == (2, 4) and ids[0].tolist() == full[:4] and mask[0].all()
    with pytest.raises(ValueError, match="truncation=True"):
        tok.encode_batch([text], max_length=4)
    assert tok.encode_batch([text, "a"], padding=None) == [full, tok.encode("a")]
    assert tok.encode_batch([], padding="longest")[0].shape == (0, 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"padding": "max"},
        {"padding_side": "middle"},
        {"padding": "max_length"},
        {"truncation": True},
    ],
)
def test_encode_batch_rejects_bad_arguments(tok, kwargs):
    with pytest.raises(ValueError):
        tok.encode_batch(["x"], **kwargs)


def test_save_and_reload(tok, tmp_path):
    path = tk.save(tok, tmp_path / "ckpt")
    again = tk.load_tokenizer(tmp_path / "ckpt")
    assert path.name == type(tok).file_name and type(again) is type(tok)
    assert (again.eos_id, again.bos_id, again.pad_id) == (tok.eos_id, tok.bos_id, tok.pad_id)
    assert again.vocab_size == tok.vocab_size
    for text in HELD_OUT:
        assert again.encode(text) == tok.encode(text)


def test_pickle_round_trip(tok):
    # Preprocessing hands tokenizers to worker processes.
    again = pickle.loads(pickle.dumps(tok))
    assert [again.encode(t) for t in HELD_OUT] == [tok.encode(t) for t in HELD_OUT]
    assert (again.eos_id, again.bos_id, again.pad_id) == (tok.eos_id, tok.bos_id, tok.pad_id)


# --- sentencepiece training -----------------------------------------------------------------


@pytest.mark.parametrize("text", HELD_OUT)
def test_spm_round_trip_held_out(spm_tok, text):
    ids = spm_tok.encode(text)
    assert all(0 <= i < spm_tok.vocab_size for i in ids)
    assert spm_tok.decode(ids) == text


def test_spm_special_ids_and_layout(spm_tok):
    assert spm_tok.vocab_size == 700
    assert (spm_tok.eos_id, spm_tok.pad_id, spm_tok.bos_id) == (0, 1, 0)
    assert spm_tok.id_to_token(0) == "<|endoftext|>"
    assert spm_tok.id_to_token(2) == "<unk>"
    assert spm_tok.encode("\n") == [spm_tok.token_to_id("\n")]
    assert spm_tok.token_to_id("no such piece") is None
    # Indentation and a common word are learned as single pieces, not spelled out.
    assert len(spm_tok.encode("    ")) == 1
    assert len(spm_tok.encode("model")) == 1


def test_spm_training_is_deterministic(corpus_file, spm_tok, tmp_path):
    again = spm_training.train_sentencepiece(
        corpus_file, 700, tmp_path / "a.model", input_sentence_size=5000
    )
    assert again.path.read_bytes() == spm_tok.path.read_bytes()
    # In-memory texts are split into the same lines as the file, so they train the same model.
    texts = corpus_file.read_text(encoding="utf-8").split("\n")
    from_texts = spm_training.train_sentencepiece(texts, 700, tmp_path, input_sentence_size=5000)
    assert from_texts.path == tmp_path / "tokenizer.model"  # a directory gets the canonical name
    assert from_texts.path.read_bytes() == spm_tok.path.read_bytes()


def test_spm_long_lines_unigram_and_bos(tmp_path):
    # A line far over max_sentence_length is chunked rather than silently dropped.
    long_line = " ".join(corpus_lines(400, seed=1))
    tok = spm_training.train_sentencepiece(
        [long_line],
        400,
        tmp_path / "u.model",
        model_type="unigram",
        max_sentence_length=512,
        bos_token="<s>",
    )
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (0, 1, 3)
    assert tok.id_to_token(3) == "<s>"
    for text in HELD_OUT:
        assert tok.decode(tok.encode(text)) == text


def test_train_rejects_bad_arguments(corpus_file, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        spm_training.train_sentencepiece(corpus_file, 200, tmp_path / "x.model")
    with pytest.raises(ValueError, match="Vocabulary size too high"):
        spm_training.train_sentencepiece(["tiny corpus"], 5000, tmp_path / "x.model")
    with pytest.raises(ValueError, match="model_type"):
        spm_training.train_sentencepiece(corpus_file, 700, tmp_path / "x.model", model_type="word")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        spm_training.train_sentencepiece(tmp_path / "missing.txt", 700, tmp_path / "x.model")
    assert not (tmp_path / "x.model").exists()


def test_cli_trains(corpus_file, tmp_path, capsys):
    out = tmp_path / "cli" / "spm.model"
    argv = ["spm", f"--input={corpus_file},{corpus_file}", "--vocab_size=600", f"--output={out}"]
    assert spm_training.COMMAND(argv) == 0  # the old flag spellings still work
    assert "vocab 600" in capsys.readouterr().out
    assert tk.load_tokenizer(out.parent).vocab_size == 600


# --- loading errors -------------------------------------------------------------------------


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        tk.load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="no_dir"):
        tk.load_tokenizer(tmp_path / "no_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*tokenizer\.json.*\.model"):
        tk.load_tokenizer(tmp_path / "empty")


def test_corrupt_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ValueError, match="tokenizer.json"):
        tk.load_tokenizer(tmp_path)
    (tmp_path / "bad.model").write_bytes(b"\x00garbage\xff")
    with pytest.raises(ValueError, match="bad.model"):
        tk.load_tokenizer(tmp_path / "bad.model")


def test_directory_lookup(spm_tok, tmp_path):
    model = spm_tok.path.read_bytes()
    (tmp_path / "only.model").write_bytes(model)
    assert isinstance(tk.load_tokenizer(tmp_path), tk.SentencePieceTokenizer)
    (tmp_path / "other.model").write_bytes(model)
    with pytest.raises(ValueError, match="several"):
        tk.load_tokenizer(tmp_path)
    (tmp_path / "spm.model").write_bytes(model)  # a known name wins over the ambiguity
    assert tk.load_tokenizer(tmp_path).path.name == "spm.model"
