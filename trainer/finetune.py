"""`argus finetune`: the pre-trained encoder as a two-tower ranker, trained on impressions.

Same machinery as pre-training (TorchRec tables, DeepSpeed ZeRO, the exactly-once loader, atomic
checkpoints, bitwise resume); what changes is the dense module (``TwoTower``), the data split
(impressions) and the loss (pairwise logistic within impressions). The tables and the encoder start
from the pre-training run named by ``finetune.init``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trainer import checkpoint
from trainer.config import ConfigError, to_dict
from trainer.data.batch import Batch, sample_starts
from trainer.data.schema import relevance
from trainer.dist import together
from trainer.engine import Engine, dummy_batch
from trainer.job import JobConfig
from trainer.model.interaction import history_rows, lookup_interactions
from trainer.model.two_tower import pairs_of
from trainer.train import Trainer

if TYPE_CHECKING:
    from trainer.data.manifest import Manifest
    from trainer.summary_cache import SummaryCache

_KEY_BITS = 40  # (sample << 40) + seconds since the batch's first event: sortable per sample


def init_checkpoint(init: str, key: str = "finetune.init") -> Path:
    """The checkpoint directory ``init`` (``key``) names: a run directory (its best, else latest) or a checkpoint."""
    try:
        return checkpoint.resolve_checkpoint(init, prefer_best=True)
    except FileNotFoundError as e:
        raise ConfigError(f"{key}: {e}") from None


TRAINING_KEYS = (
    "lr",
    "eps",
    "optimizer",
    "extra_constraints",
    "sharding",
    "dropout",
    "activation_checkpointing",
    "attention",
    "oov",
    "backend",
    "cold_start_mask_rate",  # pre-training only: fine-tuning swaps no ID rows
    "windows",  # pre-training only: how long samples are cut, not the weights
)
"""Keys of ``model`` and ``embeddings`` that fine-tuning may change: how the model is trained or sharded."""


def model_difference(pre: JobConfig, cfg: JobConfig) -> tuple[str, Any, Any] | None:
    """The first ``model``/``embeddings`` key (besides :data:`TRAINING_KEYS`) whose value in ``cfg`` differs from the
    pre-training config ``pre``: (key, cfg's value, pre's value), or None."""
    for section in ("model", "embeddings"):
        want, got = to_dict(getattr(pre, section)), to_dict(getattr(cfg, section))
        for key in sorted(want):
            if key not in TRAINING_KEYS and want[key] != got.get(key):
                return f"{section}.{key}", got.get(key), want[key]
    return None


def check_against_init(cfg: JobConfig, key: str = "finetune.init") -> Path:
    """The run must have the shapes of the pre-trained model it starts from (``finetune.init``, or
    ``train.init_from`` for pre-training); returns that checkpoint.

    Cheap (reads one YAML): runs before any process group exists."""
    path = init_checkpoint(cfg.finetune.init if key == "finetune.init" else cfg.train.init_from, key)
    saved = checkpoint.saved_job(path)
    if saved.finetune.enabled:
        raise ConfigError(f"{key}: {path} is itself a fine-tuning checkpoint; start from pre-training")
    if key == "train.init_from":  # starting from a summariser trained with the reconstruction loss, without it
        weight = cfg.model.summary.reconstruction_weight
        summary = dataclasses.replace(saved.model.summary, reconstruction_weight=weight)
        saved = dataclasses.replace(saved, model=dataclasses.replace(saved.model, summary=summary))
    diff = model_difference(saved, cfg)
    if diff is not None:
        key, got, want = diff
        raise ConfigError(f"{key}: {got!r} differs from the pre-trained model's {want!r} ({path / 'config.yaml'})")
    return path


@dataclass
class FinetuneStep:
    loss: float
    pairs: int
    correct: float  # correctly ordered pairs (ties count half)
    impressions: int
    no_history: int  # impressions with no interaction before request time - lag (skipped)
    interactions: int


def impression_inputs(batch: Batch, lag: int) -> dict[str, torch.Tensor]:
    """Per batch: which history row each impression's user state comes after, and the pairs.

    An impression at time t uses the sample's interactions with timestamp < t - lag: the encoder is
    causal, so the state after the last of them cannot depend on anything later.
    """
    imp = batch.impressions
    assert imp is not None, "an impression split is needed"
    lengths = batch.lengths.long()
    starts = sample_starts(lengths)
    ts = batch.values["timestamp"].long()
    base = int(ts.min()) if ts.numel() else 0
    row_sample = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    keys = (row_sample << _KEY_BITS) + (ts - base)
    b = imp["sample"]
    cutoff = (imp["time"] - lag - base).clamp_min(0)
    count = torch.searchsorted(keys, (b << _KEY_BITS) + cutoff, right=False) - starts[b]
    keep = count > 0
    sizes = imp["size"]
    shown_imp = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    shown_keep = keep[shown_imp]
    kept_imps = torch.nonzero(keep, as_tuple=True)[0]
    remap = torch.full((sizes.numel(),), -1, dtype=torch.long)
    remap[kept_imps] = torch.arange(kept_imps.numel())
    grades = torch.from_numpy(relevance(imp["event"].numpy(), imp["played"].numpy())).long()[shown_keep]
    hi, lo = pairs_of(grades, sizes[keep])
    return {
        "last": (starts[b] + count - 1)[keep],
        "shown_item": imp["item"][shown_keep],
        "shown_imp": remap[shown_imp[shown_keep]],
        "pair_hi": hi,
        "pair_lo": lo,
        "grades": grades,
        "score": imp["score"][shown_keep],
        "no_history": (~keep).sum(),
        "impressions": keep.sum(),
        "kept": kept_imps,
    }


def impression_windows(batch: Batch, last: torch.Tensor, window: int) -> tuple[Batch, torch.Tensor]:
    """``data.summary_cache``: each impression's user state is read from its own window, the at most ``window`` history
    rows up to flat row ``last[k]``, after the cached summary of what is older. Returns those windows as a jagged
    batch (one sample per impression, its offset the window's first row in the user's history) and each window's
    last flat row."""
    lengths = batch.lengths.long()
    starts = sample_starts(lengths)
    owner = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)[last]  # each impression's sample
    first = torch.maximum(last - window + 1, starts[owner])
    n = last - first + 1
    rows = torch.repeat_interleave(first, n) + torch.arange(int(n.sum())) - torch.repeat_interleave(sample_starts(n), n)
    windows = Batch(
        keys=[batch.keys[i] for i in owner.tolist()],
        users=batch.users[owner],
        offsets=batch.offsets[owner] + first - starts[owner],
        lengths=n,
        target_start=torch.zeros_like(n),
        values={k: v[rows] for k, v in batch.values.items()},
        padded=False,
    )
    return windows, torch.cumsum(n, 0) - 1


class FinetuneEngine(Engine):
    def init_weights(self, dense: torch.nn.Module) -> None:
        """The pre-trained tables (resharded by DCP for this world size and plan) and encoder; the item
        tower's MLP keeps its fresh init."""
        checkpoint.load_weights(init_checkpoint(self.cfg.finetune.init), self.tables, dense.argus)

    def finetune_step(self, batch: Batch, step: int) -> FinetuneStep:
        real = batch.size > 0 and batch.impressions is not None
        if not real:  # an empty padding batch: still run every collective
            batch = dummy_batch()
            shown = torch.zeros(1, dtype=torch.long)
            inp = {
                "last": torch.ones(1, dtype=torch.long),
                "shown_imp": torch.zeros(1, dtype=torch.long),
                "pair_hi": torch.zeros(0, dtype=torch.long),
                "pair_lo": torch.zeros(0, dtype=torch.long),
            }
        else:
            inp = impression_inputs(batch, self.cfg.finetune.lag_seconds)
            shown = torch.remainder(inp["shown_item"], self.item_rows)
            if shown.numel() == 0:  # every impression lacked history: look up one item to keep collectives
                shown = torch.zeros(1, dtype=torch.long)
                inp.update(last=torch.zeros(1, dtype=torch.long), shown_imp=torch.zeros(1, dtype=torch.long))
        interactions = batch.num_interactions
        prefix = None
        if self.summary_cache is not None:  # every impression's window after its cached summary
            if real and "shown_item" in inp and inp["shown_item"].numel():
                batch, inp["last"] = impression_windows(batch, inp["last"], self.cfg.window())
            else:  # nothing to score: the stand-in's rows (as long as a window at most) keep the collectives
                batch = dummy_batch()
            prefix = self.cached_summaries(batch).to(self.info.device)
        item, side, shown_emb = self.lookup(batch, shown)
        dev = self.info.device
        rows, cols, shape = batch.grid()
        pack = None if rows is None else (rows.to(dev), cols.to(dev), shape)
        out = self.ds(
            item,
            side,
            batch.lengths.to(dev),
            inp["last"].to(dev),
            shown_emb,
            inp["shown_imp"].to(dev),
            inp["pair_hi"].to(dev),
            inp["pair_lo"].to(dev),
            history_rows(batch, self.item_rows, dev),
            shown.to(dev),
            pack,
            prefix,
        )
        loss = out["loss"] if real else out["loss"] * 0.0
        self.ds.backward(loss)
        self.sparse_step()
        self.ds.step()
        pairs, correct = 0, 0.0
        counts = real and self.lead  # a tp group's batch is counted once
        if counts and inp["pair_hi"].numel():
            pairs = int(inp["pair_hi"].numel())
            correct = pairs * pairwise_accuracy(
                out["scores"].cpu().numpy(), inp["pair_hi"].numpy(), inp["pair_lo"].numpy()
            )
        return FinetuneStep(
            loss=float(loss.detach()),
            pairs=pairs,
            correct=correct,
            impressions=int(inp["impressions"]) if counts else 0,
            no_history=int(inp["no_history"]) if counts else 0,
            interactions=interactions if counts else 0,
        )


class FinetuneTrainer(Trainer):
    engine_class = FinetuneEngine

    def step_fn(self, batch: Batch) -> Any:
        return self.engine.finetune_step(batch, self.step)

    def _metrics(self, window: list[Any], seconds: float, timer: Any) -> dict[str, float]:
        n = max(len(window), 1)
        sums = self.engine.all_reduce_sum(
            torch.tensor(
                [
                    sum(o.loss for o in window) / n,
                    sum(o.pairs for o in window),
                    sum(o.correct for o in window),
                    sum(o.impressions for o in window),
                    sum(o.no_history for o in window),
                    sum(o.interactions for o in window),
                ],
                dtype=torch.float64,
            )
        ).tolist()
        world = self.info.world_size
        seconds = max(seconds, 1e-9)
        from trainer.logger import peak_memory_bytes

        return {
            "loss/pairwise": sums[0] / world,
            "pairwise_acc/train": sums[2] / max(sums[1], 1.0),
            "impressions": sums[3],
            "impressions_no_history": sums[4],
            "impressions_per_s": sums[3] / seconds,
            "interactions_per_s": sums[5] / seconds,
            "memory/peak_gb": peak_memory_bytes(self.info.device) / 2**30,
            "lr": self.engine.lr(),
            **timer.summary(len(window)),
        }


# ---- evaluation ----------------------------------------------------------------------------------------------
def pairwise_accuracy(scores: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> float:
    d = scores[hi] - scores[lo]
    return float(((d > 0).sum() + 0.5 * (d == 0).sum()) / max(d.size, 1))


def ndcg_within(scores: np.ndarray, grades: np.ndarray, sizes: np.ndarray) -> float:
    """Mean NDCG over impressions with at least one relevant (grade > 0) item; gain 2^grade - 1."""
    out, start = [], 0
    for size in sizes.tolist():
        s, g = scores[start : start + size], grades[start : start + size].astype(np.float64)
        start += size
        if g.max() <= 0:
            continue
        disc = 1.0 / np.log2(np.arange(2, size + 2))
        dcg = ((2 ** g[np.argsort(-s, kind="stable")] - 1) * disc).sum()
        idcg = ((2 ** np.sort(g)[::-1] - 1) * disc).sum()
        out.append(dcg / idcg)
    return float(np.mean(out)) if out else float("nan")


def evaluate_finetune(
    run_dir: str | Path, data_dir: str | Path, split: str | None = None, device: str = "auto"
) -> dict[str, Any]:
    """Pairwise accuracy, its uplift over a baseline, and NDCG within impressions, on any number of ranks.

    Baselines: the data's own score (``imp_score``, the production ranker's) where present, and
    popularity (training-split counts) always; the pre-trained model before fine-tuning too.

    Collective, as :func:`trainer.evaluate.evaluate`: every rank of the process group calls it (a process group is
    started for the call when there is none). Both models' item tables are sharded over the ranks
    (:func:`checkpoint.load_model_sharded`), the split's users are divided over the ranks by the loader, and every
    rank returns the same report, whatever the number of ranks (:func:`score_impressions`).
    """
    from trainer.data.manifest import Manifest
    from trainer.dist import process_group

    path = checkpoint.resolve_checkpoint(run_dir)
    manifest = Manifest.load(data_dir)
    cfg = checkpoint.saved_job(path)
    if not cfg.finetune.enabled:
        raise ValueError(f"{run_dir}: not a fine-tuning run (finetune.init is empty); use `argus eval`")
    init = init_checkpoint(cfg.finetune.init)
    split = split or cfg.finetune.eval_split
    manifest.split(split)  # an unknown split: one line now, before any process group
    cache = None
    if cfg.data.summary_cache:  # the run read cached summaries: so is it scored (and the pre-trained model with it)
        from trainer.summary_cache import SummaryCache

        cache = SummaryCache.load(cfg.data.summary_cache, cfg, "train", samples=manifest.split("train").samples)
    with process_group(device, cfg.train.timeout_s) as info:  # a caller's group is kept
        model = checkpoint.load_model_sharded(path, manifest, info.device, info.world_size)
        pretrained = checkpoint.load_model_sharded(init, manifest, info.device, info.world_size)
        return score_impressions(
            model, pretrained, data_dir, manifest, split, info.rank, info.world_size, info.device, cache
        )


@torch.no_grad()
def score_impressions(
    model: checkpoint.ShardedModel,
    pretrained: checkpoint.ShardedModel,
    data_dir: str | Path,
    manifest: Manifest,
    split: str,
    rank: int,
    world: int,
    device: torch.device,
    cache: SummaryCache | None = None,
) -> dict[str, Any]:
    """Collective: the report of :func:`evaluate_finetune`, the same on every rank. ``cache``: the run's
    ``data.summary_cache``: each impression's state from its window after the cached summary, for both models.

    Each rank scores the impressions of its exactly-once part of the split's users under both models and the
    baselines; every shown item's scores and grade, every impression's size and key and every pair are then
    gathered to every rank, and the metrics are computed over all impressions in (user id, request time,
    position) order, so that they do not depend on the number of ranks."""
    import torch.distributed as dist

    from trainer import ranking
    from trainer.data.loader import ShardLoader

    t_start = time.perf_counter()
    cfg = model.cfg
    lag = cfg.finetune.lag_seconds
    loader = ShardLoader.Config(
        path=str(data_dir),
        split=split,
        batch_size=cfg.eval.batch_size,
        num_workers=0,
        shuffle=False,
        max_seq_len=cfg.interactions_per_sample(),
    ).build(rank, world, manifest)
    counts = np.asarray(manifest.item_counts("train"), np.float64)
    names = ("model", "pretrained", "popularity", "data")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in (*names, "grade", "uid", "time", "pos", "size", "hi", "lo")}
    no_history, impressions, n_shown = 0, 0, 0
    stale = [0, 0]  # with a cache: impressions whose summary left older interactions out, and how many
    for batch in loader:  # the same number of batches on every rank (padding batches are empty)
        inp = None
        if batch.size > 0 and batch.impressions is not None:
            inp = impression_inputs(batch, lag)
            no_history += int(inp["no_history"])
            impressions += int(inp["impressions"])
        if inp is None or inp["shown_item"].numel() == 0:
            for m in (model, pretrained):  # collective under DMP: one lookup per table per batch on every rank
                lookup_interactions(m.tables, dummy_batch(), cfg, m.item_rows, torch.zeros(0, dtype=torch.long), device)
            continue
        if cfg.data.batch_tokens:  # a run trained on packed rows is scored on packed rows too
            batch.pack(cfg.interactions_per_sample())
        shown = torch.remainder(inp["shown_item"], model.item_rows)
        parts["model"].append(_score(cfg, model, batch, inp, shown, device, cache, stale))
        parts["pretrained"].append(_score(cfg, pretrained, batch, inp, shown, device, cache))
        parts["popularity"].append(torch.from_numpy(np.log1p(counts[np.clip(shown.numpy(), 0, len(counts) - 1)])))
        parts["data"].append(inp["score"])
        parts["grade"].append(inp["grades"])
        # each kept impression's key: its user, request time and position among its sample's impressions
        imp, kept = batch.impressions, inp["kept"]
        assert imp is not None
        per_sample = torch.bincount(imp["sample"], minlength=batch.size)
        first = torch.cumsum(per_sample, 0) - per_sample
        parts["uid"].append(batch.users[imp["sample"][kept]])
        parts["time"].append(imp["time"][kept])
        parts["pos"].append(kept - first[imp["sample"][kept]])
        parts["size"].append(torch.bincount(inp["shown_imp"], minlength=int(inp["impressions"])))
        parts["hi"].append(inp["pair_hi"] + n_shown)
        parts["lo"].append(inp["pair_lo"] + n_shown)
        n_shown += int(shown.numel())

    # this rank's shown items follow those of the lower ranks: its pair indices move by as many
    offset = int(ranking.gather_rows(torch.tensor([n_shown]))[:rank].sum())
    floats = {"popularity": torch.float64, "model": torch.float32, "pretrained": torch.float32, "data": torch.float32}
    every = {}
    for key, got in parts.items():
        mine = torch.cat(got) if got else torch.zeros(0, dtype=floats.get(key, torch.long))
        every[key] = ranking.gather_rows(mine + offset if key in ("hi", "lo") else mine).numpy()
    totals = torch.tensor([no_history, impressions, *stale], dtype=torch.long, device=ranking.collective_device())
    if dist.is_initialized() and world > 1:
        dist.all_reduce(totals)
    if every["grade"].size == 0:
        raise ValueError(f"{data_dir}: split {split!r} has no impression with history before request time - lag")
    # the same order on any number of ranks: impressions by (user, request time, position), shown items within
    # each impression as they were shown; NDCG's mean then sums in the same order
    sizes = every["size"]
    order = np.lexsort((every["pos"], every["time"], every["uid"]))
    starts = np.cumsum(sizes) - sizes
    sz = sizes[order]
    shown_order = np.repeat(starts[order] - (np.cumsum(sz) - sz), sz) + np.arange(int(sz.sum()))
    new_index = np.empty_like(shown_order)
    new_index[shown_order] = np.arange(shown_order.size)
    hi, lo = new_index[every["hi"]], new_index[every["lo"]]
    pair_order = np.lexsort((lo, hi))
    hi, lo, g = hi[pair_order], lo[pair_order], every["grade"][shown_order]
    flat = {name: every[name][shown_order] for name in names}
    if np.isnan(flat["data"]).all():
        del flat["data"]
    else:
        flat["data"] = np.nan_to_num(flat["data"], nan=-np.inf)
    seconds, peaks = ranking.cost_over_ranks(t_start, device, world)
    report: dict[str, Any] = {
        "split": split,
        "impressions": int(totals[1]),
        "impressions_no_history": int(totals[0]),
        "shown": int(g.size),
        "pairs": int(hi.size),
        "lag_seconds": lag,
        "seconds": round(seconds, 3),
    }
    if cache is not None:
        report["summary_cache"] = {"path": str(cache.root), "stale_impressions": int(totals[2]),
                                   "interactions_left_out": int(totals[3])}  # fmt: skip
    for name, s in flat.items():
        report[name] = {"pairwise_acc": pairwise_accuracy(s, hi, lo), "ndcg": ndcg_within(s, g, sz)}
    for base in [b for b in ("data", "popularity", "pretrained") if b in report]:
        pa, pb = report["model"]["pairwise_acc"], report[base]["pairwise_acc"]
        report["model"][f"pau_vs_{base}"] = pa - pb  # pairwise accuracy uplift, absolute
    report["cost"] = {
        "ranks": world,
        "seconds": round(seconds, 3),
        "impressions_per_s": round(report["impressions"] / max(seconds, 1e-9), 1),
        "peak_memory_gib": [round(x, 3) for x in peaks],
    }
    return report


def _score(
    cfg: JobConfig,
    model: checkpoint.ShardedModel,
    batch: Batch,
    inp: dict[str, torch.Tensor],
    shown: torch.Tensor,
    device: torch.device,
    cache: SummaryCache | None = None,
    stale: list[int] | None = None,
) -> torch.Tensor:
    """Collective under DMP: scores of the shown items, the served user and item vectors' dot product (a
    pre-trained ArgusModel scores the way its next-item head does). ``cfg``: the fine-tuning run's, which reads
    the batch (its packing, side features) for both models; the model's own config sets how it scores.
    ``cache``: each impression's state from its window after its cached summary (``stale`` is added to)."""
    from trainer.export import History, served_vectors

    prefix = None
    if cache is not None:
        batch, last = impression_windows(batch, inp["last"], cfg.window())
        inp = {**inp, "last": last}
        # every rank agrees: a summary newer than an impression's window stops them all
        tokens, _ = together(lambda: cache.for_batch(batch, strict=False, stale=stale), device)
        prefix = torch.from_numpy(tokens).to(device)
    item, side, shown_emb = lookup_interactions(model.tables, batch, cfg, model.item_rows, shown, device)
    rows, cols, shape = batch.grid()
    grid = (rows, cols, shape) if rows is None else (rows.to(device), cols.to(device), shape)
    ids = history_rows(batch, model.item_rows, device)
    hist = History(item, side, batch.lengths.to(device), inp["last"].to(device), grid, ids)
    users, items = served_vectors(model.cfg, model.dense, hist, shown_emb, shown.to(device), prefix)
    assert users is not None and items is not None
    return (users[inp["shown_imp"].to(device)] * items).sum(-1).float().cpu()
