"""Hugging Face Hub model ids wherever a model path is taken.

    resolve("EleutherAI/pythia-160m")            # -> ~/.cache/huggingface/hub/.../snapshots/<sha>
    resolve("EleutherAI/pythia-70m@step3000")    # a revision: branch, tag or commit
    resolve("runs/tiny")                         # a local path comes back untouched

Downloads go through ``huggingface_hub.snapshot_download`` into the usual cache
(``HF_HUB_CACHE`` / ``HF_HOME``), fetching only the weights (safetensors; the
``pytorch_model*.bin`` files only when a revision has no safetensors, as Pythia's
intermediate checkpoints may not), ``config.json`` and the tokenizer files (a PEFT adapter
repository: ``adapter_config.json`` and ``adapter_model.safetensors``; its base is another id). With
``HF_HUB_OFFLINE=1`` the cached snapshot is used and nothing touches the network.
Nothing is fetched unless the string names no local path and looks like ``owner/name``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from neox_jax.errors import UserError

# owner/name[@revision]: Hub repository names are letters, digits, "-", "_" and ".".
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
META_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",  # GPT-2's BPE pair, for folders saved without a tokenizer.json
    "merges.txt",
    "added_tokens.json",
    "adapter_config.json",  # a PEFT adapter (its adapter_model.safetensors are weights)
]
# The names the loader reads (transformers' model.safetensors / model-0000k-of-0000n and
# their index; peft's adapter_model): not "*.safetensors", which would also fetch, e.g.,
# Mistral's consolidated.safetensors, a second full copy in another layout.
SAFETENSORS = ["model*.safetensors", "model.safetensors.index.json", "adapter_model.safetensors"]
TORCH_BIN = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def parse_hub_id(text: str | os.PathLike) -> tuple[str, str | None] | None:
    """``(repo_id, revision or None)`` when ``text`` is a Hub model id rather than a local
    path (it does not exist here and reads ``owner/name[@revision]``), else None."""
    text = os.fspath(text)
    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")):
        return None
    match = _HUB_ID.match(text)
    if match is None or match["repo"].endswith((".json", ".model", ".safetensors")):
        return None
    return match["repo"], match["rev"]


def _snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    from neox_jax.optional import require

    hub = require("huggingface_hub", f"loading the Hub model {repo_id}")
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = repo_id + (f"@{revision}" if revision else "")
    try:
        return Path(hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RevisionNotFoundError:
        raise UserError(f"{name}: the Hub repository has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{name} is neither a local path nor a Hub model you can read (a private model "
            "needs `huggingface-cli login` or HF_TOKEN)."
        ) from None
    except LocalEntryNotFoundError:
        raise UserError(
            f"{name}: no such local path, and no Hub model of that name in the Hugging Face "
            "cache (the Hub cannot be reached: offline or HF_HUB_OFFLINE=1)."
        ) from None


def resolve(path_or_id: str | os.PathLike, *, weights: bool = True) -> str | os.PathLike:
    """A local folder for ``path_or_id``: a Hub id is downloaded (or found in the cache);
    anything else is returned unchanged, for the caller's own checks.

    Args:
      path_or_id: a local path, or ``owner/name`` with an optional ``@revision``.
      weights: also fetch the weights (False: config and tokenizer files only).

    Returns:
      The snapshot folder (a ``Path``) for a Hub id; otherwise ``path_or_id`` itself.
    """
    parsed = parse_hub_id(path_or_id)
    if parsed is None:
        return path_or_id
    repo_id, revision = parsed
    if not weights:
        return _snapshot(repo_id, revision, META_FILES)
    folder = _snapshot(repo_id, revision, META_FILES + SAFETENSORS)
    if not any(folder.glob("*.safetensors")):  # e.g. an old revision with .bin weights only
        folder = _snapshot(repo_id, revision, META_FILES + TORCH_BIN)
    return folder


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False) -> str:
    """Uploads an exported Hugging Face folder to the Hub repository ``repo_id``.

    Args:
      folder: the export (``config.json``, safetensors, tokenizer files).
      repo_id: ``owner/name``; created if missing.
      private: create the repository private.

    Returns:
      The URL of the commit.
    """
    from neox_jax.optional import require

    hub = require("huggingface_hub", "--push_to_hub")
    if _HUB_ID.match(repo_id) is None or "@" in repo_id:
        raise UserError(f"--push_to_hub={repo_id!r} is not a Hub repository id (owner/name)")
    api = hub.HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message="Upload from neox_jax.convert",
    )
    return str(getattr(info, "commit_url", info))
