"""`argus finetune`: the pre-trained encoder as a two-tower ranker, trained on impressions.

Same machinery as pre-training (TorchRec tables, DeepSpeed ZeRO, the exactly-once loader, atomic
checkpoints, bitwise resume); what changes is the dense module (``TwoTower``), the data split
(impressions) and the loss (pairwise logistic within impressions). The tables and the encoder start
from the pre-training run named by ``finetune.init``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import checkpoint
from trainer.config import ConfigError, to_dict
from trainer.data.batch import Batch, sample_starts
from trainer.data.schema import relevance
from trainer.engine import Engine, dummy_batch
from trainer.job import JobConfig
from trainer.model.interaction import lookup_interactions
from trainer.model.two_tower import pairs_of
from trainer.train import Trainer

_KEY_BITS = 40  # (sample << 40) + seconds since the batch's first event: sortable per sample


def init_checkpoint(init: str) -> Path:
    """The checkpoint directory ``finetune.init`` names: a run directory (its best, else latest) or a checkpoint."""
    try:
        return checkpoint.resolve_checkpoint(init, prefer_best=True)
    except FileNotFoundError as e:
        raise ConfigError(f"finetune.init: {e}") from None


def check_against_init(cfg: JobConfig) -> Path:
    """The fine-tuning run must have the pre-trained model's shapes; returns the init checkpoint.

    Cheap (reads one YAML): runs before any process group exists."""
    path = init_checkpoint(cfg.finetune.init)
    saved = checkpoint.saved_job(path)
    if saved.finetune.enabled:
        raise ConfigError(f"finetune.init: {path} is itself a fine-tuning checkpoint; start from pre-training")
    for section in ("model", "embeddings"):
        want, got = to_dict(getattr(saved, section)), to_dict(getattr(cfg, section))
        for key in sorted(want):
            if key in (
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
            ):
                continue  # how it is trained or sharded may change; what it is may not
            if want[key] != got.get(key):
                raise ConfigError(
                    f"{section}.{key}: {got.get(key)!r} differs from the pre-trained model's "
                    f"{want[key]!r} ({path / 'config.yaml'})"
                )
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
            pack,
        )
        loss = out["loss"] if real else out["loss"] * 0.0
        self.ds.backward(loss)
        self.sparse_step()
        self.ds.step()
        pairs, correct = 0, 0.0
        if real and inp["pair_hi"].numel():
            pairs = int(inp["pair_hi"].numel())
            correct = pairs * pairwise_accuracy(
                out["scores"].cpu().numpy(), inp["pair_hi"].numpy(), inp["pair_lo"].numpy()
            )
        return FinetuneStep(
            loss=float(loss.detach()),
            pairs=pairs,
            correct=correct,
            impressions=int(inp["impressions"]) if real else 0,
            no_history=int(inp["no_history"]) if real else 0,
            interactions=batch.num_interactions if real else 0,
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


@torch.no_grad()
def evaluate_finetune(run_dir: str | Path, data_dir: str | Path, split: str | None = None) -> dict[str, Any]:
    """Pairwise accuracy, its uplift over a baseline, and NDCG within impressions, on one process.

    Baselines: the data's own score (``imp_score``, the production ranker's) where present, and
    popularity (training-split counts) always; the pre-trained model before fine-tuning too.
    """
    from trainer.data.loader import ShardLoader
    from trainer.data.manifest import Manifest

    manifest = Manifest.load(data_dir)
    cfg, sparse, dense = checkpoint.load_model(run_dir, manifest.num_items)
    if not cfg.finetune.enabled:
        raise ValueError(f"{run_dir}: not a fine-tuning run (finetune.init is empty); use `argus eval`")
    _, init_sparse, init_dense = checkpoint.load_model(init_checkpoint(cfg.finetune.init), manifest.num_items)
    split = split or cfg.finetune.eval_split
    loader = ShardLoader.Config(
        path=str(data_dir),
        split=split,
        batch_size=cfg.eval.batch_size,
        num_workers=0,
        shuffle=False,
        max_seq_len=cfg.interactions_per_sample(),
    ).build(0, 1, manifest)
    counts = np.asarray(manifest.item_counts("train"), np.float64)
    scores: dict[str, list[np.ndarray]] = {"model": [], "pretrained": [], "popularity": [], "data": []}
    grades, sizes, his, los = [], [], [], []
    offset, no_history, impressions = 0, 0, 0
    t0 = time.perf_counter()
    for batch in loader:
        if batch.size == 0:
            continue
        inp = impression_inputs(batch, cfg.finetune.lag_seconds)
        no_history += int(inp["no_history"])
        impressions += int(inp["impressions"])
        if inp["shown_item"].numel() == 0:
            continue
        shown = torch.remainder(inp["shown_item"], sparse.item_rows)
        for name, (sp, model) in {"model": (sparse, dense), "pretrained": (init_sparse, init_dense)}.items():
            scores[name].append(_score(cfg, sp, model, batch, inp, shown).numpy())
        scores["popularity"].append(np.log1p(counts[np.clip(shown.numpy(), 0, len(counts) - 1)]))
        scores["data"].append(inp["score"].numpy())
        grades.append(inp["grades"].numpy())
        sizes.append(torch.bincount(inp["shown_imp"], minlength=int(inp["impressions"])).numpy())
        his.append(inp["pair_hi"].numpy() + offset)
        los.append(inp["pair_lo"].numpy() + offset)
        offset += shown.numel()
    if not grades:
        raise ValueError(f"{data_dir}: split {split!r} has no impression with history before request time - lag")
    g, sz, hi, lo = np.concatenate(grades), np.concatenate(sizes), np.concatenate(his), np.concatenate(los)
    flat = {k: np.concatenate(v) for k, v in scores.items()}
    if np.isnan(flat["data"]).all():
        del flat["data"]
    else:
        flat["data"] = np.nan_to_num(flat["data"], nan=-np.inf)
    report: dict[str, Any] = {
        "split": split,
        "impressions": impressions,
        "impressions_no_history": no_history,
        "shown": int(g.size),
        "pairs": int(hi.size),
        "lag_seconds": cfg.finetune.lag_seconds,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    for name, s in flat.items():
        report[name] = {"pairwise_acc": pairwise_accuracy(s, hi, lo), "ndcg": ndcg_within(s, g, sz)}
    for base in [b for b in ("data", "popularity", "pretrained") if b in report]:
        pa, pb = report["model"]["pairwise_acc"], report[base]["pairwise_acc"]
        report["model"][f"pau_vs_{base}"] = pa - pb  # pairwise accuracy uplift, absolute
    return report


def _score(
    cfg: JobConfig, sparse: Any, model: Any, batch: Batch, inp: dict[str, torch.Tensor], shown: torch.Tensor
) -> torch.Tensor:
    """Scores of the shown items by an unsharded model: the served user and item vectors' dot product
    (a pre-trained ArgusModel scores the way its next-item head does)."""
    from trainer.export import History, served_vectors

    if cfg.data.batch_tokens:  # a run trained on packed rows is scored on packed rows too
        batch.pack(cfg.interactions_per_sample())
    item, side, shown_emb = lookup_interactions(sparse, batch, cfg, sparse.item_rows, shown, torch.device("cpu"))
    hist = History(item, side, batch.lengths, inp["last"], batch.grid())
    users, items = served_vectors(cfg, model, hist, shown_emb)
    return (users[inp["shown_imp"]] * items).sum(-1)
