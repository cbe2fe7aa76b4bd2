"""launch/observability: configs parse and every metric queried is one a daemon exports."""

from __future__ import annotations

import json
import operator
import re
from pathlib import Path

import yaml

from areal_like.net.metrics import prom_name
from buffer.instruments import COUNTERS, LABELLED

ROOT = Path(__file__).resolve().parents[2]
OBS = ROOT / "launch" / "observability"
SUFFIXES = ("_total", "_sum", "_count", "_bucket")


def _made(literal: str) -> set[str]:
    """Prometheus names of the hierarchical names ``literal`` finds in the process packages, and
    of the buffer counters created up front from one table (buffer/instruments.py)."""
    names = {prom_name(f"buffer/{n}") for n in (*COUNTERS, *LABELLED)}
    for pkg in ("buffer", "rollout_server", "trainer"):
        for path in (ROOT / pkg).rglob("*.py"):
            names |= {prom_name(n) for n in re.findall(literal, path.read_text())}
    return names


def _exported() -> set[str]:
    """Prometheus names of every metric the process packages create (hierarchical name literals)."""
    names = _made(r'f?"((?:buffer|rollout|trainer)/[a-z_]+)"')
    # trainer gauges named by a loop over row keys: m.gauge(f"trainer/{key}")
    loop = (ROOT / "trainer" / "loop.py").read_text()
    block = re.search(r'for key in \(([^)]*)\):\s*\n\s*m\.gauge\(f"trainer/\{key\}"\)', loop)
    if block:
        names |= {prom_name(f"trainer/{k}") for k in re.findall(r'"([a-z_]+)"', block.group(1))}
    return names


def _queried(text: str) -> set[str]:
    found = set(re.findall(r"\b(areal_(?:buffer|rollout|trainer)_[a-z_]+)", text))
    out = set()
    for name in found:
        for suffix in SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        out.add(name)
    return out


def test_files_parse_and_prometheus_accepts_every_path_of_the_scrape_config():
    prom = yaml.safe_load((OBS / "prometheus.yml").read_text())
    assert {j["job_name"] for j in prom["scrape_configs"]} >= {"areal-like"}
    alerts = {r["alert"] for r in alert_rules()}
    assert {"TrainerNoStep", "WeightSyncOverDeadline", "StalenessAtBound",
            "EngineUnhealthy"} <= alerts
    dash = json.loads((OBS / "grafana_dashboard.json").read_text())
    assert dash["panels"] and all(p["targets"] for p in dash["panels"])
    # no '*' outside a file_sd or rule path's last segment (Prometheus refuses it)
    file_sd = re.compile(r"^[^*]*(\*[^/]*)?\.(json|yml|yaml|JSON|YML|YAML)$")
    rule_path = re.compile(r"^[^*]*(\*[^/]*)?$")
    files = [f for job in prom["scrape_configs"] for sd in job.get("file_sd_configs", [])
             for f in sd["files"]]
    assert files and all(file_sd.match(f) for f in files), files
    assert all(rule_path.match(f) for f in prom["rule_files"]), prom["rule_files"]


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load((OBS / "alerts.yml").read_text())["groups"]
            for r in g["rules"]]


def test_alert_rules_compare_daemons_within_one_job_and_each_daemon_kind_has_a_down_rule():
    """Rules aggregating over daemons keep run; every rule has a routed severity."""
    rules = alert_rules()
    aggregation = re.compile(r"\b(?:sum|min|max|count|avg)\s*(?:by\s*\(([^)]*)\))?\s*\(")
    for rule in rules:
        expr = rule["expr"]
        for m in aggregation.finditer(expr):
            assert "run" in (m.group(1) or ""), f"{rule['alert']}: {m.group(0)} mixes jobs"
        assert "scalar(" not in expr, f"{rule['alert']}: scalar() of every job's series"
        assert rule["labels"]["severity"] in ("page", "warn"), rule["alert"]
    by_expr = {r["expr"]: r for r in rules}
    for kind in ("buffer", "rollout", "trainer"):  # up == 0 of every daemon kind pages
        rule = by_expr.get(f'up{{kind="{kind}"}} == 0')
        assert rule and rule["for"] and rule["labels"]["severity"] == "page", kind


def test_docs_name_counters_as_prometheus_serves_them():
    counters = _made(r'(?:counter|count_to)\(\s*f?"((?:buffer|rollout|trainer)/[a-z_]+)"')
    assert "areal_trainer_nonfinite_steps" in counters  # the pattern finds them
    bare = {f"{page.relative_to(ROOT)}: {name}" for page in ROOT.glob("**/*.md")
            if ".venv" not in page.parts
            for name in re.findall(r"\b(areal_[a-z_]+)", page.read_text()) if name in counters}
    assert not bare, sorted(bare)


LOOKBACK_S = 300  # how far back Prometheus takes a series' last sample for an instant selector


class _Vector(dict):
    """An instant vector: labels -> value; ops match labels one to one."""

    def _op(self, other, op):
        if isinstance(other, dict):
            return {k: op(v, other[k]) for k, v in self.items() if k in other}
        return {k: op(v, other) for k, v in self.items()}

    def __sub__(self, other):
        return _Vector(self._op(other, operator.sub))

    def __gt__(self, other):
        return _Vector({k: self[k] for k, held in self._op(other, operator.gt).items() if held})


def _fires(expr: str, series: dict[str, dict[frozenset, list]], t: float) -> bool:
    """Whether expr has a result at t over series: enough PromQL for our rules."""
    def window(name, seconds):
        return {k: [v for ts, v in pts if t - seconds < ts <= t]
                for k, pts in series.get(name, {}).items()}

    def over(fn, name, minutes):
        return _Vector({k: fn(vs) for k, vs in window(name, minutes * 60).items() if vs})

    def agg(fn, label, vector):
        groups: dict[frozenset, list] = {}
        for k, v in vector.items():
            groups.setdefault(frozenset(p for p in k if p[0] == label), []).append(v)
        return _Vector({g: fn(vs) for g, vs in groups.items()})

    py = " ".join(expr.split())
    py = re.sub(r"\b(min|max)_over_time\((\w+)\[(\d+)m\]\)", r'over(\1, "\2", \3)', py)
    py = re.sub(r"\bdelta\((\w+)\[(\d+)m\]\)", r'over(delta, "\1", \2)', py)
    py = re.sub(r"\b(min|max) by \((\w+)\) \(", r'agg(\1, "\2", ', py)
    py = re.sub(r'(?<!")\b(areal_\w+)', r'over(last, "\1", LOOKBACK_S / 60)', py)
    assert not re.search(r"[{\[]|\b(and|or|on|unless|without|sum|count)\b", py), py
    names = {"over": over, "agg": agg, "min": min, "max": max, "LOOKBACK_S": LOOKBACK_S,
             "last": lambda v: v[-1], "delta": lambda v: v[-1] - v[0]}
    return bool(eval(py, names))


def test_trainer_rolled_back_sees_a_whole_job_resume_on_new_ports():
    expr = {r["alert"]: r["expr"] for r in alert_rules()}["TrainerRolledBack"]

    def resumed(lost: int, port: int) -> bool:
        first = frozenset({"run": "myjob", "instance": "127.0.0.1:40001"}.items())
        again = frozenset({"run": "myjob", "instance": f"127.0.0.1:{port}"}.items())
        # the crashed job scraped every 5 s for 10 minutes, the resumed one from 2 minutes later
        samples = {first: [(t, 0) for t in range(0, 600, 5)]}
        samples.setdefault(again, []).extend((t, lost) for t in range(720, 900, 5))
        # another job on the same Prometheus: its own rollback long ago is not this job's
        other = frozenset({"run": "other", "instance": "127.0.0.1:40009"}.items())
        samples[other] = [(t, 7) for t in range(0, 900, 5)]
        return _fires(expr, {"areal_trainer_rolled_back_steps": samples}, 895)

    assert resumed(3, 40002)  # the whole job again: a new instance
    assert resumed(3, 40001)  # the trainer alone restarted by its supervisor: the same port
    assert not resumed(0, 40002)  # a resume that lost nothing


def test_every_queried_metric_is_exported():
    exported = _exported()
    assert "areal_buffer_trainer_version" in exported and "areal_trainer_policy_version" in exported
    text = (OBS / "alerts.yml").read_text() + (OBS / "grafana_dashboard.json").read_text()
    missing = sorted(_queried(text) - exported)
    assert not missing, f"queried but not exported by any daemon: {missing}"


def test_every_rejection_reason_is_created_up_front():
    """Every buffer/rejected reason is in LABELLED, so exists at 0 from the start."""
    sources = {ROOT / "buffer" / "credits.py": r'f?"([a-z_]+): ',
               ROOT / "areal_like" / "wire" / "group_checks.py": r'f?"([a-z_]+): ',
               ROOT / "buffer" / "service.py": r'_refuse\("([a-z_]+)"',
               ROOT / "buffer" / "peer_caps.py": r'return \(?"([a-z_]+)",'}
    reasons = {"decode", "frame_too_large"}  # service.handle labels a ProtocolError by its length
    for path, pattern in sources.items():
        found = set(re.findall(pattern, path.read_text()))
        assert found, f"no rejection reason found in {path.name}: the pattern is out of date"
        reasons |= found
    missing = sorted(reasons - set(LABELLED["rejected"]))
    assert not missing, f"rejection reasons without a series until first counted: {missing}"
