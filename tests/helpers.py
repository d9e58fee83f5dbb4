"""Shared test helpers: a tiny model that trains in seconds on 2 CPU cores, and reading a run's losses."""

import json
import os
from pathlib import Path

TINY_MODEL = [
    "model.preset=custom",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.d_ff=64",
    "model.max_seq_len=32",
    "embeddings.item_dim=16",
    "model.side_dim=8",
    "data.batch_size=4",
    "heads.next_item.uniform_negatives=16",
    "heads.next_item.in_batch_negatives=16",
    "train.log_every=1",
    "train.device=cpu",
    "train.timeout_s=120",
]


def losses(run: Path) -> dict[int, float]:
    """step -> loss/total from a run's metrics.jsonl."""
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss/total"] for r in records if "loss/total" in r}  # not the validation records


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file's sha256, a symlink's target, "dir" for a directory. Equal before and
    after a refused command = nothing in the target changed, byte for byte."""
    import hashlib
    import os

    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_line_error(err: str) -> str:
    """The one line `argus` prints for a library error (asserted to be exactly one line)."""
    assert err.count("\n") == 1 and err.startswith("argus: error: "), err
    return err.strip()


def read_samples(root: Path, split: str) -> list:
    """Every sample of a split, read with stdlib tarfile + decode_sample (independently of the loader)."""
    import tarfile

    from trainer.data.manifest import Manifest
    from trainer.data.schema import decode_sample

    out = []
    for shard in Manifest.load(root).split(split).shards:
        with tarfile.open(root / shard.path) as tf:
            out += [decode_sample(m.name.split(".")[0], tf.extractfile(m).read()) for m in tf]
    return out


def assert_training_plan_matches(run: Path, data: Path, world: int) -> None:
    """The sharding `argus train` built (RUN/sharding_plan.json) is the one `argus plan` makes offline."""
    import yaml

    from cluster.hardware import Hardware
    from cluster.planner import torchrec_plan
    from trainer.config import from_dict
    from trainer.job import JobConfig

    cfg = from_dict(JobConfig, yaml.safe_load((run / "config.yaml").read_text()))
    built = json.loads((run / "sharding_plan.json").read_text())
    num_items = json.loads((data / "manifest.json").read_text())["num_items"]
    offline = torchrec_plan(cfg, num_items, Hardware("h100", nodes=1, gpus_per_node=world), None, "cpu")
    assert offline["plan"] == built


# ---- ranks started in-process (torch.multiprocessing + gloo) -----------------------------------------------------
# `torchrun -m launch.cli ...` costs a fresh interpreter per rank plus torchrun's own: ~10 s of imports each on
# 2 cores. Where the launcher is not what a test is about, the ranks are forked from a fork server that has the
# project already imported (one start per session), and each runs `launch.cli.main(argv)` with torchrun's
# environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). The server is a fresh interpreter, so
# whatever this pytest process did before (Ray, a process group) is not inherited.
REPO = Path(__file__).resolve().parents[1]
PRELOAD = [
    "launch.cli",
    "launch.train_cli",
    "launch.data_cli",
    "launch.export_cli",
    "launch.deepspeed_launch",
    "trainer.run",
    "trainer.train",
    "trainer.finetune",
    "trainer.export",
    "trainer.evaluate",
    "trainer.memory",
    "deepspeed",
    "torchrec",
    "helpers",
    # imported lazily by a run's first step: DeepSpeed's optimizer check pulls in torch.compile (~10 s)
    "deepspeed.runtime.zero.muon.muon_optimizer",
    "torch._inductor.compile_fx",
    "torch._dynamo",
    "torch.distributed.optim",
    "torch.distributed.checkpoint",
    "torch.utils.tensorboard",
    "torch.ao.quantization",
    "networkx",
    "setuptools",
    "distutils.ccompiler",
]


def mp_context():
    """The fork-server context every in-process multi-rank test uses (sharded runs, loaders, `argus` ranks)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # no effect once the server runs: it is the same for every caller
    return ctx


def start_ranks(fn, args: tuple, nprocs: int, timeout: float = 600) -> None:
    """torch.multiprocessing.start_processes(fn, args, nprocs) on the fork server, with a deadline."""
    import time

    import torch.multiprocessing as mp

    mp_context()
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.0, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks still running after {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()


def rank_env(rank: int, world: int, port: int) -> None:
    """torchrun's environment for rank ``rank`` of ``world`` started by :func:`start_ranks` (gloo at
    127.0.0.1:``port``), set in the rank's own process before it joins the group."""
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )


def single_rank_engine(job: dict, port: int) -> tuple:
    """(cfg, manifest, Engine) of job dict ``job`` in this process as rank 0 of a 1-rank gloo group (inside a
    ``start_ranks`` worker)."""
    from trainer.config import from_dict
    from trainer.data.manifest import Manifest
    from trainer.dist import init_distributed
    from trainer.engine import Engine
    from trainer.job import JobConfig

    rank_env(0, 1, port)
    info = init_distributed("cpu", timeout_s=120)
    cfg = from_dict(JobConfig, job)
    cfg.validate(1, "cpu")
    manifest = Manifest.load(cfg.data.path)
    return cfg, manifest, Engine(cfg, info, manifest)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argus_rank(
    rank: int, world: int, argv: list[str], port: int, env: dict[str, str], log: str, failing: bool = False
) -> None:
    import os
    import sys

    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    os.chdir(REPO)
    fd = os.open(f"{log}.rank{rank}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    if failing:  # stderr apart, the exit code in a file, and no exception: every rank runs to its end
        fd = os.open(f"{log}.rank{rank}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    from launch.cli import main

    try:
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    if failing:
        Path(f"{log}.rank{rank}.rc").write_text(str(rc))
    elif rc != 0:
        raise SystemExit(rc)


def argus_ranks(
    *argv: str, nproc: int = 2, env: dict[str, str] | None = None, log_dir: Path | None = None, timeout: float = 600
) -> list[str]:
    """`torchrun --nproc_per_node=NPROC -m launch.cli ARGV`, the ranks forked in-process; -> each rank's output.

    nproc=1 is `argus ARGV` in a process of its own (WORLD_SIZE=1). Fails with the ranks' output on a non-zero
    exit or an exception in any rank."""
    import os
    import tempfile

    own_dir = log_dir is None
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="argus_ranks"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log = str(log_dir / f"ranks_{free_port()}")
    env = {**os.environ, **(env or {})}
    try:
        start_ranks(_argus_rank, (nproc, list(argv), free_port(), env, log), nproc, timeout)
    except Exception as e:
        out = "\n".join(
            f"--- rank {r}\n" + Path(f"{log}.rank{r}").read_text()[-3000:]
            for r in range(nproc)
            if Path(f"{log}.rank{r}").is_file()
        )
        raise AssertionError(f"argus {' '.join(argv)} on {nproc} rank(s) failed: {e}\n{out}") from e
    out = [Path(f"{log}.rank{r}").read_text() for r in range(nproc)]
    if own_dir:
        import shutil

        shutil.rmtree(log_dir, ignore_errors=True)
    return out


def argus_ranks_failing(
    *argv: str, nproc: int = 2, env: dict[str, str] | None = None, timeout: float = 600
) -> list[tuple[int, str, str]]:
    """As :func:`argus_ranks`, for a command expected to fail: -> each rank's (exit code, stdout, stderr); every rank
    runs to its own end (none is killed when another exits non-zero)."""
    import os
    import shutil
    import tempfile

    log_dir = Path(tempfile.mkdtemp(prefix="argus_ranks"))
    log = str(log_dir / "ranks")
    try:
        start_ranks(
            _argus_rank, (nproc, list(argv), free_port(), {**os.environ, **(env or {})}, log, True), nproc, timeout
        )
        return [
            (
                int(Path(f"{log}.rank{r}.rc").read_text()),
                Path(f"{log}.rank{r}").read_text(),
                Path(f"{log}.rank{r}.err").read_text(),
            )
            for r in range(nproc)
        ]
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def argus_own_process(*argv: str) -> tuple[int, str, str]:
    """`argus ARGV` in a process of its own, forked from the fork server: -> (exit code, stdout, stderr). For the
    commands that make a process group (eval, export): TorchRec keeps a destroyed gloo group alive in the process
    that made it, and a DataLoader worker forked from there later can abort in its destructor (seen once)."""
    ((code, out, err),) = argus_ranks_failing(*argv, nproc=1)
    return code, out, err


def argus_inproc(capsys, *argv: str) -> tuple[int, str, str]:
    """`argus ARGV` in this process (for commands that make no process group): -> (exit code, stdout, stderr)."""
    from launch.cli import main

    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's usage errors: what the process would exit with
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


class BackgroundRun:
    """`argus ARGV` on one rank, forked from the fork server now and joined later (`result`): a long single-rank
    run started when the session starts uses the core the rest of the suite leaves idle."""

    def __init__(self, argv: list[str], log_dir: Path):
        import os

        self.argv, self.log = argv, str(log_dir / "background")
        self.proc = mp_context().Process(target=_argus_rank, args=(0, 1, argv, free_port(), dict(os.environ), self.log))
        self.proc.start()

    def result(self, timeout: float = 900) -> None:
        self.proc.join(timeout)
        log = Path(f"{self.log}.rank0")
        if self.proc.is_alive():
            self.stop()
            raise AssertionError(f"argus {' '.join(self.argv)} still running after {timeout} s")
        assert self.proc.exitcode == 0, f"argus {' '.join(self.argv)} exited with {self.proc.exitcode}:\n" + (
            log.read_text()[-3000:] if log.is_file() else ""
        )

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


class FaultyProxy:
    """A threaded HTTP proxy on 127.0.0.1 in front of an HTTP server (the moto S3 server in test_remote_data.py):
    every request (GET with its Range header, HEAD, PUT, POST, DELETE) is forwarded as is over a fresh
    connection and the response relayed. :meth:`fail` switches it into a failure mode for the next ``requests``
    requests or for ``seconds``: each such request is answered ``503 Slow Down`` with S3's XML error body, or its
    connection is reset (SO_LINGER 0, then closed: an RST, no response), alternately in the order of ``modes``.
    ``injected`` counts the failures served per mode, ``forwarded`` the requests relayed."""

    SLOW_DOWN = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
        b"<Message>Please reduce your request rate.</Message><RequestId>FAULTYPROXY</RequestId></Error>"
    )

    def __init__(self, upstream: str) -> None:
        import http.server
        import threading
        from urllib.parse import urlsplit

        up = urlsplit(upstream)
        self.upstream = (up.hostname, up.port)
        self.injected = {"503": 0, "reset": 0}
        self.forwarded = 0
        self._lock = threading.Lock()
        self._left, self._until, self._modes, self._next = 0, 0.0, ("503", "reset"), 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as aiohttp's pool expects

            def log_message(self, *args) -> None:
                pass

            def _relay(self) -> None:
                body = self._body()
                mode = proxy._take()
                if mode == "reset":
                    import socket
                    import struct

                    self.close_connection = True
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    os.close(self.connection.detach())  # the RST: no status line, no bytes
                    return
                if mode == "503":
                    payload = b"" if self.command == "HEAD" else proxy.SLOW_DOWN
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(proxy.SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                import http.client

                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP and not (k.lower() == "content-length" and self.command != "HEAD"):
                            self.send_header(k, v)
                    if self.command != "HEAD":
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    conn.close()
                with proxy._lock:
                    proxy.forwarded += 1

            def _body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        out += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return out
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else None

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _relay

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def fail(self, requests: int = 0, seconds: float = 0.0, modes: tuple[str, ...] = ("503", "reset")) -> None:
        import time

        with self._lock:
            self._left, self._until, self._modes, self._next = requests, time.monotonic() + seconds, modes, 0

    def heal(self) -> None:
        self.fail(0, 0.0)

    def _take(self) -> str:
        """The failure to serve the request at hand, or "" to forward it."""
        import time

        with self._lock:
            if self._left > 0:
                self._left -= 1
            elif time.monotonic() >= self._until:
                return ""
            mode = self._modes[self._next % len(self._modes)]
            self._next += 1
            self.injected[mode] += 1
            return mode

    def __enter__(self) -> "FaultyProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}


def shard_shape(run: Path, step: int, tp_rank: int, key: str) -> tuple[int, ...]:
    """The shape of parameter ``key`` in tensor-parallel rank ``tp_rank``'s model file of a run's checkpoint (ZeRO-1/2:
    the file holds that rank's weights as trained)."""
    import torch

    from trainer.checkpoint import DENSE_TAG

    path = run / "checkpoints" / f"step_{step:08d}" / "dense" / DENSE_TAG / f"mp_rank_{tp_rank:02d}_model_states.pt"
    return tuple(torch.load(path, map_location="cpu", weights_only=False)["module"][key].shape)
