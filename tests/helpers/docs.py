"""The user documentation the README tests read: README.md, then each page of ``docs/``
that it links, in the order of the links (a page's commands run after the README's, so a
page may use what a README command made, such as a running server or ``runs/tiny``)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def pages() -> list[Path]:
    """README.md and the ``docs/*.md`` pages it links, each once."""
    readme = REPO / "README.md"
    linked = re.findall(r"\]\((docs/[\w.-]+\.md)(?:#[\w-]*)?\)", readme.read_text())
    return [readme] + [REPO / name for name in dict.fromkeys(linked)]


def documentation() -> str:
    """The text of every page of ``pages()``, joined."""
    return "\n\n".join(page.read_text() for page in pages())
