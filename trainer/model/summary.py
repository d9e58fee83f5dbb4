"""Lifelong-history summaries at a fixed cost: the core of VISTA-style cached history-summary tokens.

VISTA (Meta, 2025) summarises a user's lifelong interaction history -- far longer than any encoder
context -- into a few hundred summary tokens (128 tokens of width 256 there) that are computed once, cached
per user and read by the ranking/retrieval model in place of the raw history. The summary is built by
learned seed tokens that attend over the history with quasi-linear attention ``phi(Q) (phi(K)^T V)``,
``phi = SiLU``, so its cost is linear in the history length and its state does not grow with it.

This module holds the pieces: :class:`SummaryConfig`; :class:`Summariser`, which streams a history of any
length (10^3..10^6 interactions) in chunks through a fixed-size state (``init_state`` / ``update`` /
``readout``, so a cache can be extended as new interactions arrive) with either VISTA's linear attention
or an exact, flash-style streamed softmax; and :class:`ReconstructionHead`, the objective that keeps
summaries faithful to the history they replace (its predictions are scored like the next-item head's, by
:func:`trainer.model.heads.sampled_softmax_loss`: one sampled softmax, one logQ).

In-line summaries (``model.summary.tokens > 0``): :meth:`Summariser.window_summaries` summarises, for every
window of the encoder's context in a sample, the sample's older windows; the encoder reads them as a prefix
(``trainer/model/argus.py: ArgusModel.states``). The summary cache (``argus summarize``, trainer/summary_cache.py)
holds summaries computed offline over whole lifelong histories: pieces read apart and folded with
:meth:`Summariser.combine`.

Design notes
------------
* The history stream is per-interaction: each interaction's vector is transformed on its own (input
  projection, then a residual per-token MLP before every layer after the first) and never mixes with
  other interactions. That is what makes a single pass at fixed memory possible: layer ``l``'s keys and
  values of an interaction do not depend on the seeds or on other interactions. All cross-token mixing is
  carried by the seeds (cross-attention over the history, then self-attention among the seeds and an FFN).
* The summariser is permutation-invariant over the history (sums and softmaxes over positions, no
  positional encoding): order and recency must be in the input vectors (e.g. time features).
* ``linear``: layer ``l``'s state is ``S_l = sum_j phi(k_j)^T v_j`` plus the count ``n`` of interactions
  read. Because ``S_l`` does not involve the queries, the queries can come from the seeds' evolving state
  (computed at readout, layer after layer).
* ``softmax``: exact softmax needs its queries before it reads, so every layer's cross-attention queries
  come from the learned seed embeddings (one projection per layer), not from the evolving seed state.
  The state per layer is a running max, running denominator and running weighted value sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTIONS = ("linear", "softmax")
READS = ("tokens", "memory")


@dataclass
class SummaryConfig:
    """Lifelong-history summary tokens (``model.summary``); ``tokens: 0`` turns them off."""

    tokens: int = 0  # summary tokens per user; 0 = off
    dim: int = 256  # summary token width inside the summariser
    heads: int = 1  # attention heads in the summariser; must divide dim
    attention: str = "linear"  # "linear" (VISTA: phi = SiLU) | "softmax" (exact, streamed flash-style)
    layers: int = 1
    chunk: int = 1024  # interactions per streamed chunk
    grad_chunks: int = 1  # gradients flow through each history's last grad_chunks * chunk interactions only
    reconstruction_weight: float = 0.0
    # how the encoder reads the summary tokens: "tokens", through every block beside the window (as VISTA's prefix);
    # "memory", as each block's keys and values only (no queries, no feed-forward for them: a cheaper step)
    read: str = "tokens"

    def validate(self, where: str = "model.summary") -> None:
        """Reject bad values with a one-line message naming the key; never changes the config."""
        for key, low in (("tokens", 0), ("dim", 1), ("heads", 1), ("layers", 1), ("chunk", 1), ("grad_chunks", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{where}.{key}: must be an integer >= {low}, got {value!r}")
        if self.dim % self.heads:
            raise ValueError(f"{where}.heads: must divide dim ({self.dim}), got {self.heads}")
        if self.read not in READS:
            raise ValueError(f"{where}.read: must be one of {', '.join(READS)}, got {self.read!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"{where}.attention: must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
        w = self.reconstruction_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or math.isinf(w):
            raise ValueError(f"{where}.reconstruction_weight: must be a finite number >= 0, got {w!r}")

    def grad_windows(self, window_tokens: int, tokens_per_interaction: int) -> int:
        """In-line summaries: the windows of ``window_tokens`` before each window that its summary's gradients
        reach (``grad_chunks * chunk`` interactions, rounded up to whole windows, at least one)."""
        return max(1, -(-self.grad_chunks * self.chunk * tokens_per_interaction // window_tokens))


@dataclass
class SummaryState:
    """What a summariser keeps between chunks; no size depends on the history length.

    ``count``: (B,) interactions read. ``layers``: per layer, ``(S,)`` with S (B, H, dh, dh) for linear
    attention, or ``(max, denom, acc)`` with (B, H, T), (B, H, T), (B, H, T, dh) for softmax.
    """

    count: Tensor
    layers: list[tuple[Tensor, ...]]

    def tensors(self) -> list[Tensor]:
        """Every tensor of the state, in a fixed order (for caching, moving or size checks)."""
        return [self.count] + [t for part in self.layers for t in part]

    @staticmethod
    def cat(states: list[SummaryState]) -> SummaryState:
        """The states of several batches of users as one batch."""
        layers = [tuple(torch.cat(ts) for ts in zip(*parts)) for parts in zip(*(s.layers for s in states))]
        return SummaryState(torch.cat([s.count for s in states]), layers)

    def rows(self, index: Tensor) -> SummaryState:
        """The states of users ``index`` (a batch-dimension gather)."""
        return SummaryState(self.count[index], [tuple(t[index] for t in part) for part in self.layers])


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class _Layer(nn.Module):
    """One summariser layer: history keys/values (plus the per-interaction MLP before them) and a seed block."""

    def __init__(self, dim: int, history_mlp: bool) -> None:
        super().__init__()
        # Per-interaction residual MLP (2x wide: it runs on every history interaction, so it is the hot path).
        self.hist_mlp = _mlp(dim, 2 * dim) if history_mlp else None
        self.kv_norm = nn.LayerNorm(dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.sa_norm = nn.LayerNorm(dim)
        self.qkv_self = nn.Linear(dim, 3 * dim)
        self.o_self = nn.Linear(dim, dim)
        self.ff = _mlp(dim, 4 * dim)


class _Seeds(nn.Module):
    """The learned seed tokens, read through a module call: under ZeRO-3 a parameter is gathered only while its own
    module runs, and the summariser's methods (``update``, ``readout``, ``window_summaries``) are not its forward."""

    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(tokens, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, 0.02)

    def forward(self) -> Tensor:
        return self.weight * 1.0  # a tensor of its own: outlives ZeRO-3 partitioning the weight again


class Summariser(nn.Module):
    """Summarise histories of any length into ``cfg.tokens`` vectors of width ``d_out`` at a fixed memory cost."""

    def __init__(self, cfg: SummaryConfig, d_in: int, d_out: int) -> None:
        super().__init__()
        cfg.validate()
        if cfg.tokens < 1:
            raise ValueError(f"model.summary.tokens: a Summariser needs at least 1 token, got {cfg.tokens}")
        self.cfg = cfg
        self.heads = cfg.heads
        self.head_dim = cfg.dim // cfg.heads
        self.seed_table = _Seeds(cfg.tokens, cfg.dim)
        self.in_proj = nn.Linear(d_in, cfg.dim)
        self.layers = nn.ModuleList(_Layer(cfg.dim, history_mlp=i > 0) for i in range(cfg.layers))
        self.out_norm = nn.LayerNorm(cfg.dim)
        self.out_proj = nn.Linear(cfg.dim, d_out)

    @property
    def seeds(self) -> Tensor:
        """The seed tokens' parameter (tests, references); the model reads them through ``seed_table()``."""
        return self.seed_table.weight

    @property
    def _acc_dtype(self) -> torch.dtype:
        # Sums over up to 10^6 interactions: accumulate in at least float32 even when the weights are bf16.
        return torch.promote_types(self.seeds.dtype, torch.float32)

    def _split(self, t: Tensor) -> Tensor:
        """(..., n, dim) -> (..., H, n, dh)."""
        *lead, n, _ = t.shape
        return t.reshape(*lead, n, self.heads, self.head_dim).transpose(-2, -3)

    def _merge(self, t: Tensor) -> Tensor:
        """(..., H, n, dh) -> (..., n, dim)."""
        *lead, _, n, _ = t.shape
        return t.transpose(-2, -3).reshape(*lead, n, self.heads * self.head_dim)

    def init_state(self, batch: int) -> SummaryState:
        """The state of ``batch`` users with empty histories."""
        dev, dt = self.seeds.device, self._acc_dtype
        h, t, dh = self.heads, self.cfg.tokens, self.head_dim
        count = torch.zeros(batch, dtype=torch.long, device=dev)
        if self.cfg.attention == "linear":
            layers = [(torch.zeros(batch, h, dh, dh, dtype=dt, device=dev),) for _ in self.layers]
        else:
            layers = [
                (
                    torch.full((batch, h, t), -math.inf, dtype=dt, device=dev),
                    torch.zeros(batch, h, t, dtype=dt, device=dev),
                    torch.zeros(batch, h, t, dh, dtype=dt, device=dev),
                )
                for _ in self.layers
            ]
        return SummaryState(count, layers)

    def update(self, state: SummaryState, x: Tensor, mask: Tensor) -> SummaryState:
        """Read one chunk of history, (B, c, d_in) with a (B, c) validity mask, into a new state.

        Functional (the old state is untouched) so the same code serves training, where autograd needs
        every intermediate, and a cache extended as interactions arrive. Masked positions contribute
        nothing, whatever their values (even NaN).
        """
        if x.shape[1] == 0:  # nothing to read (a batch of empty pieces: argus summarize)
            return state
        mask = mask.to(torch.bool)
        h = self.in_proj(torch.where(mask[..., None], x, x.new_zeros(())))
        layers = []
        for layer, part in zip(self.layers, state.layers):
            if layer.hist_mlp is not None:
                h = h + layer.hist_mlp(h)
            k, v = (self._split(t) for t in layer.kv(layer.kv_norm(h)).to(self._acc_dtype).chunk(2, dim=-1))
            if self.cfg.attention == "linear":
                (s,) = part
                phi_k = torch.where(mask[:, None, :, None], F.silu(k), 0.0)
                layers.append((s + phi_k.transpose(-1, -2) @ v,))
            else:
                layers.append(self._softmax_update(layer, part, k, v, mask))
        return SummaryState(state.count + mask.sum(1), layers)

    def _softmax_update(
        self, layer: _Layer, part: tuple[Tensor, ...], k: Tensor, v: Tensor, mask: Tensor
    ) -> tuple[Tensor, ...]:
        """Online softmax: rescale the running sums to the new running max, add this chunk."""
        run_max, denom, acc = part
        q = self._split(layer.q(layer.q_norm(self.seed_table())).to(self._acc_dtype))  # (H, T, dh): seed queries
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5  # (B, H, T, c)
        scores = scores.masked_fill(~mask[:, None, None, :], -math.inf)
        # The max only shifts the exponent (the result does not depend on it), so it needs no gradient.
        new_max = torch.maximum(run_max, scores.amax(-1).detach())
        shift = torch.where(torch.isfinite(new_max), new_max, 0.0)  # all -inf so far: any finite shift works
        scale = torch.exp(run_max - shift)
        p = torch.exp(scores - shift[..., None])
        return new_max, denom * scale + p.sum(-1), acc * scale[..., None] + p @ v

    def combine(self, a: SummaryState, b: SummaryState) -> SummaryState:
        """The state of history ``a`` followed by history ``b``, each read from :meth:`init_state` on its own.

        Both states are sums over their interactions (linear: ``sum phi(k)^T v``; softmax: a running max and
        max-shifted sums), so pieces of one history can be read in parallel, as a batch of unrelated rows, and
        folded in order afterwards (``argus summarize`` reads lifelong histories this way)."""
        layers = []
        for pa, pb in zip(a.layers, b.layers):
            if self.cfg.attention == "linear":
                layers.append((pa[0] + pb[0],))
                continue
            (ma, da, acc_a), (mb, db, acc_b) = pa, pb
            new_max = torch.maximum(ma, mb)
            shift = torch.where(torch.isfinite(new_max), new_max, 0.0)  # both empty: any finite shift works
            sa, sb = torch.exp(ma - shift), torch.exp(mb - shift)
            layers.append((new_max, da * sa + db * sb, acc_a * sa[..., None] + acc_b * sb[..., None]))
        return SummaryState(a.count + b.count, layers)

    def readout(self, state: SummaryState, project: bool = True) -> Tensor:
        """The summary tokens, (B, tokens, d_out), of the histories read into ``state``."""
        batch = state.count.shape[0]
        z = self.seed_table().expand(batch, -1, -1)
        n = state.count.clamp_min(1).to(self._acc_dtype)[:, None, None, None]
        for layer, part in zip(self.layers, state.layers):
            if self.cfg.attention == "linear":
                # Normalised by the number of interactions read (a mean), not by sum_j phi(q).phi(k_j) as in
                # classic linear attention: SiLU can be negative, so that sum can be ~0 and blow up. Empty
                # history: S = 0, so the read is 0.
                q = self._split(layer.q(layer.q_norm(z)).to(self._acc_dtype)) * self.head_dim**-0.5
                read = (F.silu(q) @ part[0]) / n
            else:
                _, denom, acc = part
                read = acc / torch.where(denom > 0, denom, 1.0)[..., None]  # denom >= 1 once anything was read
            z = z + layer.o(self._merge(read).to(z.dtype))
            q, k, v = (self._split(t) for t in layer.qkv_self(layer.sa_norm(z)).chunk(3, dim=-1))
            z = z + layer.o_self(self._merge(F.scaled_dot_product_attention(q, k, v)))
            z = z + layer.ff(z)
        return self.project(z) if project else z

    def project(self, z: Tensor) -> Tensor:
        """Summary tokens at the summariser's width ``cfg.dim`` (what a cache stores: ``readout(..., project=False)``)
        -> the ``d_out``-wide tokens the encoder reads."""
        return self.out_proj(self.out_norm(z))

    def forward(self, x: Tensor, lengths: Tensor, project: bool = True) -> Tensor:
        """Summaries, (B, tokens, d_out), of right-padded histories x (B, L, d_in) with ``lengths`` (B,) valid.

        Gradients flow through each user's own last ``grad_chunks * chunk`` interactions (the ones nearest
        the end of *that* history, not of the padded length: with ragged lengths a window at the padded end
        would leave short histories without any gradient). Everything older is read under ``torch.no_grad``,
        so the memory kept for backward depends on ``chunk`` and ``grad_chunks``, never on L.
        """
        batch, length, _ = x.shape
        lengths = lengths.to(device=x.device, dtype=torch.long).clamp(0, length)
        chunk = self.cfg.chunk
        window = self.cfg.grad_chunks * chunk
        start = (lengths - window).clamp_min(0)  # each user's first interaction with gradients
        pos = torch.arange(chunk, device=x.device)
        state = self.init_state(batch)
        older = int(start.max()) if batch else 0
        with torch.no_grad():
            for s in range(0, older, chunk):
                e = min(s + chunk, length)
                state = self.update(state, x[:, s:e], (s + pos[: e - s]) < start[:, None])
        rows = torch.arange(batch, device=x.device)[:, None]
        for s in range(0, min(window, length), chunk):
            e = min(s + chunk, window, length)
            idx = start[:, None] + s + pos[: e - s]  # (B, c): the window, gathered per user
            valid = idx < lengths[:, None]
            state = self.update(state, x[rows, idx.clamp_max(length - 1)], valid)
        return self.readout(state, project)

    def window_summaries(
        self, grid: Tensor, mask: Tensor, sample: Tensor, back: Tensor, count: Tensor, most: int, grad_windows: int
    ) -> Tensor:
        """The summary each window of a batch reads: of every older window of its own sample, (R, tokens, d_out).

        The rows are :class:`trainer.model.interaction.Windows`' (``grid`` (R, W, d_in) right-padded tokens with
        ``mask``; row r is window ``back[r]`` from the end of sample ``sample[r]``, which has ``count`` windows,
        at most ``most``), so a window's summary only covers interactions before it. The samples are streamed
        window by window from their oldest, in lockstep counted from their most recent window; gradients reach
        each summary through its ``grad_windows`` nearest older windows only, the rest is read under
        ``torch.no_grad``.
        """
        batch, rows = count.numel(), grid.shape[0]
        first = torch.cumsum(count, 0) - count
        if not torch.is_grad_enabled():  # eval, export: the same values, each window read once
            grad_windows = 1

        def read(state: SummaryState, b: int) -> SummaryState:  # every sample's window b from the end, if any
            valid = b < count
            r = (first + count - 1 - b).clamp(0, max(rows - 1, 0))
            return self.update(state, grid[r], mask[r] & valid[:, None])

        def detached(state: SummaryState) -> SummaryState:
            return SummaryState(state.count, [tuple(t.detach() for t in part) for part in state.layers])

        # older[q]: the detached state over every window older than the one q from the end (back > q)
        older: dict[int, SummaryState] = {most - 1: self.init_state(batch)}
        out = []
        for q in range(most - 1, -1, -1):
            base = min(q + grad_windows, most - 1)
            state = older[base]
            for b in range(base, q, -1):
                state = read(state, b)
            out.append(self.readout(state))
            if q > 0 and q not in older:
                if grad_windows == 1:  # the state just built covers exactly the windows older than q
                    older[q] = detached(state)
                else:
                    with torch.no_grad():
                        older[q] = read(older[q + 1], q + 1)
            older.pop(q + grad_windows, None)  # no later step starts from it
        if not out:
            return grid.new_zeros(0, self.cfg.tokens, self.out_proj.out_features)
        summaries = torch.stack(out[::-1])  # (most, B, tokens, d_out), indexed [windows from the end, sample]
        return summaries[back, sample]


class ReconstructionHead(nn.Module):
    """Predict each next interaction of a history window from [summary tokens | window so far].

    Trained alongside the model, it makes the summary carry what the history it replaces said: a window
    position can only see the summary and the window up to itself.
    """

    def __init__(self, d_model: int, d_item: int, n_heads: int = 2) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"ReconstructionHead: n_heads ({n_heads}) must divide d_model ({d_model})")
        self.n_heads = n_heads
        self.attn_norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.o = nn.Linear(d_model, d_model)
        self.ff = _mlp(d_model, 4 * d_model)
        self.out_norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, d_item)

    def forward(self, summary: Tensor, window: Tensor, lengths: Tensor) -> Tensor:
        """(B, T, d) summary, (B, W, d) right-padded window with ``lengths`` valid -> (B, W, d_item) predictions.

        Position j's output predicts interaction j+1's item. Padded positions' outputs are meaningless (finite).
        """
        batch, tokens, d = summary.shape
        width = window.shape[1]
        pos = torch.arange(width, device=window.device)
        valid = pos[None, :] < lengths.to(window.device)[:, None]  # (B, W)
        window = torch.where(valid[..., None], window, window.new_zeros(()))
        seq = torch.cat([summary, window], dim=1)  # (B, T + W, d)
        # Keys: every summary token, plus window positions that are valid and not in the future.
        q_pos = torch.cat([torch.full((tokens,), -1, device=pos.device), pos])  # summary rows see only the summary
        causal = pos[None, :] <= q_pos[:, None]  # (T + W, W)
        keys = torch.cat(
            [
                torch.ones(batch, tokens + width, tokens, dtype=torch.bool, device=pos.device),
                causal & valid[:, None, :],
            ],
            dim=2,
        )  # (B, T + W, T + W)
        h = self.n_heads
        q, k, v = (
            self.qkv(self.attn_norm(seq)).reshape(batch, tokens + width, 3 * h, d // h).transpose(1, 2).chunk(3, 1)
        )
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None])
        seq = seq + self.o(att.transpose(1, 2).reshape(batch, tokens + width, d))
        seq = seq + self.ff(seq)
        return self.out(self.out_norm(seq[:, tokens:]))


def _lin(i: int, o: int) -> int:
    return i * o + o


def summary_param_count(cfg: SummaryConfig, d_in: int, d_out: int) -> int:
    """Parameters of ``Summariser(cfg, d_in, d_out)`` from the sizes alone (0 when ``cfg.tokens`` is 0)."""
    if not cfg.tokens:
        return 0
    m = cfg.dim
    layer = 2 * m + _lin(m, 2 * m) + 2 * m + 2 * _lin(m, m) + 2 * m + _lin(m, 3 * m) + _lin(m, m)  # kv, q, o, self
    layer += 2 * m + _lin(m, 4 * m) + _lin(4 * m, m)  # ff
    hist_mlp = 2 * m + _lin(m, 2 * m) + _lin(2 * m, m)  # every layer after the first
    return cfg.tokens * m + _lin(d_in, m) + cfg.layers * layer + (cfg.layers - 1) * hist_mlp + 2 * m + _lin(m, d_out)


def summary_flops(
    cfg: SummaryConfig, d_in: int, d_out: int, window: int, grad_windows: int = 1, training: bool = True
) -> float:
    """Matmul FLOPs per token of in-line summaries whose windows hold ``window`` tokens: reading the token into the
    state (input projection, per-token MLPs, keys and values) and each window's readout spread over its tokens.
    Training reads every window ``grad_windows`` times with gradients (x3: forward and backward), once for each
    later window whose summary it reaches, plus once under ``no_grad`` when ``grad_windows > 1``
    (:meth:`Summariser.window_summaries`); inference reads it once."""
    if not cfg.tokens:
        return 0.0
    m, t = cfg.dim, cfg.tokens
    read = d_in * m + cfg.layers * 2 * m * m + (cfg.layers - 1) * 4 * m * m  # projection, kv, history MLPs
    if cfg.attention == "linear":
        read += cfg.layers * m * (m // cfg.heads)  # phi(k)^T v: dh x dh per head
    else:
        read += cfg.layers * 2 * t * m  # every seed's score and weighted value
    seed = cfg.layers * (m * m + m * m + 3 * m * m + m * m + 8 * m * m + 2 * t * m) + m * d_out
    readout = 2.0 * t * seed / max(1, window)
    if not training:
        return 2.0 * read + readout
    return 2.0 * read * (3 * grad_windows + (1 if grad_windows > 1 else 0)) + 3.0 * readout


def cached_summary_flops(cfg: SummaryConfig, d_out: int, window: int, training: bool = True) -> float:
    """Matmul FLOPs per token of summaries read from a cache (``data.summary_cache``): only each window's output
    projection of its ``tokens`` cached vectors to ``d_out``, spread over the window's tokens."""
    fwd = 2.0 * cfg.tokens * cfg.dim * d_out / max(1, window) if cfg.tokens else 0.0
    return 3.0 * fwd if training else fwd


def reconstruction_param_count(d_model: int, d_item: int) -> int:
    """Parameters of ``ReconstructionHead(d_model, d_item)``."""
    d = d_model
    return 2 * d + _lin(d, 3 * d) + _lin(d, d) + 2 * d + _lin(d, 4 * d) + _lin(4 * d, d) + 2 * d + _lin(d, d_item)


def reconstruction_flops(d_model: int, d_item: int, tokens: int, window: int, training: bool = True) -> float:
    """Matmul FLOPs per token of the reconstruction head's decoder (its item scores are counted like the next-item
    head's): its linear layers, and attention over the summary tokens and half the window on average."""
    d = d_model
    fwd = 2.0 * (12 * d * d + d * d_item) + 4.0 * d * (tokens + window / 2)
    return 3.0 * fwd if training else fwd
