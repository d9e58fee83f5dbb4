"""Training heads: next-item retrieval (sampled softmax, logQ-corrected) and next-feedback prediction.

Both heads return unweighted losses; the caller multiplies by ``cfg.weight``
when it sums them, so logged per-head losses stay comparable across configs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.data.schema import NUM_PLAYED_BUCKETS, PLAYED_NA, EventType, played_bucket

EVENT_CLASSES = len(EventType)  # listen, like, dislike, unlike, undislike, skip
LOG_Q_FLOOR = 1e-12  # expected counts below this are clamped before the log
# `full_softmax: auto` scores the whole catalog when it has at most this many times the sampled candidates
# (uniform + in-batch): up to there a full-softmax step costs at most 1.5x a sampled one (measured on CPU, nano:
# 1.17x at 2x, 1.48x at 4x, 1.85x at 8x; bench/full_softmax_threshold.py, docs/benchmarks.md) and is exact
# (no sampling noise, no logQ).
FULL_SOFTMAX_MULTIPLE = 4


def score(h: Tensor, item_emb: Tensor, normalize: bool, temperature: float) -> Tensor:
    """(N, d) user states x (M, d) items -> (N, M) logits: (cosine if ``normalize`` else dot) / temperature."""
    if normalize:
        h, item_emb = F.normalize(h, dim=-1), F.normalize(item_emb, dim=-1)
    return (h @ item_emb.transpose(0, 1)) / temperature


def mixed_log_q(
    ids: Tensor,
    item_freq: Tensor | np.ndarray,
    num_in_batch: int,
    num_uniform: int,
    num_items: int,
    total: float | None = None,
) -> Tensor:
    """log of the expected count of each item of ``ids`` in a candidate set of ``num_in_batch`` draws
    proportional to ``item_freq`` plus ``num_uniform`` uniform draws over ``num_items`` items.

    ``item_freq``: a tensor, or a (memory-mapped) numpy array of which only the counts of ``ids`` are
    read, so a 10^9-item catalog costs no memory per rank; ``total``: its sum, when already known.
    """
    if isinstance(item_freq, Tensor):
        counts = item_freq.to(ids.device)[ids].to(torch.float64)  # index before widening: the table is large
    else:
        idx = np.clip(ids.detach().cpu().numpy(), 0, len(item_freq) - 1)
        counts = torch.from_numpy(np.asarray(item_freq[idx], np.float64)).to(ids.device)
    if total is None:
        total = float(
            item_freq.sum(dtype=torch.float64)
            if isinstance(item_freq, Tensor)
            else np.asarray(item_freq, np.float64).sum()
        )
    expected = num_in_batch * counts / max(total, 1e-300) + num_uniform / num_items
    return expected.clamp_min(LOG_Q_FLOOR).log().to(torch.float32)


class CandidateLogQ:
    """:func:`mixed_log_q` bound to the training item counts (a memory-mapped table) and the catalog size."""

    def __init__(self, counts: np.ndarray, rows: int) -> None:
        self.counts, self.rows = counts, rows
        self.total = float(np.asarray(counts, np.float64).sum()) or 1.0

    def __call__(self, ids: Tensor, k_in_batch: int, k_uniform: int) -> Tensor:
        return mixed_log_q(ids, self.counts, k_in_batch, k_uniform, self.rows, self.total)


@dataclass
class Utility:
    """r_i, the worth of interaction i as a multi-token-prediction target, by its feedback (docs/production.md).
    All 1 (the default) weighs every interaction alike, as next-item training does."""

    like: float = 1.0
    full: float = 1.0  # a listen of at least `full_at` percent, or with no played ratio
    partial: float = 1.0  # a listen of less
    skip: float = 1.0
    dislike: float = 1.0
    other: float = 1.0  # unlike, undislike
    full_at: int = 75  # played percent from which a listen is full
    CLASSES: ClassVar[tuple[str, ...]] = ("like", "full", "partial", "skip", "dislike", "other")

    def validate(self, where: str) -> None:
        for key in self.CLASSES:
            if getattr(self, key) < 0:
                raise ValueError(f"{where}.{key}: must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.full_at <= 100:
            raise ValueError(f"{where}.full_at: a percent in [0, 100], got {self.full_at}")

    @property
    def flat(self) -> bool:
        return all(getattr(self, k) == 1.0 for k in self.CLASSES)

    def __call__(self, event: Tensor, played: Tensor) -> Tensor:
        """(N,) event types and raw played percents (PLAYED_NA where none) -> (N,) float64 utilities."""
        event, played = event.to(torch.int64), played.to(torch.int64)
        r = torch.full(event.shape, self.other, dtype=torch.float64)
        listen = event == EventType.LISTEN
        full = (played >= self.full_at) | (played == PLAYED_NA)
        r[listen & full] = self.full
        r[listen & ~full] = self.partial
        r[event == EventType.LIKE] = self.like
        r[event == EventType.SKIP] = self.skip
        r[event == EventType.DISLIKE] = self.dislike
        return r


class NextItemHead:
    """Sampled softmax over shared candidates (in-batch positives + uniform draws), logQ-corrected.

    Holds no parameters: the loss is :func:`sampled_softmax_loss`. Candidates are
    drawn by ``trainer.engine.Engine.inputs`` (their vectors come from the sharded
    item table, their frequencies from a memory-mapped count table), with
    :class:`CandidateLogQ` computing :func:`mixed_log_q` for them.
    """

    @dataclass
    class Config:
        uniform_negatives: int = 256  # items sampled uniformly from the catalog (0 = none)
        in_batch_negatives: int = 256  # up to this many of the batch's positive items as shared candidates (0 = none)
        logq: bool = True  # subtract log(expected count of the candidate in the candidate set)
        correct_positive: bool = True  # also correct the positive's logit
        temperature: float = 0.05
        normalize: bool = True  # cosine (L2-normalised) vs raw dot product
        weight: float = 1.0
        # true: score against the whole catalog; false: sampled + logQ; auto: full when the catalog has at most
        # FULL_SOFTMAX_MULTIPLE x (uniform_negatives + in_batch_negatives) items
        full_softmax: bool | str = "auto"
        # Multi-token prediction (docs/production.md): each state predicts the next `horizon` interactions of its
        # history: interaction i, for the state after j - 1, weighted r_i * 2^(-(t_i - t_(j-1)) / half_life_s)
        # (r_i: `utility`; half_life_s 0 = no decay). horizon 1, flat utility, no decay: plain next-item training.
        horizon: int = 1
        half_life_s: float = 0.0
        utility: Utility = field(default_factory=Utility)

        def validate(self, where: str = "loss.next_item") -> None:
            def bad(key: str, msg: str) -> ValueError:
                return ValueError(f"{where}.{key}: {msg}")

            if self.uniform_negatives < 0:
                raise bad("uniform_negatives", f"must be >= 0, got {self.uniform_negatives}")
            if self.in_batch_negatives < 0:
                raise bad("in_batch_negatives", f"must be >= 0, got {self.in_batch_negatives}")
            if self.temperature <= 0:
                raise bad("temperature", f"must be > 0, got {self.temperature}")
            if self.weight < 0:
                raise bad("weight", f"must be >= 0, got {self.weight}")
            if self.full_softmax not in (True, False, "auto"):
                raise bad("full_softmax", f"must be true, false or auto, got {self.full_softmax!r}")
            if self.horizon < 1:
                raise bad("horizon", f"must be >= 1, got {self.horizon}")
            if self.half_life_s < 0:
                raise bad("half_life_s", f"must be >= 0 (0 = no decay), got {self.half_life_s}")
            self.utility.validate(f"{where}.utility")

        @property
        def multi_token(self) -> bool:
            """Whether targets are weighted pairs (:func:`prediction_pairs`) rather than plain next items."""
            return self.horizon > 1 or self.half_life_s > 0 or not self.utility.flat

        def full(self, num_items: int | None) -> bool:
            """Whether training scores the whole catalog of ``num_items`` (None: unknown, so only when forced)."""
            if self.full_softmax != "auto":
                return bool(self.full_softmax)
            sampled = self.uniform_negatives + self.in_batch_negatives
            return num_items is not None and (sampled == 0 or num_items <= FULL_SOFTMAX_MULTIPLE * sampled)


NextItemLossConfig = NextItemHead.Config


def prediction_pairs(
    lengths: Tensor, tgt: Tensor, timestamp: Tensor, event: Tensor, played: Tensor, cfg: NextItemHead.Config
) -> tuple[Tensor, Tensor, Tensor]:
    """Multi-token prediction's targets for a jagged batch (host tensors): for each target ``j`` of ``tgt`` (flat
    interaction indices; its state is the one after ``j - 1``), the interactions ``i = j .. j + horizon - 1`` of
    the same sample. Returns (context ``j``, target ``i``, weight) per pair, ``d = i - j`` ascending then ``j``:
    weight = r_i * 2^(-(t_i - t_(j-1)) / half_life_s) (no decay when half_life_s is 0), float32."""
    sample = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    ends = torch.cumsum(lengths, 0)[sample[tgt]] if tgt.numel() else tgt
    ctx, out = [], []
    for d in range(cfg.horizon):
        keep = tgt + d < ends
        ctx.append(tgt[keep])
        out.append(tgt[keep] + d)
    j, i = torch.cat(ctx), torch.cat(out)
    w = cfg.utility(event[i], played[i])
    if cfg.half_life_s > 0:
        gap = (timestamp[i] - timestamp[j - 1]).to(torch.float64).clamp_min(0)
        w = w * torch.exp2(-gap / cfg.half_life_s)
    return j, i, w.to(torch.float32)


def sampled_softmax_loss(
    h: Tensor,
    pos_emb: Tensor,
    pos_ids: Tensor,
    cand_emb: Tensor,
    cand_ids: Tensor,
    pos_log_q: Tensor,
    cand_log_q: Tensor,
    cfg: NextItemHead.Config,
    weights: Tensor | None = None,
) -> Tensor:
    """Mean cross-entropy of each row's positive (column 0) against the shared candidates.

    ``h``/``pos_emb``: (N, d); ``pos_ids``/``pos_log_q``: (N,); ``cand_emb``: (K, d);
    ``cand_ids``/``cand_log_q``: (K,). Candidates equal to the row's positive
    (accidental hits) are excluded from that row. ``weights`` (N,): a weighted mean instead (multi-token
    prediction's pairs; 0 when every weight is 0).
    """
    if h.shape[0] == 0:
        return h.sum() * 0.0
    # Half-precision logits lose the margin between close items after dividing by a small
    # temperature, so they are computed in float32 even under autocast.
    wide = torch.promote_types(h.dtype, torch.float32)
    with torch.autocast(h.device.type, enabled=False):
        h, pos_emb, cand_emb = h.to(wide), pos_emb.to(wide), cand_emb.to(wide)
        if cfg.normalize:
            h, pos_emb, cand_emb = F.normalize(h, dim=-1), F.normalize(pos_emb, dim=-1), F.normalize(cand_emb, dim=-1)
        pos_logit = (h * pos_emb).sum(-1) / cfg.temperature
        cand_logits = (h @ cand_emb.transpose(0, 1)) / cfg.temperature
    if cfg.logq:
        cand_logits = cand_logits - cand_log_q.to(wide).unsqueeze(0)
        if cfg.correct_positive:
            pos_logit = pos_logit - pos_log_q.to(wide)
    cand_logits = cand_logits.masked_fill(cand_ids.unsqueeze(0) == pos_ids.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos_logit.unsqueeze(1), cand_logits], dim=1)
    zeros = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
    if weights is None:
        return F.cross_entropy(logits, zeros)
    w = weights.to(logits.dtype)
    return (w * F.cross_entropy(logits, zeros, reduction="none")).sum() / w.sum().clamp_min(1e-12)


class FeedbackHead(nn.Module):
    """Predicts the feedback (event type, played bucket) of the next interaction given its item."""

    @dataclass
    class Config:
        hidden: int = 0  # 0 = d_model
        weight: float = 1.0

        def validate(self, where: str = "loss.feedback") -> None:
            if self.hidden < 0:
                raise ValueError(f"{where}.hidden: must be >= 0, got {self.hidden}")
            if self.weight < 0:
                raise ValueError(f"{where}.weight: must be >= 0, got {self.weight}")

        def build(self, d_model: int, item_dim: int) -> "FeedbackHead":
            return FeedbackHead(self, d_model, item_dim)

    def __init__(self, cfg: Config, d_model: int, item_dim: int) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        hidden = cfg.hidden or d_model
        self.fc = nn.Linear(d_model + item_dim, hidden)
        self.out = nn.Linear(hidden, EVENT_CLASSES + NUM_PLAYED_BUCKETS)

    def forward(self, h: Tensor, item_emb: Tensor) -> dict[str, Tensor]:
        """(N, d_model) states, (N, item_dim) next items -> {"event": (N, 6), "played": (N, 6)} logits."""
        z = self.out(F.gelu(self.fc(torch.cat([h, item_emb.to(h.dtype)], dim=-1))))
        event, played = z.split([EVENT_CLASSES, NUM_PLAYED_BUCKETS], dim=-1)
        return {"event": event, "played": played}

    def loss(self, logits: dict[str, Tensor], event: Tensor, played: Tensor) -> Tensor:
        """Mean of the event and played-bucket cross-entropies; ``played`` is raw percent (or PLAYED_NA)."""
        if event.numel() == 0:
            return (logits["event"].sum() + logits["played"].sum()) * 0.0
        ce_event = F.cross_entropy(logits["event"].float(), event.to(torch.int64))
        ce_played = F.cross_entropy(logits["played"].float(), played_bucket(played))
        return 0.5 * (ce_event + ce_played)


def ne_stats(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Sufficient statistics of normalized entropy: (summed cross-entropy, class counts), float64 tensors on
    the logits' device (nothing is read back here: training sums them over a logging window first). Summed
    over steps and ranks they give the exact NE of the whole window (:func:`ne_from_stats`)."""
    with torch.no_grad():
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
        t = targets.to(device=logits.device, dtype=torch.int64)
        ce = F.cross_entropy(wide, t, reduction="sum").double()
        return ce, torch.bincount(t, minlength=logits.shape[-1]).double()


def ne_from_stats(ce_sum: float | Tensor, counts: Tensor, prior: Tensor | None = None) -> float:
    """Mean cross-entropy / entropy of the class prior (He et al. 2014, any number of classes).

    ``prior`` defaults to the class frequencies ``counts``. Below 1 means better than always
    predicting the base rate; NaN when the prior has zero entropy or there are no targets.
    """
    ce_sum, counts = float(ce_sum), counts.detach().double().cpu()
    n = float(counts.sum())
    prior = (counts if prior is None else prior.cpu()).double()
    p = prior[prior > 0] / prior.sum()
    h = float(-(p * p.log()).sum())
    return (ce_sum / n) / h if n and h > 0 else math.nan


def normalized_entropy(logits: Tensor, targets: Tensor, prior: Tensor | None = None) -> float:
    """NE of ``logits`` on ``targets`` in one call (see :func:`ne_from_stats`)."""
    return ne_from_stats(*ne_stats(logits.double(), targets), prior)
