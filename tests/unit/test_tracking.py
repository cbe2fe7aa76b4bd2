"""Experiment tracking: tailer, sink, each backend read back offline, sample rows, the curve."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sqlite3
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from areal_like.settings.config import to_yaml
from areal_like.settings.report_schema import EvalConfig, TrackingConfig
from areal_like.settings.schema import ConfigError, RunConfig, TrainerConfig
from areal_like.tasks.tokenizer import EOS_ID, char_tokenizer
from areal_like.wire import protocol as P
from areal_like.wire.trajectory import Trajectory, as_f32, as_i32
from launch import tracking
from launch.cli import main
from launch.job import Monitor
from launch.records import curve_figure, eval_records, job_over, plot_curve
from launch.topology import Topology
from launch.track_sink import JsonlTail, TrackerSink, follow, scalars
from launch.tracking import JsonlTracker, TensorBoardTracker, Tracker
from tests.conftest import child_env, run_cli
from trainer.data import BatchSource
from trainer.loop import Trainer
from trainer.samples import sample_rows

ROOT = Path(__file__).resolve().parents[2]


def append(path: Path, *rows: dict | str) -> None:
    """Rows as JSON lines; a str is written as it is (to leave a line unfinished)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))


def merged(run: Path) -> list[dict]:
    return [json.loads(line)
            for line in (run / "tracking" / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- tailing


def test_tail_reads_only_complete_lines_of_a_growing_file(tmp_path):
    path = tmp_path / "m.jsonl"
    tail = JsonlTail(path)
    assert tail.read() == []  # not there yet
    append(path, {"step": 1}, {"step": 2}, '{"step": 3, "lo')
    assert tail.read() == [{"step": 1}, {"step": 2}]
    assert tail.read() == []  # the line being written waits
    append(path, 'ss": 0.5}\n\nnot json\n[1, 2]\n{"step": 4}\n')
    # blank, non-JSON, non-object lines skipped
    assert tail.read() == [{"step": 3, "loss": 0.5}, {"step": 4}]
    append(path, '{"step": 5}')
    assert tail.read() == []
    # the writers stopped: an unterminated last line counts
    assert tail.read(final=True) == [{"step": 5}]
    path.write_text(json.dumps({"step": 9}) + "\n")  # replaced by a shorter file
    assert tail.read() == [{"step": 9}]


def test_scalars_flatten_nested_dicts_and_keep_only_numbers():
    row = {"step": 3, "time": 1.5, "loss": 0.25, "stats": {"kl": 0.125, "n": 2, "deep": {"x": -1}},
           "weight_sync": {"done": ["r0"], "error": None, "ok": True}, "tag": "x"}
    assert scalars(row, "train", ("step", "time")) == {"train/loss": 0.25, "train/stats/kl": 0.125,
                                                       "train/stats/n": 2.0,
                                                       "train/stats/deep/x": -1.0}


class Failing(Tracker):
    """A backend that fails on its first row (a full disk, a lost server)."""
    closed = False

    def log_metrics(self, *row):
        raise OSError("disk full")

    log_table = log_metrics

    def close(self):
        self.closed = True


def test_sink_forwards_trainer_eval_and_sample_rows_past_a_failing_tracker(tmp_path):
    run = tmp_path / "run"
    failing = Failing()  # dropped at its first row; the others go on
    sink = TrackerSink(run, [failing, JsonlTracker(run / "tracking" / "metrics.jsonl")])
    assert sink.poll() == 0  # no files yet
    append(run / "metrics" / "trainer.jsonl",
           {"time": 1.0, "step": 1, "policy_version": 1, "loss": 0.5, "stats": {"kl": 0.01},
            "weight_sync": {"done": ["r0"], "error": None}},
           {"time": 2.0, "event": "resume", "policy_version": 1})
    append(run / "eval.jsonl", {"policy_version": 0, "greedy_accuracy": 0.25, "pass@k": 0.5, "k": 4,
                                "final": False, "time": 3.0})
    table2 = [{"step": 2, "prompt": "ab", "reward": 1.0},
              {"step": 2, "prompt": "cd", "reward": 0.0}]
    append(run / "samples.jsonl", *table2)
    assert sink.poll() == 2  # the trainer row and the eval row; the table may still be growing
    assert failing.closed and len(sink.trackers) == 1
    assert sink.poll() == 1  # the file did not change since: the table is whole
    table4, table6 = ([{"step": 4, "prompt": "ef"}, {"step": 4, "prompt": "gh"}],
                      [{"step": 6, "prompt": "ij"}])
    append(run / "samples.jsonl", *table4, *table6)
    assert sink.poll() == 1  # step 4 is followed by step 6, which is held
    assert sink.poll(final=True) == 1
    sink.close()
    assert merged(run) == [
        {"step": 1, "metrics": {"train/policy_version": 1.0, "train/loss": 0.5,
                                "train/stats/kl": 0.01}},
        {"step": 0, "metrics": {"eval/greedy_accuracy": 0.25, "eval/pass@k": 0.5, "eval/k": 4.0}},
        {"step": 2, "table": "samples", "rows": table2},
        {"step": 4, "table": "samples", "rows": table4},
        {"step": 6, "table": "samples", "rows": table6},
    ]


def test_follow_polls_until_the_summary_appears_and_a_monitor_tick_polls_the_sink(tmp_path):
    run = tmp_path / "run"
    cfg = RunConfig(run_dir=str(run))
    sink = TrackerSink(run, [JsonlTracker(run / "tracking" / "metrics.jsonl")])
    stop = threading.Event()
    follower = threading.Thread(target=follow, args=(sink, lambda: job_over(run, cfg), stop, 0.05))
    follower.start()
    try:
        append(run / "metrics" / "trainer.jsonl", {"step": 1, "loss": 1.0})
        deadline = time.monotonic() + 30
        while not (run / "tracking" / "metrics.jsonl").read_text() and time.monotonic() < deadline:
            stop.wait(0.05)  # the follower forwards while the run goes on
        assert merged(run) == [{"step": 1, "metrics": {"train/loss": 1.0}}]
        append(run / "metrics" / "trainer.jsonl", {"step": 2, "loss": 0.5})
        (run / "summary.json").write_text("{}")
        follower.join(timeout=30)
        assert not follower.is_alive()  # the summary ended it, after a final poll
        assert merged(run)[-1] == {"step": 2, "metrics": {"train/loss": 0.5}}
        topo = Topology(host="127.0.0.1", buffer_address="", pub_address="", master_port=0,
                        slots=(), rollout_cpus=None, trainer_cpus=None)
        append(run / "metrics" / "trainer.jsonl", {"step": 3, "reward_mean": 0.5})
        Monitor(cfg, topo, run, out=io.StringIO(), sink=sink)(None)
        assert merged(run)[-1] == {"step": 3, "metrics": {"train/reward_mean": 0.5}}
    finally:
        stop.set()
        follower.join(timeout=30)
        sink.close()


def test_track_command_forwards_a_finished_run_and_takes_overrides(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(RunConfig(run_dir=str(run))))
    append(run / "metrics" / "trainer.jsonl", {"step": 1, "loss": 1.0})
    append(run / "samples.jsonl", {"step": 1, "prompt": "ab"})
    (run / "summary.json").write_text("{}")
    assert main(["track", str(run)]) == 0  # the summary exists: one final poll, then exit
    assert capsys.readouterr().out == f"2 rows and tables of {run} sent to jsonl\n"
    assert merged(run) == [{"step": 1, "metrics": {"train/loss": 1.0}},
                           {"step": 1, "table": "samples", "rows": [{"step": 1, "prompt": "ab"}]}]
    (run / "summary.json").unlink()
    assert main(["track", str(run), "--once", "tracker=[jsonl,tensorboard]"]) == 0
    assert len(merged(run)) == 2  # rewritten from the files, not appended to
    assert list((run / "tracking" / "tensorboard").glob("events.out.tfevents.*"))
    # no config.yaml: a clear error
    assert main(["track", str(tmp_path / "nowhere"), "--once"]) == 2


def test_a_tracker_that_cannot_start_is_an_error_line_naming_it(tmp_path):
    """wandb itself, online, with no key anywhere it looks: one line, no traceback."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(RunConfig(run_dir=str(run))))
    home = tmp_path / "home"
    env = child_env({"HOME": str(home), "WANDB_CONFIG_DIR": str(home / "wandb"),
                     "WANDB_DIR": str(tmp_path)})
    env.pop("WANDB_API_KEY", None)
    r = run_cli("track", str(run), "--once", "tracker=[jsonl,wandb]",
                "tracking.wandb_mode=online", timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "tracker='wandb' could not start: UsageError: No API key configured" in r.stderr, (
        r.stderr)
    assert "Traceback" not in r.stderr, r.stderr


def test_track_of_a_job_started_without_run_ends_with_its_trainer_and_final_eval(tmp_path):
    """Without summary.json the job is over at the trainer's ``done`` and its final eval."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = RunConfig(run_dir=str(run), trainer=TrainerConfig(steps=3))  # reverse: it evaluates
    (run / "config.yaml").write_text(to_yaml(cfg))
    append(run / "metrics" / "trainer.jsonl", {"step": 1, "loss": 1.0},
           {"event": "done", "policy_version": 3, "steps": 3, "time": 1.0})
    assert not job_over(run, cfg)  # the final evaluation is not written yet
    assert job_over(run, dataclasses.replace(cfg, eval=EvalConfig(at_end=False)))
    append(run / "eval.jsonl", {"final": True, "policy_version": 3, "greedy_accuracy": 1.0})
    assert job_over(run, cfg)
    done = run_cli("track", str(run), timeout=120)
    assert done.returncode == 0, done.stderr
    assert any("eval/greedy_accuracy" in r.get("metrics", {}) for r in merged(run))


# ---------------------------------------------------------------------------- backends, read back


def test_markdown_table_keeps_each_row_on_one_line():
    assert tracking.markdown_table([{"a": "x|y", "b": "1\n2"}, {"a": 3, "c": [1, 2]}]) == (
        "| a | b | c |\n| --- | --- | --- |\n| x\\|y | 1\\n2 |  |\n| 3 |  | [1, 2] |")


def test_tensorboard_event_files_hold_scalars_the_text_table_and_the_last_replay_only(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardTracker(tmp_path / "tb")
    tb.log_metrics({"train/loss": 0.5, "eval/pass@k": 0.25}, 3)
    tb.log_metrics({"train/loss": 0.25}, 4)
    tb.log_table("samples", [{"prompt": "a|b", "versions": [1, 2]}], 4)
    tb.close()
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0, "scalars": 0})
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("train/loss")] == [(3, 0.5), (4, 0.25)]
    assert [(e.step, e.value) for e in ea.Scalars("eval/pass@k")] == [(3, 0.25)]
    (text,) = ea.Tensors("samples/text_summary")
    assert text.step == 4
    assert text.tensor_proto.string_val[0].decode() == (
        "| prompt | versions |\n| --- | --- |\n| a\\|b | [1, 2] |")
    # a resumed run's sink replays every step into the same directory: only the last is shown
    tb = TensorBoardTracker(tmp_path / "tb")
    tb.log_metrics({"train/loss": 0.125}, 3)
    tb.close()
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("train/loss")] == [(3, 0.125)]


def wandb_records(path: Path) -> list:
    """A ``run-*.wandb`` file's records: ":W&B", then LevelDB-log chunks (FULL=1 ... LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, chunks = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def test_check_trackers_names_the_missing_package_and_its_extra(monkeypatch, tmp_path):
    assert tracking.check_trackers(RunConfig(tracker=["jsonl", "tensorboard", "wandb", "mlflow",
                                                      "trackio"])) == []  # the test extra
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec answers None: as if not installed
    assert tracking.check_trackers(RunConfig(tracker=["jsonl"])) == []  # not configured: not needed
    missing = "tracker='wandb' needs the 'wandb' package, which is not installed: "
    assert tracking.check_trackers(RunConfig(tracker=["jsonl", "wandb"])) == [
        missing + "pip install -e '.[wandb]' in the checkout (or drop 'wandb' from tracker)"]
    with pytest.raises(ConfigError, match=r"^tracker='wandb' needs the 'wandb' package"):
        tracking.build_trackers(RunConfig(tracker=["jsonl", "wandb"]), tmp_path)
    # `areal-like run` stops there: exit 2, and no run directory (nothing was started)
    assert main(["run", "tracker=[jsonl,wandb]", f"run_dir={tmp_path / 'run'}"]) == 2
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- sample rows


def _traj(prompt: str, out: list[int], versions: list[int], reward: float, finish: str = "stop",
          metadata: dict | None = None) -> Trajectory:
    return Trajectory.of(prompt_ids=as_i32(char_tokenizer()(prompt)["input_ids"]),
                        output_ids=as_i32(out), behav_logp=as_f32([-1.0] * len(out)),
                        versions=as_i32(versions), reward=reward,
                        finish_reason=finish, metadata=metadata or {})


def _ids(text: str) -> list[int]:
    return char_tokenizer()(text)["input_ids"][1:]  # without <bos>


def _batch_groups() -> list[P.TrajectoryGroup]:
    g0 = [_traj("ab", _ids("ba"), [5, 6], 1.0, metadata={"text": "BA (engine text)"}),
          _traj("ab", _ids("xy") + [EOS_ID], [6, 6, 7], 0.0)]
    g1 = [_traj("cd", _ids("dcc"), [7, 7, 7], 0.5, finish="length")]
    return [P.TrajectoryGroup(group_id=f"g{i}", server_id="s0", lease_id=f"l{i}", prompt_index=i,
                              epoch=0, trajectories=ts) for i, ts in enumerate((g0, g1))]


def test_sample_rows_from_a_hand_made_batch():
    def decode(ids):
        return char_tokenizer().decode(ids, skip_special_tokens=True)

    rows = sample_rows(_batch_groups(), version=7, k=8, decode=decode)
    assert rows == [  # round-robin over the groups: trajectory 0 of each group first
        {"step": 8, "policy_version": 7, "prompt": "ab", "response": "BA (engine text)",
         "reward": 1.0, "versions": [5, 6], "staleness": 2, "finish_reason": "stop"},
        {"step": 8, "policy_version": 7, "prompt": "cd", "response": "dcc", "reward": 0.5,
         "versions": [7, 7], "staleness": 0, "finish_reason": "length"},
        {"step": 8, "policy_version": 7, "prompt": "ab", "response": "xy", "reward": 0.0,
         "versions": [6, 7], "staleness": 2, "finish_reason": "stop"},
    ]
    assert sample_rows(_batch_groups(), version=7, k=2, decode=decode) == rows[:2]
    assert sample_rows([], version=7, k=2, decode=decode) == []


def test_trainer_appends_a_sample_table_every_sample_every_steps(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    cfg = RunConfig(run_dir=str(tmp_path), tracking=TrackingConfig(sample_every=10, sample_k=2))
    trainer = Trainer.from_run(cfg)
    # no socket on rank 1
    trainer.data = BatchSource("tcp://127.0.0.1:1", 2, wait_s=1, buffer_timeout_s=1, rank=1)
    trainer.data.last_groups = _batch_groups()
    for trainer.version in (9, 10, 11):
        trainer.record_samples()
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["policy_version"], r["prompt"], r["response"]) for r in rows] == [
        (10, 9, "ab", "BA (engine text)"), (10, 9, "cd", "dcc")]


# ---------------------------------------------------------------------------- learning curve


def _lines(fig) -> dict[str, list[tuple[float, float]]]:
    (ax,) = fig.axes
    return {line.get_label(): [tuple(map(float, p)) for p in line.get_xydata()]
            for line in ax.get_lines()}


def test_learning_curve_gains_eval_points_when_eval_jsonl_exists(tmp_path):
    import matplotlib.image

    recs = [{"step": s, "reward_mean": r} for s, r in ((1, 0.25), (2, 0.5), (3, 0.75))]
    assert _lines(curve_figure(tmp_path, recs, eval_records(tmp_path))) == {
        "reward (per step)": [(1, 0.25), (2, 0.5), (3, 0.75)],
        "reward (3-step mean)": [(1, 0.25), (2, 0.375), (3, 0.5)]}
    without = plot_curve(tmp_path, recs).read_bytes()
    append(tmp_path / "eval.jsonl",
           {"policy_version": 0, "greedy_accuracy": 0.125, "mean@4": 0.0625, "k": 4,
            "final": False},
           {"policy_version": 3, "greedy_accuracy": 0.5, "mean@4": 0.25, "k": 4, "final": False},
           # last wins
           {"policy_version": 3, "greedy_accuracy": 0.625, "mean@4": 0.375, "k": 4, "final": True})
    lines = _lines(curve_figure(tmp_path, recs, eval_records(tmp_path)))
    assert lines["eval accuracy (greedy)"] == [(0, 0.125), (3, 0.625)]
    assert lines["eval mean@4"] == [(0, 0.0625), (3, 0.375)]
    path = plot_curve(tmp_path, recs)
    assert path == tmp_path / "learning_curve.png" and path.read_bytes() != without
    assert matplotlib.image.imread(path).shape == (420, 600, 4)


RESUMED = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from areal_like.settings.schema import RunConfig
    from launch.track_sink import TrackerSink

    run = Path(sys.argv[1])
    (run / "metrics").mkdir(parents=True)

    def append(name, rows):
        with (run / name).open("a") as f:
            f.write("".join(json.dumps(r) + "\\n" for r in rows))

    def start(steps):  # one start of the job: its trainer's lines, then its sink's polls
        append("metrics/trainer.jsonl", [{"step": s, "reward_mean": s / 10} for s in steps])
        cfg = RunConfig(tracker=["mlflow", "trackio", "wandb"], run_dir=str(run))
        cfg.tracking.wandb_mode = "offline"
        sink = TrackerSink.from_config(cfg)
        sink.poll(final=True)
        sink.close()

    # an eval at an earlier step than the trainer's (on its own axis) and a table, before the resume
    append("eval.jsonl", [{"policy_version": 0, "pass@k": 0.25}])
    append("samples.jsonl", [{"step": 2, "prompt": "p", "versions": [1, 2]}])
    start([1, 2, 3])
    start([3, 4, 5])  # resumed from the checkpoint at 2: step 3 again, then on
""")
TABLE = [{"step": 2, "prompt": "p", "versions": [1, 2]}]


def test_each_backend_holds_metrics_config_and_tables_and_a_resumed_job_continues_its_run(
        tmp_path, monkeypatch):
    """Each tracker continues its run on a resume, given only the rows it lacked (runs.json).
    mlflow, trackio and wandb read back offline; trackio reads TRACKIO_DIR once, when it is first
    imported: the trackers run in a process of their own."""
    import wandb  # noqa: F401 - installed, as the test's child needs
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read the store back here
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRACKIO_DIR", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE",
                        "WANDB_DIR")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HOME=str(tmp_path), WANDB_SILENT="true",
               **{v: str(tmp_path / v.lower()) for v in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR",
                                                         "WANDB_DATA_DIR")})
    proc = subprocess.run([sys.executable, "-c", RESUMED, str(run)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # trackio's banners went to stderr
    lr = RunConfig().trainer.lr
    client = MlflowClient(tracking_uri=f"file:{run / 'tracking' / 'mlruns'}")
    (ml,) = client.search_runs([client.get_experiment_by_name("areal-like").experiment_id])
    assert ml.info.status == "FINISHED" and ml.info.run_name == "run"
    history = {name: [(m.step, m.value) for m in client.get_metric_history(ml.info.run_id, name)]
               for name in ("train/reward_mean", "eval/pass_k")}  # mlflow's name for pass@k
    assert history == {"train/reward_mean": [(s, s / 10) for s in range(1, 6)],
                       "eval/pass_k": [(0, 0.25)]}
    assert ml.data.params["trainer/lr"] == str(lr)
    assert ml.data.params["tracker"] == "['mlflow', 'trackio', 'wandb']"
    local = client.download_artifacts(ml.info.run_id, "samples/step_00000002.json",
                                      str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text()) == {"step": 2, "rows": TABLE}
    with sqlite3.connect(run / "tracking" / "trackio" / "areal-like.db") as db:
        logged = list(db.execute("SELECT run_id, run_name, step, metrics FROM metrics ORDER BY id"))
    assert len({(r, name) for r, name, _, _ in logged}) == 1 and logged[0][1] == "run", logged
    assert [(s, json.loads(m)) for _, _, s, m in logged] == [
        *((s, {"train/reward_mean": s / 10}) for s in (1, 2, 3)), (0, {"eval/pass@k": 0.25}),
        (2, {"samples": {"_type": "trackio.table",
                         "_value": [{"step": 2, "prompt": "p", "versions": "[1, 2]"}]}}),
        *((s, {"train/reward_mean": s / 10}) for s in (4, 5))], logged
    starts = [wandb_records(f) for f in sorted((run / "tracking" / "wandb").glob(
        "offline-run-*/run-*.wandb"), key=lambda f: f.stat().st_mtime)]
    runs_of = [next(r.run for r in recs if r.WhichOneof("record_type") == "run")
               for recs in starts]
    history = [[{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                for r in recs if r.WhichOneof("record_type") == "history"] for recs in starts]
    steps = [[h["train/step"] for h in hs if "train/step" in h] for hs in history]
    assert runs_of[0].run_id == runs_of[1].run_id and steps == [[1, 2, 3], [4, 5]], steps
    assert (runs_of[0].project, runs_of[0].display_name) == ("areal-like", "run")
    assert json.loads(next(i.value_json for i in runs_of[0].config.update
                           if i.key == "trainer"))["lr"] == lr
    [evaluated] = [h for hs in history for h in hs if "eval/pass@k" in h]
    [table] = [h for hs in history for h in hs if "samples/_type" in h]
    assert evaluated["eval/pass@k"] == 0.25 and evaluated["eval/step"] == 0
    assert table["samples/_type"] == "table-file" and table["samples/nrows"] == 1
    (table_file,) = (run / "tracking" / "wandb").glob(
        "offline-run-*/files/media/table/samples_*.table.json")
    assert json.loads(table_file.read_text()) == {"columns": ["step", "prompt", "versions"],
                                                  "data": [[2, "p", "[1, 2]"]]}
    runs = json.loads((run / "tracking" / "runs.json").read_text())
    marks = {"train": 5, "eval": 0, "samples": 2}
    assert runs == {"mlflow": {"id": ml.info.run_id, **marks},
                    "trackio": {"id": "run", **marks},
                    "wandb": {"id": runs_of[0].run_id, **marks}}, runs
