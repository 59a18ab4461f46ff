"""The documentation a reader of the repository sees: README.md, docs/*.md and the benchmark
READMEs never send the reader outside the repository, and every link to a repository file (and
to a heading in it) resolves."""

from __future__ import annotations

import glob
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted(
    {
        os.path.relpath(p, ROOT)
        for pattern in ("README.md", "docs/*.md", "benchmarks/README.md", "benchmarks/**/README.md")
        for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
    }
)

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE = re.compile(r"`([^`\n]+)`")
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
# a repository path in backticks: has a folder, ends in a file extension or "/", no placeholders
_PATHLIKE = re.compile(r"^[\w.\-]+(/[\w.\-]+)*/([\w.\-]+\.(py|md|json|jsonl|png|cpp|cu|h|sh|toml|txt))?$")


def _text(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def _inside(path: str) -> bool:
    return os.path.commonpath([os.path.realpath(path), os.path.realpath(ROOT)]) == os.path.realpath(ROOT)


def _ignored(path: str) -> bool:
    """A git-ignored place (made by the user or by a run, e.g. ``.whl/``, ``benchmarks/runs/``)."""
    try:
        res = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, capture_output=True, timeout=60)
    except OSError:
        return False
    return res.returncode == 0


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    h = re.sub(r"[`*_]", "", heading.strip().lower())
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")


def _anchors(rel: str) -> set[str]:
    text = _FENCE.sub("", _text(rel))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def test_the_docs_exist_and_readme_links_the_design():
    assert {"README.md", "docs/DESIGN.md", "benchmarks/README.md"} <= set(DOCS)
    assert "(docs/DESIGN.md" in _text("README.md")


@pytest.mark.parametrize("rel", DOCS)
def test_no_path_outside_the_repository(rel):
    """A `../` that climbs above the repository root, an absolute file-system path in a link, or
    a mention of a sibling folder is a place a reader of a clone cannot follow."""
    here = os.path.dirname(os.path.join(ROOT, rel))
    text = _text(rel)
    bad = []
    for m in re.finditer(r"(?<![\w.])((?:\.\./)+[^\s`)\]'\"]*)", text):
        full = os.path.normpath(os.path.join(here, m.group(1).split("#")[0]))
        if not _inside(full) or ("<" not in full and not os.path.exists(full)):
            bad.append(m.group(1))  # outside, or a relative path to nothing (e.g. ../shared from docs/)
    for target in _LINK.findall(text):
        if target.startswith("/") or target.startswith("file:"):
            bad.append(target)
    assert not bad, f"{rel} names paths outside the repository: {bad}"


@pytest.mark.parametrize("rel", DOCS)
def test_links_resolve(rel):
    """Every relative link names an existing file of the repository (and, with #anchor into a
    Markdown file, one of its headings)."""
    here = os.path.dirname(os.path.join(ROOT, rel))
    missing = []
    for target in _LINK.findall(_text(rel)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(here, path)) if path else os.path.join(ROOT, rel)
        if not os.path.exists(full) or not _inside(full):
            missing.append(target)
        elif anchor and full.endswith(".md") and anchor not in _anchors(os.path.relpath(full, ROOT)):
            missing.append(target)
    assert not missing, f"{rel} links what does not exist: {missing}"


@pytest.mark.parametrize("rel", DOCS)
def test_repository_paths_in_backticks_exist(rel):
    """`fastlora/_philox.py`-style paths in the text name real files (relative to the repository
    root or to the document) or git-ignored places; placeholders such as `<device>` are not
    checked."""
    here = os.path.dirname(os.path.join(ROOT, rel))
    missing = []
    for token in _CODE.findall(_FENCE.sub("", _text(rel))):
        token = token.strip()
        if "/" not in token or not _PATHLIKE.match(token):
            continue
        tail = "/" if token.endswith("/") else ""  # keeps a folder a folder for git check-ignore
        full = [os.path.normpath(os.path.join(b, token)) + tail for b in (ROOT, here)]
        full = [f for f in full if _inside(f)]
        if not any(os.path.exists(f) for f in full) and not (full and all(_ignored(f) for f in full)):
            missing.append(token)  # e.g. `fastlora/gone.py`; git-ignored places (`.whl/`, runs) are fine
    assert not missing, f"{rel} names repository paths that do not exist: {missing}"


def test_design_sections_cited_by_the_code_exist():
    """Comments cite "DESIGN.md section N" / "§N": N must be a section of docs/DESIGN.md."""
    sections = {int(m) for m in re.findall(r"^## (\d+)\. ", _text("docs/DESIGN.md"), re.M)}
    assert sections == set(range(1, max(sections) + 1))
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout.split()
    except OSError:
        pytest.skip("git not available")
    if not files:
        pytest.skip("not a git checkout")
    cited = re.compile(r"DESIGN\.md\)?,?\s*(?:section|sections|§)\s*(\d+)(?:\s*(?:-|to|and)\s*(\d+))?")
    bad = []
    for rel in files:
        if not rel.endswith((".py", ".md", ".cpp", ".cu", ".h", ".sh")) or not os.path.exists(os.path.join(ROOT, rel)):
            continue
        for m in cited.finditer(_text(rel)):
            for n in filter(None, m.groups()):
                if int(n) not in sections:
                    bad.append(f"{rel}: {m.group(0)}")
    assert not bad, f"citations of sections docs/DESIGN.md does not have: {bad}"


def test_no_file_points_outside_the_repository():
    """No tracked file a user reads points to a folder beside the repository."""
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout.split()
    except OSError:
        pytest.skip("git not available")
    if not files:
        pytest.skip("not a git checkout")
    bad = []
    for rel in files:
        if rel == "tests/test_docs.py" or not rel.endswith((".py", ".md", ".cpp", ".cu", ".h", ".sh", ".toml", ".txt")):
            continue
        if not os.path.exists(os.path.join(ROOT, rel)):
            continue
        if "../shared" in _text(rel):
            bad.append(rel)
    assert not bad, f"files that point to ../shared, outside the repository: {bad}"
