"""The GPU validation kit: run ``tests/gpu`` on a lent GPU machine that has torch but no network.

Two steps, standard library only (it runs before anything is installed):

* here, with network: ``python tests/gpu/kit.py wheelhouse`` downloads the wheels the GPU
  image lacks (``WHEELS``, pinned, for CPython 3.12 on manylinux x86-64) into ``.whl/`` (ignored
  by git): binary wheels with ``pip download --only-binary=:all:``, and the one pure-Python
  package published only as an sdist (``antlr4-python3-runtime`` 4.9.3, which hydra/omegaconf pin)
  built into a wheel with ``pip wheel``;
* there: ``python3 tests/gpu/kit.py run`` installs them with ``--no-index --no-deps --target``
  into a folder put on ``PYTHONPATH`` (the image's torch stays the one used), runs
  ``pytest -m gpu tests/gpu`` with a junit report, and writes ``tests/gpu/RESULTS.md`` (also into
  ``$OUT`` when set, which is how the device tool returns files): date, GPU, torch/CUDA/NCCL,
  pass/fail/skip per test and the figures tests record (``figure`` fixture, tests/gpu/conftest.py),
  and ``GOALS`` (at least or at most a number, or at least a baseline of the same run) met or not.

Each call also writes ``results.json`` (beside RESULTS.md, in ``$OUT`` and in
``/tmp/areal-like-kit`` on the machine); a later call on the same commit merges into it (its tests
replace those rows), so a run made of two device calls keeps the figures of both. Tests write
profiler tables with the ``artifact`` fixture into ``profiles/`` beside RESULTS.md
(``AREAL_KIT_ARTIFACTS``).

``IMAGE_HAS`` lists what the GPU image already provides; ``missing_requirements`` checks that every
dependency in pyproject.toml is in one of the two lists, and ``pin_mismatches`` that what
pyproject pins exactly (transformers, tokenizers: sglang's versions) is carried in that version,
not taken from the image (tests/unit/test_gpu_kit.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIGURE_PREFIX = "figure:"  # as tests/gpu/conftest.py records them
WHEELS = {  # name -> version: the project's non-torch needs the GPU image lacks (or has too old)
    "hydra-core": "1.3.8", "omegaconf": "2.3.1", "antlr4-python3-runtime": "4.9.3",
    "pyzmq": "27.3.0",
    "msgspec": "0.22.0", "crc32c": "2.9.post0", "msgpack": "1.2.4", "prometheus-client": "0.26.0",
    "datasets": "5.2.0", "dill": "0.4.1", "multiprocess": "0.70.19", "math-verify": "0.9.0",
    "latex2sympy2-extended": "1.11.0", "jsonschema": "4.26.0",
    "jsonschema-specifications": "2025.9.1",
    "referencing": "0.37.0", "rpds-py": "2026.9.1", "pytest-xdist": "3.8.0", "execnet": "2.1.2",
    "ruff": "0.17.6",  # tests/unit/test_lint.py
    # the fused log-prob head (trainer.logprob_head; Triton comes with the image's torch)
    "liger-kernel": "0.8.5",
    # pyproject.toml pins these (sglang's versions); the image's transformers is older (5.17)
    "transformers": "5.19.0", "tokenizers": "0.23.2",
}
# pure Python, no wheel on PyPI: built here with `pip wheel`
SDIST_ONLY = {"antlr4-python3-runtime"}
IMAGE_HAS = {  # in the GPU image (the device tool's list of its packages), used as they are
    "torch", "jinja2", "pyarrow", "numpy", "aiohttp", "psutil", "matplotlib",
    "rich", "safetensors", "pytest", "pytest-timeout", "hypothesis", "huggingface-hub",
    "pandas", "pyyaml",
    "xxhash", "fsspec", "requests", "tqdm", "filelock", "packaging", "sympy", "peft",
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def norm(name: str) -> str:
    """PEP 503 name: ``Foo_Bar.baz`` -> ``foo-bar-baz``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(pyproject: Path, extras: tuple[str, ...] = ("test",)) -> list[str]:
    """Normalised names of pyproject's dependencies and ``extras`` (self-references left out)."""
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    names = [norm(re.match(r"[A-Za-z0-9_.-]+", r).group(0)) for r in reqs]
    return sorted({n for n in names if n != norm(project["name"])})


def missing_requirements(pyproject: Path) -> list[str]:
    """Dependencies neither carried as wheels nor in the GPU image: the kit would fail on them."""
    have = {norm(n) for n in WHEELS} | {norm(n) for n in IMAGE_HAS}
    return [n for n in requirement_names(pyproject) if n not in have]


def pin_mismatches(pyproject: Path) -> list[str]:
    """pyproject's exact pins (``name==version``) that the kit would not install as pinned: the GPU
    run must test the library versions CI tests (torch, the GPU image's own, is left out)."""
    import tomllib

    out = []
    for req in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        if ((m := re.fullmatch(r"([A-Za-z0-9_.-]+)==([^;\s]+)", req.strip()))
                and norm(m[1]) != "torch"):
            carried = {norm(n): v for n, v in WHEELS.items()}.get(norm(m[1]))
            if carried != m[2]:
                out.append(f"{m[1]}=={m[2]}: the kit carries {carried or 'nothing'}")
    return out


def wheelhouse_commands(dest: Path, python: str = sys.executable) -> list[list[str]]:
    """The pip commands that fill ``dest`` with ``WHEELS``: one download, one wheel build."""
    binary = [f"{n}=={v}" for n, v in WHEELS.items() if n not in SDIST_ONLY]
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    download = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                "--python-version", "3.12",
                "--implementation", "cp", *plat, "-d", str(dest), *binary]
    build = [python, "-m", "pip", "wheel", "--no-deps", "-w", str(dest),
             *[f"{n}=={WHEELS[n]}" for n in sorted(SDIST_ONLY)]]
    return [download, build]


def wheel_files(dest: Path) -> dict[str, Path]:
    """The wheels in ``dest`` by normalised name; ValueError when a name has two versions
    (``pip install --no-index`` of both would stop the whole install)."""
    out: dict[str, Path] = {}
    for f in sorted(dest.glob("*.whl")):
        name = norm(f.name.split("-")[0])
        if name in out:
            raise ValueError(f"two wheels of {name} in {dest}: {out[name].name} and {f.name}; "
                             "keep one")
        out[name] = f
    return out


def check_wheelhouse(dest: Path) -> list[str]:
    """What ``dest`` lacks or holds in another version than ``WHEELS`` pins (empty: complete)."""
    files = wheel_files(dest)
    problems = []
    for name, version in WHEELS.items():
        f = files.get(norm(name))
        if f is None:
            problems.append(f"{name}=={version}: missing")
        elif f.name.split("-")[1] != version:
            problems.append(f"{name}=={version}: found {f.name}")
    return problems


@dataclass
class TestResult:
    name: str  # file::test, as pytest names it
    outcome: str  # passed | failed | error | skipped
    seconds: float
    message: str = ""  # why it failed or was skipped (first line)
    figures: dict[str, str] = field(default_factory=dict)  # figure name -> "value unit"


def parse_junit(path: Path) -> list[TestResult]:
    """Every testcase of a pytest junit xml report, with its outcome and recorded figures."""
    results = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.get("name") is None:  # what pytest writes for a run stopped by SIGINT
            continue
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (node.get("message") or node.text or "").strip().splitlines()[0:1]
                message = message[0] if message else ""
                break
        figures = {p.get("name")[len(FIGURE_PREFIX):]: p.get("value") for p in case.iter("property")
                   if p.get("name", "").startswith(FIGURE_PREFIX)}
        module = case.get("classname", "").replace(".", "/")
        results.append(TestResult(name=f"{module}.py::{case.get('name')}", outcome=outcome,
                                  seconds=float(case.get("time") or 0), message=message,
                                  figures=figures))
    return results


@dataclass(frozen=True)
class Goal:
    """A figure's goal: ``at_least`` and/or ``at_most`` a number, or at least another figure of the
    same run (``at_least_figure``: a baseline measured beside it on the same card). ``baseline`` is
    shown beside the value."""

    figure: str
    at_least: float | None = None
    at_most: float | None = None
    at_least_figure: str | None = None
    baseline: str | None = None

    def bound(self) -> str:
        """The goal as the table writes it: ``>= 35``, ``<= 0.02``, ``>= other_figure``."""
        parts = [f">= {self.at_least:g}" if self.at_least is not None else "",
                 f">= {self.at_least_figure}" if self.at_least_figure else "",
                 f"<= {self.at_most:g}" if self.at_most is not None else ""]
        return ", ".join(p for p in parts if p)


# The one-GPU goals. The engine's first goal is transformers' compiled static-cache `generate` on
# the same model and card (12,810 tokens/s on one H100, 2026-11-27); the one-GPU IPC sync is timed
# at the job's bucket size (weight_sync.bucket_mb, 64 MiB) over 20 pushes, the median of them all
# and of the last five both at most 0.02 s (flat: no growth push after push).
ENGINE_GOALS = (
    Goal("generated_tokens_per_s", at_least_figure="generated_tokens_per_s_baseline_hf_static"),
    Goal("generated_tokens_per_s", at_least=5028.0),
)
TRAINER_GOALS = (
    Goal("train_mfu_packed", at_least=35.0, baseline="train_mfu_packed_baseline_plain_hf"),
    Goal("train_mfu_1_5b", at_least=40.0),
    Goal("train_tokens_per_s_packed_ratio", at_least=1.3,
         baseline="train_tokens_per_s_packed_baseline_plain_hf"),
)
SYNC_GOALS = (
    Goal("weight_sync_ipc_s", at_most=0.02, baseline="weight_sync_ipc_s_baseline"),
    Goal("weight_sync_ipc_last_s", at_most=0.02),
)
SYSTEM_GOALS = (Goal("gpu_busy_share", at_least=70.0),)
GOALS = ENGINE_GOALS + TRAINER_GOALS + SYNC_GOALS + SYSTEM_GOALS


def figure_values(results: list[TestResult]) -> dict[str, float]:
    """Every recorded figure's number (its ``"value unit"`` text's first word), by name."""
    out = {}
    for r in results:
        for name, text in r.figures.items():
            try:
                out[name] = float(str(text).split()[0])
            except (ValueError, IndexError):
                continue
    return out


def goal_met(goal: Goal, values: dict[str, float]) -> bool | None:
    """Whether ``values`` meet ``goal``; None when its figure (or the figure it is held to) was not
    measured."""
    v = values.get(goal.figure)
    if v is None or (goal.at_least_figure and goal.at_least_figure not in values):
        return None
    return ((goal.at_least is None or v >= goal.at_least)
            and (goal.at_most is None or v <= goal.at_most)
            and (goal.at_least_figure is None or v >= values[goal.at_least_figure]))


def goal_rows(results: list[TestResult], goals: tuple[Goal, ...] = GOALS) -> list[str]:
    """The goal table's rows: figure, value, baseline, goal, met (``not measured`` when absent)."""
    values, rows = figure_values(results), []
    for g in goals:
        v = values.get(g.figure)
        shown = g.baseline or g.at_least_figure
        base = f"{shown} = {values[shown]:.4g}" if shown in values else shown or ""
        met = {None: "not measured", True: "yes", False: "no"}[goal_met(g, values)]
        value = "" if v is None else f"{v:.4g}"
        rows.append(f"| {g.figure} | {value} | {base} | {g.bound()} | {met} |")
    return rows


def merge_results(old: list[TestResult], new: list[TestResult]) -> list[TestResult]:
    """One commit's results over several kit calls: a test in ``new`` replaces its row in ``old``
    (in place), the others of ``new`` follow in their order."""
    fresh = {r.name: r for r in new}
    merged = [fresh.pop(r.name, r) for r in old]
    return merged + [r for r in new if r.name in fresh]


def make_record(env: dict, results: list[TestResult], note: str = "",
                selection: list[str] = ()) -> dict:
    """One kit call as ``results.json`` keeps it: its machine, its selection, its tests."""
    return {"env": env, "calls": [{"date": env.get("date", "unknown"),
                                   "selection": " ".join(selection), "note": note}],
            "results": [asdict(r) for r in results]}


def merge_records(old: dict | None, new: dict) -> dict:
    """``new`` merged into ``old`` when both ran on the same commit (the tests of ``new`` replacing
    those ``old`` had, the calls listed in order, the newer machine described), else ``new``."""
    if not old or old.get("env", {}).get("commit") != new["env"].get("commit"):
        return new
    results = merge_results([TestResult(**r) for r in old["results"]],
                            [TestResult(**r) for r in new["results"]])
    return {"env": new["env"], "calls": old["calls"] + new["calls"],
            "results": [asdict(r) for r in results],
            "profiles": sorted(set(old.get("profiles", [])) | set(new.get("profiles", [])))}


def merge_with_previous(record: dict, previous: list[dict | None]) -> dict:
    """``record`` merged into the newest of ``previous`` (None: none there) on its commit, with
    the profile files of both; ``record`` alone when none is on its commit. The newest: the
    checkout's copy may hold fewer calls than the warm machine's."""
    same = [r for r in previous
            if r and r.get("env", {}).get("commit") == record["env"].get("commit")]
    if not same:
        return record
    old = max(same, key=lambda r: (r["calls"][-1]["date"], len(r["calls"])))
    return merge_records(old, record)


def load_record(path: Path) -> dict | None:
    """A ``results.json`` record, None when absent or unreadable."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "results" in record else None


def render_record(record: dict) -> str:
    """RESULTS.md of a (merged) record: ``render_results`` with every call named."""
    calls = record.get("calls", [])
    notes = [c["note"] for c in calls if c.get("note")]
    text = render_results(record["env"], [TestResult(**r) for r in record["results"]],
                          "; ".join(notes), record.get("profiles", []))
    if len(calls) > 1:
        listed = "\n".join(f"{i}. {c['date']}: `{c['selection'] or '(all)'}`"
                            + (f" ({c['note']})" if c.get("note") else "")
                            for i, c in enumerate(calls, 1))
        text = text.replace("\n## Tests\n", f"\nMerged from {len(calls)} calls on this commit:"
                                              f"\n\n{listed}\n\n## Tests\n", 1)
    return text


def train_flops(layers: int, hidden: int, vocab: int, block_params: int,
                seqs: list[tuple[int, int]]) -> float:
    """Model FLOPs of one training pass (forward and backward) over ``seqs`` of (prompt tokens,
    output tokens), the MFU convention (PaLM, torchtitan): 6 FLOPs per matmul weight per token it
    is applied to; the blocks run on every token, the vocab x hidden output head only on the
    output tokens (the trainer takes log-probs of those alone; the input embedding is a lookup).
    Attention: 12 L H l^2 per l-token sequence (QK^T and AV, 2 l^2 H multiply-adds each per layer
    forward, times 3 with backward), causal masking NOT discounted (half of it is masked out; the
    convention counts it). A checkpointed recompute is not counted (that would be hardware FLOPs).
    """
    total = 0
    for prompt, output in seqs:
        n = prompt + output
        total += 6 * block_params * layers * n + 6 * vocab * hidden * output
        total += 12 * layers * hidden * n * n
    return float(total)


def profile_text(title: str, prof, rows: int = 30) -> str:
    """A torch.profiler run as text: its ops by CUDA time, then by CPU time."""
    avg = prof.key_averages()
    out = [f"# {title}", ""]
    for label, keys in (("CUDA", ("device_time_total", "cuda_time_total")),
                        ("CPU", ("cpu_time_total",))):
        for key in keys:
            try:
                table = avg.table(sort_by=key, row_limit=rows)
                break
            except (AttributeError, KeyError, ValueError):
                continue
        out += [f"## by {label} time", "", table, ""]
    return "\n".join(out)


def render_results(env: dict, results: list[TestResult], note: str = "",
                   profiles: list[str] = ()) -> str:
    """``tests/gpu/RESULTS.md``: the machine, the totals, one row per test, the figures, the goals,
    the profile files written beside it."""
    counts = {k: sum(r.outcome == k for r in results)
              for k in ("passed", "failed", "error", "skipped")}
    totals = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no tests ran"
    lines = ["# GPU validation results", "",
             "Written by `python3 tests/gpu/kit.py run` (tests/gpu/README.md) on torch "
             f"{env.get('torch', 'unknown')}, the machine's own; replace it with a newer run's.",
             "", "| | |", "|---|---|"]
    for key in ("date", "gpu", "driver", "torch", "cuda", "nccl", "python", "commit"):
        lines.append(f"| {key} | {env.get(key, 'unknown')} |")
    lines += [f"| result | {totals} ({sum(r.seconds for r in results):.0f} s)"
              + (f"; {note}" if note else "") + " |", "",
              "## Tests", "",
              "| test | outcome | seconds | note |", "|---|---|---|---|"]
    for r in results:
        note = r.message.replace("|", "\\|")[:160]
        lines.append(f"| `{r.name}` | {r.outcome} | {r.seconds:.1f} | {note} |")
    figures = [(r.name, k, v) for r in results for k, v in r.figures.items()]
    if figures:
        lines += ["", "## Figures", "", "| test | figure | value |", "|---|---|---|"]
        lines += [f"| `{name}` | {key} | {value} |" for name, key, value in figures]
    values = figure_values(results)
    if any(name in values for g in GOALS for name in (g.figure, g.baseline)):  # else none ran
        lines += ["", "## Goals", "", "| figure | value | baseline (same run) | goal | met |",
                  "|---|---|---|---|---|", *goal_rows(results)]
    if profiles:
        lines += ["", "## Profiles", "", "torch.profiler tables (by CUDA and by CPU time), beside "
                  "this file:", "", *[f"- `{name}`" for name in profiles]]
    return "\n".join(lines) + "\n"


ENV_PROBE = r"""
import json, platform, torch
out = {"python": platform.python_version(), "torch": torch.__version__,
       "cuda": str(torch.version.cuda)}
try:
    out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
except Exception as e:  # a CPU build has no NCCL
    out["nccl"] = f"none ({type(e).__name__})"
out["gpu"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
              else "none (torch sees no GPU)")
print(json.dumps(out))
"""


def probe_env(python: str = sys.executable) -> dict:
    """Date, GPU, driver, torch/CUDA/NCCL, Python and commit of this machine and checkout."""
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    r = subprocess.run([python, "-c", ENV_PROBE], capture_output=True, text=True, timeout=300)
    env.update(json.loads(r.stdout) if r.returncode == 0
               else {"torch": f"import failed: {r.stderr.strip()[-200:]}"})
    for key, argv in (("driver", ["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"]),
                      ("commit", ["git", "-C", str(REPO), "describe", "--always", "--dirty"])):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            env[key] = (out.stdout.strip().splitlines()[0]
                        if out.returncode == 0 and out.stdout.strip() else "unknown")
        except (FileNotFoundError, subprocess.TimeoutExpired):
            env[key] = "unknown"
    return env


def pytest_selection(pytest_args: list[str]) -> list[str]:
    """The GPU tests' pytest arguments (``pytest_args`` after them), as ``run`` passes them."""
    return ["-m", "gpu", "tests/gpu", *pytest_args]


def dry_run(pytest_args: list[str]) -> int:
    """List the tests ``run`` would run with ``pytest_args`` (pytest's ``--collect-only``),
    installing nothing: a check, on any machine, of a selection (``-- -k NAME``) before a device
    call spends its minutes on it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO),
                                                        os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           *pytest_selection(pytest_args)], cwd=REPO, env=env).returncode


def run_kit(wheelhouse: Path, site: Path, out: Path, pytest_args: list[str],
            budget_s: float = 0) -> int:
    """Install the wheelhouse, run the GPU tests, write RESULTS.md; pytest's exit code."""
    problems = (check_wheelhouse(wheelhouse) if wheelhouse.is_dir()
                else [f"{wheelhouse}: no such folder"])
    if problems:
        print("the wheelhouse is incomplete "
              "(build it with `python tests/gpu/kit.py wheelhouse` where pip "
              "has network):\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
                    *map(str, wheel_files(wheelhouse).values())],
                   check=True)
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    out.mkdir(parents=True, exist_ok=True)
    (out / PROFILES).mkdir(exist_ok=True)
    env[ARTIFACTS_ENV] = str(out / PROFILES)  # tests/gpu/conftest.py's `artifact` fixture
    junit = out / "junit.xml"
    code, stopped = run_pytest([*pytest_selection(["-rA", "-v", f"--junitxml={junit}",
                                                    "-o", "junit_family=xunit1"]), *pytest_args],
                               env, budget_s)
    note = (f"stopped at the {budget_s:g} s budget (`--budget-s`): the tests listed ran; the one "
            "running then and those after it did not" if stopped else "")
    record = make_record(probe_env(), parse_junit(junit) if junit.is_file() else [], note,
                         pytest_args)
    record["profiles"] = sorted(f"{PROFILES}/{f.name}" for f in (out / PROFILES).glob("*.txt"))
    record = merge_with_previous(record, [load_record(RECORD), load_record(STATE / RECORD.name)])
    for f in (out / PROFILES).glob("*.txt"):  # beside RESULTS.md in the checkout too
        (RESULTS.parent / PROFILES).mkdir(exist_ok=True)
        (RESULTS.parent / PROFILES / f.name).write_text(f.read_text())
    STATE.mkdir(parents=True, exist_ok=True)
    (STATE / RECORD.name).write_text(json.dumps(record, indent=1))
    write_record(record, out)
    return code


def run_pytest(args: list[str], env: dict, budget_s: float, cwd: Path = REPO) -> tuple[int, bool]:
    """pytest's exit code, and whether it ran past ``budget_s`` (0: no budget). Past it pytest
    gets SIGINT, as from Ctrl-C, so it still writes its junit report of the tests that finished
    (a device call killed at its own limit brings back no report at all). SIGINT is restored to
    its default in pytest: a shell without job control starts a command it puts in the
    background (``&``) with SIGINT ignored, and pytest would then never stop."""
    proc = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=cwd, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        return proc.wait(timeout=budget_s or None), False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        return proc.wait(), True


RESULTS = REPO / "tests" / "gpu" / "RESULTS.md"
# every call's tests and figures, merged over the calls of one commit (RESULTS.md renders it)
RECORD = REPO / "tests" / "gpu" / "results.json"
# where a warm device machine keeps the last record between calls (beside --site's folder)
STATE = Path("/tmp/areal-like-kit")
PROFILES = "profiles"  # folder of the profile tables, beside RESULTS.md (and in --out)
ARTIFACTS_ENV = "AREAL_KIT_ARTIFACTS"  # where the tests write them (tests/gpu/conftest.py)


def write_record(record: dict, out: Path | None, results_md: Path = RESULTS) -> None:
    """RESULTS.md and results.json of ``record`` here, and into ``out`` with env.json."""
    text = render_record(record)
    results_md.write_text(text)
    (results_md.parent / RECORD.name).write_text(json.dumps(record, indent=1))
    if out is not None:
        (out / "RESULTS.md").write_text(text)
        (out / RECORD.name).write_text(json.dumps(record, indent=1))
        (out / "env.json").write_text(json.dumps(record["env"], indent=2))
    print(text)


def write_results(env: dict, results: list[TestResult], out: Path | None,
                  results_md: Path = RESULTS, note: str = "") -> None:
    text = render_results(env, results, note)
    results_md.write_text(text)
    if out is not None:
        (out / "RESULTS.md").write_text(text)
        (out / "env.json").write_text(json.dumps(env, indent=2))
    print(text)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python tests/gpu/kit.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    wh = sub.add_parser("wheelhouse",
                        help="download the wheels the GPU image lacks (needs network)")
    wh.add_argument("--dest", type=Path, default=REPO / ".whl")
    run = sub.add_parser("run", help="on the GPU machine: install the wheelhouse, run tests/gpu, "
                                     "write RESULTS.md")
    run.add_argument("--wheelhouse", type=Path, default=REPO / ".whl")
    run.add_argument("--site", type=Path, default=Path("/tmp/areal-like-site"))
    run.add_argument("--out", type=Path,
                     default=(Path(os.environ["OUT"]) if os.environ.get("OUT")
                              else REPO / "outputs" / "gpu-kit"),
                     help="junit.xml, env.json and a copy of RESULTS.md (default: $OUT when set)")
    run.add_argument("--budget-s", type=float, default=0,
                     help="stop pytest (SIGINT) after this many seconds and still write the "
                          "report; keep it under the device call's timeout_s (default: none)")
    run.add_argument("--dry-run", action="store_true",
                     help="list the tests it would run and stop (installs nothing; any machine)")
    run.add_argument("pytest_args", nargs="*",
                     help="more pytest arguments, after `--` (e.g. -- -k throughput)")
    rep = sub.add_parser("report", help="render RESULTS.md from a junit xml (and an env.json)")
    rep.add_argument("junit", type=Path)
    rep.add_argument("--env", type=Path)
    rep.add_argument("--results", type=Path, default=RESULTS,
                     help="where to write (default tests/gpu/RESULTS.md)")
    args = ap.parse_args(argv)
    if args.command == "wheelhouse":
        args.dest.mkdir(parents=True, exist_ok=True)
        for cmd in wheelhouse_commands(args.dest):
            subprocess.run(cmd, check=True)
        problems = check_wheelhouse(args.dest)
        print("\n".join(problems) or f"{len(WHEELS)} wheels in {args.dest}")
        return 1 if problems else 0
    if args.command == "run":
        if not 0 <= args.budget_s < float("inf"):
            ap.error(f"--budget-s {args.budget_s}: expected a finite number of seconds >= 0")
        if args.dry_run:
            return dry_run(args.pytest_args)
        return run_kit(args.wheelhouse, args.site, args.out, args.pytest_args, args.budget_s)
    env = json.loads(args.env.read_text()) if args.env else {}
    write_results(env, parse_junit(args.junit), None, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
