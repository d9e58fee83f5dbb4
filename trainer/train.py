"""`argus train`: the pre-training loop. Same code under a plain process, torchrun, the deepspeed launcher
and Ray: the launcher only decides how many processes exist and sets RANK/WORLD_SIZE/MASTER_ADDR."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from trainer import checkpoint, checkpoint_store, faults
from trainer.config import ConfigError, save_config
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


class Validation:
    """Model selection state: the best validation value so far, its checkpoint (``checkpoints/best``), and
    early stopping. Kept in ``RUN/validation.jsonl`` (one record per validation), so a resumed run picks up
    where it stopped; every rank holds the same state (the values are broadcast from rank 0). Which
    checkpoints are deleted is retention's business (``Trainer.prune``), which never deletes ``best``."""

    def __init__(self, cfg: JobConfig, run_dir: Path) -> None:
        self.select, self.patience = cfg.eval.select, cfg.eval.patience
        self.run_dir = run_dir
        self.path = run_dir / "validation.jsonl"
        self.best = float("-inf")
        self.best_step = -1
        self.since_best = 0
        self.stop = False

    def restore(self, step: int, rank: int = 0) -> None:
        """Replay the records of validations up to ``step`` (a resumed run). ``best`` naming a checkpoint after
        ``step`` (resume fell back past it, and that step is trained again) is pointed back at the best checkpoint
        up to ``step``, or removed when that one is gone (rank 0)."""
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                rec = json.loads(line)
                if rec["step"] <= step:
                    self._update(rec["step"], rec[self.select])
        best = checkpoint.pointer_target(self.run_dir, checkpoint.BEST)
        if rank != 0 or best is None or (checkpoint.step_of(best) or 0) <= step:
            return
        earlier = checkpoint.checkpoint_root(self.run_dir) / checkpoint.checkpoint_name(max(self.best_step, 0))
        if self.best_step >= 0 and (earlier / "meta.json").is_file():
            checkpoint.set_pointer(self.run_dir, checkpoint.BEST, earlier)
        else:
            (checkpoint.checkpoint_root(self.run_dir) / checkpoint.BEST).unlink()

    def _update(self, step: int, value: float) -> bool:
        better = value > self.best  # NaN (no validation users) is never better
        if better:
            self.best, self.best_step, self.since_best = value, step, 0
        else:
            self.since_best += 1
        self.stop = bool(self.patience) and self.since_best >= self.patience
        return better

    def add(self, step: int, value: float, path: Path, elapsed_s: float, rank: int) -> None:
        better = self._update(step, value)
        if rank != 0:
            return
        if better:
            checkpoint.set_pointer(self.run_dir, checkpoint.BEST, path)
        rec = {
            "step": step,
            self.select: value,
            "best": self.best,
            "best_step": self.best_step,
            "checkpoint": path.name,
            "elapsed_s": round(elapsed_s, 3),
            "time": time.time(),
            "stop": self.stop,
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.stop:
            log.warning(
                "early stop at step %d: %s has not improved for %d validations (best %.4f at step %d)",
                step,
                self.select,
                self.patience,
                self.best,
                self.best_step,
            )


class Trainer:
    """Builds loader, engine and logger from one JobConfig and runs ``train.steps`` optimizer steps."""

    engine_class: type[Engine] = Engine  # fine-tuning swaps in its engine (trainer/finetune.py)

    def __init__(self, cfg: JobConfig, info: DistInfo | None = None) -> None:
        self.cfg = cfg
        self.info = info or init_distributed(cfg.train.device, cfg.train.timeout_s)
        cfg.validate(self.info.world_size, self.info.device.type)
        if dist.is_initialized():  # every rank has checked `out` (run.load_job, read-only) before rank 0 writes there
            dist.barrier()
        self.run_dir = Path(cfg.out)
        self.manifest = Manifest.load(cfg.data.path)
        g = cfg.parallel.group  # a tp or sp group's ranks read the same batches: the loader serves data-parallel ranks
        self.loader = cfg.loader_config().build(self.info.rank // g, self.info.world_size // g, self.manifest)
        self.total_steps = cfg.total_steps(self.loader.batches_per_epoch())
        self.eval_every = cfg.eval_every(self.loader.batches_per_epoch())
        if self.eval_every and cfg.eval.val_split not in self.manifest.splits:
            raise ConfigError(
                f"eval.val_split: {cfg.data.path} has no split {cfg.eval.val_split!r} to validate on "
                f"(splits: {', '.join(self.manifest.splits)}); write one with --holdout, or set eval.every=0"
            )
        self.engine = self.engine_class(cfg, self.info, self.manifest, self.total_steps)
        self.val_cache = None  # eval.val_summary_cache: read now, so a cache that does not fit fails before step 1
        if self.eval_every and cfg.eval.val_summary_cache:
            from trainer.summary_cache import SummaryCache

            # by the summariser that wrote the training cache (data.summary_cache, required with it): the summaries
            # the run learns to read
            assert self.engine.summary_cache is not None
            writer = Path(self.engine.summary_cache.manifest["checkpoint"])
            n = self.manifest.split(cfg.eval.val_split).samples
            self.val_cache = SummaryCache.load(cfg.eval.val_summary_cache, cfg, cfg.eval.val_split, writer, n)
        self.step = 0
        self.validation = Validation(cfg, self.run_dir)
        self.retention = checkpoint_store.Retention(cfg.train.keep_last, cfg.train.keep_every)
        self.t_start = time.time()
        self.time_up = False
        if self.info.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            # The embedding plan TorchRec made (or the replicated layout of embeddings.backend=torch); `argus plan`
            # reproduces it offline (tests compare them).
            (self.run_dir / "sharding_plan.json").write_text(json.dumps(self.engine.sharding_summary(), indent=1))
        self.gpu = detect_gpu(self.info.device)
        # Hooks: after every step (tests, fault drills); in the middle of writing a checkpoint and of deleting
        # one (fault drills: trainer/faults.py, from $ARGUS_FAULT_INJECT); after every checkpoint (Ray reports it).
        self.after_step: Callable[["Trainer", int], None] | None = None
        self.mid_checkpoint: Callable[["Trainer", Path], None] | None = None
        self.mid_prune: Callable[["Trainer", Path], None] | None = None
        self.on_checkpoint: Callable[["Trainer", Path], None] | None = None
        self.checkpoint_meta: dict[str, Any] = {}  # more keys for meta.json (Ray: the launch that wrote it)
        self._restored = False
        self._ne_noted: set[str] = set()
        faults.install(self)

    def restore(self, path: Path) -> None:
        """Continue from checkpoint directory ``path`` (collective)."""
        meta = checkpoint.load(self.engine, self.loader, path, self.info.rank)
        self.step = int(meta["step"])
        self._restored = True

    def resume_from(self, candidate: Path | None) -> None:
        """Continue from checkpoint ``candidate`` when it verifies, else from the newest good one before it
        (collective; ``trainer/checkpoint.py: select_resume``, which raises CheckpointError when none is)."""
        path = checkpoint.select_resume(self.run_dir, candidate, self.info.rank)
        if path is not None:
            self.restore(path)

    def maybe_resume(self) -> None:
        if not self.cfg.resume or self._restored:
            return
        latest = checkpoint.pointer_target(self.run_dir, checkpoint.LATEST)  # complete or not: it is verified
        if latest is None:
            if self.info.rank == 0:
                log.warning("resume=true but %s has no checkpoint: starting from step 0", self.run_dir)
            return
        self.resume_from(latest)

    def save(self) -> Path:
        path = checkpoint.save(
            self.engine,
            self.loader,
            self.step,
            self.cfg,
            self.run_dir,
            self.info.rank,
            extra={"epoch": self.loader.epoch, **self.checkpoint_meta},
            mid_write=None if self.mid_checkpoint is None else lambda tmp: self.mid_checkpoint(self, tmp),
        )
        if self.on_checkpoint is not None:
            self.on_checkpoint(self, path)
        return path

    def prune(self) -> None:
        """Retention (``train.keep_last``, ``train.keep_every``; rank 0): delete the checkpoints it does not keep.
        Called once a newer checkpoint is published and validation has moved ``best``."""
        if self.info.rank != 0:
            return
        hook = None if self.mid_prune is None else (lambda trash: self.mid_prune(self, trash))
        removed = checkpoint_store.prune(self.run_dir, self.retention, mid_delete=hook)
        if removed:
            log.debug("retention: removed %s", ", ".join(removed))

    def run(self) -> dict[str, float]:
        cfg = self.cfg
        total = self.total_steps
        self.maybe_resume()
        self.validation.restore(self.step, self.info.rank)
        start = self.step
        timer = StepTimer(self.info.device)
        window: list[StepOutput] = []
        last: dict[str, float] = {}
        t_window = time.perf_counter()
        saved_at = -1
        with MetricsLogger(self.run_dir, rank=self.info.rank, total_steps=total) as logger:
            while self.step < total and not self.stopping:
                batches = iter(self.loader)  # the rest of this epoch, then the next
                while self.step < total and not self.stopping:
                    with timer.data():
                        batch = next(batches, None)
                    if batch is None:
                        break
                    with timer.compute():
                        window.append(self.step_fn(batch))
                    self.step += 1
                    if cfg.train.log_sample_keys and self.engine.lead:  # a tp or sp group's batch: logged once
                        self._log_keys(batch.keys)
                    if self.step % cfg.train.log_every == 0 or self.step == total:
                        last = self._metrics(window, time.perf_counter() - t_window, timer)
                        logger.log(self.step, last)
                        window, t_window = [], time.perf_counter()
                        timer.reset()
                        self._check_time_cap()
                    every = self.eval_every
                    validate = every and (self.step % every == 0 or self.step == total)
                    if validate or (cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0):
                        path = self.save()
                        saved_at = self.step
                        if validate:
                            t_val = time.perf_counter()
                            last.update(self.validate(path, logger))
                            t_window += time.perf_counter() - t_val  # not training time: keep tps honest
                        self.prune()
                    if self.after_step is not None:
                        self.after_step(self, self.step)
            if self.step > start and saved_at != self.step:  # stopped by the time cap (or the last step)
                path = self.save()
                if self.eval_every:
                    last.update(self.validate(path, logger))
                self.prune()
        if self.engine.summary_cache is not None:
            stale = self.engine.all_reduce_sum(torch.tensor(self.engine.summary_stale, dtype=torch.float64))
            if stale[0] and self.info.rank == 0:
                log.warning(
                    "data.summary_cache: %d samples read a summary that leaves out %d older interactions "
                    "(a stale cache: rebuild it with argus summarize)",
                    int(stale[0]),
                    int(stale[1]),
                )
        return last

    @property
    def stopping(self) -> bool:
        return self.validation.stop or self.time_up

    def _check_time_cap(self) -> None:
        """``train.max_seconds``: rank 0's clock decides, for every rank (a broadcast at log steps)."""
        cap = self.cfg.train.max_seconds
        if not cap or self.time_up:
            return
        over = torch.tensor([float(time.time() - self.t_start > cap)], dtype=torch.float64)
        self.time_up = bool(self.engine.broadcast(over)[0])
        if self.time_up and self.info.rank == 0:
            log.warning("train.max_seconds=%g reached at step %d: stopping with a checkpoint", cap, self.step)

    def validate(self, path: Path, logger: MetricsLogger) -> dict[str, float]:
        """Rank the validation split with the live model (just saved as checkpoint ``path``), keep ``best``, decide
        on early stopping. Every rank runs ``argus eval``'s ranking (:func:`trainer.evaluate.rank_model`;
        collective: the users split over the ranks, the training tables sharded as they are) and gets the same
        metrics, so the decision is the same on every rank. Returns the ``eval/`` metrics."""
        from trainer.evaluate import rank_model  # training may never validate

        ev = self.cfg.eval
        keys = [f"{m}@{k}" for m in ("hr", "ndcg") for k in ev.ks]
        with self.inference_model() as model:
            full = rank_model(
                model,
                self.cfg.data.path,
                self.manifest,
                ev.val_split,
                list(ev.ks),
                ev.val_max_users,
                self.info.rank,
                self.info.world_size,
                self.info.device,
                cache=self.val_cache,
            )
        rep = full["model"]
        stale = full.get("summary_cache", {})
        if stale.get("stale_users") and self.info.rank == 0:
            log.warning("validation at step %d: %d users read a summary from eval.val_summary_cache that leaves out "
                        "%d older interactions (a stale cache)", self.step, stale["stale_users"],
                        stale["interactions_left_out"])  # fmt: skip
        pre = "" if f"{ev.select}" in rep else "sampled_"  # a catalog above eval.full_ranking_max_items
        metrics = {f"eval/{pre}{k}": float(rep[pre + k]) for k in keys}
        self.validation.add(self.step, float(rep[pre + ev.select]), path, time.time() - self.t_start, self.info.rank)
        metrics[f"eval/best_{ev.select}"] = self.validation.best
        logger.log(self.step, metrics)
        return metrics

    @contextlib.contextmanager
    def inference_model(self) -> Iterator[checkpoint.ShardedModel]:
        """The live model in eval mode, for validation: the training tables themselves and the dense module
        DeepSpeed trains, so validation holds no second copy of a table and reads nothing back from disk (before:
        every validation loaded the checkpoint it had just written, a second sharded table on every rank). Under
        ZeRO-3 DeepSpeed's hooks gather each submodule's weights for its forward, as in training (tested with every
        weight partitioned: tests/test_train_cli.py). Under parallel.sp the encoder runs whole rows on every rank
        meanwhile; under parallel.tp every rank ranks with a whole copy of the dense model (its ranks' users differ,
        and a sharded block would all-reduce across them). Training mode is restored after."""
        module, tables = self.engine.ds.module, self.engine.tables
        modes = module.training, tables.training
        if self.cfg.parallel.tp > 1:
            from trainer.model.build import build_dense
            from trainer.model.item_tower import share_item_data
            from trainer.model.tensor_parallel import whole_weights

            with torch.random.fork_rng(devices=[]):  # its init must not move the RNG a resumed run restores
                whole = build_dense(self.cfg)
            whole.load_state_dict(whole_weights(module))
            share_item_data(module, whole)
            module = whole.to(self.info.device)
        module.eval()
        tables.eval()
        whole_rows = contextlib.nullcontext()
        if self.cfg.parallel.sp > 1:  # parallel.sp: each rank ranks its own users with whole rows
            from trainer.model.sequence_parallel import sequence_parallel_off

            whole_rows = sequence_parallel_off(module.encoder)
        try:
            with whole_rows:
                yield checkpoint.ShardedModel(self.cfg, tables, self.engine.item_rows, module)
        finally:
            self.engine.ds.module.train(modes[0])
            tables.train(modes[1])
        self.engine.after_inference()  # a collective: not on an error, which the other ranks may not share

    def step_fn(self, batch: Batch) -> Any:
        """One optimizer step on one batch; its result goes to :meth:`_metrics`."""
        return self.engine.train_step(batch, self.step)

    def _log_keys(self, keys: list[str]) -> None:
        """Append this step's sample keys (a restarted run re-logs re-done steps; the last record wins)."""
        path = self.run_dir / "sample_keys" / f"rank{self.info.rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"step": self.step, "keys": keys}) + "\n")

    def _token_balance(self, window: list[StepOutput]) -> dict[str, float]:
        """``tokens/padding_share``: of the positions the encoder ran over, the share that was padding (all
        ranks); ``tokens/rank_skew``: the busiest rank's real interactions over the mean, minus 1 (what a
        synchronous step waits for)."""
        w, r = self.info.world_size, self.info.rank
        t = torch.zeros(w + 1, dtype=torch.float64)
        t[r] = sum(o.interactions for o in window)
        t[w] = sum(o.slots for o in window)
        t = self.engine.all_reduce_sum(t)
        real, slots = t[: w : self.cfg.parallel.group], float(t[w])  # a group's tokens: counted by its first rank
        out = {"tokens/padding_share": 1.0 - float(real.sum()) / slots if slots else 0.0}
        if real.numel() > 1 and float(real.sum()) > 0:
            out["tokens/rank_skew"] = float(real.max() / real.mean()) - 1.0
        return out

    def _metrics(self, window: list[StepOutput], seconds: float, timer: StepTimer) -> dict[str, float]:
        """Window averages, reduced over ranks; stable names (see trainer/logger.py)."""
        n = max(len(window), 1)
        # The window's one read-back of device values (steps never wait for the device).
        losses = torch.zeros(3, dtype=torch.float64)
        if window:
            losses = torch.stack([torch.stack([o.loss, o.next_item, o.feedback]) for o in window]).double().sum(0).cpu()
        local = {
            "loss/total": float(losses[0]) / n,
            "loss/next_item": float(losses[1]) / n,
            "loss/feedback": float(losses[2]) / n,
            "interactions": float(sum(o.interactions for o in window)),
            # the data path's health since the run (re)started: storage retries (data at a URL) and samples
            # skipped as unreadable (data.on_error: skip); summed over ranks below
            "data/retries": float(self.loader.stats["retries"]) if self.engine.lead else 0.0,  # once per group
            "data/skipped": float(self.loader.stats["skipped"]) if self.engine.lead else 0.0,
        }
        if window and window[0].reconstruction is not None:  # model.summary.reconstruction_weight
            local["loss/reconstruction"] = float(torch.stack([o.reconstruction for o in window]).double().sum()) / n
        out = self.engine.all_reduce_mean(local)
        for key in ("data/retries", "data/skipped"):
            out[key] = float(round(out[key] * self.info.world_size))
        out.update(self._token_balance(window))
        if self.cfg.heads.feedback.weight > 0:
            for head, classes in (("event", len(EventType)), ("played", NUM_PLAYED_BUCKETS)):
                stats = torch.zeros(1 + classes, dtype=torch.float64)  # [ce_sum, counts...], summed over ranks
                parts = [torch.cat([o.ne[head][0].view(1), o.ne[head][1]]) for o in window if head in o.ne]
                if parts:
                    stats = torch.stack(parts).sum(0).cpu()
                stats = self.engine.all_reduce_sum(stats)
                ne = ne_from_stats(float(stats[0]), stats[1:])
                if not math.isnan(ne):
                    out[f"ne/{head}"] = ne
                elif head not in self._ne_noted and self.info.rank == 0 and int((stats[1:] > 0).sum()) < 2:
                    self._ne_noted.add(head)  # a target the data never varies (no played ratio, no likes)
                    log.warning("ne/%s left out: every %s target so far has the same value", head, head)
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
