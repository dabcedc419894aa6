"""A model folder's ``generation_config.json``: the ids generation stops at, and its defaults.

transformers' ``generate`` reads this file beside the weights: it stops at every id of
``eos_token_id`` (an int or a list: Llama-3-Instruct lists ``[128001, 128009]``, end of
text and end of turn), pads finished rows with ``pad_token_id`` and starts from
``bos_token_id`` when given no input. neox_jax keeps the file with the tokenizer files
(``data.tokenizer.TOKENIZER_FILES``), so it travels into our checkpoints, runs, quantized
checkpoints and exports, and every ``Tokenizer`` loaded from a folder carries what it says
(``Tokenizer.generation``; ``Tokenizer.eos_ids`` are the ids generation stops at).

The sampling fields (``do_sample``, ``temperature``, ``top_p``, ``top_k``, ``min_p``,
``repetition_penalty``) are the model author's recommended defaults. The server uses them
for requests that leave a field unset, as vLLM does with its default
``--generation-config auto`` (``serving.protocol``); ``Generator`` and the sampling CLI
take their sampling parameters as given (``SamplingParams``), so a script is reproducible
whatever folder it runs on; ``GenerationDefaults.sampling`` gives them to callers who
want them.

A folder without ``generation_config.json`` falls back to its ``config.json`` as
transformers does (``GenerationConfig.from_pretrained(folder, config_file_name=
"config.json")`` when the file is missing, i.e. ``GenerationConfig.from_model_config``):
its ``eos_token_id`` (an int or a list), ``bos_token_id`` and ``pad_token_id``; an id the
top level leaves unset comes from the first nested decoder config (``decoder``,
``generator``, ``text_config``) as ``from_model_config`` reads it, which is where
composite models (Gemma-3, Llama-4, Mistral-3, Qwen2-VL) name their language model's ids.
neox_jax loads no such model, but their tokenizer folders serve as ``data.tokenizer`` or
``--config.tokenizer``. Only the ids are taken from a model config: its other fields
describe the architecture (an MoE's ``top_k`` is not a sampling default), and transformers
pops generation fields out of model configs. ``GenerationDefaults.file_bytes`` writes
such a fallback as the ``generation_config.json`` transformers' ``save_pretrained``
would, so it travels into checkpoints and exports like a real one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from neox_jax.errors import UserError, load_json

GENERATION_FILE = "generation_config.json"
MODEL_CONFIG_FILE = "config.json"  # a Hugging Face model folder's config
ID_FIELDS = ("eos_token_id", "bos_token_id", "pad_token_id")
# Where a composite model's config.json nests its language model, in the order
# transformers' GenerationConfig.from_model_config looks for one.
DECODER_CONFIGS = ("decoder", "generator", "text_config")
# The sampling fields we honour, with the type each must have.
SAMPLING_FIELDS = {
    "do_sample": bool,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repetition_penalty": float,
}


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """What a ``generation_config.json`` says.

    Attributes:
      path: the file (``config.json`` for the fallback of a folder without the file).
      eos_token_ids: every id that ends generation (empty when the file names none).
      bos_token_id, pad_token_id: as the file names them, or None.
      sampling: the sampling fields the file sets (``SAMPLING_FIELDS``), by name.
      mirrors_model_config: the ids are a model ``config.json``'s: read from one (the
        fallback), or a file transformers derived from one (its ``_from_model_config``
        marker, as ``save_pretrained`` writes it for a model without its own file).
    """

    path: Path
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    sampling: dict[str, Any] = dataclasses.field(default_factory=dict)
    mirrors_model_config: bool = False

    @property
    def from_model_config(self) -> bool:
        """Whether this was read from a model's ``config.json`` (no generation_config.json)."""
        return self.path.name != GENERATION_FILE

    def file_bytes(self) -> bytes:
        """The ``generation_config.json`` to write where this travels: the file itself, or,
        for a ``config.json`` fallback, the fields read from it (with transformers'
        ``_from_model_config`` marker, as its ``save_pretrained`` writes them)."""
        if not self.from_model_config:
            return self.path.read_bytes()
        fields: dict[str, Any] = {"_from_model_config": True}
        if self.eos_token_ids:
            ids = list(self.eos_token_ids)
            fields["eos_token_id"] = ids[0] if len(ids) == 1 else ids
        for name in ("bos_token_id", "pad_token_id"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        return (json.dumps({**fields, **self.sampling}, indent=2) + "\n").encode()

    def sampling_defaults(self) -> dict[str, Any]:
        """The sampling fields as neox_jax's knobs: ``do_sample: false`` is greedy
        (temperature 0), as transformers' ``generate`` reads it; without ``do_sample``
        the values stand as given (vLLM's reading)."""
        out = {k: v for k, v in self.sampling.items() if k != "do_sample"}
        if self.sampling.get("do_sample") is False:
            out["temperature"] = 0.0
        return out


def _ids(value: Any, field: str, path: Path) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    if not _valid_ids(values, "eos_token_id"):
        raise UserError(
            f"{path}: {field} must be a token id or a list of token ids, got {value!r}; "
            "fix the file or remove the field."
        )
    return tuple(dict.fromkeys(values))


def _valid_ids(value: Any, field: str) -> bool:
    values = value if isinstance(value, list) else [value]
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
    return ok and (field == "eos_token_id" or len(values) == 1)


def read_generation_config(folder: str | os.PathLike) -> GenerationDefaults | None:
    """The ``generation_config.json`` in ``folder``; without one, the ids of its
    ``config.json`` (see the module docstring); None when neither names anything.

    Raises:
      UserError: the file does not parse, or a field has the wrong type.
    """
    path = Path(folder) / GENERATION_FILE
    if path.is_file():
        return _parse(path, load_json(path, "generation config"), sampling=True)
    path = Path(folder) / MODEL_CONFIG_FILE
    if not path.is_file():
        return None
    data = load_json(path, "model config")
    if not isinstance(data, dict):
        return None  # not a model config
    ids = _model_config_ids(data)
    if all(v is None for v in ids.values()):
        return None  # a model config that names no ids
    return _parse(path, ids, sampling=False)


def _model_config_ids(data: dict[str, Any]) -> dict[str, Any]:
    """The id fields of a model's ``config.json`` as ``from_model_config`` reads them: the
    top level's, then each one it leaves unset (None) from the first non-empty nested
    decoder config (``DECODER_CONFIGS``)."""
    ids = {f: data.get(f) for f in ID_FIELDS}
    nested = next((data[n] for n in DECODER_CONFIGS if data.get(n)), None)
    if isinstance(nested, dict):
        ids = {f: nested.get(f) if v is None else v for f, v in ids.items()}
    return ids


def _parse(path: Path, data: Any, *, sampling: bool) -> GenerationDefaults:
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    ids = {}
    for field in ID_FIELDS:
        value = data.get(field)
        if not sampling and not _valid_ids(value, field):
            value = None  # a model config's placeholder (Llama ports wrote pad_token_id: -1)
        ids[field] = () if value is None else _ids(value, field, path)
        if field != "eos_token_id" and len(ids[field]) > 1:
            raise UserError(f"{path}: {field} must be one token id, got {value!r}.")
    found = {}
    for name, kind in SAMPLING_FIELDS.items() if sampling else ():
        value = data.get(name)
        if value is None:
            continue
        ok = isinstance(value, bool) if kind is bool else (
            isinstance(value, int | float) and not isinstance(value, bool)
            and (kind is float or float(value).is_integer())
        )  # fmt: skip
        if not ok:
            raise UserError(f"{path}: {name} must be a {kind.__name__}, got {value!r}.")
        found[name] = kind(value)
    return GenerationDefaults(
        path=path,
        eos_token_ids=ids["eos_token_id"],
        bos_token_id=next(iter(ids["bos_token_id"]), None),
        pad_token_id=next(iter(ids["pad_token_id"]), None),
        sampling=found,
        mirrors_model_config=not sampling or data.get("_from_model_config") is True,
    )
