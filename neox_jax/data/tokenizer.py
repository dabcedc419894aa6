"""Tokenizers: one interface over Hugging Face `tokenizer.json` files, sentencepiece models
and GPT-2's BPE files.

GPT-NeoX-20B/Pythia ship a byte-level BPE `tokenizer.json` (`HFTokenizer`); sentencepiece models
(`SentencePieceTokenizer`) come from elsewhere or from `neox_jax.data.spm_training`, which trains
a byte-fallback BPE on which any text round-trips exactly; GPT-2's `vocab.json` + `merges.txt`
(`GPT2BPETokenizer`) come from older checkpoints and GPT-NeoX's own configs. `load_tokenizer`
picks the backend from a file or directory; the interface they share, `Tokenizer`, is in
`neox_jax.data.tokenizer_base`.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
import tokenizers

from neox_jax import hub
from neox_jax.data.generation_config import GENERATION_FILE  # noqa: F401 - re-exported
from neox_jax.data.tokenizer_base import Tokenizer, _existing_file, _id_list
from neox_jax.data.tokenizer_files import (  # noqa: F401 - re-exported: the public names
    ADDED_TOKENS_FILE,
    CONFIG_FILE,
    HF_FILE,
    SPECIAL_MAP_FILE,
    SPM_FILE,
    TOKENIZER_FILES,
    atomic_write,
    gpt2_bpe_files,
    literal_meta_ids,
    missing_tokenizer_hint,
    not_sentencepiece_hint,
    read_json,
    refuse_added_tokens,
)
from neox_jax.data.tokenizer_files import copy_tokenizer as _copy_tokenizer_files

_SPM_NAMES = (SPM_FILE, "spm.model")
_META = "\u2581"  # sentencepiece's stand-in for " "


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` file (GPT-NeoX-20B/Pythia: byte-level BPE)."""

    file_name = HF_FILE

    def __init__(self, path: str | os.PathLike) -> None:
        path = _existing_file(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{path}: not a valid Hugging Face tokenizer.json ({e})") from e
        self._add_declared(path.parent / CONFIG_FILE)
        self._added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
        super().__init__(path)

    def _add_declared(self, config: Path) -> None:
        # tokenizer_config.json's added_tokens_decoder may declare tokens tokenizer.json lacks;
        # transformers adds them on loading, in id order, after the others: so do we.
        declared = read_json(config).get("added_tokens_decoder") if config.is_file() else None
        for key in sorted(declared or {}, key=lambda k: int(k) if str(k).isdigit() else -1):
            entry = declared[key]
            if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
                raise ValueError(f"{config}: added_tokens_decoder[{key!r}] has no 'content'")
            if self._tok.token_to_id(entry["content"]) is not None:
                continue
            flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
            token = tokenizers.AddedToken(
                entry["content"], **{f: bool(entry[f]) for f in flags if f in entry}
            )
            add = self._tok.add_special_tokens if entry.get("special") else self._tok.add_tokens
            add([token])

    def _special_token_id(self, token: str) -> int | None:
        # Only added tokens count: a plain BPE entry spelled "<s>" is ordinary text.
        return self._added.get(token)

    def _input_specials(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        # tokenizer.json's post_processor decides (transformers ignores add_bos_token when
        # there is a tokenizer.json); the ids it adds around a probe text have no sequence.
        enc = self._tok.encode("a b", add_special_tokens=True)
        own = [i for i, s in enumerate(enc.sequence_ids) if s is not None]
        if not own:  # the probe encodes to nothing: all that is left was added in front
            return tuple(enc.ids), ()
        return tuple(enc.ids[: own[0]]), tuple(enc.ids[own[-1] + 1 :])

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(_id_list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        # Added tokens may sit past the BPE vocabulary; count up to the largest id.
        added_end = max(self._added.values(), default=-1) + 1
        return max(self._tok.get_vocab_size(with_added_tokens=True), added_end)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._tok.id_to_token(idx) if idx >= 0 else None


class GPT2BPETokenizer(HFTokenizer):
    """GPT-2's BPE files, `vocab.json` + `merges.txt` (what transformers' slow GPT2Tokenizer
    saves, and GPT-NeoX's GPT2BPETokenizer reads as `vocab_file` and `merge_file`).

    Built with `tokenizers` as transformers builds GPT2Tokenizer from them: byte-level BPE
    with GPT-2's split pattern and no prefix space; the special tokens the folder names
    (bos/eos/unk/pad in `tokenizer_config.json` or `special_tokens_map.json`, else GPT-2's
    `<|endoftext|>`) and `added_tokens.json`'s tokens are kept whole; `add_bos_token` in
    `tokenizer_config.json` puts bos in front of a text. `save_to` writes it as a
    `tokenizer.json` (which `load_tokenizer` reads back to the same ids). GPT-NeoX's own
    tokenizer splits a `<|endoftext|>` written in the text into pieces; transformers and
    this class read it as the token.
    """

    def __init__(self, vocab: str | os.PathLike, merges: str | os.PathLike) -> None:
        vocab, merges = _existing_file(vocab), _existing_file(merges)
        try:
            model = tokenizers.models.BPE.from_file(str(vocab), str(merges))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{vocab} + {merges}: not GPT-2 BPE files ({e})") from e
        self._tok = tokenizers.Tokenizer(model)
        self._tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = tokenizers.decoders.ByteLevel()
        self.merges_path = merges
        self._add_named_specials(vocab.parent)
        self._add_declared(vocab.parent / CONFIG_FILE)
        self._added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
        Tokenizer.__init__(self, vocab)
        if self._config.get("add_bos_token") is True and self.bos_id is not None:
            bos = self.id_to_token(self.bos_id)
            self._tok.post_processor = tokenizers.processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)]
            )
            self.special_prefix, self.special_suffix = self._input_specials()

    def _add_named_specials(self, folder: Path) -> None:
        named = {}
        for name in (CONFIG_FILE, SPECIAL_MAP_FILE):
            data = read_json(folder / name) if (folder / name).is_file() else {}
            extra = data.get("additional_special_tokens") or []
            for value in [data.get(f"{k}_token") for k in ("bos", "eos", "unk", "pad")] + extra:
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str) and value:
                    named[value] = None
        specials = list(named) or ["<|endoftext|>"]  # GPT2Tokenizer's default bos/eos/unk
        self._tok.add_special_tokens(
            [tokenizers.AddedToken(t, special=True, normalized=False)
             for t in specials if self._tok.token_to_id(t) is not None]
        )  # fmt: skip
        path = folder / ADDED_TOKENS_FILE
        added = read_json(path) if path.is_file() else {}
        for token, idx in sorted(added.items(), key=lambda kv: kv[1]):
            if self._tok.token_to_id(token) is None:
                self._tok.add_tokens([tokenizers.AddedToken(token, normalized=False)])
            if self._tok.token_to_id(token) != idx:
                raise ValueError(
                    f"{path}: {token!r} has id {idx}, but follows a vocabulary of "
                    f"{self._tok.get_vocab_size(with_added_tokens=True) - 1} tokens; "
                    "its ids must continue the vocabulary's"
                )

    def file_bytes(self) -> bytes:
        return self._tok.to_str().encode()


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model` file."""

    file_name = SPM_FILE

    def __init__(self, path: str | os.PathLike) -> None:
        path = _existing_file(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            hint = not_sentencepiece_hint(path)
            raise ValueError(f"{path}: not a valid sentencepiece model ({e}){hint}") from e
        self._meta_bytes = literal_meta_ids(self._sp)
        refuse_added_tokens(path, self.token_to_id)
        super().__init__(path)

    def _declared_special(self, kind: str) -> int | None:
        idx = {"eos": self._sp.eos_id, "bos": self._sp.bos_id, "pad": self._sp.pad_id}[kind]()
        return idx if idx >= 0 else None

    @functools.cached_property
    def _special_text(self) -> re.Pattern | None:
        pieces = sorted({self._sp.id_to_piece(i) for i in self._special_ids} - {""}, key=len)
        return re.compile(f"({'|'.join(map(re.escape, pieces[::-1]))})") if pieces else None

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        # Control pieces (<s>, </s>, Mistral's [INST], ...) never come out of sentencepiece's
        # encoding of text; transformers (and Meta's and Mistral's own code) give their ids
        # where their text stands, so they are cut out first and each part encoded alone.
        special = self._special_text
        if special is None or not any(map(special.search, texts)):
            return self._encode_plain(texts)
        return [self._encode_around(special, text) for text in texts]

    def _encode_around(self, special: re.Pattern, text: str) -> list[int]:
        ids: list[int] = []
        for k, part in enumerate(special.split(text)):  # text, piece, text, ..., text
            if k % 2:
                ids.append(self._sp.piece_to_id(part))
            elif part:
                ids += self._encode_plain([part])[0]
        return ids

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        if self._meta_bytes is None or not any(_META in t for t in texts):
            return self._sp.encode(texts) if texts else []
        parts = [self._sp.encode(t.split(_META)) for t in texts]
        meta = self._meta_bytes
        return [list(itertools.chain(p[0], *([*meta, *q] for q in p[1:]))) for p in parts]

    @functools.cached_property
    def _special_ids(self) -> frozenset[int]:
        n = self._sp.get_piece_size()
        return frozenset(i for i in range(n) if self._sp.is_control(i) or self._sp.is_unknown(i))

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = False) -> str:
        # Control pieces (eos, pad, bos) and unk are the special tokens here. Ids past
        # the pieces (a model vocabulary padded for speed) have no text: dropped, as HF's
        # tokenizers drop ids they do not know, instead of sentencepiece's IndexError.
        n = self._sp.get_piece_size()
        ids, special = [i for i in _id_list(ids) if 0 <= i < n], self._special_ids
        if skip_special_tokens:
            return self._sp.decode([i for i in ids if i not in special])
        out, run = [], []  # sentencepiece drops control pieces; write them out like HF does
        for i in ids:
            if i in special:
                out += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out) + self._sp.decode(run)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        idx = self._sp.piece_to_id(token)  # unk_id for unknown pieces
        return idx if self._sp.id_to_piece(idx) == token else None

    def id_to_token(self, idx: int) -> str | None:
        return self._sp.id_to_piece(idx) if 0 <= idx < self._sp.get_piece_size() else None


def _find_in_dir(directory: Path) -> Path:
    for name in (HF_FILE, *_SPM_NAMES):
        if (directory / name).is_file():
            return directory / name
    models = sorted(p for p in directory.glob("*.model") if p.is_file())
    if len(models) > 1:
        names = ", ".join(p.name for p in models)
        raise ValueError(f"{directory} holds several .model files ({names}); pass one of them")
    if not models:
        looked = ", ".join((HF_FILE, *_SPM_NAMES, "*.model")) + missing_tokenizer_hint(directory)
        raise FileNotFoundError(f"no tokenizer in {directory}: looked for {looked}")
    return models[0]


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer from a file or from a directory holding one.

    Args:
      path: a `tokenizer.json`, a sentencepiece `.model`, or a directory with one of them
        (`tokenizer.json` preferred, then `tokenizer.model`, `spm.model`, a single `*.model`,
        then GPT-2's `vocab.json` + `merges.txt`), a GPT-2 vocab file with its merges beside
        it (`gpt2-vocab.json` + `gpt2-merges.txt`), or a Hugging Face Hub model id
        (`EleutherAI/pythia-160m[@revision]`, see `neox_jax.hub`).

    Returns:
      An `HFTokenizer`, a `SentencePieceTokenizer` or a `GPT2BPETokenizer`.

    Raises:
      FileNotFoundError: nothing at `path`, or no tokenizer in the directory.
      ValueError: a corrupt file.
    """
    path = Path(hub.resolve(path, weights=False)).expanduser()  # a Hub id: its tokenizer files
    if (pair := gpt2_bpe_files(path)) is not None:
        return GPT2BPETokenizer(*pair)
    if path.is_dir():
        path = _find_in_dir(path)
    elif not path.exists():
        raise FileNotFoundError(
            f"no tokenizer at {path}: expected a {HF_FILE} file, a sentencepiece .model file, "
            "or a directory holding one"
        )
    if path.suffix in (".json", ".model"):
        return HFTokenizer(path) if path.suffix == ".json" else SentencePieceTokenizer(path)
    with open(path, "rb") as f:  # other names: tokenizer.json is JSON, a .model is protobuf
        is_json = f.read(64).lstrip().startswith(b"{")
    return HFTokenizer(path) if is_json else SentencePieceTokenizer(path)


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the tokenizer at ``src`` (a file, or a folder's tokenizer files) into ``dst``;
    GPT-2's BPE pair is written as the tokenizer.json it reads as."""
    if gpt2_bpe_files(Path(src)) is not None:
        load_tokenizer(src).save_to(dst)
    else:
        _copy_tokenizer_files(src, dst)


def save(tokenizer: Tokenizer, directory: str | os.PathLike) -> Path:
    """Copies `tokenizer` into `directory`; see `Tokenizer.save_to`."""
    return tokenizer.save_to(directory)
