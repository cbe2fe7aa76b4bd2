"""The latest line of every benchmark in ``benchmarks/*.jsonl``, as a Markdown table.

Each benchmark prints one JSON line per case (``name``, ``figure``, ``unit``, ``baseline``,
``ratio``, ``goal``); the lines a results run kept are appended to a ``.jsonl`` file here. This
prints, per ``name``, the last line found (files read in name order, lines in file order), so the
rows of ``benchmarks/README.md`` can be checked against, or refreshed from, what was kept:

    python benchmarks/results.py [FILE.jsonl ...]

A line that is not a JSON object with a ``name`` is skipped; the file and line are named on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLUMNS = ("name", "figure", "unit", "baseline", "ratio", "goal")


def latest_lines(paths: list[Path]) -> dict[str, tuple[dict, str]]:
    """name -> (its last line, the file it came from)."""
    out: dict[str, tuple[dict, str]] = {}
    for path in paths:
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except json.JSONDecodeError:
                line = None
            if not isinstance(line, dict) or "name" not in line:
                print(f"{path.name}:{number}: not a benchmark line, skipped", file=sys.stderr)
                continue
            out[str(line["name"])] = (line, path.name)
    return out


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def table(latest: dict[str, tuple[dict, str]]) -> str:
    head = "| " + " | ".join((*COLUMNS, "file")) + " |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name in sorted(latest):
        line, source = latest[name]
        rows.append("| " + " | ".join([*(cell(line.get(c)) for c in COLUMNS), source]) + " |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path,
                    help="JSON-lines files (default: benchmarks/*.jsonl)")
    args = ap.parse_args(argv)
    paths = args.files or sorted(HERE.glob("*.jsonl"))
    sys.stdout.write(table(latest_lines(paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
