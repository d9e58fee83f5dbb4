"""Node loss on a 2-node Ray cluster: kill -9 a worker after the first checkpoint, then kill -9 rank 0
in the middle of writing the next checkpoint; the run must finish with the same weights as an
uninterrupted run, having consumed every sample exactly once, and the half-written checkpoint must
never have been published."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODEL, argus_ranks

REPO = Path(__file__).resolve().parents[1]
# Loopback addresses of this drill's two simulated nodes: not 127.0.0.2, where `--local` clusters start
# (cluster/ray_local.py), so this drill may run beside the tests that start those (tests/conftest.py).
HEAD_IP, NODE_IP = "127.0.0.12", "127.0.0.13"
TINY = [
    *TINY_MODEL,
    "data.num_workers=0",
    "optim.warmup_steps=2",
    "train.checkpoint_every=2",
    "train.log_sample_keys=true",
]


def committed_keys(run: Path) -> dict[int, list[str]]:
    """rank -> keys of the steps that count (a re-done step's last record wins)."""
    out = {}
    for path in sorted((run / "sample_keys").glob("rank*.jsonl")):
        by_step = {}
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            by_step[rec["step"]] = rec["keys"]
        out[int(path.stem[4:])] = [k for s in sorted(by_step) for k in by_step[s]]
    return out


@pytest.mark.slow
def test_worker_killed_after_checkpoint_recovers_exactly(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    from launch.ray_launch import launch
    from trainer.checkpoint import load_model
    from trainer.data.synth import synthesize

    data = tmp_path / "data"
    synthesize(data, users=48, items=100, mean_len=25, shards=3, seed=2, holdout="none", workers=1)
    steps = 6  # 48 samples / (2 ranks x 4) = one epoch
    common = ["configs/mini.yaml", f"data.path={data}", *TINY, f"train.steps={steps}"]

    # reference: uninterrupted, 2 ranks under torchrun's environment (forked in-process)
    ref = tmp_path / "ref"
    argus_ranks("train", *common, f"out={ref}", nproc=2)

    # two simulated nodes. Attempt 1: rank 1 is killed (SIGKILL) 6 s after step 3, i.e. after the step-2
    # checkpoint and after Ray's controller has registered it (it polls every 2 s). Attempt 2 resumes
    # from Ray's step-2 checkpoint; rank 0 is killed while writing the step-4 checkpoint
    # (dense states on disk, sparse tables not). Attempt 3 resumes from step 2 again and finishes.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    marker, marker_ckpt = tmp_path / "killed", tmp_path / "killed_in_checkpoint"
    monkeypatch.setenv(
        "ARGUS_FAULT_INJECT", f"rank=1,step=3,delay=6,once={marker};rank=0,step=4,phase=checkpoint,once={marker_ckpt}"
    )
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)  # nothing lands in /tmp/ray
    os.makedirs(os.path.join(ray_tmp, "ray"), exist_ok=True)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "node_ip_address": HEAD_IP, "temp_dir": ray_tmp, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, node_ip_address=NODE_IP)
    run = tmp_path / "ray_run"
    try:
        args = argparse.Namespace(
            config=common[0],
            overrides=common[1:] + [f"out={run}"],
            address=cluster.address,
            local=False,
            num_workers=2,
            cpus_per_worker=1.0,
            gpus_per_worker=0.0,
            storage_path=str(tmp_path / "storage"),
            max_failures=2,
            name="ft",
        )
        assert {n.node_ip_address for n in cluster.list_all_nodes()} == {HEAD_IP, NODE_IP}
        assert launch(args) == 0
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert marker.is_file(), "the step fault was injected"
    # (3) the kill inside save() hit a half-written step-4 checkpoint while `latest` named step 2
    assert marker_ckpt.read_text().strip() == (
        "rank 0 killed at checkpoint 4; latest=step_00000002; writing=step_00000004.tmp"
    )

    # (1) final weights equal the uninterrupted run's, bit for bit
    num_items = json.loads((data / "manifest.json").read_text())["num_items"]
    _, s_ref, d_ref = load_model(ref / "checkpoints" / f"step_{steps:08d}", num_items)
    _, s_run, d_run = load_model(run / "checkpoints" / f"step_{steps:08d}", num_items)
    for (name, a), (_, b) in zip(
        sorted({**s_ref.state_dict(), **d_ref.state_dict()}.items()),
        sorted({**s_run.state_dict(), **d_run.state_dict()}.items()),
    ):
        assert torch.equal(a, b), name
    # (2) every sample exactly once over the committed steps, equal to the uninterrupted run's per rank
    got, want = committed_keys(run), committed_keys(ref)
    assert got == want
    all_keys = [k for keys in got.values() for k in keys]
    manifest = json.loads((data / "manifest.json").read_text())
    assert len(all_keys) == len(set(all_keys)) == sum(s["samples"] for s in manifest["splits"]["train"]["shards"])
    # both restarts resumed from the step-2 checkpoint: step 3 ran in all three attempts, step 4 in the
    # last two (the half-written step-4 checkpoint was never used), steps 5-6 once
    for rank in (0, 1):
        logged = [
            json.loads(x)["step"] for x in (run / "sample_keys" / f"rank{rank:05d}.jsonl").read_text().splitlines()
        ]
        assert [logged.count(s) for s in range(1, steps + 1)] == [1, 1, 3, 2, 1, 1], (rank, logged)
    attempts = [json.loads(x) for x in (run / "ray_attempts.jsonl").read_text().splitlines()]
    assert [(a["restored_from"], a["step"]) for a in attempts] == [(None, 0), ("ray", 2), ("ray", 2)]
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
