"""launch/topology.py: port and CPU placement is pure and keeps its invariants."""

from __future__ import annotations

import itertools

import pytest

from areal_like.settings.config import ConfigError, RunConfig, load_config
from launch.job import job_specs, laid_out, plan_job
from launch.placement import check_one_node, place_nodes
from launch.topology import (
    TURN_SPINCOUNT,
    apply_topology,
    laptop_layout,
    layout_line,
    plan_lines,
    plan_topology,
    split_cpus,
)
from tests.conftest import run_cli


def _cfg(*overrides: str) -> RunConfig:
    return load_config(list(overrides))


def _fixed(*overrides: str) -> RunConfig:
    """2 servers, 2 ranks (``overrides`` win): nothing is left to the cores."""
    return _cfg("launch.num_rollout_servers=2", "launch.trainer_ranks=2", *overrides)


def test_every_port_is_distinct_and_zero_ports_are_assigned():
    cfg = _fixed("buffer.address=tcp://127.0.0.1:0", "buffer.pub_address=tcp://127.0.0.1:0",
                 "launch.num_rollout_servers=3")
    # a port source that repeats itself (free_port() can) must still give distinct ports
    topo = plan_topology(cfg, itertools.chain([20000, 20000, 20001], itertools.count(20001)))
    ports = topo.ports()
    assert len(set(ports.values())) == len(ports) == 3 + 5  # router, pub, master + 5 metrics
    assert ([s.name for s in topo.slots]
            == ["buffer", "rollout-0", "rollout-1", "rollout-2", "trainer"])
    assert (topo.buffer_address == "tcp://127.0.0.1:20000"
            and topo.pub_address == "tcp://127.0.0.1:20001")
    assert all(p >= 20000 for p in ports.values())


def test_fixed_ports_are_kept_and_skipped_by_the_source():
    cfg = _fixed("buffer.address=tcp://10.0.0.5:7000", "buffer.pub_address=tcp://10.0.0.5:7001",
                 "buffer.metrics_port=9100", "rollout.metrics_port=9101",
                 "trainer.metrics_port=9200")
    topo = plan_topology(cfg, itertools.count(9100))  # overlaps the fixed ports on purpose
    assert topo.host == "10.0.0.5"  # nothing assumes localhost
    assert topo.buffer_address == "tcp://10.0.0.5:7000"
    assert topo.slot("buffer").metrics_port == 9100
    assert [topo.slot(f"rollout-{i}").metrics_port for i in range(2)] == [9101, 9102]
    assert topo.slot("trainer").metrics_port == 9200
    assert topo.master_port == 9103  # first port of the source that no fixed port uses
    assert topo.slot("rollout-1").overrides == ("rollout.server_id=rollout-1",
                                                "rollout.metrics_port=9102")


def test_two_daemons_with_the_same_fixed_port_are_refused():
    cfg = _fixed("buffer.metrics_port=9100", "trainer.metrics_port=9100")
    with pytest.raises(ConfigError, match="same fixed port"):
        plan_topology(cfg, itertools.count(30000))


@pytest.mark.parametrize("cores,rollout,trainer", [
    ([0, 1], (0,), (1,)),
    ([3, 2, 1, 0], (0, 1), (2, 3)),
    ([0, 1, 2], (0,), (1, 2)),
])
def test_cpu_pools_are_disjoint_and_cover_the_cores(cores, rollout, trainer):
    assert split_cpus(cores) == (rollout, trainer)
    with pytest.raises(ConfigError, match="at least 2 cores"):  # pinning needs two
        split_cpus(cores[:1])


def test_pinned_topology_puts_rollouts_on_one_pool_trainer_on_the_other_buffer_on_both():
    cfg = _fixed("launch.pin_cpus=true", "buffer.address=tcp://127.0.0.1:0",
                 "buffer.pub_address=tcp://127.0.0.1:0")
    topo = plan_topology(cfg, itertools.count(40000), cpus=[3, 0, 1, 2])
    assert topo.slot("trainer").cpus == (2, 3)
    assert topo.slot("rollout-0").cpus == (0, 1)
    assert topo.slot("buffer").cpus == (0, 1, 2, 3)
    unpinned = plan_topology(_fixed(), itertools.count(40000), cpus=[0, 1])
    assert all(s.cpus is None for s in unpinned.slots)


def test_apply_topology_fills_every_daemon_address():
    cfg = _fixed("buffer.address=tcp://127.0.0.1:0", "buffer.pub_address=tcp://127.0.0.1:0")
    topo = plan_topology(cfg, itertools.count(50000))
    out = apply_topology(cfg, topo)
    assert (out.buffer.address == out.rollout.buffer_address == out.trainer.buffer_address
            == topo.buffer_address)
    assert out.rollout.pub_address == out.buffer.pub_address == topo.pub_address
    assert out.buffer.metrics_port == topo.slot("buffer").metrics_port
    assert out.trainer.metrics_port == topo.slot("trainer").metrics_port
    assert cfg.buffer.address == "tcp://127.0.0.1:0"  # the input is not mutated


@pytest.mark.parametrize("override,message", [
    ("buffer.address=127.0.0.1:5555", "buffer.address='127.0.0.1:5555' is not a tcp://host:port"),
    ("buffer.pub_address=tcp://h:99999", "buffer.pub_address='tcp://h:99999': port '99999' is "
                                         "not a port number"),
    ("buffer.address=tcp://h:-1", "buffer.address='tcp://h:-1': port '-1' is not a port number"),
    # torchrun's --master-addr: it read "-x" as a flag and printed its usage
    ("buffer.address=tcp://-x:5555", "buffer.address='tcp://-x:5555': host '-x' is not a host"),
    ("buffer.pub_address=tcp://:5556", "buffer.pub_address='tcp://:5556': host '' is not a host")])
def test_a_bad_buffer_address_is_refused_naming_its_key(override, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        plan_topology(_fixed(override), itertools.count(20000))


@pytest.mark.parametrize("cores,servers,rollout,trainer", [
    ([0, 1], 1, (0,), (1,)),
    ([0, 1, 2, 3], 2, (0, 1), (2, 3)),
    ([5, 4, 7, 6, 1, 0, 3, 2], 4, (0, 1, 2, 3), (4, 5, 6, 7)),
    ([0, 1, 2], 1, (0,), (1, 2)),
])
def test_laptop_layout_fills_the_cores_without_oversubscribing(cores, servers, rollout, trainer):
    cfg = laptop_layout(_cfg("topology=laptop"), cores)
    assert ((cfg.launch.num_rollout_servers, cfg.launch.trainer_ranks, cfg.launch.pin_cpus)
            == (servers, 1, True))
    topo = plan_topology(cfg, itertools.count(31000), cores)
    assert topo.rollout_cpus == rollout and topo.trainer_cpus == trainer
    trainer_slot = topo.slot("trainer")
    assert trainer_slot.cpus == trainer and trainer_slot.threads == len(trainer)
    rollouts = [s for s in topo.slots if s.kind == "rollout"]
    assert len(rollouts) == servers and all(s.cpus == rollout and s.threads is None
                                            for s in rollouts)
    # threads per pool never exceed its cores: one per single-threaded server,
    # the trainer's pool size
    assert (len(rollouts) * cfg.launch.omp_threads <= len(rollout)
            and trainer_slot.threads <= len(trainer))
    envs = {s.name: s.env for s in job_specs(cfg, topo, "config.yaml")}
    assert envs["trainer"]["OMP_NUM_THREADS"] == str(len(trainer))
    assert envs["rollout-0"]["OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize("cores", [(0, 1), (0, 1, 2, 3, 4)])
def test_at_eta_0_the_trainer_takes_every_core_while_the_servers_wait(cores, monkeypatch):
    """At eta 0 generation and training take turns: the trainer gets a (briefly spinning) thread
    per core of both pools; the servers keep theirs."""
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    cfg = laptop_layout(_cfg("topology=laptop", "buffer.max_staleness=0"), cores)
    topo = plan_topology(cfg, itertools.count(31500), cores)
    trainer = topo.slot("trainer")
    assert trainer.cpus == cores and trainer.threads == len(cores)
    rollouts = [s for s in topo.slots if s.kind == "rollout"]
    assert all(s.cpus == topo.rollout_cpus and s.threads is None for s in rollouts)
    envs = {s.name: s.env for s in job_specs(cfg, topo, "config.yaml")}
    assert envs["trainer"]["OMP_NUM_THREADS"] == str(len(cores))
    assert envs["trainer"]["GOMP_SPINCOUNT"] == str(TURN_SPINCOUNT)
    assert "GOMP_SPINCOUNT" not in envs["rollout-0"]
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")  # the user's own setting is theirs
    assert "GOMP_SPINCOUNT" not in {s.name: s.env
                                    for s in job_specs(cfg, topo, "config.yaml")}["trainer"]
    monkeypatch.delenv("OMP_WAIT_POLICY")
    # reaches the trainer from the supervisor's environment
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    assert "GOMP_SPINCOUNT" not in {s.name: s.env
                                    for s in job_specs(cfg, topo, "config.yaml")}["trainer"]
    eta1 = plan_topology(laptop_layout(_cfg("topology=laptop", "buffer.max_staleness=1"), cores),
                         itertools.count(31600), cores)
    assert eta1.slot("trainer").cpus == eta1.trainer_cpus and eta1.slot("trainer").env == ()


def test_laptop_layout_on_one_core_runs_unpinned_and_a_gpu_or_multi_node_job_must_set_its_counts():
    cfg = laptop_layout(_cfg("topology=laptop"), [3])
    assert ((cfg.launch.num_rollout_servers, cfg.launch.trainer_ranks, cfg.launch.pin_cpus)
            == (1, 1, False))
    assert plan_topology(cfg, itertools.count(32000), [3]).slot("trainer").threads is None
    gpu = _cfg("topology=gpu_sglang", "launch.gpus_per_node=2", "launch.trainer_ranks=null")
    assert laptop_layout(gpu, [0, 1]) == gpu  # a GPU job's layout is never guessed from the cores
    with pytest.raises(ConfigError,
                       match=r"^launch.trainer_ranks=null \(from the cores\) is for CPU jobs"):
        place_nodes(gpu)
    with pytest.raises(ConfigError,
                       match=r"^launch.num_rollout_servers=null .* launch.nodes=2 set it"):
        laptop_layout(_cfg("topology=laptop", "launch.nodes=2"), [0, 1])


@pytest.mark.parametrize("cores,servers,trainer_threads", [
    (2, 1, 1),  # the development machine: buffer + 1 server on core 0, the trainer on core 1
    (8, 4, 4),
    # many cores: at most launch.auto_max_servers servers, launch.auto_max_threads threads
    (64, 8, 8),
])
def test_the_quickstart_lays_itself_out_from_the_cores(cores, servers, trainer_threads):
    base = _cfg("experiment=quickstart")
    # the README's first command: its layout from the cores
    assert base.launch.num_rollout_servers is None
    cpus = list(range(cores))
    cfg = laptop_layout(base, cpus)
    topo = plan_topology(cfg, itertools.count(33000), cpus)
    rollouts = [s for s in topo.slots if s.kind == "rollout"]
    assert len(rollouts) == servers and cfg.launch.trainer_ranks == 1
    assert topo.slot("trainer").threads == trainer_threads
    assert (set(topo.rollout_cpus).isdisjoint(topo.trainer_cpus)
            and len(topo.rollout_cpus) == cores // 2)
    # one rank runs the trainer module itself: no torchrun process in between
    trainer = next(s for s in job_specs(cfg, topo, "config.yaml") if s.name == "trainer")
    assert (trainer.argv[1:3] == ["-m", "trainer"]
            and trainer.env["OMP_NUM_THREADS"] == str(trainer_threads))


def test_laptop_layout_ceilings_are_configurable_and_without_taskset_nothing_is_pinned():
    cpus = list(range(16))
    cfg = laptop_layout(_cfg("topology=laptop", "launch.auto_max_servers=3",
                             "launch.auto_max_threads=2"), cpus)
    topo = plan_topology(cfg, itertools.count(34000), cpus)
    assert cfg.launch.num_rollout_servers == 3 and topo.slot("trainer").threads == 2
    assert topo.slot("trainer").cpus == tuple(range(8, 16))  # the pool keeps its cores
    unpinned = laptop_layout(_cfg("topology=laptop"), cpus, can_pin=False)
    assert (unpinned.launch.num_rollout_servers, unpinned.launch.trainer_ranks,
            unpinned.launch.pin_cpus) == (1, 1, False)
    with pytest.raises(ConfigError, match="auto_max_servers"):
        _cfg("topology=laptop", "launch.auto_max_servers=0")


def test_a_job_attached_to_an_engine_by_url_gets_one_rollout_server():
    """Servers attached to one engine by URL would each join it to the weight group: one server;
    a count set above one is refused."""
    url = ("rollout.engine.kind=url", "rollout.engine.url=http://127.0.0.1:30000")
    cpus = list(range(8))
    asked = _cfg(*url)
    cfg = laptop_layout(asked, cpus)
    assert cfg.launch.num_rollout_servers == 1
    line = layout_line(asked, cfg, plan_topology(cfg, itertools.count(35000), cpus))
    assert "launch.num_rollout_servers=1 (one engine, rollout.engine.url)" in line
    check_one_node(cfg)
    with pytest.raises(ConfigError, match=r"^launch.num_rollout_servers=2 with rollout.engine"):
        check_one_node(_cfg(*url, "launch.num_rollout_servers=2"))


def test_several_trainer_ranks_still_run_under_torchrun():
    cfg = _fixed("topology=local_cpu")
    topo = plan_topology(cfg, itertools.count(35000))
    argv = next(s for s in job_specs(cfg, topo, "config.yaml") if s.name == "trainer").argv()
    assert (argv[1:3] == ["-m", "launch.torchrun"]
            and argv[argv.index("--nproc-per-node") + 1] == "2")
    # torchrun's own files go with the run's logs, not to a new /tmp/torchelastic_* per start
    assert argv[argv.index("--log-dir") + 1] == f"{cfg.run_dir}/logs/torchrun"


def test_the_trainer_waits_for_the_evaluating_server_only_when_one_is_started_for_a_final_eval():
    def trainer_argv(*overrides: str) -> list[str]:
        cfg = _fixed("experiment=quickstart", *overrides)
        topo = plan_topology(cfg, itertools.count(37000))
        return next(s for s in job_specs(cfg, topo, "config.yaml") if s.name == "trainer").argv()

    assert "eval.await_server=true" in trainer_argv()  # rollout-0 evaluates, at the end too
    # under torchrun as well
    assert "eval.await_server=true" in trainer_argv("launch.trainer_ranks=2")
    assert "eval.await_server=true" not in trainer_argv("eval.at_end=false")
    # no evaluator
    assert "eval.await_server=true" not in trainer_argv("eval.at_end=false", "eval.every=0")


@pytest.mark.parametrize("base", [(), ("experiment=quickstart",),
                                  ("model=local_hf", "model.path=/models/mine", "task=jsonl_math",
                                   "task.dataset_path=/data/train.jsonl")])
def test_a_cpu_job_lays_itself_out_from_the_cores_and_keeps_the_counts_it_sets(base, monkeypatch):
    # taskset, to pin
    monkeypatch.setattr("launch.job.shutil.which", lambda name: f"/usr/bin/{name}")

    def layout(*overrides: str) -> tuple[int, int, bool]:
        la = laid_out(_cfg(*base, *overrides), [0, 1])[0].launch
        return la.num_rollout_servers, la.trainer_ranks, bool(la.pin_cpus)

    # the laptop layout: one server on core 0, the trainer on core 1
    assert layout() == (1, 1, True)
    # kept; the rank still from the cores
    assert layout("launch.num_rollout_servers=2") == (2, 1, True)
    assert layout("launch.trainer_ranks=2") == (1, 2, True)
    # as set
    assert layout("launch.num_rollout_servers=3", "launch.trainer_ranks=2") == (3, 2, False)
    assert layout("launch.pin_cpus=false") == (1, 1, False)  # a pinning set by hand is kept
    asked = _cfg(*base, "launch.trainer_ranks=2")
    laid, topo = plan_job(asked, cpus=[0, 1])
    rows = plan_lines(laid_out(asked, [0, 1])[0], topo)[1:]
    assert ([r.split()[1] for r in rows] == ["buffer", "rollout-0", "trainer"]
            and "torchrun 2 ranks" in rows[-1])
    assert layout_line(asked, laid, topo) == (
        "laid out from the cores: launch.num_rollout_servers=1 "
        "(one per core of the rollout pool [0], at "
        "most launch.auto_max_servers=8); launch.trainer_ranks=2 (as set)")
    assert layout_line(laid, laid, topo) is None  # both set: nothing to explain
    assert plan_job(laid, cpus=[0, 1])[0] == laid  # laying out a laid-out config changes nothing


def test_plan_ends_with_what_the_cores_chose_and_says_nothing_of_counts_set_by_hand():

    def plan(*overrides: str) -> list[str]:
        r = run_cli("plan", *overrides, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines()

    last = plan("launch.trainer_ranks=2")[-1]
    assert last.startswith("laid out from the cores: launch.num_rollout_servers=")
    assert last.endswith("; launch.trainer_ranks=2 (as set)")
    assert (plan("launch.num_rollout_servers=2", "launch.trainer_ranks=2")[-1].split()[1]
            == "trainer")


def test_run_makes_the_trainer_wait_for_its_servers_only_when_it_starts_servers():
    cfg = _fixed("topology=local_cpu")
    topo = plan_topology(cfg, itertools.count(36000))
    applied = apply_topology(cfg, topo)
    assert cfg.trainer.first_engine_wait_s == 0  # the trainer alone (tests, by hand) pushes at once
    assert applied.trainer.first_engine_wait_s == min(cfg.launch.health_timeout_s,
                                                      cfg.trainer.gloo_timeout_s / 2)
    assert cfg.trainer.first_engines == 1
    assert applied.trainer.first_engines == sum(slot.kind == "rollout" for slot in topo.slots) == 2
    kept = _fixed("trainer.first_engine_wait_s=7")
    assert (apply_topology(kept, plan_topology(kept, itertools.count(36100)))
            .trainer.first_engine_wait_s == 7)
