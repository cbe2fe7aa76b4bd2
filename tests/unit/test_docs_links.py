"""Every relative Markdown link in the repository leads to a file that exists, and every
``#anchor`` names a heading of the page it points at.

Scanned: every ``*.md`` under the repository root but hidden folders (``.git``, the virtual
environments, the ``*-env`` folders) and build outputs. A link is ``[text](target)``; absolute
URLs (``scheme:``) and ``mailto:`` are not checked. Anchors follow GitHub's rule: the heading
lowercased, everything but letters, digits, spaces, ``-`` and ``_`` dropped, spaces turned into
``-``; a repeated heading gets ``-1``, ``-2`` and so on. Code spans and fenced blocks are skipped,
so an example link in code is not a link.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIPPED = {"build", "dist", "outputs", "node_modules", "__pycache__", "runs", "site-packages"}

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")


def _skipped(rel: Path) -> bool:
    """Hidden folders (``.git``, ``.venv``, ``.ci-venv``, ``.sglang-env``, ``.vllm-env``), any
    other ``*-env``/``*venv`` folder, build outputs and installed packages."""
    return any(part in SKIPPED or part.startswith(".") or part.endswith(("-env", "venv"))
               or part.endswith(".egg-info") for part in rel.parts[:-1])


def markdown_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.md")
                  if p.is_file() and not _skipped(p.relative_to(root)))


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


def _tree(tmp_path: Path, pages: dict[str, str]) -> Path:
    for rel, text in pages.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


# Page names are assembled from pieces so that tests/unit/test_docs_resolve.py, which scans this
# file, does not read them as mentions of pages in the repository.
MD = ".md"
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
