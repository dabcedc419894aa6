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
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from neox_jax.errors import UserError, load_json

GENERATION_FILE = "generation_config.json"
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
      path: the file.
      eos_token_ids: every id that ends generation (empty when the file names none).
      bos_token_id, pad_token_id: as the file names them, or None.
      sampling: the sampling fields the file sets (``SAMPLING_FIELDS``), by name.
    """

    path: Path
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    sampling: dict[str, Any] = dataclasses.field(default_factory=dict)

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
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise UserError(
            f"{path}: {field} must be a token id or a list of token ids, got {value!r}; "
            "fix the file or remove the field."
        )
    return tuple(dict.fromkeys(values))


def read_generation_config(folder: str | os.PathLike) -> GenerationDefaults | None:
    """The ``generation_config.json`` in ``folder``, or None when there is none.

    Raises:
      UserError: the file does not parse, or a field has the wrong type.
    """
    path = Path(folder) / GENERATION_FILE
    if not path.is_file():
        return None
    data = load_json(path, "generation config")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    ids = {}
    for field in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = data.get(field)
        ids[field] = () if value is None else _ids(value, field, path)
        if field != "eos_token_id" and len(ids[field]) > 1:
            raise UserError(f"{path}: {field} must be one token id, got {value!r}.")
    sampling = {}
    for name, kind in SAMPLING_FIELDS.items():
        value = data.get(name)
        if value is None:
            continue
        ok = isinstance(value, bool) if kind is bool else (
            isinstance(value, int | float) and not isinstance(value, bool)
            and (kind is float or float(value).is_integer())
        )  # fmt: skip
        if not ok:
            raise UserError(f"{path}: {name} must be a {kind.__name__}, got {value!r}.")
        sampling[name] = kind(value)
    return GenerationDefaults(
        path=path,
        eos_token_ids=ids["eos_token_id"],
        bos_token_id=next(iter(ids["bos_token_id"]), None),
        pad_token_id=next(iter(ids["pad_token_id"]), None),
        sampling=sampling,
    )
