"""Step time of a full softmax vs sampled softmax + logQ, by catalog size: where `full_softmax: auto` switches.

    python bench/full_softmax_threshold.py [--items 1024,2048,4096,8192,16384] [--steps 8] [--preset nano]

One process, the real engine (TorchRec item table + DeepSpeed dense model), the same batches for both
heads; the sampled side draws `uniform_negatives + in_batch_negatives` = 512 candidates. Prints the ratio
full / sampled per catalog size and the catalog-to-candidates multiple where the ratio crosses `--max-ratio`
(the multiple `heads.FULL_SOFTMAX_MULTIPLE` is set from; docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def step_seconds(data: Path, run: Path, full: bool, steps: int, preset: str, batch: int) -> float:
    from trainer.run import load_job
    from trainer.train import Trainer

    cfg = load_job(
        "configs/nano.yaml",
        [
            f"data.path={data}",
            f"out={run}",
            f"model.preset={preset}",
            f"data.batch_size={batch}",
            "data.num_workers=0",
            "train.steps=1000",
            "eval.every_epochs=0",
            "eval.patience=0",
            f"heads.next_item.full_softmax={'true' if full else 'false'}",
        ],
        1,
    )
    t = Trainer(cfg)
    it = iter(t.loader)
    batches = [next(it) for _ in range(steps + 2)]
    for i in range(2):
        t.engine.train_step(batches[i], i)
    t0 = time.perf_counter()
    for i in range(2, steps + 2):
        t.engine.train_step(batches[i], i)
    return (time.perf_counter() - t0) / steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", default="1024,2048,4096,8192,16384")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--preset", default="nano")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-ratio", type=float, default=1.25)
    a = p.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29631", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch

    from trainer.data.synth import synthesize

    torch.set_num_threads(1)
    candidates = 512
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in [int(x) for x in a.items.split(",")]:
            data = Path(tmp) / f"d{m}"
            synthesize(data, users=a.batch_size * (a.steps + 2), items=m, mean_len=100, shards=1, seed=0, workers=1)
            full = step_seconds(data, Path(tmp) / f"f{m}", True, a.steps, a.preset, a.batch_size)
            sampled = step_seconds(data, Path(tmp) / f"s{m}", False, a.steps, a.preset, a.batch_size)
            rows.append((m, full, sampled))
            print(
                f"items {m:>7,}  ({m / candidates:5.1f}x candidates)  full {full * 1e3:7.1f} ms  "
                f"sampled {sampled * 1e3:7.1f} ms  ratio {full / sampled:.2f}",
                flush=True,
            )
    ok = [m for m, f, s in rows if f / s <= a.max_ratio]
    print(
        f"largest catalog with full/sampled <= {a.max_ratio}: {max(ok) if ok else None} items "
        f"= {max(ok) / candidates if ok else 0:.0f}x the {candidates} sampled candidates"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
