"""Writes the shipped example dataset ``math_chat/{train,eval}.parquet`` (deterministic; the rows:
areal_like/tasks/TASKS.md): ``python -m areal_like.tasks.data.make_math_chat [OUT_DIR]``.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

SEED = 16
EVAL_ROWS = 300
# level -> (source, questions drawn from that level's distinct questions). Levels 1-4 are place
# value, which the tiny model learns in a short warm start; level 5 (one-digit facts, disjoint
# between train and eval) and level 6 (two-digit plus one-digit, carries) are the hard tail.
LEVELS = {1: ("place-value", 700), 2: ("tens-plus-ones", 90), 3: ("times-ten", 99),
          4: ("drop-ones", 90), 5: ("one-digit", 100), 6: ("carry", 300)}
OUT_DIR = Path(__file__).resolve().parent / "math_chat"


def _candidates(level: int) -> list[tuple[str, int]]:
    """Every distinct (question, value) of ``level``, in a fixed order."""
    if level == 1:
        return [(f"{a * 100} + {b * 10} + {c}", a * 100 + b * 10 + c)
                for a in range(1, 10) for b in range(10) for c in range(10)]
    if level == 2:
        return [(f"{a * 10} + {b}", a * 10 + b) for a in range(1, 10) for b in range(10)]
    if level == 3:
        return [(f"10 * {a}", 10 * a) for a in range(1, 100)]
    if level == 4:
        return [(f"{a * 10 + b} - {b}", a * 10) for a in range(1, 10) for b in range(10)]
    if level == 5:
        return [(f"{a} + {b}", a + b) for a in range(10) for b in range(10)]
    return [(f"{a} + {b}", a + b) for a in range(10, 100) for b in range(1, 10) if a % 10 + b >= 10]


def _row(level: int, question: str, value: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {question}?"}], "answer": str(value),
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
        pq.write_table(pa.Table.from_pylist(split_rows, schema=schema),
                       out_dir / f"{split}.parquet")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR)
