#!/usr/bin/env bash
# Makes the environment the SGLang tier (tests/sglang/) runs in: a venv in DIR with the pinned
# SGLang and the `gpu` extra's resolved versions (torch 2.14.1, transformers 5.19.0, ...), plus
# this project installed editable from this checkout. About 11 GB and 5-6 minutes the first time;
# a DIR that is already complete (its marker names the same requirement set) is re-used: the
# project is installed editable from this checkout again WITH its dependencies, so one added to
# pyproject.toml since DIR was made is installed too (when all are satisfied pip changes nothing
# else: measured 16 s for the dry run on a complete DIR).
#   usage: tests/sglang/setup_env.sh DIR
set -euo pipefail

if [ "$#" -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 DIR   (the venv for the SGLang tier is made, or re-used, in DIR)" >&2
    exit 2
fi
DIR="$1"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# The gpu extra's pins (pyproject.toml) and what the tier's tests need; changing this line makes
# an existing DIR incomplete, so it is built again.
REQS="sglang==0.5.23 torch==2.14.1 torchaudio==2.11.0 pytest>=8 pytest-timeout>=2.3 hypothesis>=6.100"
MARKER="$DIR/.areal-like-sglang-env"

if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$REQS" ] && [ -x "$DIR/bin/python" ]; then
    echo "re-using the complete SGLang environment in $DIR"
else
    rm -rf "$DIR"
    python3 -m venv "$DIR"
    # shellcheck disable=SC2086
    "$DIR/bin/python" -m pip install --quiet $REQS
    echo "$REQS" > "$MARKER"
fi
"$DIR/bin/python" -m pip install --quiet -e "$REPO[gpu]"
"$DIR/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("sglang", "torch", "transformers", "tokenizers"):
    print(name, md.version(name))
assert md.version("sglang") == "0.5.23", md.version("sglang")
assert md.version("torch").startswith("2.14.1"), md.version("torch")
PY
