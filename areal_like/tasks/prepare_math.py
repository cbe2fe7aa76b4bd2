"""GSM8K and MATH as the project's dataset format (chat ``messages``, a reference ``answer`` that
math-verify reads): ``python -m areal_like.tasks.prepare_math {gsm8k,math} [--train SRC]
[--test SRC] [--out DIR]``; the recipes (configs/RECIPES.md) read ``DIR/train.parquet`` and
``DIR/test.parquet``.

A source is a local file or directory (``.parquet``, ``.jsonl``, ``.json``, ``.csv``, a directory
of them, or a ``save_to_disk`` directory: what ``datasets`` saved) or, where the machine
reaches the Hugging Face hub, a dataset id (``org/name``, loaded with ``datasets.load_dataset``).
The defaults are the hub ids: GSM8K ``openai/gsm8k`` (config ``main``), MATH's training split
``DigitalLearningGmbH/MATH-lighteval`` and its test split the 500 problems of
``HuggingFaceH4/MATH-500``. The training rows are shuffled (seed ``--seed``; the job serves rows in
file order); the test rows keep theirs. A row without a final answer (GSM8K's ``#### N``, MATH's
last ``\\boxed{}``, or MATH-500's ``answer`` column) is dropped and counted. A source that cannot be
read (no such file, the hub out of reach, another dataset's columns) is one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

DEFAULTS = {  # kind -> split -> (hub id, hub config or None, hub split)
    "gsm8k": {"train": ("openai/gsm8k", "main", "train"), "test": ("openai/gsm8k", "main", "test")},
    "math": {"train": ("DigitalLearningGmbH/MATH-lighteval", None, "train"),
             "test": ("HuggingFaceH4/MATH-500", None, "test")},
}
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # org/name; a local path has a suffix or more parts
_FILE_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".arrow")


class SourceError(ValueError):
    """A source that cannot be converted: one ``error:`` line, exit 2."""


def gsm8k_answer(solution: str) -> str | None:
    """The number after GSM8K's last ``####``, thousands separators removed; None without one."""
    if "####" not in solution:
        return None
    return solution.rsplit("####", 1)[1].strip().replace(",", "") or None


def last_boxed(text: str) -> str | None:
    """The contents of ``text``'s last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced;
    None when it has none or it is not closed."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i].strip() or None
    return None


def convert_row(kind: str, row: dict) -> dict | None:
    """One source row as a dataset row, or None when it has no final answer."""
    if kind == "gsm8k":
        answer = gsm8k_answer(row["answer"])
        question, meta = row["question"], {}
    else:
        answer = row.get("answer") or last_boxed(row["solution"])
        question = row["problem"]
        meta = {"level": str(row.get("level", "")),
                "subject": str(row.get("type") or row.get("subject") or "")}
    if answer is None:
        return None
    return {"messages": [{"role": "user", "content": question.strip()}], "answer": answer,
            "source": kind, **meta}


def load_rows(split: str, source: str, hub_config: str | None, hub_split: str) -> list[dict]:
    """The rows of a local file or directory, or of a hub dataset's split; SourceError naming the
    source when it cannot be read."""
    from areal_like.settings.config import ConfigError

    path, flag = Path(source).expanduser(), f"--{split} {source}"
    import datasets

    if (path / "dataset_dict.json").is_file():  # save_to_disk of several splits: the one named
        return datasets.load_from_disk(str(path))[hub_split].to_list()
    if path.is_dir() and len(splits := split_files(path)) > 1:  # a hub snapshot: not all of it
        raise SourceError(f"{flag}: the directory holds the files of several splits "
                          f"({', '.join(splits)}); give the {split} split's file or directory")
    if path.exists():
        from areal_like.tasks.datasets import load_table

        try:
            return load_table("source", source).to_list()
        except ConfigError as e:
            raise SourceError(f"{flag}: {e}") from None
    if not _HUB_ID.fullmatch(source) or source.endswith(_FILE_SUFFIXES):
        raise SourceError(f"{flag}: no such file or directory (a hub dataset id is org/name)")
    try:
        return datasets.load_dataset(source, hub_config, split=hub_split).to_list()
    except Exception as e:  # noqa: BLE001 - the hub's errors are many; the user needs one line
        raise SourceError(
            f"{split} split: cannot load {source!r} from the Hugging Face hub ({type(e).__name__}: "
            f"{e}); without the hub, download its files elsewhere and give them with --train and "
            "--test (configs/RECIPES.md)") from None


def split_files(directory: Path) -> list[str]:
    """The splits whose files ``directory`` holds, named as ``datasets`` infers them (``train-*``,
    ``test.jsonl``, ...); one (``train``) when the names say none."""
    from datasets.data_files import get_data_patterns

    try:
        return sorted(map(str, get_data_patterns(str(directory))))
    except Exception:  # noqa: BLE001 - no data files: the loader says what it expected
        return []


def convert_rows(kind: str, split: str, source: str, raw: list[dict]) -> list[dict]:
    """``raw`` converted, rows without a final answer dropped; SourceError when the rows lack the
    columns ``kind`` has."""
    need = ["question", "answer"] if kind == "gsm8k" else ["problem", "solution"]
    if kind == "math" and raw and "answer" in raw[0]:  # MATH-500: the answer column suffices
        need[1] = "answer"
    if raw and (missing := [c for c in need if c not in raw[0]]):
        raise SourceError(f"{split} split {source}: no {' or '.join(map(repr, missing))} column "
                          f"(it has {', '.join(map(repr, raw[0]))}): is it a {kind} dataset?")
    rows = [r for r in (convert_row(kind, row) for row in raw) if r is not None]
    if not rows:
        raise SourceError(f"{split} split: no row of {source} has a final answer; is it the "
                          "right dataset?")
    return rows


def write(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    fields = [("messages", pa.list_(message)), ("answer", pa.string()), ("source", pa.string())]
    fields += [(k, pa.string()) for k in ("level", "subject") if rows and k in rows[0]]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(fields)), path)


def prepare(kind: str, out: Path, sources: dict[str, str | None], seed: int = 0) -> dict:
    """Writes ``out/train.parquet`` and ``out/test.parquet``; returns the counts written and
    dropped per split."""
    summary = {"kind": kind, "out": str(out)}
    # hub splits first: reading a local file turns the hub off for the rest of the process
    for split in sorted(DEFAULTS[kind], key=lambda s: bool(sources.get(s))):
        hub_id, hub_config, hub_split = DEFAULTS[kind][split]
        source = sources.get(split) or hub_id
        raw = load_rows(split, source, hub_config, hub_split)
        rows = convert_rows(kind, split, source, raw)
        if split == "train":
            random.Random(seed).shuffle(rows)
        write(rows, out / f"{split}.parquet")
        summary[split] = {"rows": len(rows), "dropped": len(raw) - len(rows)}
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m areal_like.tasks.prepare_math",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=sorted(DEFAULTS))
    parser.add_argument("--train", help="local file/directory or hub id (default: the hub's)")
    parser.add_argument("--test", help="local file/directory or hub id (default: the hub's)")
    parser.add_argument("--out", type=Path, help="output directory (default: data/KIND)")
    parser.add_argument("--seed", type=int, default=0, help="the training rows' shuffle")
    args = parser.parse_args(argv)
    out = args.out or Path("data") / args.kind
    try:
        summary = prepare(args.kind, out, {"train": args.train, "test": args.test}, args.seed)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
