"""``Example``, the unit every task hands out, and ``task.name=dataset``'s rows: prompts and
answers from local files (``.jsonl``, ``.json``, ``.parquet``, ``.csv``, a directory of one
format, or a ``save_to_disk`` directory), read with the ``datasets`` library; nothing is
downloaded. Columns map to ``Example`` by the ``task.*_key`` settings; metadata is converted to
plain msgpack-able values.

TRL's formats: a ``prompt`` column of text (standard) or of ``[{role, content}, ...]`` lists
(conversational, told apart by the column's type), or a ``messages`` column. Ambiguous data is
refused naming the key to set (``task_columns``, ``holds_messages``, ``row_example``): both a
``prompt`` and a ``messages`` column, a prompt column mixing text and lists, chat messages written
as text (a CSV cell).

Invariants: the same files and config give the same examples in the same order in every process;
the eval split is ``task.eval_path`` or a held-out ``task.eval_fraction`` drawn with
``task.seed`` before any filtering. No task code here (``DatasetTask`` is in ``task.py``).
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from areal_like.settings.config import ConfigError, TaskConfig

# suffix -> datasets builder
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True, slots=True)
class Example:
    """One prompt (text and/or chat ``messages``), its reference ``answer`` and its metadata."""

    prompt: str
    answer: str
    messages: tuple | list | None = None  # [{"role": ..., "content": ...}, ...]
    metadata: dict = field(default_factory=dict)


def load_split(cfg: TaskConfig, split: str) -> list[Example]:
    """The examples of ``split`` ("train" or "eval") in file order, before any prompt filter."""
    if split == "eval" and cfg.eval_path:
        return load_examples(cfg, "task.eval_path", cfg.eval_path)
    if split == "eval" and cfg.eval_fraction <= 0:
        raise ConfigError("the task has no eval split: set task.eval_path or task.eval_fraction")
    examples = load_examples(cfg, "task.dataset_path", cfg.dataset_path or "")
    if cfg.eval_fraction > 0 and not cfg.eval_path:
        train, held_out = split_indices(len(examples), cfg.eval_fraction, cfg.seed)
        examples = [examples[i] for i in (held_out if split == "eval" else train)]
    return examples


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) row indices, ascending: ``round(n * fraction)`` rows (1 to n - 1) held out."""
    if n < 2:
        raise ConfigError(f"task.eval_fraction={fraction}: the dataset has {n} row(s), too few to "
                          "hold any out")
    k = min(max(round(n * fraction), 1), n - 1)
    held_out = sorted(random.Random(seed).sample(range(n), k))
    chosen = set(held_out)
    return [i for i in range(n) if i not in chosen], held_out


def load_examples(cfg: TaskConfig, key: str, value: str) -> list[Example]:
    """Every row of the dataset at ``value`` (the config key ``key`` names it) as an Example."""
    table = load_table(key, value)
    keys = example_keys(cfg, table, value)
    rows = table.select_columns(selected(keys)).to_list()
    if not rows:
        raise ConfigError(f"{key}={value!r} has no rows")
    return [row_example(cfg, row, i, keys, value) for i, row in enumerate(rows)]


def example_keys(cfg: TaskConfig, table: Any, source: str) -> tuple[str, str, list[str], bool]:
    """``task_columns`` of ``table`` and whether its prompt column holds chat messages."""
    text_key, answer_key, meta_keys = task_columns(cfg, list(table.column_names), source)
    return text_key, answer_key, meta_keys, holds_messages(cfg, table, text_key, source)


def selected(keys: tuple) -> list[str]:
    """The columns an Example reads (no answer column with ``task.answer_key=''``)."""
    return list(dict.fromkeys(c for c in (keys[0], keys[1], *keys[2]) if c))


def row_example(cfg: TaskConfig, row: dict, i: int, keys: tuple[str, str, list[str], bool],
                source: str) -> Example:
    """Row ``i`` of ``source`` as an Example; ConfigError naming the key when it cannot be one.
    ``keys``: ``example_keys``."""
    text_key, answer_key, meta_keys, chat = keys
    answer = row[answer_key] if answer_key else ""
    if answer is None:
        raise ConfigError(f"task.answer_key={answer_key!r}: row {i} of {source} has no answer")
    metadata = {k: _plain(row[k]) for k in meta_keys}
    key = "task.messages_key" if cfg.messages_key or text_key != cfg.prompt_key else (
        "task.prompt_key")
    if chat:
        messages = _messages(row[text_key], i, f"{key}={text_key!r}", source)
        return Example("\n".join(m["content"] for m in messages), _text(answer), messages, metadata)
    if row[text_key] is None or not str(row[text_key]).strip():  # blank: nothing to answer
        raise ConfigError(f"{key}={text_key!r}: row {i} of {source} has no prompt")
    if isinstance(row[text_key], (dict, list, tuple)):  # its str() would be the prompt
        raise ConfigError(f"{key}={text_key!r}: row {i} of {source} is neither text nor a list "
                          f"of {{role, content}} messages: {str(row[text_key])[:120]}")
    text = _text(row[text_key])
    if CHAT_AS_TEXT.match(text):
        raise ConfigError(f"{key}={text_key!r}: row {i} of {source} is chat messages written as "
                          f"text ({text[:60]!r}...): keep the messages a list, in JSONL, JSON or "
                          "parquet (a CSV cell holds text only)")
    return Example(text, _text(answer), None, metadata)


# a text prompt that is the text of a messages list: JSON's or Python's repr of one
CHAT_AS_TEXT = re.compile(r"\s*\[\s*\{\s*[\"']role[\"']\s*:")


ROW_BATCH = 1024  # rows decoded at a time by check_rows, whatever the file's size
SHOWN_ROWS = 5  # row numbers a check_rows line lists


def check_rows(cfg: TaskConfig, key: str, value: str, table: Any) -> str | None:
    """One line saying which rows of ``table`` cannot become examples (``row_example``), or None;
    streamed ``ROW_BATCH`` rows at a time."""
    keys = example_keys(cfg, table, value)
    columns = selected(keys)
    bad, first, n = [], "", 0
    for batch in table.select_columns(columns).iter(batch_size=ROW_BATCH):
        for j in range(len(batch[columns[0]])):
            try:
                row_example(cfg, {c: batch[c][j] for c in columns}, n, keys, value)
            except ConfigError as e:
                bad.append(n)
                first = first or str(e)
            n += 1
    if n == 0:
        return f"{key}={value!r} has no rows"
    if not bad:
        return None
    shown = ", ".join(map(str, bad[:SHOWN_ROWS])) + (", ..." if len(bad) > SHOWN_ROWS else "")
    return (f"{key}={value!r}: {len(bad)} of {n} rows cannot be used (rows {shown}, counted "
            f"from 0); the first: {first}")


MESSAGES_COLUMN = "messages"  # TRL's conversational column, read when there is no prompt column


def task_columns(cfg: TaskConfig, columns: list[str], source: str) -> tuple[str, str, list[str]]:
    """(prompt, answer, metadata) columns: ``task.messages_key``, else ``task.prompt_key``, else a
    ``messages`` column; ConfigError naming the task keys whose column is missing (the prompt's
    and the answer's at once), or ``task.messages_key`` when both a prompt and a ``messages``
    column could be the prompt. No answer column with ``task.answer_key=''``."""
    answer_key, prompt_key = cfg.answer_key, cfg.prompt_key
    if cfg.messages_key:
        text_key, text_name = cfg.messages_key, "task.messages_key"
    elif prompt_key in columns and MESSAGES_COLUMN in columns and prompt_key != MESSAGES_COLUMN:
        raise ConfigError(
            f"task.messages_key: {source} has both a {prompt_key!r} column and a "
            f"{MESSAGES_COLUMN!r} column, so which one is the prompt is ambiguous: set "
            f"task.messages_key={MESSAGES_COLUMN} to prompt with the messages, or "
            f"task.messages_key={prompt_key} when the {prompt_key!r} column holds the chat "
            f"messages (for a plain-text prompt, drop the {MESSAGES_COLUMN!r} column)")
    elif prompt_key not in columns and MESSAGES_COLUMN in columns:
        text_key, text_name = MESSAGES_COLUMN, "task.messages_key"
    else:
        text_key, text_name = prompt_key, "task.prompt_key"
    missing = [f"{key}={column!r}" for key, column in (
        (text_name, text_key), ("task.answer_key", answer_key)) if column and column not in columns]
    if missing:
        hint = ("; task.answer_key='' when the reward (task.reward_fn) needs no answer"
                if answer_key and answer_key not in columns else "")
        raise ConfigError(f"{', '.join(missing)}: no such column{'s' if len(missing) > 1 else ''} "
                          f"in {source}; columns found: {', '.join(columns)}{hint}")
    if cfg.metadata_keys is None:
        return text_key, answer_key, [c for c in columns if c not in (text_key, answer_key)]
    return text_key, answer_key, [_require(columns, "task.metadata_keys", k, source)
                                  for k in cfg.metadata_keys]


def holds_messages(cfg: TaskConfig, table: Any, column: str, source: str) -> bool:
    """Whether the prompt ``column`` of ``table`` holds chat messages: a ``task.messages_key`` or
    ``messages`` column always; a prompt column when its type is a list (TRL's conversational
    format); text otherwise. A column of mixed types (the ``datasets`` JSON reader's ``Json``
    feature) is read row by row: text and lists together are refused naming the key."""
    import pyarrow as pa

    if cfg.messages_key or column != cfg.prompt_key:
        return True
    kind = table.data.schema.field(column).type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return True
    if not isinstance(kind, pa.BaseExtensionType):  # a typed column: text, numbers, ...
        return False
    first: dict[bool, int] = {}
    for i, value in enumerate(table[column]):
        if value is not None:
            first.setdefault(isinstance(value, (list, tuple)), i)
    if len(first) > 1:
        raise ConfigError(f"task.prompt_key={column!r}: the column mixes text (row {first[False]}) "
                          f"and message lists (row {first[True]}) in {source}: make every row "
                          "plain text or every row a list of {role, content} messages")
    return first.get(True) is not None


def load_table(key: str, value: str):
    """A ``datasets.Dataset`` of the local file or directory ``value`` (module docstring)."""
    path = _local_path(key, value)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()  # one bar per load is noise in every daemon's log
    if path.is_dir() and ((path / "state.json").is_file()
                          or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        return (_one_split(loaded, key, value) if isinstance(loaded, datasets.DatasetDict)
                else loaded)
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS
        and not any(part.startswith(".") for part in p.parts))
    builders = {BUILDERS.get(f.suffix) for f in files}
    if not files or None in builders:
        raise ConfigError(f"{key}={value!r}: expected a {', '.join(BUILDERS)} file, a directory of "
                          "them, or a save_to_disk directory")
    if len(builders) > 1:
        raise ConfigError(f"{key}={value!r}: the directory mixes formats "
                          f"({', '.join(sorted(builders))}); keep one format per directory")
    if all(f.stat().st_size == 0 for f in files):  # the json reader fails with a bare StopIteration
        raise ConfigError(f"{key}={value!r} has no rows")
    return datasets.load_dataset(builders.pop(), data_files=[str(f) for f in files], split="train")


def _local_path(key: str, value: str) -> Path:
    path = Path(value).expanduser()
    if not value or "://" in value or not path.exists():
        raise ConfigError(f"{key}={value!r} is not a local file or directory; datasets are read "
                          "from local files only, never downloaded (save a hub dataset with "
                          "save_to_disk or to parquet first)")
    return path


def _one_split(dataset_dict, key: str, value: str):
    """The split of a saved DatasetDict that ``key`` means: its only split, else train / eval by
    role."""
    names = list(dataset_dict)
    if len(names) == 1:
        return dataset_dict[names[0]]
    wanted = ("train",) if key == "task.dataset_path" else ("eval", "validation", "test")
    for name in wanted:
        if name in names:
            return dataset_dict[name]
    raise ConfigError(f"{key}={value!r} holds splits {names}; none of {list(wanted)}: point {key} "
                      "at one split's directory")


def _require(columns: list[str], key: str, column: str, source: str) -> str:
    if column not in columns:
        raise ConfigError(f"{key}={column!r}: no such column in {source}; columns found: "
                          f"{', '.join(columns)}")
    return column


def _messages(value: Any, row: int, key: str, source: str) -> tuple[dict, ...]:
    """Chat messages as plain dicts (keys a columnar format filled with None for this message
    dropped)."""
    ok = isinstance(value, (list, tuple)) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value)
    if not ok:
        raise ConfigError(f"{key}: row {row} of {source} is not a non-empty "
                          f"list of {{role, content}} messages: {str(value)[:120]}")
    return tuple({k: _plain(v) for k, v in m.items() if v is not None} for m in value)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(_plain(value))


def _plain(value: Any) -> Any:
    """``value`` as plain msgpack-able Python: numpy scalars/arrays -> numbers/lists, dates -> ISO
    text."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalar or array
        return _plain(value.tolist())
    if hasattr(value, "isoformat"):  # date, datetime, time, pandas Timestamp
        return value.isoformat()
    return str(value)  # Decimal too: exact, where float() would round


def prompt_column(cfg: TaskConfig) -> tuple[str, bool]:
    """The train split's prompt column and whether it holds chat messages, as ``load_examples``
    reads them (``task.messages_key`` says so without reading the file)."""
    if cfg.messages_key:
        return cfg.messages_key, True
    value = cfg.dataset_path or ""
    keys = example_keys(cfg, load_table("task.dataset_path", value), value)
    return keys[0], keys[3]
