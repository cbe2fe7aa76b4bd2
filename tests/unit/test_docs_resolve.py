"""Every document the repository cites is in the repository, and every cited section exists.

A reader meets references in code comments, docstrings, configs, tests and notes; each must lead
somewhere inside this repository. The scan covers the package folders, ``configs/``, ``tests/``,
``benchmarks/``, ``launch/``, ``README.md`` and ``pyproject.toml`` (never build outputs, virtual
environments or ``.git``) and fails, naming ``file:line``, on:

* a path into a specs folder, or a kernel section cited as "spec" and a number: the formulas
  live in trainer/LOSSES.md;
* the design page named without its path and extension (it is areal_like/DESIGN.md);
* a style-guide rule number (an R and digits, in parentheses or after the guide's name);
* a reference to a brief that is not in the repository;
* a ``*.md`` mention that does not resolve: one with a folder against the repository root or the
  mentioning file's folder, a bare file name against the Markdown files anywhere in the scan;
* a Markdown file cited with "section N" that has no heading numbered N.

This file is scanned too, so its patterns and examples are written so that they do not match
themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED_DIRS = ("areal_like", "buffer", "rollout_server", "trainer", "launch", "configs", "tests",
                "benchmarks")
SCANNED_ROOT_FILES = ("README.md", "pyproject.toml")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".sbatch"}
SKIPPED_DIRS = {"build", ".git", "__pycache__", "node_modules", "runs"}

# (pattern, what is wrong): references to documents that are not part of the repository
FORBIDDEN = [
    (re.compile(r"\bspecs/"), "path into a specs folder that is not in the repository "
                              "(kernel formulas: trainer/LOSSES.md)"),
    (re.compile(r"\bspecs?\s+\d+(\.\d+)?\b"), "kernel section cited from an outside spec "
                                                "(use trainer/LOSSES.md section N)"),
    (re.compile(r"\bDESIGN\b(?!\.md)"),
     "design page named without its path (areal_like/DESIGN.md)"),
    (re.compile(r"\bSTYLE\s+R\d+\b|\(R\d+\)|\brule\s+R\d+\b"),
     "style-guide rule number (say the reason instead)"),
    (re.compile(r"\bthe\s+brief\b", re.IGNORECASE), "reference to a brief outside the repository "
                                                      "(say what it requires)"),
]
URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+")
# a Markdown file mention: optional ./ or ../, folders, a name; not glued to a longer path or glob
MD_MENTION = re.compile(r"(?<![\w./*-])((?:\.{1,2}/)*(?:[\w.-]+/)*[\w-]+\.md)\b")
SECTION_CITE = re.compile(r"(?<![\w./*-])((?:[\w.-]+/)*[\w-]+\.md)\)?,?\s+sections?\s+"
                          r"(\d+)(?:\s*-\s*(\d+))?")
NUMBERED_HEADING = re.compile(r"^#+\s+(\d+)\.", re.MULTILINE)


@dataclass(frozen=True)
class Problem:
    path: str
    line: int
    text: str
    why: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.why}: {self.text.strip()[:100]}"


def _skipped(rel: Path) -> bool:
    return any(part in SKIPPED_DIRS or part.startswith(".venv") or part.startswith(".ci-venv")
               or part.endswith(".egg-info") for part in rel.parts[:-1])


def scanned_files(root: Path) -> list[Path]:
    """The text files a reader meets, as paths under ``root``."""
    files = [root / name for name in SCANNED_ROOT_FILES if (root / name).is_file()]
    for folder in SCANNED_DIRS:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and not _skipped(path.relative_to(root)):
                files.append(path)
    return files


def markdown_by_name(files: list[Path]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for path in files:
        if path.suffix == ".md":
            out.setdefault(path.name, []).append(path)
    return out


def resolve_md(token: str, source: Path, root: Path, by_name: dict[str, list[Path]]) -> list[Path]:
    """The files a ``*.md`` mention can mean (empty: it dangles)."""
    if "/" not in token:
        return by_name.get(token, [])
    return [p for p in (root / token, source.parent / token) if p.is_file()]


def section_numbers(doc: Path) -> set[int]:
    return {int(n) for n in NUMBERED_HEADING.findall(doc.read_text(encoding="utf-8"))}


def line_problems(line: str, source: Path, root: Path, by_name: dict[str, list[Path]]) -> list[str]:
    """What is wrong with one line (empty list: nothing)."""
    line = URL.sub(" ", line)
    out = [why for pattern, why in FORBIDDEN if pattern.search(line)]
    for token in MD_MENTION.findall(line):
        if not resolve_md(token, source, root, by_name):
            out.append(f"{token} is not in the repository")
    for token, first, last in SECTION_CITE.findall(line):
        docs = resolve_md(token, source, root, by_name)
        wanted = {int(first)} | ({int(last)} if last else set())
        if docs and not any(wanted <= section_numbers(d) for d in docs):
            out.append(f"{token} has no section {'-'.join(n for n in (first, last) if n)}")
    return out


def scan(root: Path) -> list[Problem]:
    files = scanned_files(root)
    by_name = markdown_by_name(files)
    problems = []
    for path in files:
        rel = str(path.relative_to(root))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            problems += [Problem(rel, number, line, why)
                         for why in line_problems(line, path, root, by_name)]
    return problems


def test_every_reference_resolves_inside_the_repository():
    problems = scan(ROOT)
    assert not problems, ("references that lead outside the repository:\n"
                          + "\n".join(map(str, problems)))


def test_the_scan_covers_the_documents_and_code():
    scanned = {str(p.relative_to(ROOT)) for p in scanned_files(ROOT)}
    for expected in ("README.md", "areal_like/DESIGN.md", "trainer/LOSSES.md", "trainer/losses.py",
                     "configs/loss/oapl.yaml", "launch/slurm/areal_like.sbatch",
                     "tests/unit/test_docs_resolve.py"):
        assert expected in scanned, expected
    assert not any(part.startswith(".venv") for p in scanned for part in Path(p).parts)


def test_cited_design_sections_exist():
    # the numbering areal_like/DESIGN.md promises to the code that cites it
    assert section_numbers(ROOT / "areal_like" / "DESIGN.md") == set(range(1, 8))
    assert section_numbers(ROOT / "trainer" / "LOSSES.md") == set(range(0, 12))


def _tree(tmp_path: Path, lines: dict[str, str]) -> Path:
    for rel, text in lines.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


# Offending lines are assembled from pieces so that this file does not contain them itself.
MD = ".md"
DESIGN_PAGE = "DES" + "IGN"
BAD_LINES = {
    "specs folder": "# see " + "spec" + "s/kernels" + MD,
    "outside spec section": "# clipped as in " + "spec" + " 2",
    "bare design name": "# the loop (" + DESIGN_PAGE + " section 5)",
    "rule number": "# one class (" + "R" + "4)",
    "rule after guide": "# pass-through (" + "STY" + "LE R9)",
    "brief": "# as " + "the br" + "ief requires",
    "missing path": "# see trainer/" + "NOTES" + MD,
    "missing bare name": "# see " + "NOTES" + MD,
    "missing section": "# see trainer/" + "LOSSES" + MD + " section 12",
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_scanner_reports_each_kind_of_dangling_reference_with_file_and_line(tmp_path, case):
    root = _tree(tmp_path, {"trainer/LOSSES" + MD: "# Kernels\n\n### 0. Rules\n\n### 2. PPO\n",
                            "trainer/loop.py": '"""Loop."""\n\n' + BAD_LINES[case] + "\n"})
    problems = scan(root)
    assert problems and {(p.path, p.line) for p in problems} == {("trainer/loop.py", 3)}, problems


def test_scanner_accepts_references_that_resolve(tmp_path):
    good = "\n".join([
        "# formulas: trainer/LOSSES" + MD + " section 2; design: areal_like/" + DESIGN_PAGE + MD
        + " sections 1-2",
        "# beside this file: ENGINE" + MD + ", and engine/ENGINE" + MD + " from rollout_server/",
        "# globs and URLs are not mentions: *" + MD + ", https://example.org/docs/GONE" + MD,
        "# an ordinary brief system prompt: 'Be brief.'; a spec object: ProcSpec(...)",
    ])
    root = _tree(tmp_path, {"trainer/LOSSES" + MD: "### 2. PPO\n",
                            "areal_like/" + DESIGN_PAGE + MD: "## 1. Processes\n## 2. Versions\n",
                            "rollout_server/engine/ENGINE" + MD: "# Engine\n",
                            "rollout_server/x.py": good + "\n",
                            "build/lib/trainer/y.py": "# " + "spec" + "s/kernels" + MD + "\n"})
    assert scan(root) == []
