"""The fine-tuned ranker: ARGUS's second stage as a two-tower model.

User tower: the pre-trained causal encoder's state after the last interaction *before request time
minus a lag* (production user states are recomputed daily, so the ranker must not see the last
day), projected into item space. Item tower: the item's embedding from the same sharded table,
plus an optional residual MLP. Score = dot product, so user states and item vectors can be computed
offline and served by a nearest-neighbour index.

Loss: pairwise logistic over pairs of shown items of the same impression whose relevance differs
(``trainer.data.schema.relevance``: like > full listen > short listen > skip/dislike).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embeddings.tables import ItemEmbeddings
from trainer.data.batch import sample_starts
from trainer.data.schema import DAY
from trainer.model.argus import ArgusModel, Grid, HeadsConfig, ModelConfig


@dataclass
class FinetuneConfig:
    init: str = ""  # the pre-training run (or checkpoint) to start from; "" = not a fine-tuning run
    lag_seconds: int = DAY  # user state = history strictly before request time - lag
    split: str = "impressions"  # impression split to train on
    eval_split: str = "impressions_test"
    item_mlp: int = 0  # hidden width of a residual MLP on item embeddings (0 = embeddings as they are)

    def validate(self, where: str = "finetune") -> None:
        if self.lag_seconds < 0:
            raise ValueError(f"{where}.lag_seconds: must be >= 0, got {self.lag_seconds}")
        if self.item_mlp < 0:
            raise ValueError(f"{where}.item_mlp: must be >= 0, got {self.item_mlp}")

    @property
    def enabled(self) -> bool:
        return bool(self.init)


class ItemTower(nn.Module):
    """Item embedding + a residual MLP whose output layer starts at zero (so fine-tuning starts from
    the pre-trained scores)."""

    def __init__(self, item_dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        if hidden:
            self.fc1 = nn.Linear(item_dim, hidden)
            self.fc2 = nn.Linear(hidden, item_dim)
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, emb: Tensor) -> Tensor:
        if not self.hidden:
            return emb
        return emb + self.fc2(F.gelu(self.fc1(emb)))


class TwoTower(nn.Module):
    """Dense part of the fine-tuned ranker (the tables stay sharded in TorchRec)."""

    def __init__(self, model: ModelConfig, emb: ItemEmbeddings.Config, heads: HeadsConfig, ft: FinetuneConfig) -> None:
        super().__init__()
        self.argus = ArgusModel(model, emb, heads)
        self.item_tower = ItemTower(emb.item_dim, ft.item_mlp)
        # Score like the pre-trained next-item head (cosine / temperature, or a plain dot product), so
        # fine-tuning starts from the pre-trained ranking and exported vectors reproduce scores exactly.
        self.normalize, self.temperature = heads.next_item.normalize, heads.next_item.temperature

    def user_vectors(
        self,
        item: Tensor,
        side: dict[str, Tensor],
        lengths: Tensor,
        last: Tensor,
        pack: Grid | None = None,
        prefix: Tensor | None = None,
    ) -> Tensor:
        """The served user vector after flat history row ``last[k]`` (the caller picks, per impression or
        user, the last interaction before its cutoff); ``pack``: the batch's grid, ``prefix``: cached summary
        tokens, one window per sample (``ArgusModel.states``)."""
        states = self.argus.states(item, side, lengths, pack, prefix)
        rows = last * 2 + 1 if self.argus.interleaved else last
        u = self.argus.proj(states[rows]).float()
        return (F.normalize(u, dim=-1) if self.normalize else u) / self.temperature

    def item_vectors(self, emb: Tensor) -> Tensor:
        """The served item vector of item vectors ``emb`` (after the pre-trained item tower)."""
        v = self.item_tower(emb.to(self.argus.proj.weight.dtype)).float()
        return F.normalize(v, dim=-1) if self.normalize else v

    def forward(
        self,
        item: Tensor,
        side: dict[str, Tensor],
        lengths: Tensor,
        last: Tensor,
        shown_emb: Tensor,
        shown_imp: Tensor,
        pair_hi: Tensor,
        pair_lo: Tensor,
        item_ids: Tensor | None = None,
        shown_ids: Tensor | None = None,
        pack: Grid | None = None,
        prefix: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Scores of the shown items and the pairwise loss.

        ``last[k]``: flat history row the user state of impression k is taken after; ``shown_imp[s]``:
        impression of shown item s; ``pair_hi``/``pair_lo``: shown-item indices, hi more relevant; ``item`` /
        ``shown_emb``: looked-up ID rows of table rows ``item_ids`` / ``shown_ids``, through the pre-trained item
        tower here (``ArgusModel.item_vectors``; the ids may be None for ``model.item_tower: id``); ``prefix``: cached
        summary tokens (``data.summary_cache``: every sample one impression's window).
        """
        item = self.argus.item_vectors(item, item_ids)
        shown_emb = self.argus.item_vectors(shown_emb, shown_ids)
        users = self.user_vectors(item, side, lengths, last, pack, prefix)
        scores = (users[shown_imp] * self.item_vectors(shown_emb)).sum(-1)
        if pair_hi.numel():
            loss = F.softplus(scores[pair_lo] - scores[pair_hi]).mean()  # -log sigmoid(s_hi - s_lo)
        else:
            loss = scores.sum() * 0.0
        return {"loss": loss, "scores": scores.detach()}


def pairs_of(grades: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor]:
    """All (hi, lo) shown-item index pairs within each impression with grade[hi] > grade[lo]."""
    m = sizes.numel()
    if m == 0 or grades.numel() == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    width = int(sizes.max())
    starts = sample_starts(sizes)
    col = torch.arange(width)
    valid = col[None, :] < sizes[:, None]  # (impressions, slate)
    flat = (starts[:, None] + col[None, :]).clamp_max(grades.numel() - 1)
    g = torch.where(valid, grades[flat].long(), torch.full_like(flat, -1))
    better = (g[:, :, None] > g[:, None, :]) & valid[:, None, :]  # padding (-1) is never "better"
    imp, a, b = torch.nonzero(better, as_tuple=True)
    return starts[imp] + a, starts[imp] + b
