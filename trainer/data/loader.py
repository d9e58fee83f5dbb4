"""The training data loader: exactly once per epoch, equal batch counts per rank, exact resume.

``ShardLoader`` (main process) owns the epoch layout and counts what it hands
to the training loop; ``ShardDataset`` (inside each DataLoader worker) reads
its part of the layout and assembles batches there. Position is tracked in the
main process from each batch's ``part`` tag, so it is exact however many
batches the workers have prefetched, and it is independent of the number of
workers — which is what lets a job resume on a different world size.

Every part yields exactly ``layout.batches_per_part`` batches (the last ones
short, or empty), so every rank runs the same number of steps per epoch and no
rank waits at a collective while another has run dry.
"""

from __future__ import annotations

import gc
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from trainer.data.batch import Batch, collate
from trainer.data.layout import (
    EpochLayout,
    Packing,
    PartPlan,
    merge_rank_states,
    new_layout,
    relayout,
    shard_permutation,
)
from trainer.data.manifest import Manifest
from trainer.data.reader import SampleReader, ShardTable
from trainer.data.schema import Sample
from trainer.data.storage import RETRIES

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata 0.11 on torch 2.13

STATE_VERSION = 1


class ShardDataset(IterableDataset):
    """Yields the batches of this rank's parts of ``layout``; one part per DataLoader worker.

    ``rotation`` maps DataLoader worker ``i`` to part ``(rotation + i) % W`` so a
    fresh DataLoader resumes the round-robin over workers exactly where the
    previous one stopped.
    """

    def __init__(
        self,
        table: ShardTable,
        layout: EpochLayout,
        rank: int,
        rotation: int,
        cfg: "ShardLoader.Config",
        shuffle_seed: int,
        plans: dict[int, PartPlan] | None = None,
    ) -> None:
        """``plans``: this rank's parts' packed batches (token-budget batches only)."""
        self.table, self.layout, self.rank, self.rotation, self.cfg = table, layout, rank, rotation, cfg
        self.perm = shard_permutation(len(table.paths), shuffle_seed, layout.epoch, cfg.shuffle)
        self.plans = plans

    def part_for_worker(self, worker: int) -> int:
        return self.layout.part_index(self.rank, (self.rotation + worker) % self.layout.num_workers)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        return self.iter_part(self.part_for_worker(info.id if info else 0))

    def _batches(self, p: int) -> tuple[np.ndarray, list[np.ndarray], PartPlan | None]:
        """(the part's global indices, the positions in it of each batch left, the packed plan or None)."""
        part = self.layout.parts[p]
        first, last = part.batches, self.layout.batches_per_part
        if self.plans is None:
            order = part.order(self.cfg.shuffle_buffer if self.cfg.shuffle else 0)[part.consumed :]
            bs = self.cfg.batch_size
            return part.indices(), [order[i * bs : (i + 1) * bs] for i in range(last - first)], None
        plan = self.plans[p]
        if plan.start(first) != part.consumed:
            raise ValueError(f"data-loader state: part {p} consumed {part.consumed} samples, its plan says otherwise")
        return part.indices(), [plan.take[plan.batch(b)] for b in range(first, last)], plan

    def iter_part(self, p: int) -> Iterator[Batch]:
        cfg = self.cfg
        # Snapshot: without workers the loader updates this same Part while we iterate.
        first_batch = self.layout.parts[p].batches
        indices, batches, plan = self._batches(p)
        want = np.sort(indices[np.concatenate(batches)]) if batches else np.zeros(0, np.int64)
        reader = SampleReader(self.table, self.perm, cfg.on_error)
        stream = reader.read(want)
        # Read but not yet emitted: at most shuffle_buffer samples (+ the packing window).
        waiting: dict[int, Sample | None] = {}
        padded = cfg.batch_format == "padded"
        packing = self.layout.packer()
        n_errors, n_retries = 0, RETRIES["count"]  # a per-process counter: this worker's, or the rank's
        for b, positions in enumerate(batches, start=first_batch):
            targets = indices[positions].tolist()
            samples: list[Sample] = []
            kept: list[int] = []
            skipped = 0
            for i, g in enumerate(targets):
                while g not in waiting:
                    gi, s = next(stream)
                    waiting[gi] = s
                s = waiting.pop(g)
                if s is None:
                    skipped += 1
                else:
                    samples.append(s)
                    kept.append(i)
            batch = collate(samples, padded, cfg.max_seq_len)
            if plan is not None and packing is not None:
                sl = plan.batch(b)
                batch.place(plan.row[sl][kept], plan.col[sl][kept], packing.rows, packing.row_len)
            batch.part, batch.skipped = p, skipped
            if len(reader.errors) > n_errors:
                batch.meta["errors"] = reader.errors[n_errors:]
                n_errors = len(reader.errors)
            if RETRIES["count"] > n_retries:
                batch.meta["retries"], n_retries = RETRIES["count"] - n_retries, RETRIES["count"]
            yield batch


class ShardLoader:
    """Streams one split of a dataset to one rank; see the module docstring."""

    @dataclass
    class Config:
        path: str = ""
        split: str = "train"
        batch_size: int = 32  # samples per batch, per rank (unless batch_tokens is set)
        # Token-budget batches: interactions per batch, per rank, packed into rows of max_seq_len (0 = off)
        batch_tokens: int = 0
        max_seq_len: int = 0  # 0 = keep whole samples (<= the dataset's max_len); else keep the most recent
        num_workers: int = 2
        shuffle: bool = True
        shuffle_buffer: int = 256  # samples held per worker for shuffling
        seed: int = 0
        batch_format: str = "jagged"  # "jagged" (KeyedJaggedTensor-ready) or "padded"
        on_error: str = "raise"  # "raise": stop naming shard and key; "skip": count and continue
        prefetch_factor: int = 2
        # Data at a URL (s3://, gs://, az://, http(s)://): the most bytes of consecutive samples one range read
        # spans (0 = 8 MiB). Larger: fewer requests, more bytes read past another worker's samples.
        read_ahead: int = 0
        # Data at a URL: > 0 keeps whole shards in a local cache (ARGUS_CACHE/shards) of at most this many bytes,
        # least recently used out first; later epochs read those from local disk. 0: stream every epoch.
        cache_bytes: int = 0
        # An `argus summarize` cache of this split (model.summary): each sample is read after its user's cached
        # summary tokens instead of summarising older history in-line (the loader itself does not read it).
        summary_cache: str = ""

        def validate(self, where: str = "data") -> None:
            def bad(key: str, msg: str) -> ValueError:
                return ValueError(f"{where}.{key}: {msg}")

            if not self.path:
                raise bad("path", "is required (a directory written by `argus data synth` or `argus data convert`)")
            if self.batch_size < 1:
                raise bad("batch_size", f"must be >= 1, got {self.batch_size}")
            if self.batch_tokens < 0:
                raise bad("batch_tokens", f"must be >= 0, got {self.batch_tokens}")
            if self.batch_tokens and self.batch_format != "jagged":
                raise bad("batch_tokens", "packs histories into rows: needs batch_format 'jagged'")
            if self.batch_tokens and self.max_seq_len and self.batch_tokens < self.max_seq_len:
                raise bad("batch_tokens", f"{self.batch_tokens} is less than one row of max_seq_len={self.max_seq_len}")
            if self.max_seq_len < 0:
                raise bad("max_seq_len", f"must be >= 0, got {self.max_seq_len}")
            if self.num_workers < 0:
                raise bad("num_workers", f"must be >= 0, got {self.num_workers}")
            if self.shuffle_buffer < 0:
                raise bad("shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
            if self.batch_format not in ("jagged", "padded"):
                raise bad("batch_format", f"must be 'jagged' or 'padded', got {self.batch_format!r}")
            if self.on_error not in ("raise", "skip"):
                raise bad("on_error", f"must be 'raise' or 'skip', got {self.on_error!r}")
            if self.read_ahead < 0:
                raise bad("read_ahead", f"must be >= 0 bytes, got {self.read_ahead}")
            if self.cache_bytes < 0:
                raise bad("cache_bytes", f"must be >= 0 bytes, got {self.cache_bytes}")

        def build(self, rank: int = 0, world_size: int = 1, manifest: Manifest | None = None) -> "ShardLoader":
            return ShardLoader(self, rank, world_size, manifest)

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, manifest: Manifest | None = None) -> None:
        cfg.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.manifest = manifest or Manifest.load(cfg.path)
        self.table = ShardTable.from_manifest(self.manifest, cfg.split, cfg.read_ahead, cfg.cache_bytes)
        self.workers = max(1, cfg.num_workers)
        self._lengths: list[np.ndarray] | None = None
        self.packing = self._packing()
        self.layout = self._fresh(0)
        self.batches_seen = 0  # batches handed out this epoch on this rank
        # retries: transient storage failures retried while reading this rank's batches (remote data)
        self.stats = {"samples": 0, "interactions": 0, "skipped": 0, "truncated": 0, "retries": 0}
        self.errors: list[str] = []

    def _packing(self) -> Packing | None:
        """The row shape of token-budget batches (None: ``batch_size`` samples per batch)."""
        cfg = self.cfg
        if not cfg.batch_tokens:
            return None
        row_len = cfg.max_seq_len or self.manifest.max_len
        if cfg.batch_tokens < row_len:
            raise ValueError(f"data.batch_tokens: {cfg.batch_tokens} is less than one row of {row_len} interactions")
        lengths = self._epoch_lengths(0)
        mean = float(np.minimum(lengths, row_len).mean()) if lengths.size else 1.0
        rows = cfg.batch_tokens // row_len
        # Look ahead twice the samples a batch holds on average: enough to fill rows to ~98% on heavy-tailed
        # lengths (docs/benchmarks.md), few enough that a worker holds little beyond its shuffle buffer.
        window = max(64, 2 * math.ceil(rows * row_len / max(mean, 1.0)))
        return Packing(rows, row_len, window)

    def _epoch_lengths(self, epoch: int) -> np.ndarray:
        """Every sample's interaction count by global index of ``epoch`` (whose shard order is permuted)."""
        if self._lengths is None:
            self._lengths = self.table.shard_lengths()
        perm = shard_permutation(len(self.table.paths), self.cfg.seed, epoch, self.cfg.shuffle)
        return np.concatenate([self._lengths[i] for i in perm]) if len(perm) else np.zeros(0, np.int64)

    def _buffer(self) -> int:
        return self.cfg.shuffle_buffer if self.cfg.shuffle else 0

    def _fresh(self, epoch: int) -> EpochLayout:
        return new_layout(
            self.table.num_samples,
            epoch,
            self.world_size,
            self.workers,
            self.cfg.batch_size,
            self.cfg.seed,
            self.packing,
            self._epoch_lengths(epoch) if self.packing else None,
            self._buffer(),
        )

    @property
    def epoch(self) -> int:
        return self.layout.epoch

    def batches_per_epoch(self) -> int:
        """Batches every rank gets in a full epoch (identical on all ranks)."""
        return self.layout.batches_per_part * self.workers

    def __len__(self) -> int:
        """Batches left in the current epoch on this rank."""
        return self.batches_per_epoch() - self.batches_seen

    def _dataset(self) -> ShardDataset:
        plans = None
        if self.packing is not None:
            lengths = self._epoch_lengths(self.epoch)
            parts = [self.layout.part_index(self.rank, w) for w in range(self.workers)]
            plans = {
                p: self.layout.parts[p].plan(self.cfg.batch_size, self._buffer(), self.packing, lengths) for p in parts
            }
        return ShardDataset(
            self.table, self.layout, self.rank, self.batches_seen % self.workers, self.cfg, self.cfg.seed, plans
        )

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch; the next call starts the next epoch."""
        if len(self) == 0:
            self.layout = self._fresh(self.epoch + 1)
            self.batches_seen = 0
        if self.cfg.num_workers == 0:
            source: Any = self._dataset()
        else:
            # Workers are forked: garbage of this process that holds a destroyed gloo process group (eval and export
            # destroy theirs; TorchRec's sharded modules keep one alive) would be collected in a worker, where its
            # destructor aborts ("terminate called without an active exception": its threads are not there). Seen
            # in 2 of ~10 `make test` runs; collected here, in the parent, first.
            gc.collect()
            source = StatefulDataLoader(
                self._dataset(),
                batch_size=None,
                num_workers=self.cfg.num_workers,
                prefetch_factor=self.cfg.prefetch_factor,
                persistent_workers=False,
            )
        for batch in source:
            self._account(batch)
            yield batch
        if len(self) != 0:
            raise RuntimeError(
                f"rank {self.rank}: epoch {self.epoch} ended after {self.batches_seen} of "
                f"{self.batches_per_epoch()} batches"
            )

    def _account(self, batch: Batch) -> None:
        part = self.layout.parts[batch.part]
        part.consumed += batch.size + batch.skipped
        part.batches += 1
        self.batches_seen += 1
        self.stats["samples"] += batch.size
        self.stats["interactions"] += batch.num_interactions
        self.stats["skipped"] += batch.skipped
        self.stats["truncated"] += batch.truncated
        self.stats["retries"] += batch.meta.get("retries", 0)
        for err in batch.meta.get("errors", []):
            log.warning("skipped unreadable data: %s", err)
            self.errors.append(err)

    # ---- checkpointing -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's position (and the whole layout). Save every rank's state to resume on a new world size."""
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "split": self.cfg.split,
            "num_samples": self.table.num_samples,
            "batches_seen": self.batches_seen,
            "layout": self.layout.to_dict(),
            "stats": dict(self.stats),
        }

    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        """Resume from this rank's own state (same world size), or from all ranks' states (any world size)."""
        states = [state] if isinstance(state, dict) else list(state)
        for s in states:
            if s.get("version") != STATE_VERSION:
                raise ValueError(f"data-loader state version {s.get('version')} is not {STATE_VERSION}")
            if s["num_samples"] != self.table.num_samples or s["split"] != self.cfg.split:
                raise ValueError(
                    f"data-loader state is for split {s['split']!r} with {s['num_samples']} samples; "
                    f"this dataset's {self.cfg.split!r} has {self.table.num_samples}"
                )
        packing = [self.packing.rows, self.packing.row_len, self.packing.window] if self.packing else None
        same_shape = (
            states[0]["world_size"] == self.world_size
            and states[0]["layout"]["num_workers"] == self.workers
            and states[0]["layout"].get("packing") == packing
        )
        if same_shape:
            own = [s for s in states if s["rank"] == self.rank]
            if not own:
                raise ValueError(f"data-loader state has no entry for rank {self.rank}")
            self.layout = EpochLayout.from_dict(own[0]["layout"])
            self.batches_seen = own[0]["batches_seen"]
            self.stats = {**self.stats, **own[0]["stats"]}  # a state saved before a counter existed lacks it
        else:
            if len(states) < states[0]["world_size"]:
                raise ValueError(
                    f"resuming on a different world size needs the states of all "
                    f"{states[0]['world_size']} ranks, got {len(states)}"
                )
            merged = merge_rank_states(states)
            self.layout = relayout(
                merged,
                self.world_size,
                self.workers,
                self.cfg.batch_size,
                self._buffer(),
                self.cfg.seed,
                self.packing,
                self._epoch_lengths(merged.epoch) if self.packing or merged.packing else None,
            )
            self.batches_seen = 0


def gather_states(loader: ShardLoader) -> list[dict[str, Any]]:
    """All ranks' loader states (collective: call on every rank), for a checkpoint."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [loader.state_dict()]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, loader.state_dict())
    return out
