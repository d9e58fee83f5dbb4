"""`argus train`: the pre-training loop. Same code under a plain process, torchrun, the deepspeed launcher
and Ray: the launcher only decides how many processes exist and sets RANK/WORLD_SIZE/MASTER_ADDR."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from embeddings.sharding import plan_summary
from trainer import checkpoint
from trainer.config import save_config
from trainer.data.batch import Batch
from trainer.data.manifest import Manifest
from trainer.data.schema import NUM_PLAYED_BUCKETS, EventType
from trainer.dist import DistInfo, init_distributed
from trainer.engine import Engine, StepOutput
from trainer.flops import detect_gpu, mfu
from trainer.job import JobConfig
from trainer.logger import MetricsLogger, StepTimer, peak_memory_bytes
from trainer.model.heads import ne_from_stats

log = logging.getLogger(__name__)


class Trainer:
    """Builds loader, engine and logger from one JobConfig and runs ``train.steps`` optimizer steps."""

    engine_class: type[Engine] = Engine  # fine-tuning swaps in its engine (trainer/finetune.py)

    def __init__(self, cfg: JobConfig, info: DistInfo | None = None) -> None:
        self.cfg = cfg
        self.info = info or init_distributed(cfg.train.device, cfg.train.timeout_s)
        cfg.validate(self.info.world_size, self.info.device.type)
        self.run_dir = Path(cfg.out)
        self.manifest = Manifest.load(cfg.data.path)
        self.loader = cfg.loader_config().build(self.info.rank, self.info.world_size, self.manifest)
        self.engine = self.engine_class(cfg, self.info, self.manifest)
        self.step = 0
        if self.info.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            # The embedding plan TorchRec made; `argus plan` reproduces it offline (tests compare them).
            (self.run_dir / "sharding_plan.json").write_text(json.dumps(plan_summary(self.engine.plan), indent=1))
        self.gpu = detect_gpu(self.info.device)
        # Hooks: after every step (tests, fault drills); in the middle of writing a checkpoint (fault
        # drills); after every checkpoint (Ray reports it).
        self.after_step: Callable[["Trainer", int], None] | None = None
        self.mid_checkpoint: Callable[["Trainer", Path], None] | None = None
        self.on_checkpoint: Callable[["Trainer", Path], None] | None = None
        self._restored = False

    def restore(self, path: Path) -> None:
        """Continue from checkpoint directory ``path`` (collective)."""
        meta = checkpoint.load(self.engine, self.loader, path, self.info.rank)
        self.step = int(meta["step"])
        self._restored = True

    def maybe_resume(self) -> None:
        if not self.cfg.resume or self._restored:
            return
        path = checkpoint.latest_checkpoint(self.run_dir)
        if path is None:
            if self.info.rank == 0:
                log.warning("resume=true but %s has no checkpoint: starting from step 0", self.run_dir)
            return
        self.restore(path)

    def save(self) -> Path:
        path = checkpoint.save(
            self.engine,
            self.loader,
            self.step,
            self.cfg,
            self.run_dir,
            self.info.rank,
            extra={"epoch": self.loader.epoch},
            mid_write=None if self.mid_checkpoint is None else lambda tmp: self.mid_checkpoint(self, tmp),
        )
        if self.on_checkpoint is not None:
            self.on_checkpoint(self, path)
        return path

    def run(self) -> dict[str, float]:
        cfg = self.cfg
        self.maybe_resume()
        start = self.step
        timer = StepTimer(self.info.device)
        window: list[StepOutput] = []
        last: dict[str, float] = {}
        t_window = time.perf_counter()
        with MetricsLogger(self.run_dir, rank=self.info.rank, total_steps=cfg.train.steps) as logger:
            while self.step < cfg.train.steps:
                batches = iter(self.loader)  # the rest of this epoch, then the next
                while self.step < cfg.train.steps:
                    with timer.data():
                        batch = next(batches, None)
                    if batch is None:
                        break
                    with timer.compute():
                        window.append(self.step_fn(batch))
                    self.step += 1
                    if cfg.train.log_sample_keys:
                        self._log_keys(batch.keys)
                    if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                        last = self._metrics(window, time.perf_counter() - t_window, timer)
                        logger.log(self.step, last)
                        window, t_window = [], time.perf_counter()
                        timer.reset()
                    if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                        self.save()
                    if self.after_step is not None:
                        self.after_step(self, self.step)
            saved = cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0
            if self.step > start and not saved:
                self.save()
        return last

    def step_fn(self, batch: Batch) -> Any:
        """One optimizer step on one batch; its result goes to :meth:`_metrics`."""
        return self.engine.train_step(batch, self.step)

    def _log_keys(self, keys: list[str]) -> None:
        """Append this step's sample keys (a restarted run re-logs re-done steps; the last record wins)."""
        path = self.run_dir / "sample_keys" / f"rank{self.info.rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"step": self.step, "keys": keys}) + "\n")

    def _metrics(self, window: list[StepOutput], seconds: float, timer: StepTimer) -> dict[str, float]:
        """Window averages, reduced over ranks; stable names (see trainer/logger.py)."""
        n = max(len(window), 1)
        local = {
            "loss/total": sum(o.loss for o in window) / n,
            "loss/next_item": sum(o.next_item for o in window) / n,
            "loss/feedback": sum(o.feedback for o in window) / n,
            "interactions": float(sum(o.interactions for o in window)),
        }
        out = self.engine.all_reduce_mean(local)
        if self.cfg.heads.feedback.weight > 0:
            for head, classes in (("event", len(EventType)), ("played", NUM_PLAYED_BUCKETS)):
                stats = torch.zeros(1 + classes, dtype=torch.float64)  # [ce_sum, counts...], summed over ranks
                for o in window:
                    if head in o.ne:
                        stats[0] += o.ne[head][0]
                        stats[1:] += o.ne[head][1]
                stats = self.engine.all_reduce_sum(stats)
                out[f"ne/{head}"] = ne_from_stats(float(stats[0]), stats[1:])
        interactions = out.pop("interactions") * self.info.world_size
        seconds = max(seconds, 1e-9)
        k = self.cfg.tokens_per_interaction()
        flops = self.engine.flops_per_interaction() * interactions / seconds
        out.update(
            {
                "interactions_per_s": interactions / seconds,
                "tps": k * interactions / seconds,
                "tflops": flops / 1e12,
                "memory/peak_gb": peak_memory_bytes(self.info.device) / 2**30,
                "lr": self.engine.lr(),
                **timer.summary(len(window)),
            }
        )
        m = mfu(flops / self.info.world_size, self.gpu, self.cfg.deepspeed.precision)
        if m is not None:
            out["mfu(%)"] = m
        return out
