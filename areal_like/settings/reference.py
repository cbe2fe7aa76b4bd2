"""The configuration reference, generated from the schema: ``python -m areal_like.settings.reference
> configs/REFERENCE.md`` (tests/unit/test_config_reference.py checks the committed file is what this
prints, and that every key has a description).

Every leaf key of ``RunConfig`` with its type, its effective default (``configs/config.yaml``
composed with no overrides; the dataclass default beside it where the two differ), the bounds
declared on its type (``config_checks.field_bounds``, which the load checks too), the presets
(config group options) that set it, and its description. A description is the comment of the
field in the schema's source, the lines directly above it and the one at the end of its line; a
comment starting ``[X only]`` names what the key applies to. Sections (fields that are
dataclasses) take their class docstring. Nothing here imports torch or starts anything.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
import typing
from functools import cache
from typing import Any

import yaml

from areal_like.settings.config import compose_with_choices, config_dir
from areal_like.settings.config_checks import field_bounds
from areal_like.settings.schema import RunConfig

APPLIES = re.compile(r"^\[([^\]]+) only\]\s*")
HEADER = """# Configuration reference

Generated from the schema (`areal_like/settings/schema.py`, `loss_schema.py`, `report_schema.py`)
by `python -m areal_like.settings.reference > configs/REFERENCE.md`; do not edit by hand (a unit
test fails when this file and the schema disagree). How configs compose, presets and your own
YAML: configs/README.md.

Columns: **default** is the effective default of `areal-like run` with no overrides
(`configs/config.yaml` composed: `task=reverse model=tiny loss=decoupled_ppo topology=local_cpu`);
where the dataclass default differs it follows as "schema: ...". **bounds** are those the key
declares, checked at load (a bad value stops the job before anything starts, naming the key, as
do the checks that relate two keys, in the schema's `__post_init__`). **set by** lists the
presets (`group=option`) that change the key (`group=*`: all of them; `* but a`: all but a).
`${a.b}` is the value of key `a.b`.
"""


# ---- descriptions: the comments of each field in the schema's source ---------------------------

def _comments(cls: type) -> dict[str, str]:
    """field name -> its comment, from the class that declares it or, inherited, a base."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        out.update({k: v for k, v in _own_comments(klass).items() if v or k not in out})
    return out


@cache
def _own_comments(cls: type) -> dict[str, str]:
    """field name -> its comment (lines directly above, then the one ending its line)."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    by_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            by_line[tok.start[0]] = tok.string.lstrip("#").strip()
    out: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, n = [], node.lineno - 1
        while n in by_line and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, by_line[n])
            n -= 1
        trailing = by_line.get(node.lineno) if node.lineno in by_line else None
        if trailing and "type: ignore" in trailing:
            trailing = None
        text = " ".join([*above, *([trailing] if trailing else [])]).strip()
        out[node.target.id] = text
    return out


# ---- the keys ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Key:
    path: str
    type: str
    default: Any
    schema_default: Any
    bounds: list[str]
    applies: str
    description: str


def _type(hint: Any) -> str:
    return (hint.__name__ if isinstance(hint, type) else str(hint)).replace(" | None", " or null")


def _schema_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _is_section(cls: type, f: dataclasses.Field) -> type | None:
    value = _schema_default(f)
    return type(value) if dataclasses.is_dataclass(value) else None


def _section_doc(cls: type) -> str:
    doc = " ".join((cls.__doc__ or "").split())
    return "" if doc.startswith(cls.__name__ + "(") else doc  # dataclass's made-up signature


def walk(cls: type = RunConfig, prefix: str = "", applies: str = "") -> list[tuple[str, Any]]:
    """(section path, class) and (key path, Key) rows in schema order."""
    rows: list[tuple[str, Any]] = []
    comments, hints, bounds = _comments(cls), typing.get_type_hints(cls), field_bounds(cls)
    # a section with an ``enabled`` switch: its other keys apply only when it is on
    switch = f"{prefix}enabled=true" if hints.get("enabled") is bool else ""
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        section = _is_section(cls, f)
        if section is not None:
            rows.append((path, section))
            kernel = re.fullmatch(r"trainer\.loss\.(\w+)", path)
            rows += walk(section, path + ".", f"trainer.loss.kernel={kernel[1]}" if kernel
                         else applies)
            continue
        text = comments.get(f.name, "")
        scope = APPLIES.match(text)
        if scope:
            text = text[scope.end():]
        implied = switch if switch and f.name != "enabled" else applies
        rows.append((path, Key(path, _type(hints[f.name]), None, _schema_default(f),
                               [b.rule for b in bounds[f.name]], scope[1] if scope else implied,
                               text)))
    return rows


def keys() -> list[Key]:
    return [row for _, row in walk() if isinstance(row, Key)]


def _effective() -> dict:
    from omegaconf import OmegaConf

    raw, _ = compose_with_choices([], "config")
    return OmegaConf.to_container(raw, resolve=False)


def _lookup(tree: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return dataclasses.MISSING
        tree = tree[part]
    return tree


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if prefix + str(k) == "rollout.engine.sglang":
            out["rollout.engine.sglang"] = v
        else:
            out.update(_flatten(v, f"{prefix}{k}."))
    return out


def preset_settings() -> dict[str, list[str]]:
    """dotted key -> the ``group=option`` presets under configs/ that set it."""
    out: dict[str, list[str]] = {}
    for path in sorted(config_dir().glob("*/*.yaml")):
        text = path.read_text()
        package = re.search(r"^# @package (\S+)", text, re.MULTILINE)
        prefix = (package[1] if package else path.parent.name)
        prefix = "" if prefix == "_global_" else prefix + "."
        data = yaml.safe_load(text) or {}
        data.pop("defaults", None)
        for key in _flatten(data, prefix):
            out.setdefault(key, []).append(f"{path.parent.name}={path.stem}")
    return out


def _presets(names: list[str], options: dict[str, list[str]]) -> str:
    """``loss=*`` for every option of a group, ``group=* but c`` for most of them, else
    ``group=a,b``."""
    by_group: dict[str, list[str]] = {}
    for name in names:
        group, _, option = name.partition("=")
        by_group.setdefault(group, []).append(option)

    def shown(group: str, opts: list[str]) -> str:
        rest = [o for o in options[group] if o not in opts]
        if not rest and len(opts) > 1:
            return f"{group}=*"
        return (f"{group}=* but {','.join(rest)}" if len(rest) < len(opts) / 2
                else f"{group}={','.join(opts)}")
    return ", ".join(shown(g, opts) for g, opts in by_group.items())


def _show(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "?"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"' if value == "" else value
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    effective = _effective()
    presets = preset_settings()
    options = {d.name: sorted(p.stem for p in d.glob("*.yaml"))
               for d in config_dir().iterdir() if d.is_dir()}
    sections: dict[str, tuple[str, list[Key]]] = {"": ("", [])}
    for path, row in walk():
        if isinstance(row, Key):
            sections[row.path.rpartition(".")[0]][1].append(row)
        else:
            sections[path] = (_section_doc(row), [])
    out = [HEADER]
    for name, (doc, rows) in sections.items():
        if not rows:
            continue
        out += [f"\n## `{name}`\n" if name else "\n## top level\n", *([doc + "\n"] if doc else []),
                "| key | type | default | bounds | applies to | set by | description |",
                "|---|---|---|---|---|---|---|"]
        for row in rows:
            value = _lookup(effective, row.path)
            shown = _show(row.schema_default if value is dataclasses.MISSING else value)
            if value is not dataclasses.MISSING and _show(value) != _show(row.schema_default):
                shown += f" (schema: {_show(row.schema_default)})"
            cells = [f"`{row.path}`", row.type, f"`{shown}`", "; ".join(row.bounds),
                     row.applies, _presets(presets.get(row.path, []), options), row.description]
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
