"""Datasets at a URL (trainer/data/storage.py): an S3-protocol server on loopback (moto), written by `argus data
synth --out s3://...`, read back sample for sample as from local disk, exactly once over 2 ranks x 2 workers,
resumed mid-epoch bitwise, transient failures retried and counted, a deleted shard named in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import argus_inproc, one_line_error

from trainer.data.loader import ShardLoader
from trainer.data.manifest import Manifest
from trainer.data.reader import ShardReadError
from trainer.data.storage import RETRIES, location, redact
from trainer.data.synth import synthesize

SYNTH = dict(users=60, items=90, mean_len=20, shards=3, seed=11, holdout="loo")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (no network beyond loopback), the AWS variables pointing at it, and a bucket
    holding `argus data synth --out s3://argus-test/ds` of SYNTH; and the same dataset on local disk."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "ARGUS_CACHE": str(tmp_path_factory.mktemp("cache")),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="argus-test")
        local = tmp_path_factory.mktemp("local") / "ds"
        synthesize(local, workers=1, **SYNTH)
        yield "s3://argus-test/ds", local
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _synth_args(out: str, *extra: str) -> list[str]:
    s = SYNTH
    return [
        "data", "synth", "--out", out, "--users", str(s["users"]), "--items", str(s["items"]),
        "--mean-len", str(s["mean_len"]), "--shards", str(s["shards"]), "--seed", str(s["seed"]),
        "--holdout", "loo", "--workers", "1", *extra,
    ]  # fmt: skip


def _synth_cli(capsys, out: str, *extra: str) -> tuple[int, str, str]:
    return argus_inproc(capsys, *_synth_args(out, *extra))


@pytest.fixture(scope="module")
def remote(s3):
    """SYNTH written to s3://argus-test/ds by the CLI (staged locally, uploaded, the manifest last)."""
    from launch.cli import main

    url, local = s3
    assert main(_synth_args(url)) == 0
    return url, local


def _epoch(path: str, rank: int, world: int, workers: int) -> list[tuple[str, list[int]]]:
    cfg = ShardLoader.Config(path=path, batch_size=4, num_workers=workers, shuffle_buffer=6, read_ahead=2048)
    return [(k, b.values["item"].tolist()) for b in cfg.build(rank, world) for k in [",".join(b.keys)]]


def test_a_dataset_written_to_s3_reads_back_as_on_local_disk_exactly_once(remote):
    url, local = remote
    m = Manifest.load(url)
    assert m.version == 2 and all(sh.index for sh in m.splits["train"].shards)
    assert m.to_json() == Manifest.load(local).to_json(), "the same dataset, byte for byte (hashes included)"
    seen = []
    for rank in range(2):
        got, want = _epoch(url, rank, 2, workers=2), _epoch(str(local), rank, 2, workers=2)
        assert got == want  # sample for sample, item for item, in the same batches
        seen += [k for keys, _ in got for k in keys.split(",")]
    assert len(seen) == len(set(seen)) == m.splits["train"].samples, "exactly once over 2 ranks x 2 workers"
    assert np.array_equal(m.item_counts("train"), Manifest.load(local).item_counts("train"))


def test_inspect_and_verify_read_the_url(remote, capsys):
    url, _ = remote
    code, out, err = argus_inproc(capsys, "data", "verify", url)
    assert code == 0 and "OK s3://argus-test/ds" in out, out + err


def test_resume_mid_epoch_from_s3_is_bitwise(remote):
    url, _ = remote
    cfg = ShardLoader.Config(path=url, batch_size=3, num_workers=2, shuffle_buffer=5)
    reference = [b.keys for b in cfg.build(1, 2)]
    first = cfg.build(1, 2)
    got = []
    for i, b in enumerate(first):
        got.append(b.keys)
        if i == 2:
            break
    resumed = cfg.build(1, 2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert got + [b.keys for b in resumed] == reference


def test_transient_failures_are_retried_and_counted(remote, monkeypatch):
    """Connection resets and 503-like errors (OSError, as s3fs raises them) on range reads: retried with backoff,
    counted in the loader's stats, the epoch's samples unchanged."""
    url, local = remote
    monkeypatch.setattr("trainer.data.storage.RETRY_BASE_S", 0.001)
    fs = location(url).fs
    real, calls = fs.cat_file, {"n": 0}

    def flaky(path, start=None, end=None, **kw):
        calls["n"] += 1
        if calls["n"] % 3 == 1:  # every third request fails once
            raise (ConnectionResetError if calls["n"] % 2 else OSError)("503 Slow Down (injected)")
        return real(path, start=start, end=end, **kw)

    monkeypatch.setattr(fs, "cat_file", flaky)
    before = RETRIES["count"]
    loader = ShardLoader.Config(path=url, batch_size=4, num_workers=0, read_ahead=2048).build(0, 1)
    got = [b.keys for b in loader]
    want = [b.keys for b in ShardLoader.Config(path=str(local), batch_size=4, num_workers=0).build(0, 1)]
    assert got == want
    # every retry while reading batches is in the loader's stats (the manifest's and side files' come before)
    assert 0 < loader.stats["retries"] <= RETRIES["count"] - before


def test_a_deleted_shard_is_one_line_naming_it(s3, capsys):
    url, _ = s3
    broken = url + "-broken"
    code, _, err = _synth_cli(capsys, broken)
    assert code == 0, err
    shard = f"{broken}/train/shard-000001.tar"
    location(shard).fs.rm_file(location(shard).path)
    with pytest.raises(ShardReadError, match=f"shard {shard}: not found"):
        [b for b in ShardLoader.Config(path=broken, batch_size=4, num_workers=0).build(0, 1)]
    code, _, err = argus_inproc(capsys, "data", "verify", broken)
    assert code != 0 and "train/shard-000001.tar: missing" in err


def test_writing_to_a_url_refuses_an_existing_dataset_and_foreign_objects(s3, capsys):
    url, _ = s3
    target = url + "-w"
    assert _synth_cli(capsys, target)[0] == 0
    code, _, err = _synth_cli(capsys, target)
    assert (
        code == 2
        and one_line_error(err) == f"argus: error: out {target}: holds a dataset; pass --overwrite to replace it"
    )
    assert _synth_cli(capsys, target, "--overwrite")[0] == 0
    foreign = url + "-mine"
    location(foreign + "/notes.txt").fs.pipe_file(location(foreign + "/notes.txt").path, b"my notes")
    code, _, err = _synth_cli(capsys, foreign)
    assert code == 2 and "not empty and not an argus dataset" in one_line_error(err)
    assert location(foreign + "/notes.txt").fs.cat_file(location(foreign + "/notes.txt").path) == b"my notes"


def test_credentials_in_a_url_are_redacted():
    assert redact("s3://AKIAXXX:s3cr3t@bucket/p") == "s3://***@bucket/p"
    assert redact("https://host/p.tar?X-Amz-Signature=abc&X-Amz-Credential=k&a=1") == (
        "https://host/p.tar?X-Amz-Signature=***&X-Amz-Credential=***&a=1"
    )
    assert redact("az://c/p?sv=2020&sig=SECRET") == "az://c/p?sv=***&sig=***"
    assert redact("/local/path") == "/local/path"
    with pytest.raises(ValueError, match="unsupported URL scheme 'ftp'"):
        location("ftp://host/ds")
    try:
        import gcsfs  # noqa: F401
    except ImportError:  # the usual case here: the [gs] extra is not installed
        with pytest.raises(ValueError, match=r"gs://b/ds: reading gs:// needs the gcsfs package; install it with: "):
            location("gs://b/ds")


def test_training_reads_the_url_and_its_saved_config_holds_no_secret(remote, tmp_path, capsys, monkeypatch):
    """`argus train` with data.path=s3://... (one process, 2 steps, a DataLoader worker); the config saved beside
    the run keeps the URL; a URL's credentials are redacted in any saved config."""
    from helpers import REPO, TINY_MODEL, losses

    from trainer.config import save_config
    from trainer.job import JobConfig

    url, _ = remote
    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    args = ["configs/mini.yaml", f"data.path={url}", f"out={run}", *TINY_MODEL, "train.steps=2", "data.num_workers=1"]
    import subprocess
    import sys

    # a real process: `argus train` keeps its process group, which in-process would leak into later tests
    out = subprocess.run([sys.executable, "-m", "launch.cli", "train", *args], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(losses(run)) == [1, 2] and all(v == v for v in losses(run).values())
    assert f"path: {url}" in (run / "config.yaml").read_text()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["data/retries"] for r in records] == [0.0, 0.0] and records[-1]["data/skipped"] == 0.0
    cfg = JobConfig()
    cfg.data.path = "s3://AKIAXXX:s3cr3t@argus-test/ds"
    save_config(cfg, tmp_path / "c.yaml")
    text = (tmp_path / "c.yaml").read_text()
    assert "s3cr3t" not in text and "s3://***@argus-test/ds" in text


def test_s3_failures_injected_by_a_proxy_mid_epoch_are_survived(s3, monkeypatch):
    """A dataset at s3://... read through FaultyProxy (tests/helpers.py: a loopback HTTP proxy in front of the moto
    server) that answers `503 Slow Down` and resets connections for a burst of requests mid-epoch: the epoch's
    samples equal the local dataset's, and the failures the proxy injected are seen.

    Three layers retry, and the two below ours absorb short bursts, so our counter only sees what gets past them:
    - botocore retries 503/SlowDown and connection errors itself (legacy mode: 5 attempts, random backoff up to
      2^n s: a burst of 6 failures costs seconds). Lowered with ``AWS_MAX_ATTEMPTS=1`` (read when the client is
      made), or ``storage_options={"config_kwargs": {"retries": {"max_attempts": 1}}}``.
    - s3fs wraps every call in ``_error_wrapper``: SlowDown ``ClientError`` and ``HTTPClientError`` (resets,
      timeouts) retried ``S3FileSystem.retries`` (= 5) times, 0.1 s x 1.7^i apart. ``retries`` is a class
      attribute, not a constructor argument (a ``retries=`` storage option ends up in ``AioSession(**kwargs)``),
      so it is lowered on the instance: ``fs.retries = 1``. A 503 then reaches us as ``OSError(EBUSY)``; a reset as
      botocore's ``EndpointConnectionError`` / ``ConnectionClosedError`` -- not an ``OSError``, which is why
      ``storage.transient`` also takes botocore's connection and HTTP-client errors.
    - aiohttp re-sends an idempotent request (GET, HEAD) once when a reused keep-alive connection is reset.
    With defaults only the botocore layer is lowered here (its backoff is slow): s3fs absorbs a burst of 3 (our
    counter stays 0); with ``fs.retries = 1`` too, a burst of 6 reaches ``with_retries`` and is counted."""
    import s3fs
    from helpers import FaultyProxy

    from trainer.data.storage import upload_tree

    _, local = s3
    url = "s3://argus-test/proxied"
    monkeypatch.setattr("trainer.data.storage.RETRY_BASE_S", 0.001)
    kw = dict(batch_size=4, num_workers=0, shuffle_buffer=4, read_ahead=2048)  # many small range reads per epoch
    want = [b.keys for b in ShardLoader.Config(path=str(local), **kw).build(0, 1)]

    def epoch(proxy: FaultyProxy, burst: int, modes: tuple[str, ...], s3fs_retries: int | None) -> tuple[list, int]:
        loader = ShardLoader.Config(path=url, **kw).build(0, 1)
        if s3fs_retries is not None:
            location(url).fs.retries = s3fs_retries  # the cached instance the loader reads with
        got = []
        for i, b in enumerate(loader):
            got.append(b.keys)
            if i == 2:
                proxy.fail(requests=burst, modes=modes)
        proxy.heal()
        return got, loader.stats["retries"]

    with FaultyProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        s3fs.S3FileSystem.clear_instance_cache()  # s3fs caches instances (and their clients): use the proxy
        try:
            upload_tree(local, location(url), "manifest.json")  # PUTs (and HEADs) through the proxy
            assert proxy.forwarded > 0 and sum(proxy.injected.values()) == 0

            got, retries = epoch(proxy, 3, ("reset", "503"), None)  # s3fs's own retries absorb a short burst
            assert got == want and proxy.injected == {"503": 1, "reset": 2}
            assert retries == 0, "s3fs retried these itself"

            before = dict(proxy.injected)
            # s3fs's retries off: the failures reach storage.with_retries. Two resets in a row get past aiohttp's
            # re-send (a botocore EndpointConnectionError, retried by us since storage.transient takes it).
            got, retries = epoch(proxy, 6, ("reset", "reset", "503"), 1)
            assert got == want
            assert proxy.injected["503"] - before["503"] == 2 and proxy.injected["reset"] - before["reset"] == 4
            assert retries >= 4, (retries, proxy.injected)  # each 503, each pair of resets (or each reset)
        finally:
            monkeypatch.undo()
            s3fs.S3FileSystem.clear_instance_cache()  # later tests: the moto endpoint again


def test_a_version_1_dataset_at_a_url_is_read_from_each_shards_start(remote):
    """A dataset written before the sample index existed (manifest without ``version``, every shard's
    ``index``/``index_sha256`` empty, no .index.npy objects) at a URL: the reader fetches each shard from its
    start and the epochs equal the local dataset's."""
    url, local = remote
    v1 = url + "-v1"
    fs, src, dst = location(url).fs, location(url).path, location(v1).path
    d = json.loads(fs.cat_file(f"{src}/manifest.json"))
    d.pop("version")
    for split in d["splits"].values():
        for sh in split["shards"]:
            sh["index"] = sh["index_sha256"] = ""
    for obj in fs.find(src):
        rel = obj[len(src) + 1 :]
        if rel != "manifest.json" and not rel.endswith(".index.npy"):
            fs.pipe_file(f"{dst}/{rel}", fs.cat_file(obj))
    fs.pipe_file(f"{dst}/manifest.json", json.dumps(d).encode())  # the manifest last, as a writer would
    assert not [o for o in fs.find(dst) if o.endswith(".index.npy")]

    m = Manifest.load(v1)
    assert m.version == 1 and not any(sh.index for s in m.splits.values() for sh in s.shards)
    for rank in range(2):
        assert _epoch(v1, rank, 2, workers=2) == _epoch(str(local), rank, 2, workers=2)
    cfg = ShardLoader.Config(path=v1, split="test", batch_size=5, num_workers=0)
    want = ShardLoader.Config(path=str(local), split="test", batch_size=5, num_workers=0)
    assert [b.keys for b in cfg.build(0, 1)] == [b.keys for b in want.build(0, 1)]


def test_convert_reads_its_input_from_a_url_and_writes_to_one(s3, tmp_path):
    """`argus data convert s3://.../logs --out s3://...`: the input streamed through fsspec (a parquet file, a
    gzipped CSV), never downloaded first; the same dataset as converting the local files (byte-identical shards)."""
    import gzip

    from launch.cli import main

    url, _ = s3
    fix = Path(__file__).resolve().parent / "fixtures"
    gz = tmp_path / "ratings_small.csv.gz"
    gz.write_bytes(gzip.compress((fix / "ratings_small.csv").read_bytes()))
    fs = location(url).fs
    for local, name in ((fix / "yambda_small.parquet", "yambda_small.parquet"), (gz, gz.name)):
        remote_in = location(f"{url}-logs/{name}")
        fs.put_file(str(local), remote_in.path)
        out_url, out_local = f"{url}-conv-{name}", tmp_path / f"conv-{name}"
        assert main(["data", "convert", str(local), "--out", str(out_local), "--shards", "2"]) == 0
        assert main(["data", "convert", str(remote_in), "--out", out_url, "--shards", "2"]) == 0
        a, b = Manifest.load(out_url).to_json(), Manifest.load(out_local).to_json()
        assert a["source"].pop("input") == str(remote_in) and b["source"].pop("input") == str(local)
        a["source"].pop("files", None), b["source"].pop("files", None)
        assert a == b, name


def test_a_pipe_url_reads_sequentially_exactly_once_and_resumes(s3, tmp_path, capsys):
    """`pipe:CMD` (WebDataset's convention; `{}` = the object's path in the dataset): the same epochs as the local
    directory over 2 ranks x 2 workers, a bitwise mid-epoch resume (each shard re-read from its start), verify; a
    failing command is one line naming it; a pipe is read-only."""
    _, local = s3
    url = f"pipe:cat {local}/{{}}"
    for rank in range(2):
        assert _epoch(url, rank, 2, workers=2) == _epoch(str(local), rank, 2, workers=2)
    cfg = ShardLoader.Config(path=url, batch_size=3, num_workers=2, shuffle_buffer=5)
    reference = [b.keys for b in cfg.build(0, 2)]
    first = cfg.build(0, 2)
    got = [b.keys for _, b in zip(range(3), first)]
    resumed = cfg.build(0, 2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert got + [b.keys for b in resumed] == reference
    code, out, err = argus_inproc(capsys, "data", "verify", url)
    assert code == 0 and f"OK pipe:cat {local}/{{}}" in out, out + err
    missing = f"pipe:cat {tmp_path}/nothing/{{}}"
    code, _, err = argus_inproc(capsys, "data", "verify", missing)
    assert code != 0 and one_line_error(err).startswith(f"argus: error: {missing} [manifest.json]: not found")
    code, _, err = _synth_cli(capsys, url)
    assert code == 2 and "read-only URL" in one_line_error(err)


def test_the_shard_cache_serves_later_epochs_and_stays_within_its_bound(remote, tmp_path, monkeypatch):
    """data.cache_bytes: the first epoch fetches whole shards into ARGUS_CACHE/shards, the second reads none from the
    store (no request), both equal to the local epoch; with a bound of ~1.5 shards the cache never holds more."""
    url, local = remote
    monkeypatch.setenv("ARGUS_CACHE", str(tmp_path / "cache"))
    fs = location(url).fs
    real, requests = fs.cat_file, []
    monkeypatch.setattr(fs, "cat_file", lambda path, *a, **kw: requests.append(path) or real(path, *a, **kw))
    sizes = [sh.bytes for sh in Manifest.load(local).splits["train"].shards]
    want = [b.keys for b in ShardLoader.Config(path=str(local), batch_size=4, num_workers=0).build(0, 1)]
    for bound, epochs_fetching in ((sum(sizes) * 2, 1), (int(max(sizes) * 1.5), 2)):
        loader = ShardLoader.Config(path=url, batch_size=4, num_workers=0, cache_bytes=bound).build(0, 1)
        for epoch in range(2):
            requests.clear()
            assert [b.keys for b in loader] == want if epoch == 0 else [b.keys for b in loader]
            held = list((tmp_path / "cache" / "shards").glob("*.tar"))
            assert sum(p.stat().st_size for p in held) <= max(bound, max(sizes))
            shard_reads = [r for r in requests if r.endswith(".tar")]
            assert bool(shard_reads) == (epoch < epochs_fetching), (bound, epoch, shard_reads)


def test_review_cases_errors_redaction_pipes_and_cache(s3, tmp_path, monkeypatch, capsys):
    """What a review found: which failures are retried; credentials anywhere in a message; a chatty pipe command;
    a cached shard another worker evicts stays readable; a loader state saved before `retries` existed resumes."""
    import errno

    import aiohttp

    from trainer.data.storage import PipeLocation, cached_shard, transient

    assert transient(ConnectionResetError()) and transient(OSError("503 Slow Down")) and transient(TimeoutError())
    assert not transient(OSError(errno.EINVAL, "InvalidRange")) and not transient(FileNotFoundError())
    info = aiohttp.RequestInfo(url="https://h/x", method="GET", headers={}, real_url="https://h/x")
    assert transient(aiohttp.ClientResponseError(info, (), status=503))
    assert not transient(aiohttp.ClientResponseError(info, (), status=403))
    assert redact("pipe:curl -sf https://user:pw@host/ds/{}") == "pipe:curl -sf https://***@host/ds/{}"
    assert redact("403, message='Forbidden', url='https://u:p@h/x?sig=1'") == (
        "403, message='Forbidden', url='https://***@h/x?sig=***'"
    )

    _, local = s3
    chatty = PipeLocation(f"head -c 200000 /dev/zero >&2; cat {local}/{{}}") / "manifest.json"
    assert chatty.read() == (local / "manifest.json").read_bytes()  # 200 kB on stderr: no deadlock
    assert chatty.read(10) == (local / "manifest.json").read_bytes()[:10]

    monkeypatch.setenv("ARGUS_CACHE", str(tmp_path / "cache"))
    shards = Manifest.load(local).splits["train"].shards
    first = cached_shard(local / shards[0].path, shards[0].sha256, bound=0)
    second = cached_shard(local / shards[1].path, shards[1].sha256, bound=0)  # evicts the first copy
    assert [p.name for p in (tmp_path / "cache" / "shards").glob("*.tar")] == [f"{shards[1].sha256}.tar"]
    assert first.read() == (local / shards[0].path).read_bytes(), "an evicted copy stays readable when open"
    first.close(), second.close()

    cfg = ShardLoader.Config(path=str(local), batch_size=4, num_workers=0)
    loader = cfg.build(0, 1)
    reference = [b.keys for b in cfg.build(0, 1)]
    got = [b.keys for _, b in zip(range(2), loader)]
    state = json.loads(json.dumps(loader.state_dict()))
    del state["stats"]["retries"]  # as saved by an earlier version
    resumed = cfg.build(0, 1)
    resumed.load_state_dict(state)
    assert got + [b.keys for b in resumed] == reference and resumed.stats["retries"] == 0


def test_writing_to_a_url_holding_an_incomplete_dataset_or_another_tools_manifest(s3, capsys):
    """--out URL as strict as a local --out: another tool's manifest.json is refused even with --overwrite; an
    incomplete argus dataset (an upload that died after the old manifest went) needs --overwrite and is replaced,
    with no file of the old one left."""
    url, _ = s3
    fs = location(url).fs
    other = url + "-export"
    fs.pipe_file(location(other + "/manifest.json").path, b'{"format": "argus-export"}')
    code, _, err = _synth_cli(capsys, other, "--overwrite")
    assert (
        code == 2
        and one_line_error(err)
        == f"argus: error: out {other}: manifest.json is not a dataset's; refusing to write there"
    )
    half = url + "-half"
    fs.pipe_file(location(half + "/train/shard-000009.tar").path, b"old")
    code, _, err = _synth_cli(capsys, half)
    assert code == 2 and "holds an incomplete dataset (no manifest); pass --overwrite" in one_line_error(err)
    assert _synth_cli(capsys, half, "--overwrite")[0] == 0
    assert not fs.exists(location(half + "/train/shard-000009.tar").path), "the old dataset's files are gone"
    assert Manifest.load(half).splits["train"].samples == SYNTH["users"]
