"""The docs stand alone: every repository path they cite exists, the user guide stays a reference,
and no doc points outside the repository or at an issue tracker's numbers.

Read as text, with no markdown library: a path is a word that starts with one of the repository's
top folders (``docs/notes/performance.md``, ``tests/test_spmd.py::test_x``, ``cqil_fx/graph/modes/*.py``),
resolved from the repository root; a markdown link target is resolved from the doc's own folder; a
top-level file (``Makefile``, ``pyproject.toml``) counts when it is quoted in backticks or linked.
URLs are skipped, and so are paths with a placeholder in them (``OUT``, ``DIR``, ``runN``).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").rglob("*.md")])
USER_GUIDE_LINES = 400

TOP_FOLDERS = ("cqil_fx", "passes", "tests", "examples", "benchmarks", "docs", "adapters")
TOP_FILES = {"Makefile", "pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE", "setup.py", "setup.cfg",
             "MANIFEST.in"}
NOT_PLACEHOLDERS = {"README", "CHANGELOG", "LICENSE", "MANIFEST"}

URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s)>\]`'\"]+")
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
PATH = re.compile(r"(?<![\w./~$-])((?:%s)/(?:[\w.*-]|/|\{[^}\s]*\})*)" % "|".join(TOP_FOLDERS))
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
OUTSIDE = re.compile(r"FACTS\.md|DESIGN\.md|\.\./shared\b|/work/shared\b")
ISSUE = re.compile(r"\bissues?\s+#?\d+|(?<!&)#\d+\b", re.I)


def _name(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


def _has_placeholder(path: str) -> bool:
    """``OUT``, ``DIR``, ``FILE``, ``runN``: a name the reader fills in."""
    words = re.findall(r"[A-Za-z]+", path)
    return any((w.isupper() and w not in NOT_PLACEHOLDERS) or re.fullmatch(r"[a-z]+[A-Z]+", w) for w in words)


def _expand(path: str) -> list[str]:
    """``run{1,2}.json`` -> ``run1.json``, ``run2.json`` (one level of braces, as a shell does)."""
    parts = re.split(r"\{([^}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def _exists(path: Path) -> bool:
    if "*" in path.name or "*" in str(path.parent):
        return any(ROOT.glob(str(path.relative_to(ROOT))))
    return path.exists()


def cited_paths(doc: Path) -> list[tuple[str, Path]]:
    """(as written, where it points) for every repository path ``doc`` cites."""
    text = URL.sub(" ", doc.read_text())
    found = []
    for target in LINK.findall(text):
        target = target.split("#", 1)[0]
        if target and ":" not in target and not _has_placeholder(target):
            found.append((target, (doc.parent / target).resolve()))
    for written in PATH.findall(LINK.sub(" ", text)):
        written = written.rstrip(".,;")
        if not _has_placeholder(written):
            found.extend((written, ROOT / p) for p in _expand(written))
    found.extend((span.strip(), ROOT / span.strip()) for span in CODE_SPAN.findall(text)
                 if span.strip() in TOP_FILES)
    return found


def prose(doc: Path) -> str:
    """The doc without code blocks, code spans and URLs."""
    return URL.sub(" ", CODE_SPAN.sub(" ", FENCE.sub(" ", doc.read_text())))


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_every_cited_repository_path_exists(doc):
    missing = sorted({written for written, path in cited_paths(doc) if not _exists(path)})
    assert not missing, f"{_name(doc)} cites paths that do not exist: {', '.join(missing)}"


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_no_doc_points_outside_the_repository_or_at_issue_numbers(doc):
    outside = sorted(set(OUTSIDE.findall(doc.read_text())))
    issues = sorted(set(ISSUE.findall(prose(doc))))
    assert not (outside or issues), (f"{_name(doc)} cites files outside the repository: {outside}; "
                                     f"issue numbers: {issues}")


def test_the_user_guide_is_a_reference_not_a_log():
    lines = (ROOT / "docs" / "user-guide.md").read_text().count("\n")
    assert lines <= USER_GUIDE_LINES, f"docs/user-guide.md has {lines} lines; keep it under {USER_GUIDE_LINES} " \
                                      "and put measurements in docs/notes/"


def test_the_checks_see_what_they_should(tmp_path):
    """The path, link, placeholder and issue rules on a doc written here."""
    doc = tmp_path / "docs" / "notes" / "x.md"
    doc.parent.mkdir(parents=True)
    doc.write_text("See docs/user-guide.md, `tests/test_docs.py::test_x`, [a](../../Makefile) and\n"
                   "benchmarks/results/default/latency-2026-11-30-run{1,2}.json; not docs/no-such.md,\n"
                   "[b](no-such.md), `pyproject.toml`, https://example.org/docs/missing.md or OUT/docs/x;\n"
                   "`--out benchmarks/results/OUT` and cqil_fx/graph/modes/*.py. Issue 18 and #12, not `#3`.\n")
    cited = [(w, p) for w, p in cited_paths(doc)]
    written = [w for w, _ in cited]
    assert "docs/user-guide.md" in written and "tests/test_docs.py" in written and "pyproject.toml" in written
    assert not any("example.org" in w or "OUT" in w for w in written)
    missing = sorted({w for w, p in cited if not _exists(p)})
    assert missing == ["../../Makefile", "docs/no-such.md", "no-such.md"]  # the link resolves from tmp_path
    assert sorted(ISSUE.findall(prose(doc))) == ["#12", "Issue 18"]
