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

Every relative Markdown link ``[text](target)`` in a ``*.md`` anywhere but hidden folders
(``.git``, the virtual environments, the ``*-env`` folders) and build outputs leads to a file that
exists, and its ``#anchor`` names a heading of that page. Absolute URLs (``scheme:``) and
``mailto:`` are not checked. Anchors follow GitHub's rule: the heading lowercased, everything but
letters, digits, spaces, ``-`` and ``_`` dropped, spaces turned into ``-``; a repeated heading gets
``-1``, ``-2`` and so on. Code spans and fenced blocks are skipped.

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


def test_the_scan_covers_the_documents_and_code_and_the_cited_sections_exist():
    scanned = {str(p.relative_to(ROOT)) for p in scanned_files(ROOT)}
    for expected in ("README.md", "areal_like/DESIGN.md", "trainer/LOSSES.md", "trainer/losses.py",
                     "configs/loss/oapl.yaml", "launch/slurm/areal_like.sbatch",
                     "tests/unit/test_docs_resolve.py"):
        assert expected in scanned, expected
    assert not any(part.startswith(".venv") for p in scanned for part in Path(p).parts)
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


# ---------------------------------------------------------------- Markdown links and anchors

LINK_SKIPPED = {"build", "dist", "outputs", "node_modules", "__pycache__", "runs", "site-packages"}

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")


def _hidden_or_built(rel: Path) -> bool:
    """Hidden folders (``.git``, ``.venv``, ``.ci-venv``, ``.sglang-env``, ``.vllm-env``), any
    other ``*-env``/``*venv`` folder, build outputs and installed packages."""
    return any(part in LINK_SKIPPED or part.startswith(".") or part.endswith(("-env", "venv"))
               or part.endswith(".egg-info") for part in rel.parts[:-1])


def markdown_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.md")
                  if p.is_file() and not _hidden_or_built(p.relative_to(root)))


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) for every line outside fenced blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def link_problems(root: Path) -> list[str]:
    problems = []
    cache: dict[Path, set[str]] = {}
    for page in markdown_files(root):
        rel = page.relative_to(root)
        for number, line in prose_lines(page.read_text(encoding="utf-8")):
            for target in LINK.findall(CODE_SPAN.sub("", line)):
                if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
                    continue  # https:, mailto: ...
                path_part, _, anchor = target.partition("#")
                dest = page if not path_part else (page.parent / path_part).resolve()
                if not dest.exists():
                    problems.append(f"{rel}:{number}: {target}: no such file")
                    continue
                if anchor and dest.suffix == ".md":
                    if dest not in cache:
                        cache[dest] = anchors(dest)
                    if anchor.lower() not in cache[dest]:
                        problems.append(f"{rel}:{number}: {target}: no heading #{anchor}")
    return problems


def test_every_relative_markdown_link_resolves():
    problems = link_problems(ROOT)
    assert not problems, "broken Markdown links:\n" + "\n".join(problems)


def test_the_scan_finds_the_pages_and_skips_environments(tmp_path):
    found = {str(p.relative_to(ROOT)) for p in markdown_files(ROOT)}
    assert {"README" + MD, "trainer/WEIGHT_SYNC" + MD, "benchmarks/README" + MD} <= found
    assert not any(".venv" in p for p in found)
    for folder in (".venv/lib", ".ci-venv/x", ".sglang-env", "vllm-env", "build", "pkg.egg-info"):
        _tree(tmp_path, {f"{folder}/X" + MD: "[gone](nowhere" + MD + ")\n"})
    _tree(tmp_path, {"docs/Y" + MD: "[ok](Y" + MD + ")\n"})
    assert [p.relative_to(tmp_path) for p in markdown_files(tmp_path)] == [Path("docs/Y" + MD)]
    assert link_problems(tmp_path) == []


B, C = "b/B" + MD, "b/C" + MD


@pytest.mark.parametrize("link, ok", [
    (f"[b]({B})", True),
    (f"[b]({B}#the-sync-port-begin)", True),
    (f"[b]({B}#twice-1)", True),
    (f"[b]({B}#nowhere)", False),
    (f"[c]({C})", False),
    ("[self](#a)", True),
    ("[self](#b)", False),
    ("[web](https://example.org/x" + MD + ")", True),
    (f"`[code]({C})`", True),
    ("[dir](b/)", True),
])
def test_the_scanner_reports_missing_files_and_headings(tmp_path, link, ok):
    root = _tree(tmp_path, {
        "A" + MD: f"# A\n\n{link}\n\n```\n[fenced]({C})\n```\n",
        B: "# B\n\n## The sync port: `/begin`\n\n## Twice\n\n## Twice\n",
    })
    assert (link_problems(root) == []) == ok, link_problems(root)
