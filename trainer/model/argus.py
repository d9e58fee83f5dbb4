"""The dense ARGUS model (what DeepSpeed trains): interaction tokens -> causal encoder -> two heads.

Targets: every interaction but the first of its sample (and, for evaluation
samples, only those at or after ``target_start``). For target interaction
``j`` the model predicts its item from the state after interaction ``j-1``
(next-item head) and its feedback given its item (feedback head).

Index bookkeeping that needs the data (which candidates, their logQ) is done
by the caller and passed in as tensors, so this module only does math and
behaves the same under every ZeRO stage.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from embeddings.tables import ItemEmbeddings
from trainer.data.batch import sample_starts
from trainer.model.encoder import MAX_CONTEXT, Encoder
from trainer.model.heads import FeedbackHead, NextItemLossConfig, sampled_softmax_loss
from trainer.model.interaction import (
    TOKEN_LAYOUTS,
    InteractionEmbedding,
    Packed,
    jagged_to_packed,
    jagged_to_padded,
    jagged_to_windows,
    packed_order,
)
from trainer.model.item_tower import ITEM_TOWERS, SemanticItems
from trainer.model.summary import ReconstructionHead, Summariser, SummaryConfig, SummaryState


@dataclass
class ModelConfig(Encoder.Config):
    """The ``model`` section: the encoder's sizes (``Encoder.Config``) plus the interaction token."""

    token_layout: str = "merged"  # merged (one token per interaction) | interleaved (item token + feedback token)
    side_dim: int = 16  # width of the small side tables (context, event, played, hour, gap)
    num_contexts: int = 64  # rows of the context table (larger context ids hash to id mod rows)
    # The item tower (trainer/model/item_tower.py): id | semantic (metadata only) | both (ID row or OOV + metadata)
    item_tower: str = "id"
    item_features: int = 0  # width of the dataset's item metadata vectors (semantic and both)
    cold_start_mask_rate: float = 0.0  # both: share of a batch's item ids scored from OOV + metadata in training
    # Lifelong-history summary tokens (trainer/model/summary.py; tokens 0 = off): a sample longer than the context
    # is encoded window by window, each window reading the summary of the sample's older windows (docs/lifelong.md)
    summary: SummaryConfig = field(default_factory=SummaryConfig)
    # A sample longer than the context is encoded window by window, each window on its own (no summary): what
    # model.summary adds its summary to, so the control for it on the same samples (bench/lifelong.py); implied by
    # model.summary.tokens > 0
    windows: bool = False

    def windowed(self) -> bool:
        """Whether a sample longer than the context is encoded window by window (``windows``, or ``summary``)."""
        return self.windows or self.summary.tokens > 0

    def validate(self, where: str = "model", max_context: int | None = MAX_CONTEXT) -> None:
        super().validate(where, max_context)
        if self.item_tower not in ITEM_TOWERS:
            raise ValueError(f"{where}.item_tower: must be one of {', '.join(ITEM_TOWERS)}, got {self.item_tower!r}")
        if self.item_tower != "id" and self.item_features < 1:
            raise ValueError(
                f"{where}.item_features: item_tower {self.item_tower} needs the width of the dataset's item "
                f"features (`argus data inspect` shows it), got {self.item_features}"
            )
        if not 0.0 <= self.cold_start_mask_rate < 1.0:
            raise ValueError(f"{where}.cold_start_mask_rate: must be in [0, 1), got {self.cold_start_mask_rate}")
        if self.cold_start_mask_rate > 0 and self.item_tower != "both":
            raise ValueError(
                f"{where}.cold_start_mask_rate: masks ID rows for the OOV vector, which only item_tower both has "
                f"(got item_tower {self.item_tower})"
            )
        self.summary.validate(f"{where}.summary")
        if self.summary.reconstruction_weight > 0 and not self.summary.tokens:
            raise ValueError(f"{where}.summary.reconstruction_weight: needs {where}.summary.tokens > 0")
        if self.token_layout not in TOKEN_LAYOUTS:
            raise ValueError(f"{where}.token_layout: must be 'merged' or 'interleaved', got {self.token_layout!r}")
        for key in ("side_dim", "num_contexts"):
            if getattr(self, key) < 1:
                raise ValueError(f"{where}.{key}: must be >= 1, got {getattr(self, key)}")

    @property
    def tokens_per_interaction(self) -> int:
        return 2 if self.token_layout == "interleaved" else 1


@dataclass
class HeadsConfig:
    next_item: NextItemLossConfig = field(default_factory=NextItemLossConfig)
    feedback: FeedbackHead.Config = field(default_factory=FeedbackHead.Config)

    def validate(self, where: str = "heads") -> None:
        ni = self.next_item
        ni.validate(f"{where}.next_item")
        self.feedback.validate(f"{where}.feedback")
        if ni.weight == 0 and self.feedback.weight == 0:
            raise ValueError(f"{where}: next_item.weight and feedback.weight are both 0: nothing to train")
        if ni.weight > 0 and ni.uniform_negatives == 0 and ni.in_batch_negatives == 0 and ni.full_softmax is False:
            raise ValueError(f"{where}.next_item: needs uniform_negatives > 0 or in_batch_negatives > 0")


# A batch's grid: (row, first column) of each sample and (rows, row length), in interactions (Batch.grid).
Grid = tuple[torch.Tensor | None, torch.Tensor | None, tuple[int, int]]


def target_index(
    lengths: torch.Tensor, target_start: torch.Tensor | None = None, total: int | None = None
) -> torch.Tensor:
    """Flat indices of target interactions: not the first of their sample, and >= target_start.
    ``total``: sum(lengths) when the caller knows it (then nothing is read back from ``lengths``)."""
    n = int(lengths.sum()) if total is None else total
    pos = torch.arange(n, device=lengths.device) - torch.repeat_interleave(
        sample_starts(lengths), lengths, output_size=n
    )
    first_target = torch.ones_like(lengths)
    if target_start is not None:
        first_target = target_start.clamp_min(1)
    keep = pos >= torch.repeat_interleave(first_target, lengths, output_size=n)
    return torch.nonzero(keep, as_tuple=False).flatten()


class ArgusModel(nn.Module):
    def __init__(self, model: ModelConfig, emb: ItemEmbeddings.Config, heads: HeadsConfig) -> None:
        super().__init__()
        enc = model.resolved()
        self.heads_cfg = heads
        self.interaction = InteractionEmbedding(
            model.token_layout, emb.item_dim, model.side_dim, model.num_contexts, enc.d_model, init_std=emb.init_std
        )
        self.encoder = enc.build()
        self.proj = nn.Linear(enc.d_model, emb.item_dim)  # user state -> item space, for dot-product scoring
        self.feedback = heads.feedback.build(enc.d_model, emb.item_dim)
        self.interleaved = model.token_layout == "interleaved"
        self.items = (
            SemanticItems(model.item_tower, model.item_features, emb.item_dim, emb.init_std)
            if model.item_tower != "id"
            else None
        )
        k = model.tokens_per_interaction
        self.window = enc.max_seq_len // k * k  # tokens of context per window (whole interactions)
        self.windowed = model.windowed()
        sm = model.summary
        self.summary = Summariser(sm, enc.d_model, enc.d_model) if sm.tokens else None
        # model.summary.reconstruction_weight: a small causal decoder of its own predicts each next item from the
        # summary and the window so far, so the summary has to carry what the older history said (VISTA)
        self.reconstruction = (
            ReconstructionHead(enc.d_model, emb.item_dim) if sm.tokens and sm.reconstruction_weight > 0 else None
        )
        # Windows of older history a summary's gradients reach (model.summary.grad_chunks * chunk interactions)
        self.summary_grad_windows = sm.grad_windows(self.window, k)
        # Windows the summariser streams at least, whatever the batch (build_dense: a sample's most): every rank then
        # calls the summariser's modules as often, which ZeRO-3 needs (each call gathers their parameters)
        self.min_windows = 0

    def item_vectors(
        self, emb: torch.Tensor, ids: torch.Tensor | None, masked: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The item tower: looked-up ID rows ``emb`` of table rows ``ids`` -> the vectors the encoder reads and the
        head scores (``emb`` itself for ``model.item_tower: id``, which needs no ``ids``); ``masked``: rows given
        the OOV vector."""
        if self.items is None:
            return emb
        if ids is None:
            raise ValueError("model.item_tower: the semantic item tower needs the items' table rows (ids)")
        return self.items(emb, ids, masked)

    def states(
        self,
        item: torch.Tensor,
        side: dict[str, torch.Tensor],
        lengths: torch.Tensor,
        pack: Grid | None = None,
        prefix: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encoder states of every token, flat (sum(lengths) * tokens_per_interaction, d_model).

        ``item``: the history's item vectors (:meth:`item_vectors` of the lookups); ``side``: side-feature ids
        (:func:`trainer.model.interaction.side_features`); ``pack``: the batch's grid (``Batch.grid()``):
        (row, first column, (rows, row_len)) of each sample in interactions for a token-budget batch, or
        (None, None, (samples, longest)) for one sample per row; None = one sample per row, shape read from
        ``lengths`` (a device read: the training step always passes the grid).

        With ``model.summary`` each sample is cut into windows of the context (from its end) that are encoded as
        rows of their own, each after the summary tokens of the sample's older windows; a sample no longer than
        the context is one window with the summary of an empty history (``model.windows``: the same windows, each
        encoded on its own). ``prefix``: (samples, tokens, model.summary.dim) summaries read from a cache
        (trainer/summary_cache.py) in place of computing them; every sample is then one window (at most the context
        long)."""
        return self._states(item, side, lengths, pack, prefix)[0]

    def read_pieces(
        self, item: torch.Tensor, side: dict[str, torch.Tensor], lengths: torch.Tensor, lead: torch.Tensor
    ) -> SummaryState:
        """The summariser's state of each piece of history (a jagged batch of ``lengths`` interactions) read on its
        own, the first ``lead`` interactions of each left out (there only to give the next one its time gap): states
        to fold in order with ``summary.combine`` (``argus summarize``: lifelong histories, trainer/data/lifelong.py).
        A cache stores ``summary.readout(state, project=False)``, at the summariser's width."""
        if self.summary is None:
            raise ValueError("model.summary: this model has no summary tokens (model.summary.tokens is 0)")
        tokens = self.interaction(item.to(self.proj.weight.dtype), side)
        k = self.interaction.tokens_per_interaction
        padded, mask, _ = jagged_to_padded(tokens, lengths * k)
        mask &= torch.arange(mask.shape[1], device=mask.device)[None, :] >= (lead * k).to(mask.device)[:, None]
        return self.summary.update(self.summary.init_state(lengths.numel()), padded, mask)

    def _states(
        self,
        item: torch.Tensor,
        side: dict[str, torch.Tensor],
        lengths: torch.Tensor,
        pack: Grid | None = None,
        prefix: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`states`, and the reconstruction head's predictions of every token (flat, like the states; None
        without ``model.summary.reconstruction_weight``)."""
        tokens = self.interaction(item.to(self.proj.weight.dtype), side)  # bf16 engines: cast the lookups
        k = self.interaction.tokens_per_interaction
        tok_lengths = lengths * k
        if prefix is not None:  # cached summaries: one window per sample
            summary = self.summary.project(prefix.to(tokens.dtype))
            if pack is not None and pack[0] is not None:  # packed rows: each sample reads its own, as memory
                rows, cols, (num_rows, row_len) = pack
                T = row_len * k
                if T > self.window:
                    raise ValueError(
                        f"cached summaries: packed rows of {T} tokens exceed the {self.window}-token window"
                    )
                where = Packed(rows, cols * k, (num_rows, T))
                grid, mask, positions, segments, (row, col) = jagged_to_packed(tokens, tok_lengths, where)
                memory = summary[packed_order(where)]  # one per segment id
                out = self.encoder(grid, mask, positions, segments, prefix=memory, read=self.summary.cfg.read)
                return out[row, col], None
            padded, mask, (row, col) = jagged_to_padded(tokens, tok_lengths)
            if padded.shape[1] > self.window:
                raise ValueError(
                    f"cached summaries: a sample of {padded.shape[1]} tokens exceeds the {self.window}-token window"
                )
            return self.encoder(padded, mask, prefix=summary, read=self.summary.cfg.read)[row, col], None
        if self.summary is not None:
            if pack is not None and pack[0] is not None:
                raise ValueError("model.summary: token-budget batches (data.batch_tokens) are not supported with it")
            w = jagged_to_windows(tokens, tok_lengths, self.window)
            prefix = self.summary.window_summaries(
                w.grid, w.mask, w.sample, w.back, w.count, max(w.most, self.min_windows), self.summary_grad_windows
            )
            recon = None
            if self.reconstruction is not None:
                recon = self.reconstruction(prefix, w.grid, w.mask.sum(1))[w.index]
            return self.encoder(w.grid, w.mask, prefix=prefix, read=self.summary.cfg.read)[w.index], recon
        if self.windowed:  # model.windows: every window of the context on its own row, nothing read before it
            if pack is not None and pack[0] is not None:
                raise ValueError("model.windows: token-budget batches (data.batch_tokens) are not supported with it")
            w = jagged_to_windows(tokens, tok_lengths, self.window)
            return self.encoder(w.grid, w.mask)[w.index], None
        encode = self.encoder
        if self.encoder.sequence_group is not None:  # parallel.sp: this rank encodes its chunk of every row
            from trainer.model.sequence_parallel import encode as sp_encode

            encode = functools.partial(sp_encode, self.encoder)
        if pack is None or pack[0] is None:
            max_len = None if pack is None else pack[2][1] * k
            padded, mask, (row, col) = jagged_to_padded(tokens, tok_lengths, max_len)
            return encode(padded, mask)[row, col], None
        rows, cols, (num_rows, row_len) = pack
        grid, mask, positions, segments, (row, col) = jagged_to_packed(
            tokens, tok_lengths, Packed(rows, cols * k, (num_rows, row_len * k))
        )
        return encode(grid, mask, positions, segments)[row, col], None

    def state_rows(self, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token rows whose states predict (next item of, feedback of) target interactions ``tgt``."""
        src = tgt - 1
        if self.interleaved:
            return 2 * src + 1, 2 * tgt  # feedback token of j-1; item token of j
        return src, src

    def forward(
        self,
        item: torch.Tensor,
        side: dict[str, torch.Tensor],
        neg: torch.Tensor,
        lengths: torch.Tensor,
        tgt: torch.Tensor,
        sel: torch.Tensor,
        item_ids: torch.Tensor,
        neg_ids: torch.Tensor,
        event: torch.Tensor,
        played: torch.Tensor,
        pos_log_q: torch.Tensor,
        cand_log_q: torch.Tensor,
        pack: Grid | None = None,
        pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        masked: tuple[torch.Tensor, torch.Tensor] | None = None,
        prefix: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses for one micro-batch; ``sel`` picks in-batch candidates among the targets; ``pack``: see
        :meth:`states`. ``pairs``: multi-token prediction's (context target, predicted interaction, weight)
        (:func:`trainer.model.heads.prediction_pairs`; ``pos_log_q`` is then the predicted interactions'); None =
        each target's next item, weighted alike. ``item`` / ``neg``: looked-up ID rows of ``item_ids`` /
        ``neg_ids``, through :meth:`item_vectors` here; ``masked``: their rows given the OOV vector
        (``model.cold_start_mask_rate``); ``prefix``: cached summary tokens, one window per sample (:meth:`states`)."""
        m_item, m_neg = masked if masked is not None else (None, None)
        item, neg = self.item_vectors(item, item_ids, m_item), self.item_vectors(neg, neg_ids, m_neg)
        h, recon = self._states(item, side, lengths, pack, prefix)
        ni, fb = self.heads_cfg.next_item, self.heads_cfg.feedback
        next_rows, fb_rows = self.state_rows(tgt)
        zero = h.sum() * 0.0
        out = {"loss/next_item": zero, "loss/feedback": zero}
        if recon is not None:
            out["loss/reconstruction"] = zero
        if ni.weight > 0:
            user = self.proj(h[next_rows]).float()
            pos = item[tgt].float()
            cand = torch.cat([pos[sel], neg.float()])
            cand_ids = torch.cat([item_ids[tgt][sel], neg_ids])
            pos_ids, weights = item_ids[tgt], None
            rec = recon[next_rows].float() if recon is not None else None
            if pairs is not None:  # each target's state scores the later interactions of its pairs, weighted
                ctx, pred, weights = pairs
                at = torch.searchsorted(tgt, ctx)  # tgt ascends
                user = user[at]  # projected once per state
                rec = rec[at] if rec is not None else None
                pos, pos_ids = item[pred].float(), item_ids[pred]
            out["loss/next_item"] = sampled_softmax_loss(
                user, pos, pos_ids, cand, cand_ids, pos_log_q, cand_log_q, ni, weights
            )
            if rec is not None:  # the same targets and candidates, scored from the reconstruction head
                out["loss/reconstruction"] = sampled_softmax_loss(
                    rec, pos, pos_ids, cand, cand_ids, pos_log_q, cand_log_q, ni, weights
                )
        if fb.weight > 0:
            logits = self.feedback(h[fb_rows], item[tgt].to(h.dtype))
            out["loss/feedback"] = self.feedback.loss(
                {k: v.float() for k, v in logits.items()}, event[tgt], played[tgt]
            )
            out["logits/event"] = logits["event"].detach().float()
            out["logits/played"] = logits["played"].detach().float()
        out["loss"] = ni.weight * out["loss/next_item"] + fb.weight * out["loss/feedback"]
        if recon is not None:
            out["loss"] = out["loss"] + self.summary.cfg.reconstruction_weight * out["loss/reconstruction"]
        out["targets"] = torch.tensor(float(tgt.numel()), device=h.device)
        return out

    def user_vectors(self, states: torch.Tensor, lengths: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Item-space user state after interaction ``last[b]`` of each sample (for ranking), from :meth:`states`."""
        rows = sample_starts(lengths) + last
        if self.interleaved:
            rows = 2 * rows + 1
        return self.proj(states[rows]).float()
