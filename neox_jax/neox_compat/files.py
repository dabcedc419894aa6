"""Reading several GPT-NeoX config files into one dict, as GPT-NeoX reads them.

GPT-NeoX (``megatron/neox_arguments/arguments.py``): ``deepy.py`` takes config names with
or without their ``.yml`` (``125M`` means ``125M.yml``), and ``NeoXArgs.from_ymls`` loads
the files in order into one dict, each key stored with ``-`` replaced by ``_``. Before
storing a key it checks the key *as written* against the keys stored so far, so:

* a key written with ``_`` (or with neither ``-`` nor ``_``) that an earlier file, or an
  earlier line, already set is an error;
* a key written with ``-`` never matches a stored key: it replaces the earlier value, the
  later file winning (``num-layers: 4`` in an override file after ``pythia/160M.yml``).

neox_jax merges the same way, and logs a warning for every value replaced, since a
silent replacement is easy to miss.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from neox_jax.errors import UserError

# The suffixes deepy.py leaves alone; any other name gets ".yml" appended.
SUFFIXES = (".yml", ".json")


def resolve_path(path: str) -> str:
    """``path``, or ``path + ".yml"`` when only that exists (deepy.py's ``125M`` names)."""
    if not Path(path).exists() and not path.endswith(SUFFIXES) and Path(path + ".yml").is_file():
        return path + ".yml"
    return path


def load_file(path: str) -> dict[str, Any]:
    """One GPT-NeoX config file (YAML or JSON) as its mapping of keys to values."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError as e:
        raise UserError(f"GPT-NeoX config {path} does not exist.") from e
    except yaml.YAMLError as e:
        raise UserError(f"GPT-NeoX config {path} is not valid YAML/JSON: {e}") from e
    if not isinstance(data, dict):
        raise UserError(f"GPT-NeoX config {path} must hold a mapping of keys to values.")
    return data


def read_configs(paths: list[str]) -> dict[str, Any]:
    """GPT-NeoX config files (YAML or JSON) merged as ``NeoXArgs.from_ymls`` merges them
    (see the module docstring): keys with ``_``, a later file's dashed key winning.

    Raises:
      UserError: no files, a file that is missing or not a mapping, or a key written
        with ``_`` that was already set.
    """
    if not paths:
        raise UserError("no GPT-NeoX config files given; pass --neox_config=FILE.yml")
    merged: dict[str, Any] = {}
    source: dict[str, str] = {}
    for path in map(resolve_path, paths):
        for key, value in load_file(path).items():
            written, name = str(key), str(key).replace("-", "_")
            if written in merged:
                raise _duplicate(written, source[name], path)
            if name in merged:
                logging.warning(
                    "GPT-NeoX key %r: %r from %s replaces %r from %s (a later key written "
                    "with '-' overrides, as in GPT-NeoX).",
                    key, value, path, merged[name], source[name],
                )  # fmt: skip
            merged[name], source[name] = value, path
    return merged


def _duplicate(key: str, first: str, path: str) -> UserError:
    where = f"twice in {path}" if first == path else f"in both {first} and {path}"
    dashed = key.replace("_", "-")
    hint = f" (or write it {dashed!r} where it should override)" if dashed != key else ""
    return UserError(
        f"GPT-NeoX key {key!r} is set {where}; GPT-NeoX refuses a key written without '-' "
        f"that is already set: keep one{hint}."
    )
