"""The docs a clone carries: a README for users (short), docs/ for the rest, every relative link resolving inside
the clone and nothing pointing outside it (a clone never has ../shared)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250  # "Compare variations" holds real output


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_resolve_inside_the_clone(doc):
    text = doc.read_text()
    assert "../shared" not in text and "PAPER.md" not in text.replace("docs/spec.md", "")
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to missing {target}"
