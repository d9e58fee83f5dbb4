"""ARGUS interaction embedding: (context, item, feedback) embeddings -> transformer tokens.

``merged`` (the ARGUS default): one token per interaction, an MLP over the
concatenated item, context, feedback (event, played bucket) and time (hour of
week, gap) embeddings. ``interleaved``: two tokens per interaction — an item
token (item, context, time) followed by a feedback token (event, played) — so
the state after the item token can predict that item's feedback and the
state after the feedback token the next item.

These MLPs are dense parameters (trained by DeepSpeed with the encoder); only
the lookups they consume are TorchRec's.
"""

from __future__ import annotations

import torch
from torch import nn

from embeddings.tables import ItemEmbeddings

ITEM_SIDE = ("context", "hour", "gap")
FEEDBACK_SIDE = ("event", "played")


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


class InteractionEmbedding(nn.Module):
    def __init__(self, cfg: ItemEmbeddings.Config, d_model: int, hidden: int = 0) -> None:
        super().__init__()
        self.layout = cfg.token_layout
        hidden = hidden or d_model
        if self.layout == "merged":
            d_in = cfg.item_dim + cfg.side_dim * (len(ITEM_SIDE) + len(FEEDBACK_SIDE))
            self.merged = _mlp(d_in, hidden, d_model)
        else:
            self.item_token = _mlp(cfg.item_dim + cfg.side_dim * len(ITEM_SIDE), hidden, d_model)
            self.feedback_token = _mlp(cfg.side_dim * len(FEEDBACK_SIDE), hidden, d_model)

    @property
    def tokens_per_interaction(self) -> int:
        return 1 if self.layout == "merged" else 2

    def forward(self, item: torch.Tensor, side: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, d_in) lookups of N interactions -> (N * tokens_per_interaction, d_model) tokens, in sequence order."""
        item_part = torch.cat([item] + [side[k] for k in ITEM_SIDE], dim=-1)
        feedback_part = torch.cat([side[k] for k in FEEDBACK_SIDE], dim=-1)
        if self.layout == "merged":
            return self.merged(torch.cat([item_part, feedback_part], dim=-1))
        it, fb = self.item_token(item_part), self.feedback_token(feedback_part)
        return torch.stack([it, fb], dim=1).reshape(-1, it.shape[-1])  # item_0, fb_0, item_1, fb_1, ...


def jagged_to_padded(values: torch.Tensor, lengths: torch.Tensor, max_len: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(N, d) jagged rows -> (B, T, d) right-padded, the (B, T) mask, and each row's (b, t) index."""
    b = lengths.numel()
    t = int(lengths.max()) if b and max_len is None else (max_len or 0)
    row = torch.repeat_interleave(torch.arange(b, device=values.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    col = torch.arange(values.shape[0], device=values.device) - torch.repeat_interleave(starts, lengths)
    out = values.new_zeros(b, t, values.shape[-1])
    out = out.index_put((row, col), values)
    mask = torch.zeros(b, t, dtype=torch.bool, device=values.device)
    mask[row, col] = True
    return out, mask, (row, col)
