"""Every benchmark count/float flag refuses an out-of-range value at parsing: exit 2 naming it."""

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from areal_like.daemon import MALLOC_ENV

ROOT = Path(__file__).resolve().parents[2]
COUNTS = {  # script: {flag: its minimum}
    "bench_agentic": {"--steps": 1, "--skip": 0, "--groups": 1, "--calls": 1},
    "bench_async": {"--steps": 1, "--skip": 0, "--groups": 1, "--max-new-tokens": 1},
    "bench_buffer": {"--tokens": 1, "--group-size": 1, "--producers": 1, "--processes": 1,
                     "--rounds": 1, "--handout-groups": 1, "--curve-io-threads": 1},
    "bench_chaos": {"--steps": 1, "--checkpoint-every": 1},
    "bench_critic": {"--steps": 10, "--seed": 0},
    "bench_moe": {"--trials": 1, "--warmup": 0, "--experts": 1, "--top-k": 1},
    "bench_engine": {"--requests": 1, "--group": 1, "--batch": 1, "--rounds": 1, "--hidden": 1},
    "bench_packing": {"--seqs": 1, "--median": 1, "--max-len": 1, "--group": 1, "--mbs": 1,
                      "--budget": 1, "--repeats": 1},
    "bench_reward_pool": {"--rounds": 1},
    "bench_sglang_sync": {"--hidden": 1, "--layers": 1, "--requests": 1, "--versions": 1},
    "bench_vllm_sync": {"--hidden": 1, "--layers": 1, "--requests": 1, "--versions": 1},
    "bench_staleness": {"--seeds": 1, "--first-seed": 0, "--steps": 1, "--groups": 1,
                        "--eval-examples": 1},
    "bench_train_step": {"--trials": 1, "--warmup": 0, "--groups": 1, "--max-new-tokens": 1},
    "bench_trainer_memory": {"--layers": 1, "--vocab": 0, "--seqs": 1, "--mbs": 1, "--len": 1,
                             "--steps": 1, "--chunk": 1, "--lora-rank": 0},
    "bench_transport": {"--rounds": 1, "--window": 1},
    "bench_vs_trl": {"--eval-prompts": 1, "--repeats": 1},
    "bench_weight_sync": {"--hidden": 1, "--layers": 1, "--vocab": 1, "--trials": 1, "--steps": 1,
                          "--skip": 0, "--eta": 0, "--lora": 0},
    "soak": {"--checkpoint-every": 1, "--export-every": 0},
}
CASES = [(script, flag, str(least - 1)) for script, flags in COUNTS.items()
         for flag, least in flags.items()]
CASES += [("bench_staleness", "--etas", "0,x"), ("bench_staleness", "--etas", "0,-1"),
          ("bench_transport", "--tokens", "512,0")]
FLOATS = {  # script: {flag: a value out of its range}
    "bench_buffer": {"--seconds": "0", "--warmup-s": "-1"},
    "bench_packing": {"--sigma": "-0.5"},
    "bench_sglang_sync": {"--bucket-mb": "0"},
    "bench_vllm_sync": {"--bucket-mb": "0"},
    "bench_transport": {"--seconds": "-1"},
    "bench_vs_trl": {"--budget-s": "0"},
    "bench_weight_sync": {"--bucket-mb": "-64"},
    "soak": {"--minutes": "0", "--sample-s": "0", "--segment-mb": "0", "--log-max-mb": "-1",
             "--warmup-frac": "1.5", "--window-frac": "0"},
}
CASES += [(script, flag, value) for script, flags in FLOATS.items()
          for flag, value in flags.items()]
CASES += [("bench_buffer", "--seconds", "nan"), ("soak", "--minutes", "inf")]
LOADED = {}
PARSE = argparse.ArgumentParser.parse_args


class Parsed(Exception):
    """The arguments parsed: the benchmark would have run."""


def script(name: str, monkeypatch):
    if name not in LOADED:
        monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
        for key, value in MALLOC_ENV.items():  # else bench_transport re-executes the interpreter
            monkeypatch.setenv(key, value)
        spec = importlib.util.spec_from_file_location(f"args_{name}",
                                                      ROOT / "benchmarks" / f"{name}.py")
        LOADED[name] = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = LOADED[name]
        spec.loader.exec_module(LOADED[name])
    return LOADED[name]


@pytest.mark.parametrize("name, flag, value", CASES)
def test_a_value_out_of_its_range_is_refused_at_parsing_naming_its_flag(name, flag, value,
                                                                        monkeypatch, capsys):
    main = script(name, monkeypatch).main

    def parse_args(parser, *args, **kwargs):
        PARSE(parser, *args, **kwargs)  # exits 2 on a refused value
        raise Parsed(f"{name}.py {flag} {value} was accepted: the benchmark would run")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", flag, value])
    with pytest.raises(SystemExit) as refused:
        main()
    assert refused.value.code == 2
    assert f"argument {flag}: " in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("name, argv, says", [
    ("bench_buffer", ["--fsync", "sometimes"], "--fsync"),
    ("bench_buffer", ["--curve-io-threads", "2"], "--curve-io-threads"),
    ("bench_weight_sync", ["--lora", "8"], "--system"),
    ("bench_weight_sync", ["--system", "--steps", "5", "--skip", "5"], "--skip"),
])
def test_flags_that_measure_nothing_are_refused_before_any_run(name, argv, says):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *argv],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and says in out.stderr.splitlines()[-1]
