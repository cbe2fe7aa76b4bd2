"""A request frame is bounded by what the job can need (request_frame_limit) and refused from
its length alone: a real buffer sent a 32 MB expanding frame stays responsive and small."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
import zmq

from areal_like.job_facts import request_frame_limit, trajectory_limit
from areal_like.net.dealer import Client
from areal_like.settings.config import (
    BufferConfig,
    ConfigError,
    ModelConfig,
    RunConfig,
    SecurityConfig,
    TaskConfig,
    to_yaml,
)
from areal_like.wire import protocol as P

TIMEOUT_S = 60.0
# empty maps in the hostile frame: one byte each on the wire, ~72 decoded
HUGE_MAPS = 32 * 1024 * 1024


def hostile_frame(n: int) -> bytes:
    """A valid msgpack Stats frame whose ``values["a"]`` is a list of ``n`` empty maps."""
    template = msgspec.msgpack.encode({"type": "stats", "values": {"a": [{}, {}, {}]},
                                       "protocol": P.PROTOCOL_VERSION})
    small = b"\x93\x80\x80\x80"  # fixarray of 3 empty fixmaps
    assert template.count(small) == 1
    return template.replace(small, b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n)


def test_the_limit_is_the_biggest_group_the_job_can_produce(tmp_path):
    cfg = RunConfig(task=TaskConfig(group_size=16, max_prompt_tokens=4096, max_new_tokens=8192))
    # prompt ids, output ids + logp + versions + mask, metadata
    per_trajectory = 4096 * 4 + 8192 * 16 + 64 * 1024
    assert request_frame_limit(cfg) == 2 * 16 * per_trajectory == 6_815_744
    # no prompt bound: the model's context bounds it (config.json of model.path when set)
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 32768, "vocab_size": 100}')
    cfg = RunConfig(model=ModelConfig(path=str(tmp_path)),
                    task=TaskConfig(group_size=16, max_new_tokens=8192))
    assert request_frame_limit(cfg) == 2 * 16 * (32768 * 4 + 8192 * 16 + 64 * 1024)
    # a tiny job: the floor for control messages
    assert request_frame_limit(RunConfig()) == 4 * 1024 * 1024
    assert request_frame_limit(RunConfig(buffer=BufferConfig(max_frame_bytes=12345))) == 12345
    episodes = RunConfig(task=TaskConfig(group_size=16, max_prompt_tokens=4096, max_new_tokens=64,
                                         env="areal_like.tasks.envs:GuessNumber",
                                         max_episode_tokens=8192))
    assert request_frame_limit(episodes) == 6_815_744  # every turn of an episode is in its output
    agent = TaskConfig(group_size=16, max_prompt_tokens=4096, max_new_tokens=64, max_turns=8,
                       agent="areal_like.tasks.agents:calc_agent", max_episode_tokens=8192)
    biggest = 16 * 8 * (8192 * 16 + 64 * 1024)  # every call its own segment, all of it output
    assert request_frame_limit(RunConfig(task=agent)) >= biggest
    with pytest.raises(ConfigError, match="buffer.max_frame_bytes"):
        BufferConfig(max_frame_bytes=-1)


def test_decode_refuses_an_oversized_frame_without_decoding_it():
    frame = hostile_frame(1000)
    assert isinstance(P.decode(frame), P.Stats)  # valid: within the limit it decodes
    for data in (frame, bytearray(frame), memoryview(frame)):
        with pytest.raises(P.ProtocolError, match=f"{len(frame)} bytes exceeds the limit of 100"):
            P.decode(data, max_bytes=100)


def vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def test_a_32mb_frame_is_refused_undecoded_by_a_real_buffer(tmp_run_dir, spawn_python, free_port):
    cfg = RunConfig(run_dir=str(tmp_run_dir), task=TaskConfig(num_prompts=100),
                    security=SecurityConfig(curve=False),  # the test speaks plain ZMQ
                    buffer=BufferConfig(address=f"tcp://127.0.0.1:{free_port()}",
                                        pub_address=f"tcp://127.0.0.1:{free_port()}"))
    (tmp_run_dir / "config.yaml").write_text(to_yaml(cfg))
    proc = spawn_python("buffer", ["--config-file", tmp_run_dir / "config.yaml"], capture=False)
    client = Client(cfg.buffer.address, timeout_s=TIMEOUT_S)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        assert "policy_version" in client.request(P.StatsRequest()).values  # up and serving
        before = vm_hwm_kb(proc.pid)
        frame = hostile_frame(HUGE_MAPS)
        assert len(frame) > 32 * 1024 * 1024
        sock.connect(cfg.buffer.address)
        sock.send_multipart([b"hostile", frame])
        assert sock.poll(int(TIMEOUT_S * 1000)), "no reply to the oversized frame"
        req_id, reply = sock.recv_multipart()
        ack = P.decode(reply)
        assert req_id == b"hostile" and isinstance(ack, P.Ack) and ack.status == "rejected"
        assert (ack.reason.startswith("frame_too_large:")
                and f"limit of {4 * 1024 * 1024}" in ack.reason)
        stats = client.request(P.StatsRequest()).values  # still answering
        assert stats["rejected_frame_too_large"] == 1 and "rejected_decode" not in stats
        growth_mb = (vm_hwm_kb(proc.pid) - before) / 1024
        print(f"buffer VmHWM {before / 1024:.0f} MB before, +{growth_mb:.0f} MB after a "
              f"{len(frame) >> 20} MB frame")
        assert growth_mb < 200, f"peak RSS grew by {growth_mb:.0f} MB"
    finally:
        sock.close(linger=0)
        client.close()


def test_the_trajectory_limit_is_the_context_the_engine_serves(tmp_path):
    """SGLang's context (rope scaling, context_length) or the embedded engine's."""
    def limit(config: dict, kind: str = "sglang", budget: int = 65536, **sglang) -> int:
        (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 100, **config}))
        cfg = RunConfig(model=ModelConfig(path=str(tmp_path)))
        cfg.rollout.engine.kind, cfg.rollout.engine.max_total_tokens = kind, budget
        cfg.rollout.engine.sglang.update(sglang)
        return trajectory_limit(cfg)

    assert trajectory_limit(RunConfig()) == ModelConfig().max_position_embeddings == 256
    assert limit({"max_position_embeddings": 32768}) == 32768
    yarn = {"rope_type": "yarn", "factor": 4.0}
    assert limit({"max_position_embeddings": 32768, "rope_scaling": yarn}) == 131072
    named = {**yarn, "original_max_position_embeddings": 32768}  # already the scaled length
    assert limit({"max_position_embeddings": 131072, "rope_scaling": named}) == 131072
    llama3 = {"rope_type": "llama3", "factor": 8.0}
    assert limit({"max_position_embeddings": 131072, "rope_scaling": llama3}) == 131072
    assert limit({"max_position_embeddings": 32768}, context_length=65536) == 65536
    assert limit({"max_position_embeddings": 32768}, context_length=4096) == 32768
    embedded = {"kind": "embedded", "context_length": 65536}  # SGLang's setting: not its own
    assert limit({"max_position_embeddings": 32768, "rope_scaling": yarn}, **embedded) == 32768
    assert limit({"max_position_embeddings": 131072}, **embedded) == 65536  # the KV budget
    assert limit({"max_position_embeddings": 32768}, budget=1000, **embedded) == 1000
