"""Tokenizers: one interface over Hugging Face `tokenizer.json` files, sentencepiece models
and GPT-2's BPE files.

GPT-NeoX-20B/Pythia ship a byte-level BPE `tokenizer.json` (`HFTokenizer`); sentencepiece models
(`SentencePieceTokenizer`) come from elsewhere or from `neox_jax.data.spm_training`, which trains
a byte-fallback BPE on which any text round-trips exactly; GPT-2's `vocab.json` + `merges.txt`
(`GPT2BPETokenizer`) come from older checkpoints and GPT-NeoX's own configs. `load_tokenizer`
picks the backend from a file or directory.
"""

from __future__ import annotations

import abc
import functools
import itertools
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
import tokenizers

from neox_jax import hub
from neox_jax.data.generation_config import GENERATION_FILE, read_generation_config
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
# Token strings tried in order when tokenizer_config.json names no such token (and a sentencepiece
# model declares none). GPT-NeoX/Pythia use <|endoftext|> to end and to start documents.
_CANDIDATES = {
    "eos": ("<|endoftext|>", "</s>", "<eos>"),
    "bos": ("<s>", "<bos>", "<|endoftext|>"),
    "pad": ("<|padding|>", "<pad>"),
}
_META = "\u2581"  # sentencepiece's stand-in for " "


def _existing_file(path: str | os.PathLike) -> Path:
    if not (path := Path(path)).is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return path


def _id_list(ids: Sequence[int] | np.ndarray) -> list[int]:
    if (arr := np.asarray(ids)).ndim != 1:
        raise ValueError(f"decode takes a 1-D sequence of ids, got shape {arr.shape}")
    return [int(i) for i in arr]


class Tokenizer(abc.ABC):
    """The interface over both backends.

    Subclasses implement `_encode_many(texts)` (no special tokens added), `decode(ids, *,
    skip_special_tokens=False)` (1-D ids; special tokens are written out unless skipped),
    `vocab_size` (every id is below it), and `token_to_id` / `id_to_token` (None when absent).

    `eos_id`, `bos_id`, `pad_id` (int or None) come from `special_tokens_map.json` or
    `tokenizer_config.json` beside the file when they name them (`eos_token`, ...: a string or
    a dict with "content"; the map wins, as in transformers), else from the backend's own
    declarations, else from the well-known strings in `_CANDIDATES`; a bos set to null stays
    None, as transformers reads Qwen's (a null eos or pad still falls back: generation needs it).

    `encode(text, add_special_tokens=True)` is what transformers' `tokenizer(text)` gives, the
    encoding of text fed to a model: the special tokens the folder's tokenizer adds around a
    text (`special_prefix` / `special_suffix`: tokenizer.json's post_processor, or for a
    sentencepiece model `add_bos_token` / `add_eos_token` in tokenizer_config.json) are added,
    e.g. BOS for Llama/Mistral, nothing for GPT-NeoX/Pythia. The default, no special tokens,
    is for pieces of text that are joined into one sequence (chat templates, training data).

    `generation` is the folder's `generation_config.json` (without one, the ids of its
    `config.json`, as transformers falls back; None without either) and `eos_ids`
    the ids generation stops at: the file's `eos_token_id` list when it names one (as
    transformers' `generate` reads it), else `eos_id`.
    """

    file_name: str  # canonical name used by `save_to`

    def __init__(self, path: Path) -> None:
        self.path = path
        config_path = path.parent / CONFIG_FILE
        self._config = read_json(config_path) if config_path.is_file() else {}
        # Older exports name the special tokens only in special_tokens_map.json; transformers
        # reads it after tokenizer_config.json, so its tokens win.
        map_path = path.parent / SPECIAL_MAP_FILE
        mapped = read_json(map_path) if map_path.is_file() else {}
        self._named = {
            f"{k}_token": (v, map_path if mapped.get(f"{k}_token") else config_path)
            for k in _CANDIDATES
            if (v := mapped.get(f"{k}_token") or self._config.get(f"{k}_token"))
        }
        self._no_bos = "bos_token" in (self._config.keys() | mapped.keys()) - self._named.keys()
        self._special = {k: self._resolve_special(k) for k in _CANDIDATES}
        self.generation = read_generation_config(path.parent)
        self.special_prefix, self.special_suffix = self._input_specials()

    def _resolve_special(self, kind: str) -> int | None:
        value, source = self._named.get(f"{kind}_token", (None, None))
        if isinstance(value, dict):
            value = value.get("content")
        if value:
            if (idx := self.token_to_id(value)) is None:
                raise ValueError(f"{source}: {kind}_token {value!r} is not in {self.path}")
            return idx
        if kind == "bos" and self._no_bos:
            return None
        found = (self._special_token_id(t) for t in _CANDIDATES[kind])
        return next((i for i in (self._declared_special(kind), *found) if i is not None), None)

    def _declared_special(self, kind: str) -> int | None:
        return None

    def _input_specials(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The ids `tokenizer(text)` puts before and after a text: by default the
        `add_bos_token` / `add_eos_token` flags of tokenizer_config.json (absent: False)."""
        added = []
        for kind in ("bos", "eos"):
            if (flag := self._config.get(f"add_{kind}_token")) not in (None, True, False):
                raise ValueError(f"{CONFIG_FILE}: add_{kind}_token must be true or false: {flag!r}")
            added.append((self._require(kind),) if flag else ())
        return added[0], added[1]

    @property
    def add_bos_token(self) -> bool:
        """Whether encoding with `add_special_tokens=True` starts with the bos id."""
        return self.bos_id is not None and self.bos_id in self.special_prefix

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The ids that end generation (see the class docstring); empty when none is known."""
        if self.generation is not None and self.generation.eos_token_ids:
            return self.generation.eos_token_ids
        return () if self.eos_id is None else (self.eos_id,)

    def _special_token_id(self, token: str) -> int | None:
        return self.token_to_id(token)

    @abc.abstractmethod
    def _encode_many(self, texts: list[str]) -> list[list[int]]: ...
    @abc.abstractmethod
    def decode(
        self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = False
    ) -> str: ...
    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...
    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None: ...
    @abc.abstractmethod
    def id_to_token(self, idx: int) -> str | None: ...

    eos_id = property(lambda self: self._special["eos"])
    bos_id = property(lambda self: self._special["bos"])
    pad_id = property(lambda self: self._special["pad"])

    def _require(self, kind: str) -> int:
        if (idx := self._special[kind]) is None:
            raise ValueError(f"{self.path} has no {kind} token; set {kind}_token in {CONFIG_FILE}")
        return idx

    def _with_specials(
        self, ids: list[int], add_bos: bool, add_eos: bool, add_special_tokens: bool = False
    ) -> list[int]:
        if add_special_tokens:
            if add_bos or add_eos:
                raise ValueError("pass add_special_tokens or add_bos/add_eos, not both")
            prefix = list(self.special_prefix)
            if ids and prefix and prefix[-1] == ids[0] == self.bos_id:
                prefix.pop()  # the text starts with the bos text already: never bos twice
            return prefix + ids + list(self.special_suffix)
        bos = [self._require("bos")] if add_bos else []
        return bos + ids + ([self._require("eos")] if add_eos else [])

    def encode(
        self,
        text: str,
        *,
        add_bos: bool = False,
        add_eos: bool = False,
        add_special_tokens: bool = False,
    ) -> list[int]:
        """Encodes one text; special tokens are added only when asked.

        Args:
          text: the text.
          add_bos: prepend the bos id; add_eos: append the eos id.
          add_special_tokens: add what the folder's tokenizer adds to a model input, as
            transformers' `tokenizer(text)` does (see the class docstring); a bos is not
            added in front of a text that starts with the bos token already.

        Returns:
          The token ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = self._encode_many([text])[0]
        return self._with_specials(ids, add_bos, add_eos, add_special_tokens)

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        padding: str | None = "longest",
        padding_side: str = "right",
        truncation: bool = False,
        add_bos: bool = False,
        add_eos: bool = False,
        add_special_tokens: bool = False,
    ) -> tuple[np.ndarray, np.ndarray] | list[list[int]]:
        """Encodes several texts, padded into one array.

        Args:
          texts: the texts.
          max_length: longest sequence allowed (bos/eos included); needed by truncation and
            padding="max_length"; without truncation a longer sequence is an error.
          padding: "longest", "max_length", or None for unpadded lists.
          padding_side: "right" (training) or "left" (batched prompts for decoding).
          truncation: keep the first `max_length` ids (an eos from `add_eos` goes with the tail).
          add_bos, add_eos, add_special_tokens: as in `encode`, for every sequence.

        Returns:
          `(ids, mask)`, both int32 [batch, length]: mask is 1 on tokens and 0 on padding,
          where `ids` holds `pad_id`. With padding=None, the list of id lists instead.
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of str; use encode() for one text")
        if padding not in ("longest", "max_length", None) or padding_side not in ("right", "left"):
            raise ValueError(
                "padding must be 'longest', 'max_length' or None and padding_side 'right' or "
                f"'left'; got {padding!r}, {padding_side!r}"
            )
        needs_length = truncation or padding == "max_length"
        if (max_length is None and needs_length) or (max_length is not None and max_length < 1):
            raise ValueError(f"truncation/padding='max_length' need max_length >= 1: {max_length}")
        seqs = [
            self._with_specials(s, add_bos, add_eos, add_special_tokens)
            for s in self._encode_many(list(texts))
        ]
        if truncation:
            seqs = [s[:max_length] for s in seqs]
        elif max_length and (over := [i for i, s in enumerate(seqs) if len(s) > max_length]):
            raise ValueError(
                f"{len(over)} text(s) exceed max_length={max_length} (text {over[0]} has "
                f"{len(seqs[over[0]])} tokens); pass truncation=True or a larger max_length"
            )
        if padding is None:
            return seqs
        length = max_length if padding == "max_length" else max(map(len, seqs), default=0)
        ids = np.full((len(seqs), length), self._require("pad"), dtype=np.int32)  # [batch, length]
        mask = np.zeros((len(seqs), length), dtype=np.int32)  # [batch, length]
        for row, seq in enumerate(seqs):
            start = 0 if padding_side == "right" else length - len(seq)
            ids[row, start : start + len(seq)] = seq
            mask[row, start : start + len(seq)] = 1
        return ids, mask

    def save_to(self, directory: str | os.PathLike) -> Path:
        """Copies the tokenizer into `directory` (e.g. a checkpoint) under its canonical name,
        with a `tokenizer_config.json` naming the resolved special tokens, so that
        `load_tokenizer(directory)` gives back the same tokenizer and ids.

        Args:
          directory: the target directory; created if missing.

        Returns:
          The path of the copied tokenizer file.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.file_name != HF_FILE and (directory / HF_FILE).exists():
            raise ValueError(f"{directory} holds a {HF_FILE}, which load_tokenizer would prefer")
        target = directory / self.file_name
        if not (target.exists() and target.samefile(self.path)):
            atomic_write(target, self.file_bytes())
        config = dict(self._config)
        for kind, idx in self._special.items():
            config[f"{kind}_token"] = None if idx is None else self.id_to_token(idx)
        atomic_write(directory / CONFIG_FILE, json.dumps(config, indent=2).encode() + b"\n")
        if (gen := self.generation) is not None and gen.path.resolve() != (
            directory / GENERATION_FILE
        ).resolve():
            atomic_write(directory / GENERATION_FILE, gen.file_bytes())
        return target

    def file_bytes(self) -> bytes:
        """What `save_to` writes under `file_name`."""
        return self.path.read_bytes()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size})"


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
