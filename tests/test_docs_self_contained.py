"""The repository's citations can be followed from the repository alone.

Comments, docstrings, pages and config files cite the paper (arXiv 2507.14137), the original code (valeoai/Franca
file and function) or our own docs/ pages, never the numbered sections of a document that is not in the repository.
A section sign is accepted only as the paper's own numbering, written right after the arXiv number
("arXiv 2507.14137 <section sign>3.2").
"""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKED_SUFFIXES = (".py", ".md", ".yaml")
SKIPPED_DIRS = {".venv", ".git", ".pytest_cache", ".ruff_cache", "__pycache__", "build", "dist", "outputs", "runs"}
SECTION_SIGN = "\u00a7"  # spelled as an escape so that this file does not cite anything itself
PAPER = "2507.14137"
PAPER_REACH = 30  # a section sign at most this many characters after the arXiv number cites the paper


def is_external_citation(line: str, position: int) -> bool:
    """Whether the section sign at ``position`` of ``line`` cites something other than the paper's sections."""
    before = line[:position]
    if before.lower().endswith("reference "):
        return True
    return PAPER not in before[-PAPER_REACH - len(PAPER) :]


def external_citations(text: str) -> list[int]:
    """1-based numbers of the lines of ``text`` that hold an external section citation."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        signs = [i for i, char in enumerate(line) if char == SECTION_SIGN]
        if any(is_external_citation(line, i) for i in signs):
            found.append(number)
    return found


def checked_files(root: Path) -> list[Path]:
    """The .py, .md and .yaml files under ``root``, outside virtual environments, git data, caches and build output."""
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        files.extend(Path(folder) / name for name in names if name.endswith(CHECKED_SUFFIXES))
    return sorted(files)


def test_detects_external_section_citations_and_accepts_the_papers():
    s = SECTION_SIGN
    offending = [
        f"weights (reference {s}2.6).",
        f"blur quirk ({s}4.4, {s}10.7)",
        f"| {s}10.16 |",
        f"see Reference {s}3 and arXiv {PAPER}",
    ]
    accepted = [
        f"Matryoshka heads (arXiv {PAPER} {s}3.1).",
        f"(paper arXiv {PAPER} {s}3.1, {s}3.2)",
        f"(paper arXiv {PAPER}, Sec. 3; original ``franca/data/masking.py``)",
        "no section sign at all",
    ]
    assert external_citations("\n".join(offending)) == [1, 2, 3, 4]
    assert external_citations("\n".join(accepted)) == []


def test_no_file_cites_a_document_outside_the_repository():
    offenders = []
    for path in checked_files(REPO):
        text = path.read_text(encoding="utf-8", errors="replace")
        offenders.extend(f"{path.relative_to(REPO)}:{number}" for number in external_citations(text))
    assert not offenders, (
        f"{len(offenders)} line(s) cite sections of a document that is not in the repository: "
        + ", ".join(offenders)
        + f". Cite the paper (arXiv {PAPER}, section or equation), the original code (valeoai/Franca file and"
        " function) or a docs/ page instead."
    )
