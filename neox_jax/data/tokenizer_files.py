"""The files of a tokenizer folder: their names, reading their JSON, copying and writing them.

Kept apart from ``neox_jax.data.tokenizer`` (which re-exports the names) so the tokenizer
classes stay one readable file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from neox_jax.data.generation_config import GENERATION_FILE, read_generation_config
from neox_jax.errors import UserError

HF_FILE = "tokenizer.json"
SPM_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
# The files that make up a tokenizer folder (what a checkpoint or an export copies); a
# model folder's generation_config.json travels with them (see data/generation_config.py).
TOKENIZER_FILES = (HF_FILE, CONFIG_FILE, SPECIAL_MAP_FILE, SPM_FILE, GENERATION_FILE)
# GPT-2's BPE pair (transformers' slow GPT2Tokenizer saves these; GPT-NeoX's
# GPT2BPETokenizer reads them as vocab_file and merge_file) and the slow tokenizers' extra
# tokens.
VOCAB_FILE, MERGES_FILE, ADDED_TOKENS_FILE = "vocab.json", "merges.txt", "added_tokens.json"


def gpt2_merges_beside(vocab: Path) -> list[Path]:
    """Where the merges of GPT-2's vocab file ``vocab`` are looked for, in order."""
    names = [vocab.stem.replace("vocab", "merges") + ".txt"] if "vocab" in vocab.stem else []
    return [vocab.with_name(n) for n in dict.fromkeys((*names, MERGES_FILE))]


def gpt2_bpe_files(path: Path) -> tuple[Path, Path] | None:
    """``(vocab, merges)`` when ``path`` is GPT-2's BPE pair: a folder holding vocab.json and
    merges.txt but no tokenizer.json (which would be preferred), or a vocab file (a flat JSON
    object of token -> id, as GPT-NeoX's gpt2-vocab.json) with its merges beside it, named
    as it is with "vocab" -> "merges" and .txt (gpt2-merges.txt), or merges.txt."""
    if path.is_dir():
        vocab, merges = path / VOCAB_FILE, path / MERGES_FILE
        if (path / HF_FILE).is_file() or not (vocab.is_file() and merges.is_file()):
            return None
        return vocab, merges
    if path.suffix != ".json" or not path.is_file():
        return None
    merges = next((m for m in gpt2_merges_beside(path) if m.is_file()), None)
    if merges is None:
        return None
    with open(path, "rb") as f:  # a tokenizer.json is an object of sections, not of ids
        head = f.read(4096)
    if re.match(rb'\s*\{\s*"(?:[^"\\]|\\.)*"\s*:\s*\d', head) is None:
        return None
    return path, merges


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy tokenizer files (a file, or the tokenizer files of a folder) into ``dst``."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    files = [src] if src.is_file() else [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
    if src.is_file():  # load_tokenizer(file) reads these beside the file: so must the copy
        metadata = (CONFIG_FILE, SPECIAL_MAP_FILE, GENERATION_FILE)
        files += [src.parent / n for n in metadata if (src.parent / n).is_file()]
    if src.is_dir():
        files += [f for f in src.glob("*.model") if f not in files]
    for f in files:
        shutil.copy2(f, dst / f.name)
    folder = src if src.is_dir() else src.parent
    if not (folder / GENERATION_FILE).is_file() and (gen := read_generation_config(folder)):
        (dst / GENERATION_FILE).write_bytes(gen.file_bytes())  # config.json's eos ids


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read JSON ({e}); fix or replace the file") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def atomic_write(path: Path, data: bytes) -> None:
    # Write beside the target, then rename: a crash never leaves half a file in a checkpoint.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a shared checkpoint must stay readable
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# A line of a tiktoken BPE file: a base64 token, a space, its rank.
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?\n")


def not_sentencepiece_hint(path: Path) -> str:
    """What a ``.model`` file that sentencepiece cannot parse is instead, when it can tell."""
    with open(path, "rb") as f:
        head = f.read(256)
    if _TIKTOKEN_LINE.match(head):
        return (
            "; it is a tiktoken BPE file (as Llama 3's original/tokenizer.model), which is not "
            "read here: use the tokenizer.json of the model's Hugging Face folder"
        )
    return ""


def missing_tokenizer_hint(directory: Path) -> str:
    """What a folder without a tokenizer.json or sentencepiece model holds instead, if known."""
    if (directory / VOCAB_FILE).is_file() != (directory / MERGES_FILE).is_file():
        have, lack = (VOCAB_FILE, MERGES_FILE)[:: 1 if (directory / VOCAB_FILE).is_file() else -1]
        return f"; it holds {have} without {lack}: GPT-2's BPE needs both"
    if (directory / "tekken.json").is_file():
        return "; its tekken.json (mistral-common's format) is not read: use a tokenizer.json"
    return ""


def literal_meta_ids(sp) -> list[int] | None:
    """The byte pieces spelling a literal ``\u2581`` in the sentencepiece model ``sp``, or None."""
    # sentencepiece BPE escapes " " as "▁" and unescapes on decode, so a literal "▁" would
    # come back as a space. Its UTF-8 byte pieces decode literally, so we spell it with them
    # and encode the text between occurrences separately. That needs byte pieces and segment
    # encodings that concatenate exactly (no dummy prefix or whitespace removal): probe it.
    ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in "\u2581".encode()]
    probe = ["a ", " b", "  c  ", "\td"]
    joined = [i for p in probe for i in sp.encode(p)]
    exact = sp.decode(joined) == "".join(probe)
    return ids if exact and all(sp.is_byte(i) for i in ids) else None


def refuse_added_tokens(path: Path, token_to_id) -> None:
    """Refuses a sentencepiece ``path`` whose folder declares tokens the model does not hold
    (transformers' added_tokens_decoder, extra or additional special tokens, the named
    bos/eos/unk/pad, added_tokens.json): they would be split into pieces."""
    config, extra = path.parent / CONFIG_FILE, path.parent / "added_tokens.json"
    config = read_json(config) if config.is_file() else {}
    tokens = [config.get(f"{k}_token") for k in ("bos", "eos", "unk", "pad")]
    for key in ("added_tokens_decoder", "extra_special_tokens", "additional_special_tokens"):
        more = config.get(key) or []  # a list, or a dict (by id or, transformers 5, name)
        tokens += list(more.values() if isinstance(more, dict) else more)
    names = [t.get("content") if isinstance(t, dict) else t for t in tokens]
    names += list(read_json(extra)) if extra.is_file() else []
    if missing := [n for n in names if isinstance(n, str) and token_to_id(n) is None]:
        raise ValueError(
            f"{path.parent} adds tokens that {path.name} does not hold ({missing[:5]}); write "
            "a tokenizer.json, which carries them, with transformers: "
            "AutoTokenizer.from_pretrained(folder).save_pretrained(folder)."
        )
