"""What bench_transport.py reports beside its main lines: CPU read from /proc (per process and per
thread) and the two security lines, CURVE on tcp and the same-node ipc:// path, each against the
unencrypted tcp stream of the same rounds (medians over rounds; see bench_transport's docstring)."""

from __future__ import annotations

import os
import statistics

GROUP_SIZE = 8
GOAL_CURVE_RATIO_AT_4096 = 0.75  # CURVE over unencrypted: security may cost at most a quarter of the throughput


def child_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) of another process, from /proc."""
    return sum(cpu_split_s(pid))


def thread_cpu_s(pids: tuple[int, ...]) -> dict[tuple[int, int], float]:
    """CPU seconds of every thread of ``pids``, by (pid, thread id), from /proc. libzmq encrypts and
    decrypts CURVE frames in its I/O thread, beside the Python thread that encodes and decodes."""
    out = {}
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                out[(pid, int(tid))] = sum(cpu_split_s(pid, f"/task/{tid}"))
            except OSError:  # the thread ended
                pass
    return out


def cpu_split_s(pid: int, task: str = "") -> tuple[float, float]:
    """(user, system) CPU seconds, all threads, of a process, from /proc (clock-tick resolution)."""
    fields = open(f"/proc/{pid}{task}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def sealed_line(tokens: int, rates: dict, cpu_us, split: dict, frame_bytes: int, rounds: int, seconds: float) -> dict:
    """The stream of ours over sealed bulk frames (CURVE handshake, AES-GCM frames) against the same
    stream unencrypted, and against CURVE for every frame; ``split``: CPU us per group by process and
    user/system, sealed and unencrypted."""
    sealed, plain, curve = (statistics.median(rates[("stream", m)]) for m in ("sealed", "ours", "curve"))
    goal = GOAL_CURVE_RATIO_AT_4096 if tokens == 4096 else None
    return {"name": f"transport_stream_{GROUP_SIZE}x{tokens}_sealed", "figure": round(sealed, 1), "unit": "groups/s",
            "baseline": round(plain, 1), "ratio": round(sealed / plain, 3), "goal": goal,
            "goal_met": None if goal is None else sealed / plain >= goal, "ratio_to_curve": round(sealed / curve, 3),
            "mb_s": round(sealed * frame_bytes / 1e6, 1), "cpu_us_per_group": round(cpu_us(("stream", "sealed")), 1),
            "unencrypted_cpu_us_per_group": round(cpu_us(("stream", "ours")), 1), "cpu_split_us": split,
            "rounds": rounds, "round_s": seconds, "sealed_rounds": [round(x) for x in rates[("stream", "sealed")]],
            "unencrypted_rounds": [round(x) for x in rates[("stream", "ours")]],
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def load_warning() -> dict:
    """A ``warning`` field when other work keeps the machine busy (1-minute load above its CPU count):
    absolute figures are then low and noisy; ratios of one run (modes interleaved) still compare."""
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load <= cpus:
        return {}
    return {"warning": f"loaded machine (1-minute load {load:.1f} on {cpus} CPUs): compare ratios of one run only"}


def local_line(tokens: int, rates: dict, cpu_us, rounds: int, seconds: float) -> dict:
    """The stream of ours over the same-node endpoint of the CURVE socket, against unencrypted tcp and CURVE."""
    local, plain, curve = (statistics.median(rates[("stream", m)]) for m in ("local", "ours", "curve"))
    return {"name": f"transport_stream_{GROUP_SIZE}x{tokens}_local", "figure": round(local, 1), "unit": "groups/s",
            "baseline": round(plain, 1), "ratio": round(local / plain, 3), "ratio_to_curve": round(local / curve, 3),
            "cpu_us_per_group": round(cpu_us(("stream", "local")), 1),
            "unencrypted_cpu_us_per_group": round(cpu_us(("stream", "ours")), 1), "rounds": rounds, "round_s": seconds,
            "local_rounds": [round(x) for x in rates[("stream", "local")]], "load_avg_1m": round(os.getloadavg()[0], 2)}


def curve_line(tokens: int, rates: dict, cpu_us, busiest: dict[str, float], busiest_thread: dict[str, float],
               frame_bytes: int, rounds: int, seconds: float) -> dict:
    """The stream of ours with CURVE against the same stream without it (and both against raw ZMQ).
    Load-robust twins of ``ratio``, from CPU per group by mode: ``cpu_bound_ratio`` (the busier
    process: the throughput bound with one core per process) and ``thread_bound_ratio`` (the busiest
    thread of either process: the bound where every thread has a core, as on an idle many-core node;
    libzmq runs CURVE in its I/O thread, beside the Python thread)."""
    curve, plain, raw = (statistics.median(rates[("stream", m)]) for m in ("curve", "ours", "raw"))
    goal = GOAL_CURVE_RATIO_AT_4096 if tokens == 4096 else None
    return {"name": f"transport_stream_{GROUP_SIZE}x{tokens}_curve", "figure": round(curve, 1), "unit": "groups/s",
            "baseline": round(plain, 1), "ratio": round(curve / plain, 3), "goal": goal,
            "goal_met": None if goal is None else curve / plain >= goal,
            "ratio_to_raw": round(curve / raw, 3), "unencrypted_ratio_to_raw": round(plain / raw, 3),
            "raw": round(raw, 1), "mb_s": round(curve * frame_bytes / 1e6, 1),
            "cpu_us_per_group": round(cpu_us(("stream", "curve")), 1),
            "unencrypted_cpu_us_per_group": round(cpu_us(("stream", "ours")), 1),
            "busiest_process_cpu_us": round(busiest["curve"], 1),
            "unencrypted_busiest_process_cpu_us": round(busiest["ours"], 1),
            "cpu_bound_ratio": round(busiest["ours"] / busiest["curve"], 3),
            "busiest_thread_cpu_us": round(busiest_thread["curve"], 1),
            "unencrypted_busiest_thread_cpu_us": round(busiest_thread["ours"], 1),
            "thread_bound_ratio": round(busiest_thread["ours"] / busiest_thread["curve"], 3),
            "rounds": rounds, "round_s": seconds,
            "curve_rounds": [round(x) for x in rates[("stream", "curve")]],
            "unencrypted_rounds": [round(x) for x in rates[("stream", "ours")]],
            "load_avg_1m": round(os.getloadavg()[0], 2)}


