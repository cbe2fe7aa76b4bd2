"""Writes the shipped example dataset ``math_chat/{train,eval}.parquet`` (deterministic).

Arithmetic questions in chat form, small enough for a ~0.5M-parameter model to partly learn:
each row is ``messages`` = one user message ("What is 37 + 45?"), ``answer`` ("82"), and two
metadata columns, ``source`` (the operation) and ``level`` (1: one-digit + and -, 2: two-digit plus
one-digit, 3: two-digit minus one-digit, 4: two-digit + two-digit, 5: products of 2..9). Every question is distinct;
``EVAL_ROWS`` of them, drawn at random, form the eval split, so it is disjoint from train.

Run ``python -m areal_like.data.make_math_chat [OUT_DIR]`` to rewrite the files; the test suite
checks that ``rows()`` reproduces the committed files.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

SEED = 16
EVAL_ROWS = 300
# level -> (source, questions drawn from that level's distinct questions)
LEVELS = {1: ("one-digit", 155), 2: ("addition", 700), 3: ("subtraction", 700), 4: ("two-digit", 100),
          5: ("multiplication", 64)}
OUT_DIR = Path(__file__).resolve().parent / "math_chat"


def _candidates(level: int) -> list[tuple[int, str, int]]:
    """Every distinct (a, op, b) question of ``level``, in a fixed order."""
    if level == 1:
        return ([(a, "+", b) for a in range(10) for b in range(10)]
                + [(a, "-", b) for a in range(10) for b in range(a + 1)])
    if level == 2:
        return [(a, "+", b) for a in range(10, 100) for b in range(1, 10)]
    if level == 3:
        return [(a, "-", b) for a in range(10, 100) for b in range(1, 10)]
    if level == 4:
        return [(a, "+", b) for a in range(10, 100) for b in range(10, 100)]
    return [(a, "*", b) for a in range(2, 10) for b in range(2, 10)]


def _row(level: int, a: int, op: str, b: int) -> dict:
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return {"messages": [{"role": "user", "content": f"What is {a} {op} {b}?"}], "answer": str(value),
            "source": LEVELS[level][0], "level": level}


def rows() -> dict[str, list[dict]]:
    """{"train": [...], "eval": [...]}: the rows of both files, in file order."""
    rng = random.Random(SEED)
    out = []
    for level, (_, count) in LEVELS.items():
        out += [_row(level, *q) for q in rng.sample(_candidates(level), count)]
    rng.shuffle(out)
    return {"train": out[EVAL_ROWS:], "eval": out[:EVAL_ROWS]}


def write(out_dir: Path = OUT_DIR) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("answer", pa.string()), ("source", pa.string()), ("level", pa.int32())])
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, split_rows in rows().items():
        pq.write_table(pa.Table.from_pylist(split_rows, schema=schema), out_dir / f"{split}.parquet")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR)
