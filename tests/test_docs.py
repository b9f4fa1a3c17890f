"""The repository explains itself: every `docs/glm130b.md §N` that code or docs cite is a heading
of that page, and nothing cites a document that is not in the repository."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("glmctl", "stages", "kernels", "bench", "tests", "docs") for p in (REPO / d).rglob("*")
           if p.suffix in (".py", ".md", ".cu", ".cpp", ".h") and p.is_file()] + [REPO / "README.md", REPO / "Makefile"]


def _sections() -> set[str]:
    heads = re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", (REPO / "docs" / "glm130b.md").read_text(), flags=re.M)
    return set(heads)


def test_every_cited_section_exists():
    sections = _sections()
    assert {"1", "2.3", "4.4", "7.1", "9.2"} <= sections  # the page is numbered as the code cites it
    missing = []
    for f in SOURCES:
        text = f.read_text(errors="replace")
        for m in re.finditer(r"docs/glm130b\.md\s+((?:§[\d.]*\d[,;\s-]*(?:and\s+)?)+)", text):
            for num in re.findall(r"§?(\d+(?:\.\d+)?)", m.group(1)):
                if num not in sections:
                    missing.append(f"{f.relative_to(REPO)}: §{num}")
    assert not missing, missing


def test_no_reference_to_documents_outside_the_repository():
    this = Path(__file__).resolve()
    bad = [f"{f.relative_to(REPO)}: {w}" for f in SOURCES if f.resolve() != this
           for w in ("spec §", "DESIGN.md", "environment-notes", "glm130b-spec", "../shared")
           if w in f.read_text(errors="replace")]
    assert not bad, bad


def test_linked_docs_exist():
    readme = (REPO / "README.md").read_text()
    for link in ("docs/architecture.md", "docs/glm130b.md"):
        assert link in readme and (REPO / link).is_file()
