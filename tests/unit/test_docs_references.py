"""Every section the repository cites exists in `docs/` (no JAX).

A citation is a section sign followed by a number (`\u00a74.2`, `\u00a79.21-25`, `\u00a72.9-2.11`). It belongs to the
document named right before its run of citations (runs are joined by `,` `;` `/` `and` `or`):
`paper-facts` -> `docs/paper-facts.md`, `official-checkpoint` -> `docs/official-checkpoint.md`,
`math.md` / `gmflow-math` / `spec` -> `docs/math.md`; a run after the name of an outside document
("paper", "paper's", "arXiv", "App.", "Appendix", "PEP", "RFC") is not checked; anything else means
`docs/math.md` (in `docs/paper-facts.md` itself: that file). A section exists when the document has a
heading that starts with its number (`### 2.9 1-D GM CDF and its inverse`, `## 5 Sampling`).

The section sign is written as an escape in this file so that the file cites nothing itself.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
SECTION_SIGN = "\u00a7"

SCANNED = (
    "gmflow_jax",
    "configs",
    "tools",
    "benchmarks",
    "tests",
    "launch",
    "colab",
    "docs",
    "README.md",
)
"""Paths under the repository root whose citations are checked."""

SUFFIXES = (".py", ".md", ".ipynb", ".sh", ".sbatch", ".toml", ".txt", ".cfg")
SKIPPED_DIRS = {".venv", "__pycache__", ".git", ".pytest_cache"}

_NUMBER = r"\d+(?:\.\d+)*"
_CITATION = re.compile(SECTION_SIGN + rf"\s?({_NUMBER})(?:\s?[-\u2013]\s?({_NUMBER}))?")
_SEPARATOR = re.compile(r"(?:\s*(?:,|;|/|&|-|\u2013|\band\b|\bor\b)\s*|\s+)")
# The name right before a run of citations decides the document (None: an outside document).
_DOC_NAMES = (
    (re.compile(r"paper-facts(?:\.md)?[`'\"*\s:]*$"), "paper-facts.md"),
    (re.compile(r"official-checkpoint(?:-keys)?(?:\.md)?[`'\"*\s:]*$"), "official-checkpoint.md"),
    (re.compile(r"(?:math\.md|gmflow-math|\b[Ss]pec)[`'\"*\s:]*$"), "math.md"),
    (re.compile(r"(?:\bpaper(?:'s)?|\barXiv|\bApp\.|\bAppendix|\bPEP|\bRFC)[`'\"*\s:]*$"), None),
)
_HEADING = re.compile(rf"^#{{1,6}}\s+({_NUMBER})\.?(?:\s|$)")


@dataclasses.dataclass(frozen=True)
class Citation:
    """One cited section: where (`file:line`), which document and which section number."""

    where: str
    doc: str
    section: str


def _range_end(start: str, end: str) -> str:
    """`9.21-25` ends at 9.25 (the end replaces the last components of the start); `2.9-2.11` at 2.11."""
    head = start.split(".")
    tail = end.split(".")
    if len(tail) >= len(head):
        return end
    return ".".join(head[: len(head) - len(tail)] + tail)


def citations_in_line(line: str, where: str, default_doc: str) -> list[Citation]:
    """The citations of one line of text, each with its document (None documents are dropped)."""
    found = []
    run_doc = default_doc
    run_end = None
    for match in _CITATION.finditer(line):
        joined = run_end is not None and _SEPARATOR.fullmatch(line[run_end : match.start()])
        if not joined:
            before = line[: match.start()]
            run_doc = default_doc
            for pattern, doc in _DOC_NAMES:
                if pattern.search(before):
                    run_doc = doc
                    break
        run_end = match.end()
        if run_doc is None:
            continue
        start, end = match.group(1), match.group(2)
        found.append(Citation(where, run_doc, start))
        if end is not None:
            found.append(Citation(where, run_doc, _range_end(start, end)))
    return found


def _text_lines(path: Path) -> Iterable[tuple[str, str]]:
    """(location, line) pairs of a text file, or of the cells of a notebook."""
    rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".ipynb":
        for ci, cell in enumerate(json.loads(text).get("cells", [])):
            source = cell.get("source", [])
            lines = source.splitlines() if isinstance(source, str) else source
            for li, line in enumerate(lines, 1):
                yield f"{rel}:cell {ci}:{li}", line
        return
    for li, line in enumerate(text.splitlines(), 1):
        yield f"{rel}:{li}", line


def _files(paths: Iterable[Path]) -> Iterable[Path]:
    for path in paths:
        if path.is_file():
            yield path
        elif path.is_dir():
            for sub in sorted(path.rglob("*")):
                parts = set(sub.relative_to(path).parts)
                if sub.is_file() and sub.suffix in SUFFIXES and not parts & SKIPPED_DIRS:
                    if not any(p.endswith(".egg-info") for p in parts):
                        yield sub


def collect_citations(paths: Iterable[Path]) -> list[Citation]:
    """Every citation in the files under `paths`."""
    found = []
    for path in _files(paths):
        default_doc = "paper-facts.md" if path.resolve() == DOCS / "paper-facts.md" else "math.md"
        for where, line in _text_lines(path):
            if SECTION_SIGN in line:
                found.extend(citations_in_line(line, where, default_doc))
    return found


def numbered_headings(doc: Path) -> list[str]:
    """Section numbers of the numbered headings of a markdown document, in order."""
    if not doc.is_file():
        return []
    return [
        m.group(1) for m in map(_HEADING.match, doc.read_text(encoding="utf-8").splitlines()) if m
    ]


def unresolved(citations: Iterable[Citation], docs_dir: Path = DOCS) -> list[str]:
    """`file:line: docs/<doc> §x.y` for every citation whose document has no such heading."""
    sections: dict[str, set[str]] = {}
    missing = []
    for c in citations:
        if c.doc not in sections:
            sections[c.doc] = set(numbered_headings(docs_dir / c.doc))
        if c.section not in sections[c.doc]:
            missing.append(f"{c.where}: docs/{c.doc} {SECTION_SIGN}{c.section}")
    return missing


def test_every_cited_section_has_a_heading_in_docs():
    citations = collect_citations(REPO / p for p in SCANNED)
    assert len(citations) > 300, f"the collector found only {len(citations)} citations"
    missing = unresolved(citations)
    assert not missing, "cited sections missing from docs/:\n" + "\n".join(missing)


def test_a_made_up_section_is_reported_with_its_file_and_line(tmp_path):
    s = SECTION_SIGN
    source = tmp_path / "module.py"
    source.write_text(
        "\n".join(
            [
                f'"""The 1-D GM CDF (`docs/math.md` {s}2.9) and Knothe-Rosenblatt ({s}2.10)."""',
                f"# made-up: {s}99.7 and the oracle range {s}9.21-47",
                f"# paper-facts {s}5 exists, `docs/paper-facts.md` {s}42 does not; spec {s}4.2 and {s}77",
                f"# outside documents are skipped: paper {s}3.2, App. A.4, arXiv {s}123",
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    missing = unresolved(collect_citations([tmp_path]))
    where = source.relative_to(REPO) if source.is_relative_to(REPO) else source
    assert missing == [
        f"{where}:2: docs/math.md {s}99.7",
        f"{where}:2: docs/math.md {s}9.47",
        f"{where}:3: docs/paper-facts.md {s}42",
        f"{where}:3: docs/math.md {s}77",
    ]


def test_documents_are_assigned_by_the_name_before_each_run():
    s = SECTION_SIGN
    line = f"(paper-facts {s}5, spec {s}7 and {s}8.2; README; spec paper-facts {s}7; paper {s}1, {s}4.2)"
    got = [(c.doc, c.section) for c in citations_in_line(line, "x:1", "math.md")]
    assert got == [
        ("paper-facts.md", "5"),
        ("math.md", "7"),
        ("math.md", "8.2"),
        ("paper-facts.md", "7"),
    ]
    ranges = citations_in_line(f"{s}2.9-2.11, {s}9.21-25, {s}4.1-4.4.", "x:1", "math.md")
    assert [c.section for c in ranges] == ["2.9", "2.11", "9.21", "9.25", "4.1", "4.4"]
    spelled = citations_in_line(f"(paper-facts {s}2-{s}5; spec {s}5.3-{s}5.5)", "x:1", "math.md")
    assert [(c.doc, c.section) for c in spelled] == [
        ("paper-facts.md", "2"),
        ("paper-facts.md", "5"),
        ("math.md", "5.3"),
        ("math.md", "5.5"),
    ]


def test_notebook_cells_are_scanned(tmp_path):
    s = SECTION_SIGN
    notebook = tmp_path / "nb.ipynb"
    cells = [{"cell_type": "markdown", "source": ["intro\n", f"see {s}2.9 and {s}98.1\n"]}]
    notebook.write_text(json.dumps({"cells": cells}), encoding="utf-8")
    assert unresolved(collect_citations([notebook])) == [
        f"{notebook}:cell 0:2: docs/math.md {s}98.1"
    ]


def test_docs_numbering_is_unique_and_increasing():
    for name in ("math.md", "paper-facts.md"):
        numbers = numbered_headings(DOCS / name)
        keys = [tuple(int(x) for x in n.split(".")) for n in numbers]
        assert len(set(numbers)) == len(numbers), f"docs/{name} repeats a section number"
        assert keys == sorted(keys), f"docs/{name} sections are out of order"
    top = {n for n in numbered_headings(DOCS / "math.md") if "." not in n}
    assert top == {str(i) for i in range(12)}, f"docs/math.md chapters: {sorted(top, key=int)}"
