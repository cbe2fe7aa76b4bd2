"""Whole pushes against their deadline (trainer/weight_sync.py, weight_local.py)."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
from collections.abc import Callable

import torch

from areal_like.net.auth import vouch_proof
from areal_like.net.distributed import free_port
from areal_like.net.metrics import Metrics
from areal_like.settings.config import WeightSyncConfig
from areal_like.weights.plan import WeightSyncPlan
from areal_like.wire import protocol as P
from trainer.engine_drive import EngineDrive
from trainer.weight_sync import WeightBroadcaster

WRITE_S = 0.6  # how long the stand-in model's directory takes to write
SLOW_S = 1.0  # how long a "slow" engine takes to load: more than the least a plan gets (0.5 s)
FROZEN_S = 60.0  # a frozen engine's longest silence (the test ends it sooner)


class Engine:
    """Engine over HTTP; how(body) of each load: done, slow (SLOW_S), failed (500) or frozen."""

    def __init__(self, how: Callable[[dict], str]):
        self.how, self.loaded, self.released = how, [], threading.Event()
        self.ended, self.end_s = [], 0.0  # each /end's ok, answered after ``end_s``
        self.server_id = ""  # the roster's id for it (``RosterBuffer``)
        engine = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # /health
                self._reply(200, {})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"] or 0)))
                if self.path == "/begin":  # its server's word, for the roster's id (no key)
                    return self._reply(200, {"drained": False, "proof": vouch_proof(
                        "", body["nonce"], engine.server_id, engine.url, engine.url)})
                if self.path == "/end":
                    time.sleep(engine.end_s)
                    engine.ended.append(body["ok"])
                if body.get("weight_version") is None:  # begin, pause, a bucket, continue, end
                    return self._reply(200, {})
                how = engine.how(body)
                if how == "frozen":
                    engine.released.wait(FROZEN_S)
                elif how == "slow":
                    time.sleep(SLOW_S)
                if how in ("done", "slow"):
                    engine.loaded.append(body["weight_version"])
                    return self._reply(200, {"success": True})
                self._reply(500, {"error": {"message": f"load {how}"}})

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                with contextlib.suppress(OSError):  # a frozen answer's caller is gone
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


class Recording(EngineDrive):

    def __init__(self):
        super().__init__()
        self.plans: list[tuple[WeightSyncPlan, float]] = []

    def start(self, plan, entries) -> None:
        self.plans.append((plan, time.monotonic()))
        super().start(plan, entries)


class RosterBuffer:
    """Roster of members (id -> Engine or a dead URL), each showing life between pushes."""

    def __init__(self, members: dict[str, Engine | str]):
        self.members, self.asked = members, 0
        for s, engine in members.items():
            if isinstance(engine, Engine):
                engine.server_id = s

    def request(self, msg, timeout_s=None):
        if isinstance(msg, P.RosterRequest):
            self.asked += 1
            urls = {s: getattr(e, "url", e) for s, e in self.members.items()}
            return P.Roster(members=[P.RosterEntry(server_id=s, engine_url=url, sync_url=url,
                                                   engine_ranks=1, policy_version=0,
                                                   active=self.asked)
                                     for s, url in urls.items()], policy_version=0)
        return P.Ack(ref="", status="ok")


def broadcaster(cfg: WeightSyncConfig, members: dict, drive: EngineDrive,
                 metrics: Metrics | None = None) -> WeightBroadcaster:
    wb = WeightBroadcaster(cfg, buffer_address="tcp://127.0.0.1:9", rank=0,
                           device=torch.device("cpu"), metrics=metrics, drive=drive)
    wb.client.close()
    wb.client = RosterBuffer(members)
    return wb


@contextlib.contextmanager
def closing(wb: WeightBroadcaster, *engines: Engine):
    try:
        yield wb
    finally:
        for engine in engines:
            engine.close()
        wb.client = None
        wb.close()


class SlowConfig:
    def save_pretrained(self, path: str) -> None:
        time.sleep(WRITE_S)
        with open(f"{path}/config.json", "w") as f:
            json.dump({}, f)


def test_the_plan_deadline_leaves_out_the_time_spent_making_the_payloads():
    """And a trainer closing right after its last push still tells the server how it ended."""
    cfg = WeightSyncConfig(path="disk", deadline_s=5.0)
    engine, drive = Engine(lambda body: "done"), Recording()
    engine.end_s = 0.5
    model = torch.nn.Linear(2, 2)
    model.config = SlowConfig()
    wb = broadcaster(cfg, {"a": engine}, drive)
    try:
        t0 = time.monotonic()
        report = wb.push(model, 1)
        wb.client = None
        wb.close()
    finally:
        engine.close()
    assert report.done == ["a"] and engine.loaded == ["1"] and engine.ended == [True], report
    (plan, sent), = drive.plans
    assert plan.path == "disk"
    # the members' deadline ends no later than the trainer's (t0 + deadline_s)
    assert sent + plan.deadline_s <= t0 + cfg.deadline_s + 0.2, (plan.deadline_s, sent - t0)


class CountingConfig:
    def __init__(self):
        self.writes = 0

    def save_pretrained(self, path: str) -> None:
        self.writes += 1
        with open(f"{path}/config.json", "w") as f:
            json.dump({}, f)


def counted_model() -> torch.nn.Module:
    model = torch.nn.Linear(2, 2)
    model.config = CountingConfig()
    return model


def test_a_re_push_on_the_disk_path_sends_the_directory_it_wrote():
    """a is lost, b fails the first plan: the re-push to b alone sends the same directory."""
    cfg = WeightSyncConfig(path="disk", deadline_s=20.0)
    drive = Recording()
    b = Engine(lambda body: "failed" if len(drive.plans) == 1 else "done")
    model = counted_model()
    members = {"a": f"http://127.0.0.1:{free_port()}", "b": b}
    with closing(broadcaster(cfg, members, drive), b) as wb:
        report = wb.push(model, 1)
    assert report.done == ["b"] and report.repushed == ["b"] and b.loaded == ["1"], report
    first, again = (plan for plan, _ in drive.plans)
    assert [m.server_id for m in first.members] == ["a", "b"]
    assert [m.server_id for m in again.members] == ["b"]
    assert again.payloads == first.payloads and model.config.writes == 1


def test_re_pushes_that_can_never_meet_the_deadline_say_why_once_and_go_on(caplog):
    """A third re-push in a row cut at its deadline logs one error per streak; pushes go on."""
    from trainer.engine_lag import STALL_PUSHES, EngineSchedule

    answers = ["frozen", "frozen", "done", "frozen", "failed", "frozen", "frozen", "frozen",
               "frozen"]
    # 1 s: a plan gets at least 0.5 s (``WeightBroadcaster``), so a frozen plan's member task
    # would outlive a shorter push and hold up the next plan's (one member task at a time)
    cfg = WeightSyncConfig(path="disk", deadline_s=1.0)
    drive = Recording()
    paths = lambda: [plan.payloads[0] for plan, _ in drive.plans]  # noqa: E731 - one line
    engine = Engine(lambda body: answers[paths().index(body["model_path"])])
    model = counted_model()

    def errors() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]

    with closing(broadcaster(cfg, {"a": engine}, drive), engine) as wb:
        engines = EngineSchedule(cfg, wb, model, final_version=10)
        for _ in range(5):  # two cut, one loaded, one cut, one failed at once
            engines.repush(1)
        for _ in range(STALL_PUSHES - 1):
            assert engines.repush(1).dropped == ["a"]
        assert errors() == []
        engines.repush(1)
        assert len(errors()) == 1
        assert engines.repush(1).dropped == ["a"]  # still re-pushing, not said again
        (why,) = errors()
    assert len(drive.plans) == 9 and engine.loaded == ["1"]  # one plan a re-push
    assert why.startswith("weight sync: 3 pushes of version 1 in a row ran into "
                          "trainer.weight_sync.deadline_s=1 ("), why
    assert why.endswith(" s) and no engine loaded it (a dropped), so the data the trainer waits "
                        "for cannot come: raise trainer.weight_sync.deadline_s above what a push "
                        "takes here (or the engines are unreachable); re-pushing on"), why


def test_a_resync_after_a_failed_overlapped_push_leaves_its_report_to_the_next_record():
    """A blocking resync does not take the place of the overlapped push's pending report."""
    from trainer.engine_lag import EngineSchedule

    cfg = WeightSyncConfig(path="tensor", deadline_s=1.0)
    seen: list[str] = []

    def how(body: dict) -> str:
        seen.append(body["weight_version"])
        return "frozen" if seen.count("1") == 1 and seen[-1] == "1" else "done"

    engine = Engine(how)
    with closing(broadcaster(cfg, {"a": engine}, EngineDrive()), engine) as wb:
        engines = EngineSchedule(cfg, wb, torch.nn.Linear(4, 4), final_version=10)
        engines.after_step(0)  # the setup push, blocking
        assert engines.after_step(1, wait=False).version == 0  # v1 goes on in the background
        assert engines.repush(1).done == ["a"]  # no data for v1: pushed again, blocking; it lands
        record = engines.after_step(2, wait=False)  # what step 2's record carries
    assert (record.version, record.dropped, record.cut) == (1, ["a"], True), record


def test_an_overlapped_push_gets_its_whole_deadline_after_waiting_for_the_one_before():
    """v1, frozen, is cut at its deadline and counted for its alert; v2 waits for it."""
    cfg = WeightSyncConfig(path="tensor", deadline_s=2 * SLOW_S)
    metrics = Metrics()
    engine = Engine(lambda body: "frozen" if body["weight_version"] == "1" else "slow")
    model = torch.nn.Linear(4, 4)
    near = "areal_trainer_weight_sync_near_deadline_total"
    with closing(broadcaster(cfg, {"a": engine}, EngineDrive(), metrics), engine) as wb:
        assert metrics.registry.get_sample_value(near) == 0  # served before any push
        wb.push(model, 1, wait=False)
        first = wb.push(model, 2, wait=False)  # v1's report, once v1 ran out its deadline
        assert metrics.registry.get_sample_value(near) == 1
        second = wb.join()
    assert (first.version, first.dropped, first.cut) == (1, ["a"], True), first
    assert first.seconds >= 0.9 * cfg.deadline_s, first
    assert (second.version, second.done, engine.loaded) == (2, ["a"], ["2"]), second
    # v2 (the engine takes half its deadline) is counted only if a loaded machine made it that near
    assert metrics.registry.get_sample_value(near) == 1 + second.cut
