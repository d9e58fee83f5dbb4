"""Shared fixtures: small datasets written through the real writer (no synth dependency)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

from trainer.data.manifest import Manifest  # noqa: E402
from trainer.data.writer import Holdout, ShardSetWriter, finalize  # noqa: E402


def make_dataset(
    root: Path, shards: int, users: int, seed: int = 0, max_len: int = 16, num_items: int = 100, max_hist: int = 40
) -> Manifest:
    """Random histories, users split into contiguous ranges per shard; returns the manifest."""
    rng = np.random.default_rng(seed)
    results = []
    holdout = Holdout("none")
    for i, us in enumerate(np.array_split(np.arange(users), shards)):
        w = ShardSetWriter(root, i, holdout, max_len=max_len)
        for u in us:
            n = int(rng.integers(1, max_hist))
            w.add_user(
                int(u),
                {
                    "item": rng.integers(0, num_items, n),
                    "timestamp": np.sort(rng.integers(0, 10**6, n)),
                    "event": rng.integers(0, 6, n).astype(np.uint8),
                    "played": rng.integers(0, 101, n).astype(np.uint16),
                    "organic": rng.integers(0, 2, n).astype(np.uint8),
                    "context": rng.integers(0, 4, n).astype(np.int32),
                },
            )
        results.append(w.close())
    return finalize(root, results, holdout, num_items=num_items, max_len=max_len, source={"kind": "test"})


@pytest.fixture
def dataset_factory(tmp_path: Path):
    def factory(shards: int, users: int, **kw) -> Manifest:
        root = tmp_path / f"ds{shards}_{users}_{kw.get('seed', 0)}"
        return make_dataset(root, shards, users, **kw)

    return factory


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """A small planted-structure dataset (leave-one-out splits) for CLI and launcher tests."""
    from trainer.data.synth import synthesize

    root = tmp_path_factory.mktemp("synth") / "data"
    synthesize(root, users=48, items=100, mean_len=25, shards=3, seed=2, holdout="loo", workers=1)
    return root


@pytest.fixture(scope="session")
def imp_data(tmp_path_factory) -> Path:
    """A small planted-structure dataset with impression splits (fine-tuning, export)."""
    from trainer.data.synth import synthesize

    root = tmp_path_factory.mktemp("synth_imp") / "data"
    synthesize(
        root,
        users=120,
        items=150,
        mean_len=40,
        shards=3,
        seed=3,
        holdout="loo",
        workers=1,
        days=40,
        impressions=4,
        slate=6,
    )
    return root


# ---- trained runs shared between test files (read-only: copy one into tmp_path before changing it) -----------
@pytest.fixture(scope="session")
def imp_pretrained(imp_data, tmp_path_factory) -> Path:
    """One 2-rank pre-training run on `imp_data` (ZeRO-2, 3 steps): fine-tuning's init, export's model."""
    from helpers import TINY_MODEL, argus_ranks

    run = tmp_path_factory.mktemp("imp_pre") / "run"
    argus_ranks(
        "train",
        "configs/mini.yaml",
        f"data.path={imp_data}",
        *TINY_MODEL,
        "data.num_workers=0",
        "optim.warmup_steps=2",
        f"out={run}",
        "train.steps=3",
        "deepspeed.stage=2",
        nproc=2,
    )
    return run


@pytest.fixture(scope="session")
def torchrun_run(data, tmp_path_factory) -> Path:
    """`torchrun --nproc_per_node=2 -m launch.cli train` (the real launcher, 3 steps on `data`): the reference the
    other launchers (deepspeed's, `argus launch deepspeed`) must reproduce."""
    import subprocess
    import sys

    from helpers import REPO, TINY_MODEL, free_port

    run = tmp_path_factory.mktemp("torchrun") / "tr2"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            "-m",
            "launch.cli",
            "train",
            "configs/mini.yaml",
            f"data.path={data}",
            *TINY_MODEL,
            "data.num_workers=1",
            "optim.warmup_steps=2",
            "train.steps=3",
            f"out={run}",
        ],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return run


# ---- the suite's one long single-rank run, trained in the background from the start of the session ----------------
MINI_RUN = "test_short_mini_run_beats_popularity"
_background: dict = {}


def _start_mini_run(root: Path):
    """`argus train configs/mini.yaml` for 100 steps on a planted-structure dataset (test_train_cli's quality check)."""
    from helpers import BackgroundRun

    from trainer.data.synth import synthesize

    data, run = root / "data", root / "run"
    synthesize(data, users=600, items=800, mean_len=60, shards=2, seed=5, holdout="loo", workers=1)
    job = BackgroundRun(
        [
            "train",
            "configs/mini.yaml",
            f"data.path={data}",
            f"out={run}",
            "model.max_seq_len=32",
            "data.batch_size=16",
            "train.steps=100",
            "train.log_every=50",
            "train.checkpoint_every=0",
            "train.device=cpu",
        ],
        root,
    )
    return data, run, job


def pytest_collection_finish(session):
    if session.config.option.collectonly or not any(i.name == MINI_RUN for i in session.items):
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every xdist worker collects every test: mini_run starts it lazily
        return
    import tempfile

    _background["mini"] = _start_mini_run(Path(tempfile.mkdtemp(prefix="argus_mini_")))


def pytest_sessionfinish(session):
    if "mini" in _background:
        import shutil

        data, _, job = _background.pop("mini")
        job.stop()
        shutil.rmtree(data.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def mini_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data, run) of the background mini run, once it has finished (started here if the session did not)."""
    if "mini" not in _background:
        _background["mini"] = _start_mini_run(tmp_path_factory.mktemp("mini"))
    data, run, job = _background["mini"]
    job.result()
    return data, run


# ---- pytest-xdist (`make test` runs 2 workers): tests sharing a session run, or a Ray cluster, stay together ----
_GROUPS = {"torchrun_run": "torchrun_run", "imp_pretrained": "imp_pretrained", "mini_run": "mini_run"}
_RAY = ("test_launch_ray.py", "test_ray_fault_tolerance.py", "test_hosts_from_a_running_ray_cluster")
# Two Ray chains that may run at once: the node-loss drill's cluster lives at 127.0.0.12-13, the `--local`
# clusters at 127.0.0.2 and `ray.init()` on the machine's address (Ray picks free ports for each).
_RAY_DRILL = "test_ray_fault_tolerance.py"


def pytest_collection_modifyitems(config, items):
    """``--dist loadgroup`` keeps each group on one worker: a shared session fixture is built once, and the Ray
    tests that share node addresses run one at a time. The two Ray chains, the longest, go first, so that each
    worker starts on one while the rest fills in behind."""
    items.sort(key=lambda item: not any(name in item.nodeid for name in _RAY))  # stable: order otherwise kept
    for item in items:
        if any(name in item.nodeid for name in _RAY):
            item.add_marker(pytest.mark.xdist_group("ray_drill" if _RAY_DRILL in item.nodeid else "ray"))
            continue
        group = next((g for f, g in _GROUPS.items() if f in getattr(item, "fixturenames", ())), None)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
