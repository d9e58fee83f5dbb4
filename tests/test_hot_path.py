"""The training step's hot path: no device-to-host reads in project code, the metrics read once per window.

On a GPU, reading a device tensor's value on the host (``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``,
``.tolist()``) waits for every queued kernel. On CPU nothing waits, but the scalar reads still go through the
dispatcher as ``aten._local_scalar_dense`` (a dispatch mode sees them) and ``tolist`` is a method we can wrap:
the spy counts those whose caller is project code (``trainer/``, ``embeddings/``), ignoring the ones TorchRec
and DeepSpeed make inside their own code. Host-side bookkeeping (the batch comes from the loader as numpy)
reads numpy, which is neither. Ops that sync on CUDA without a read (``nonzero``, ``unique``) look the same
on host and device tensors here; `bench/gpu_check.sh` runs a step under ``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch
from helpers import free_port, single_rank_engine, start_ranks
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tuple(str(ROOT / d) for d in ("trainer", "embeddings"))
TORCH = "/torch/"  # torch's own frames sit between any caller and the read: look past them
LIBRARIES = ("/torchrec/", "/deepspeed/", "/fbgemm_gpu/", "/torchdata/")


_TOLIST = torch.Tensor.tolist


class ScalarReads(TorchDispatchMode):
    """Counts scalar reads (``aten._local_scalar_dense``) and ``Tensor.tolist`` calls made by project code, with
    where they came from."""

    def __init__(self) -> None:
        super().__init__()
        self.where: list[str] = []

    def _note(self, stack: list[traceback.FrameSummary]) -> None:
        for frame in reversed(stack):
            if __file__ in frame.filename or TORCH in frame.filename:
                continue
            if any(lib in frame.filename for lib in LIBRARIES):
                return  # a library's own read: not ours to remove
            if frame.filename.startswith(PROJECT):
                self.where.append(f"{Path(frame.filename).relative_to(ROOT)}:{frame.lineno} {frame.line}")
            return

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self._note(traceback.extract_stack()[:-1])
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        tolist = self._tolist = torch.Tensor.tolist
        spy = self

        def counted(t: torch.Tensor):
            spy._note(traceback.extract_stack()[:-1])
            return tolist(t)

        torch.Tensor.tolist = counted
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def _job(data: Path, out: Path, packed: bool, backend: str = "torchrec") -> dict:
    # Packed rows attend through the block mask, the sync-free path (on GPUs `auto` picks flex, which has no CPU
    # backward); `segments`, the faster CPU path, reads the history lengths on the host by design.
    model = {"preset": "custom", "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "max_seq_len": 24}
    return {
        "data": {"path": str(data), "batch_size": 4, "num_workers": 0, "batch_tokens": 48 if packed else 0},
        "model": model | {"attention": "mask"},
        # backend torch with adam: the replicated table's update, the one with a step count (embeddings/replicated.py)
        "embeddings": {"item_dim": 16, "backend": backend} | ({"optimizer": "adam"} if backend == "torch" else {}),
        "heads": {"next_item": {"uniform_negatives": 16, "in_batch_negatives": 16, "full_softmax": False}},
        "train": {"steps": 4, "seed": 3, "device": "cpu", "timeout_s": 120},
        "out": str(out),
    }


def _worker(rank: int, job: dict, port: int, out: str) -> None:
    cfg, manifest, engine = single_rank_engine(job, port)
    loader = cfg.loader_config().build(0, 1, manifest)
    reads, outputs = [], []
    for step, batch in zip(range(4), loader):
        spy = ScalarReads()
        with spy:
            outputs.append(engine.train_step(batch, step))
        reads.append(spy.where)
    result = {
        "reads": reads,
        "on_device": all(isinstance(o.loss, torch.Tensor) and o.loss.device == engine.info.device for o in outputs),
        "losses": [float(o.loss) for o in outputs],
        "packed": batch.pack_shape is not None,
    }
    Path(out).write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("packed, backend", [(False, "torchrec"), (True, "torchrec"), (False, "torch")])
@pytest.mark.slow
def test_train_step_reads_no_device_value(data, tmp_path, packed, backend):
    job = _job(data, tmp_path / "run", packed, backend)
    out = tmp_path / "result.json"
    start_ranks(_worker, (job, free_port(), str(out)), nprocs=1)
    res = json.loads(out.read_text())
    assert res["packed"] == packed
    assert res["on_device"], "step losses must stay device tensors until the logging window reads them"
    assert all(x == x and x > 0 for x in res["losses"])
    assert res["reads"] == [[]] * 4, "project code read a device value during a step:\n" + "\n".join(
        sorted({w for r in res["reads"] for w in r})
    )


def test_spy_sees_a_read_in_project_code():
    """The spy must be able to fail: a scalar read from project code is seen, with its place."""
    from trainer.model.encoder import AttnLayout
    from trainer.model.heads import ne_from_stats

    spy = ScalarReads()
    with spy:
        ne_from_stats(torch.tensor(3.0, dtype=torch.float64), torch.tensor([1.0, 2.0]))
    assert spy.where and spy.where[0].startswith("trainer/model/heads.py")
    spy = ScalarReads()
    with spy:
        AttnLayout.build(torch.tensor([[0, 0, 1, -1]]), "segments")  # reads the lengths with tolist
    assert spy.where and spy.where[0].startswith("trainer/model/encoder.py")
    assert torch.Tensor.tolist is _TOLIST
