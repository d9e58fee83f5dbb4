"""A reference SASRec: the yardstick for argus's quality claims (issue #11).

    python bench/reference_sasrec.py DATA [--epochs 200] [--patience 3] [--max-len 200] [--out DIR]
        [--report FILE] [--json]

Plain PyTorch, one process, written independently of ``trainer/model/`` and ``embeddings/``: the
blocks of Kang & McAuley (2018) -- learned positions, causal self-attention blocks with dropout and
LayerNorm, item embeddings shared between input and output -- trained the "SASRec+" way, with a
full-softmax cross-entropy over the whole catalog at every position (not BCE with one sampled
negative), which is the strong version of the baseline.

What it shares with argus is only what makes the numbers comparable: the same shards through the same
loader (``ShardLoader``, most recent ``max_len`` interactions per sample) and the same ranking code
(``trainer.evaluate.rank_split``: same split, same sample length, same targets, same tie rule, same
popularity baseline).

Model selection: ``val`` NDCG@10 after every ``eval_every_epochs`` epochs, the best state kept (in
memory, and as ``OUT/best.pt`` with ``--out``), early stop after ``patience`` evaluations without
improvement; ``test`` is scored once, with the best state. The report carries absolute times
(``train_start_time``, ``best_time``) so an outer harness can compute wall time to the selected
checkpoint.

Importable without side effects: ``from bench.reference_sasrec import run_reference`` (repo root on
``sys.path``) or ``from reference_sasrec import run_reference`` (``bench/`` on ``sys.path``).
"""

from __future__ import annotations

import os
import time

PROCESS_START = time.time()  # first thing: as close to the process start as a module can see
if __name__ == "__main__":
    # OpenMP threads that spin while they wait make torch up to 20x slower on a shared, busy machine (measured:
    # 2 threads on 2 loaded cores). Read once, when torch loads its OpenMP runtime, so only a script can set it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from trainer.data.batch import Batch, sample_starts  # noqa: E402
from trainer.data.loader import ShardLoader  # noqa: E402
from trainer.data.manifest import Manifest  # noqa: E402
from trainer.evaluate import EvalTargets, SplitRanking, eval_loader, rank_split  # noqa: E402

PAD = 0  # input id of padding; item i is input id i + 1


@dataclass
class RefConfig:
    """Every option of a run (the report's ``config``)."""

    hidden: int = 64
    blocks: int = 2
    heads: int = 2
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 256
    max_len: int = 200  # interactions per sample (training and evaluation): the most recent ones are kept
    epochs: int = 200  # cap; early stopping normally ends the run first
    eval_every_epochs: int = 1
    patience: int = 3  # evaluations without improvement before stopping (0 = never stop early)
    # No early stop before this many epochs: with few steps per epoch (small data, big batches) val can dip
    # while the model moves past popularity, and patience alone then stops below the popularity baseline.
    min_epochs: int = 0
    max_seconds: float = 0  # stop after the first evaluation past this many seconds of training (0 = no cap)
    select: str = "ndcg@10"  # the val metric that picks the best state
    ks: list[int] = field(default_factory=lambda: [10, 100])
    eval_batch_size: int = 256
    val_max_users: int = 0  # score only the first N val users (0 = all); test always scores all
    seed: int = 0
    threads: int = 2
    out: str = ""  # directory for best.pt ("" = keep the best state in memory only)

    def validate(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        for name in ("hidden", "blocks", "heads", "batch_size", "max_len", "epochs", "eval_every_epochs", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_len < 2:
            raise ValueError("max_len must be >= 2 (a sample needs an input and a next item)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.select.split("@")[0] not in ("hr", "ndcg", "recall") or int(self.select.split("@")[1]) not in self.ks:
            raise ValueError(f"select {self.select!r} must be hr|ndcg|recall@K with K in ks {self.ks}")


# ---- the model -------------------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).split(d, dim=2))
        # is_causal: position t reads positions <= t only, so the state before a target never sees it.
        # Padding is on the right (after every real position), so the causal mask also keeps it out.
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """g(x) = x + Dropout(g(LayerNorm(x))) for g = self-attention, then the point-wise FFN (the paper's 3.2-3.3)."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, dropout)
        # SASRec's FFN keeps the width d (no 4x expansion) and uses ReLU.
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRec(nn.Module):
    def __init__(
        self, num_items: int, max_len: int, d: int = 64, blocks: int = 2, heads: int = 2, dropout: float = 0.2
    ):
        super().__init__()
        self.num_items, self.max_len, self.d = num_items, max_len, d
        self.items = nn.Embedding(num_items + 1, d, padding_idx=PAD)  # row 0 = padding, never scored
        self.pos = nn.Embedding(max_len, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, heads, dropout) for _ in range(blocks))
        self.ln = nn.LayerNorm(d)
        # Xavier-normal matrices, as the common PyTorch port of the paper's code does; zero biases.
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        with torch.no_grad():
            self.items.weight[PAD].zero_()

    def forward(self, ids: Tensor) -> Tensor:
        """(B, T) input ids, right-padded with PAD -> (B, T, d) states; state t has read ids[:, : t + 1]."""
        t = ids.shape[1]
        if t > self.max_len:
            raise ValueError(f"{t} positions, the model has {self.max_len}")
        # sqrt(d) scaling (paper's code) keeps item identity larger than the position signal at init.
        x = self.items(ids) * math.sqrt(self.d) + self.pos(torch.arange(t, device=ids.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.ln(x)

    def scores(self, h: Tensor) -> Tensor:
        """(..., d) states -> (..., num_items) logits: dot products with the shared item embeddings."""
        return h @ self.items.weight[1:].T


# ---- batches ---------------------------------------------------------------------------------------------------
def padded_ids(items: Tensor, lengths: Tensor) -> Tensor:
    """Jagged item ids (flat, ``lengths`` per sample) -> (B, T) input ids, right-padded with PAD (T >= 1)."""
    t = max(int(lengths.max()) if lengths.numel() else 0, 1)
    mask = torch.arange(t)[None, :] < lengths[:, None]  # row-major order of mask == the flat order
    out = torch.full((lengths.numel(), t), PAD, dtype=torch.long)
    out[mask] = items + 1
    return out


def context_ids(batch: Batch) -> tuple[Tensor, Tensor]:
    """Each sample's interactions before ``target_start`` only, as (B, T) input ids, and those lengths.

    The model is causal anyway; cutting the targets off here too means an evaluation can never read them.
    """
    lengths, keep = batch.lengths, batch.target_start.clamp(min=0)
    pos = torch.arange(int(lengths.sum())) - torch.repeat_interleave(sample_starts(lengths), lengths)
    before = pos < torch.repeat_interleave(keep, lengths)
    return padded_ids(batch.values["item"][before], keep), keep


def make_scores_fn(model: SASRec) -> Callable[[Batch, EvalTargets], Tensor]:
    """``rank_split``'s scorer: (B, num_items) scores from each sample's state after its last context interaction."""

    def scores_fn(batch: Batch, targets: EvalTargets | None = None, last: Tensor | None = None) -> Tensor:
        ids, n = context_ids(batch)
        h = model(ids)  # (B, T, d)
        if last is None:  # target_start - 1; samples without context (n == 0) are ignored by rank_split
            last = n - 1
        return model.scores(h[torch.arange(batch.size), last.clamp(min=0)])  # rank_split ignores last < 0

    return scores_fn


def train_loss(model: SASRec, batch: Batch) -> tuple[Tensor, int]:
    """Mean full-softmax cross-entropy of the next item at every position that has one, and that count."""
    ids = padded_ids(batch.values["item"], batch.lengths)
    h = model(ids)
    has_next = torch.arange(ids.shape[1] - 1)[None, :] < (batch.lengths - 1)[:, None]
    logits = model.scores(h[:, :-1][has_next])  # (P, num_items): the whole catalog is every position's softmax
    return F.cross_entropy(logits, ids[:, 1:][has_next] - 1), int(has_next.sum())


# ---- evaluation and training -----------------------------------------------------------------------------------
@torch.inference_mode()
def evaluate(
    model: SASRec,
    data_dir: str | Path,
    manifest: Manifest,
    split: str,
    cfg: RefConfig,
    max_users: int = 0,
    state_before: float | None = None,
    items: str = "all",
) -> SplitRanking:
    """``rank_split`` on ``split`` (full ranking, training item counts for the popularity baseline); ``state_before``
    and ``items``: ``argus eval``'s ``--delay`` (as the time states are taken at) and ``--items``."""
    was_training = model.training
    model.eval()
    try:
        loader = eval_loader(data_dir, manifest, split, cfg.eval_batch_size, cfg.max_len)
        counts = np.array(manifest.item_counts("train"))  # a writable copy of the memory map, for torch
        return rank_split(loader, make_scores_fn(model), counts, cfg.ks, full=True, seed=0, max_users=max_users,
                          state_before=state_before, items=items)  # fmt: skip
    finally:
        model.train(was_training)


def _ranking(r: SplitRanking) -> dict[str, Any]:
    lift = {k: (v / r.popularity[k] if r.popularity.get(k) else None) for k, v in r.model.items() if "@" in k}
    return {
        "users": r.users,
        "users_without_history": r.users_without_history,
        "model": r.model,
        "popularity": r.popularity,
        "lift": lift,
    }


def run_reference(data_dir: str | Path, log: Callable[[str], None] | None = None, **options: Any) -> dict[str, Any]:
    """Train and select a reference SASRec on ``data_dir``; returns the report (see the module docstring).

    ``options`` are :class:`RefConfig` fields. ``log`` receives one progress line per evaluation. Seeds
    torch's global RNG; sets torch's thread count for the run and restores it after.
    """
    unknown = set(options) - {f.name for f in dataclasses.fields(RefConfig)}
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}; see RefConfig")
    cfg = RefConfig(**options)
    cfg.validate()
    say = log or (lambda _msg: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(Path(data_dir), cfg, say)
    finally:
        torch.set_num_threads(threads)


def _run(data_dir: Path, cfg: RefConfig, say: Callable[[str], None]) -> dict[str, Any]:
    manifest = Manifest.load(data_dir)
    if "val" not in manifest.splits:
        raise ValueError(f"{data_dir} has no val split (splits: {sorted(manifest.splits)}): nothing to select on")
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    model = SASRec(manifest.num_items, cfg.max_len, cfg.hidden, cfg.blocks, cfg.heads, cfg.dropout)
    # betas (0.9, 0.98) as in the paper's code.
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
    loader = ShardLoader.Config(
        path=str(data_dir),
        split="train",
        batch_size=cfg.batch_size,
        num_workers=0,
        shuffle=True,
        max_seq_len=cfg.max_len,
        seed=cfg.seed,
    ).build(0, 1, manifest)
    out = Path(cfg.out) if cfg.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)

    history: list[dict[str, Any]] = []
    losses: list[float] = []  # mean training loss of every epoch
    best: dict[str, Any] = {"value": -math.inf, "epoch": None, "step": 0, "val": None, "time": None, "state": None}
    step, stale, capped = 0, 0, False
    val_popularity: dict[str, float] = {}
    model.train()
    for epoch in range(cfg.epochs):
        total, positions = 0.0, 0
        for batch in loader:  # one epoch: iterating the loader again continues with the next one
            if batch.size == 0:
                continue
            loss, n = train_loss(model, batch)
            if n == 0:
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            total, positions = total + loss.item() * n, positions + n
        losses.append(total / max(positions, 1))
        last_epoch = epoch + 1 == cfg.epochs
        if (epoch + 1) % cfg.eval_every_epochs and not last_epoch:
            continue
        ranking = evaluate(model, data_dir, manifest, "val", cfg, cfg.val_max_users)
        val, val_popularity = ranking.model, ranking.popularity
        value = val[cfg.select]
        improved = value > best["value"]  # strictly better; NaN (no val users) never is
        if improved:
            best.update(value=value, epoch=epoch, step=step, val=val, state=copy.deepcopy(model.state_dict()))
            if out:
                meta = {"config": dataclasses.asdict(cfg), "num_items": manifest.num_items, "epoch": epoch, "val": val}
                torch.save({"model": best["state"], "step": step, **meta}, out / "best.pt")
            best["time"] = time.time()  # after the write: the selected checkpoint exists from here on
            stale = 0
        else:
            stale += 1
        history.append(
            {
                "epoch": epoch,
                "step": step,
                "train_loss": losses[-1],
                "val": val,
                "improved": improved,
                "seconds": time.time() - t_start,
            }
        )
        say(
            f"epoch {epoch:3d}  step {step:6d}  loss {losses[-1]:.4f}  val hr@10 {val.get('hr@10', math.nan):.4f}  "
            f"ndcg@10 {val.get('ndcg@10', math.nan):.4f}{'  *' if improved else ''}  {history[-1]['seconds']:.1f}s"
        )
        if cfg.patience > 0 and stale >= cfg.patience and epoch + 1 >= cfg.min_epochs:
            break
        if cfg.max_seconds and time.time() - t_start > cfg.max_seconds:
            capped = True
            break

    if best["state"] is not None:
        model.load_state_dict(best["state"])
    test = evaluate(model, data_dir, manifest, "test", cfg) if "test" in manifest.splits else None
    t_end = time.time()
    notes = []
    if capped:
        notes.append(f"stopped by the time cap (--max-seconds {cfg.max_seconds:g}) after {len(losses)} epochs")
    if best["val"] and not best["val"][cfg.select] > val_popularity.get(cfg.select, math.inf):
        notes.append(
            f"the selected state is not better than popularity on val ({cfg.select} {best['val'][cfg.select]:.4f} vs "
            f"{val_popularity[cfg.select]:.4f}): train longer (--min-epochs, --patience) or with smaller batches"
        )
    return {
        "data": str(data_dir),
        "num_items": manifest.num_items,
        "config": dataclasses.asdict(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": len(losses),
        "steps": step,
        "train_loss": losses,
        "history": history,
        "best_epoch": best["epoch"],
        "best_step": best["step"],
        "best_val": best["val"],
        "val_popularity": val_popularity,
        "checkpoint": str(out / "best.pt") if out and best["state"] is not None else None,
        "test": _ranking(test) if test else None,
        "process_start_time": PROCESS_START,
        "train_start_time": t_start,
        "best_time": best["time"],
        "seconds_to_best": best["time"] - t_start if best["time"] else None,
        "total_seconds": t_end - t_start,
        "end_time": t_end,
        "notes": notes,
    }


# ---- command line ----------------------------------------------------------------------------------------------
def _print_table(report: dict[str, Any]) -> None:
    test = report["test"]
    lines = [
        f"best epoch {report['best_epoch']} (step {report['best_step']}) of {report['epochs']}; "
        f"{report['seconds_to_best']:.1f}s to best, {report['total_seconds']:.1f}s in all"
    ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain lines
        print(lines[0])
        print("\n".join(f"note: {note}" for note in report["notes"]))
        if test:
            for k, v in test["model"].items():
                if "@" in k:
                    print(f"test {k:12s} sasrec {v:.4f}  popularity {test['popularity'][k]:.4f}")
        return
    console = Console()
    console.print(lines[0])
    for note in report["notes"]:
        console.print(f"[yellow]note:[/] {note}")
    if test:
        table = Table(title=f"test ({test['users']} users)")
        for col in ("metric", "SASRec", "popularity", "lift"):
            table.add_column(col, justify="left" if col == "metric" else "right")
        for k, v in test["model"].items():
            if "@" in k:
                lift = test["lift"][k]
                table.add_row(k, f"{v:.4f}", f"{test['popularity'][k]:.4f}", f"{lift:.2f}x" if lift else "-")
        console.print(table)


def main(argv: list[str] | None = None) -> int:
    d = RefConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data", help="a dataset directory (argus data synth / convert) with train, val and test splits")
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--blocks", type=int, default=d.blocks)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-len", type=int, default=d.max_len, help="interactions per sample (most recent kept)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="cap on epochs")
    p.add_argument("--eval-every-epochs", type=int, default=d.eval_every_epochs)
    p.add_argument("--patience", type=int, default=d.patience, help="evaluations without improvement (0 = off)")
    p.add_argument("--min-epochs", type=int, default=d.min_epochs, help="no early stop before this many epochs")
    p.add_argument("--max-seconds", type=float, default=d.max_seconds, help="time cap on training (0 = none)")
    p.add_argument("--select", default=d.select, help="val metric that selects the best state")
    p.add_argument("--ks", default=",".join(map(str, d.ks)), help="cutoffs, comma-separated")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--val-max-users", type=int, default=d.val_max_users, help="0 = all")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="torch.set_num_threads")
    p.add_argument("--out", default="", help="directory for best.pt")
    p.add_argument("--report", default="", help="write the JSON report here")
    p.add_argument("--json", action="store_true", help="print the JSON report (progress goes to stderr)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    a = p.parse_args(argv)
    options = {k: v for k, v in vars(a).items() if k not in ("data", "report", "json", "quiet")}
    options["ks"] = [int(k) for k in a.ks.split(",") if k]
    log = None if a.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    report = run_reference(a.data, log=log, **options)
    text = json.dumps(report, indent=2)
    if a.report:
        Path(a.report).parent.mkdir(parents=True, exist_ok=True)
        Path(a.report).write_text(text + "\n")
    if a.json:
        print(text)
    else:
        _print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
