"""Every relative link in README.md and docs/*.md points at a file of this repository (and a heading that exists).

A reader of a clone, or of the sdist, has only this repository: a link to a file that moved, to a sibling checkout
(`../shared/...`) or to a path of the machine it was written on is a dead end. Links to other sites (the paper on
arXiv) are allowed; links into this repository must be relative. Code spans and fenced blocks are not links.
Run: .venv/bin/python -m pytest -q tests/test_docs_links.py
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:
# Paths that exist only on the machine the project was written on.
_OUTSIDE_PATHS = ("../shared", "/work/shared", "/work/main")


def _prose(text: str) -> str:
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", _FENCE.sub("", path.read_text()), re.M)
    return {_slug(h) for h in headings}


def _links(path: Path) -> list[str]:
    return _LINK.findall(_prose(path.read_text()))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_in_the_repository(doc):
    problems = []
    for target in _links(doc):
        if _EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / unquote(file_part)).resolve() if file_part else doc
        if ROOT not in (dest, *dest.parents):
            problems.append(f"{target}: outside the repository")
        elif not dest.exists():
            problems.append(f"{target}: {dest.relative_to(ROOT)} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not problems, f"{doc.relative_to(ROOT)}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_link_leaves_the_repository(doc):
    text = doc.read_text()
    assert not [p for p in _OUTSIDE_PATHS if p in text], f"{doc.relative_to(ROOT)} names a path outside the repository"
    own = [t for t in _links(doc) if re.match(r"https?://(www\.)?github\.com/[^/]+/dash", t, re.I)]
    assert not own, f"{doc.relative_to(ROOT)} links to this repository by URL (use a relative link): {own}"


def test_docs_index_lists_every_doc():
    index = ROOT / "docs" / "README.md"
    linked = {(index.parent / t.partition("#")[0]).resolve() for t in _links(index) if not _EXTERNAL.match(t)}
    missing = [p.name for p in DOCS[1:] if p != index and p.resolve() not in linked]
    assert not missing, f"docs/README.md does not link {missing}"


def test_slug_matches_github():
    assert _slug("The paper in the code") == "the-paper-in-the-code"
    assert _slug("Export to transformers / vLLM") == "export-to-transformers--vllm"
    assert _slug("`dash_kernels` in another trainer") == "dash_kernels-in-another-trainer"
