"""The interface every tokenizer backend implements (``neox_jax.data.tokenizer`` holds the
backends and ``load_tokenizer``): special tokens as transformers resolves them, the ids put
around a model's input, batch encoding with padding, and saving into a folder.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from neox_jax.data.generation_config import GENERATION_FILE, read_generation_config
from neox_jax.data.tokenizer_files import (
    CONFIG_FILE,
    HF_FILE,
    SPECIAL_MAP_FILE,
    atomic_write,
    read_json,
)

# Token strings tried in order when tokenizer_config.json names no such token (and a sentencepiece
# model declares none). GPT-NeoX/Pythia use <|endoftext|> to end and to start documents.
_CANDIDATES = {
    "eos": ("<|endoftext|>", "</s>", "<eos>"),
    "bos": ("<s>", "<bos>", "<|endoftext|>"),
    "pad": ("<|padding|>", "<pad>"),
}


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
