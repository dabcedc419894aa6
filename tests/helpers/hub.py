"""An offline Hugging Face Hub cache built by a test, in huggingface_hub's own layout.

``models--owner--name/refs/<revision>`` holds a commit hash and
``snapshots/<hash>/`` the files, so ``HF_HUB_CACHE=<cache> HF_HUB_OFFLINE=1`` makes
``owner/name@revision`` resolve without any network.
"""

import hashlib
import shutil
from pathlib import Path


def add_repo(cache: Path, repo_id: str, revisions: dict[str, Path]) -> None:
    """Put each revision's folder into ``cache`` as a snapshot of ``repo_id``."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for revision, folder in revisions.items():
        sha = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
        (repo / "refs" / revision).write_text(sha)
        shutil.copytree(folder, repo / "snapshots" / sha, dirs_exist_ok=True)
