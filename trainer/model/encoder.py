"""The dense part of the model: a causal pre-norm transformer over interaction vectors.

Blocks are separate modules in an ``nn.ModuleList`` (not ``nn.TransformerEncoder``,
whose deep-copied layers break DeepSpeed ZeRO-3 ``zero.Init``), and every
layer initialises its own parameters in ``reset_parameters``: under ``zero.Init``
a parameter is partitioned as soon as the module that owns it is constructed,
so an init pass from a parent module would only see empty shards.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

# Sizes the encoder presets are named by: blocks + final LayerNorm, position table excluded.
PRESETS: dict[str, dict[str, int]] = {
    "nano": {"d_model": 64, "n_layers": 4, "n_heads": 2, "d_ff": 256},  # ~0.2M: small public datasets
    "mini": {"d_model": 256, "n_layers": 4, "n_heads": 4, "d_ff": 1024},  # ~3.2M
    "small": {"d_model": 512, "n_layers": 4, "n_heads": 8, "d_ff": 2048},  # ~12.6M
    "medium": {"d_model": 1024, "n_layers": 8, "n_heads": 16, "d_ff": 4096},  # ~100M
    "large": {"d_model": 2048, "n_layers": 20, "n_heads": 16, "d_ff": 8192},  # ~1.0B
}
SIZE_KEYS = ("d_model", "n_layers", "n_heads", "d_ff")
# Residual and embedding dropout by preset, where measured (docs/benchmarks.md): nano and mini meet small datasets
# that they overfit within a few epochs (the demo: HR@10 0.290 with 0.1 vs 0.272 without); the larger presets
# keep 0 (the paper-scale ones see each interaction about once) until a measurement says otherwise.
PRESET_DROPOUT: dict[str, float] = {"nano": 0.2, "mini": 0.1, "small": 0.0, "medium": 0.0, "large": 0.0}
MAX_CONTEXT = 8192
INIT_STD = 0.02
# How packed rows (``segments`` given) are attended; see ``Encoder.Config.attention`` and ``AttnLayout``.
ATTENTION_MODES = ("auto", "mask", "segments", "flex")
# `auto` off CUDA. Forward+backward ms/step, d_model 256, 4 heads, 2 layers, lognormal lengths of mean ~T/4, by
# `OMP_NUM_THREADS=N python bench/packed_attention.py --context T --rows R` (2 shared cores, medians):
#   T=512  R=8, 1 thread: mask 1238, segments 980, padded 4258;  2 threads: mask 715, segments 607, padded 2568
#   T=2048 R=4, 1 thread: mask 6236, segments 2872, padded 12112; 2 threads: mask 3557, segments 1970, padded 7840
#   T=64 / T=128 (~4k tokens): mask 1036 / 1050, segments 1040 / 1044 (a tie: linear layers dominate)
# segments never loses, so one choice for every T.
AUTO_CPU_ATTENTION = "segments"


class _Linear(nn.Linear):
    """Linear with N(0, std) weights and zero bias, set in its own ``reset_parameters``."""

    def __init__(self, in_features: int, out_features: int, std: float = INIT_STD) -> None:
        self.init_std = std  # read by reset_parameters, which nn.Linear.__init__ calls
        super().__init__(in_features, out_features, bias=True)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, self.init_std)
        nn.init.zeros_(self.bias)


class _Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, INIT_STD)


_compiled_flex: Callable[..., Tensor] | None = None


def _flex(device: torch.device) -> Callable[..., Tensor]:
    """``flex_attention``, compiled once on CUDA: eager flex materialises every score and is slow there."""
    global _compiled_flex
    if device.type != "cuda":
        return flex_attention  # eager; on CPU it runs the forward only (torch 2.13 has no CPU backward)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


@dataclass
class AttnLayout:
    """Where the histories of packed rows lie, built once per forward from ``segments`` and shared by every block.

    A query may attend to a key of its own history at or before it; padding queries attend to themselves only, so
    no row of scores is empty (no NaN). Which field is set depends on ``mode``:

    - ``mask``: ``mask`` (R, 1, T, T) bool, True = allowed, for SDPA.
    - ``flex``: ``block_mask``, the same rule for ``flex_attention``.
    - ``segments``: exact per-history attention, sum(L^2) instead of T^2 per row. ``gather`` (real tokens,) the
      flat (R*T) token indices ordered by history length, then history; ``shapes``: (n, L) per length, n
      histories of length L, in that order; ``inverse`` (R*T,) each token's row in the gathered order (one past
      the end, an appended zero row, for padding). Building it reads the lengths on the host (a sync on CUDA).
    """

    mode: str
    mask: Tensor | None = None
    block_mask: BlockMask | None = None
    shapes: tuple[tuple[int, int], ...] = ()
    gather: Tensor | None = None
    inverse: Tensor | None = None
    # Packed rows whose histories each read their own memory tokens (``build(..., memory=P)``): ``mask`` / ``flex``:
    # ``memory_index`` (R, S) the histories each row holds, in order (-1: none), whose memories sit before the row's
    # keys, P keys each; ``segments``: ``groups``, the histories of each ``shapes`` group, in the gathered order.
    memory_index: Tensor | None = None
    groups: tuple[Tensor, ...] = ()

    @staticmethod
    def build(segments: Tensor, mode: str, memory: int = 0) -> AttnLayout:
        """``segments``: (R, T) int, history id per token (increasing along a row), -1 for padding. ``memory`` > 0:
        each history also reads ``memory`` tokens of its own as keys and values (``model.summary.read: memory`` on
        packed rows), the ``i``-th memory the history whose id is ``i`` (ids numbering the histories across rows,
        as :func:`trainer.model.interaction.jagged_to_packed` does); every query of a history sees all of its own
        memory and none of another's. The mask and flex modes give every row the memories of all its histories
        (histories x ``memory`` keys a query, most masked out; their count is read on the host: a sync on CUDA),
        the segments mode each history its own alone."""
        R, T = segments.shape
        dev = segments.device
        if mode in ("mask", "flex"):
            mem_index, M = None, 0
            if memory:
                big = torch.iinfo(torch.long).max
                first = torch.where(segments >= 0, segments, big).amin(1)
                count = (segments.amax(1) - first + 1).clamp_min(0)  # ids in a row are consecutive (or skip empties)
                S = max(int(count.max()) if R else 0, 1)
                j = torch.arange(S, device=dev)
                mem_index = torch.where(j[None, :] < count[:, None], first[:, None] + j[None, :], -1)
                M = S * memory
                mem_of_key = mem_index.repeat_interleave(memory, dim=1)  # (R, M) the history of each memory key

            def allowed(b: Tensor, h: Tensor | None, q: Tensor, k: Tensor) -> Tensor:
                if not memory:
                    same = (segments[b, q] == segments[b, k]) & (segments[b, k] >= 0)
                    return (same & (k <= q)) | (q == k)
                kr = (k - M).clamp_min(0)  # a row key; k < M: a memory key
                q_own = segments[b, q]
                mem = (k < M) & (mem_of_key[b, k.clamp_max(M - 1)] == q_own) & (q_own >= 0)
                same = (k >= M) & (q_own == segments[b, kr]) & (segments[b, kr] >= 0)
                return mem | (same & (kr <= q)) | ((k >= M) & (q == kr))

            if mode == "flex":
                block = create_block_mask(allowed, R, None, T, M + T, device=dev)
                return AttnLayout(mode, block_mask=block, memory_index=mem_index)
            i, k = torch.arange(T, device=dev), torch.arange(M + T, device=dev)
            b = torch.arange(R, device=dev)
            mask = allowed(b[:, None, None], None, i[None, :, None], k[None, None, :])[:, None]
            return AttnLayout(mode, mask=mask, memory_index=mem_index)
        real = (segments >= 0).reshape(-1)
        boundary = torch.ones(R, T, dtype=torch.bool, device=dev)
        boundary[:, 1:] = segments[:, 1:] != segments[:, :-1]
        tokens = real.nonzero().squeeze(1)  # flat indices of real tokens, history after history
        history = (real & boundary.reshape(-1)).cumsum(0)[tokens] - 1
        lengths = torch.bincount(history)
        # Histories of one length form one batched SDPA call; a stable sort keeps each history's tokens together and
        # in order. Padding histories up to length buckets (fewer, larger calls; causal keeps it exact) was slower:
        # attention fwd+bwd at T=512 (bench/packed_attention.py's lengths) 166 ms exact vs 187-312 ms bucketed.
        gather = tokens[torch.argsort(lengths[history], stable=True)]
        sizes, counts = torch.unique(lengths, return_counts=True)
        inverse = torch.full((R * T,), gather.numel(), dtype=torch.long, device=dev)
        inverse[gather] = torch.arange(gather.numel(), device=dev)
        counts_host = counts.tolist()
        shapes = tuple(zip(counts_host, sizes.tolist()))
        groups: tuple[Tensor, ...] = ()
        if memory:  # the memory (the history's id) of each history of each group, in the group's order
            ids = torch.zeros_like(lengths).scatter_(0, history, segments.reshape(-1)[tokens])
            groups = ids[torch.argsort(lengths, stable=True)].split(counts_host)
        return AttnLayout(mode, shapes=shapes, gather=gather, inverse=inverse, groups=groups)

    @staticmethod
    def prefixed(prefix: int, T: int, device: torch.device, mode: str = "mask") -> AttnLayout:
        """Rows of ``prefix`` summary tokens followed by ``T - prefix`` right-padded history tokens: every token sees
        every summary token, history tokens are causal among themselves, and summary tokens never see history
        tokens (a history token reads the summaries at every layer, so a summary that saw a later token would carry
        it back to earlier ones). ``mode`` flex: a block mask shared by all rows (CUDA: no T x T scores kept);
        otherwise ``mask``, one (1, 1, T, T) boolean mask for SDPA."""

        def allowed(b: Tensor | None, h: Tensor | None, q: Tensor, k: Tensor) -> Tensor:
            return (k < prefix) | (k <= q)

        if mode == "flex":
            return AttnLayout(mode, block_mask=create_block_mask(allowed, None, None, T, T, device=device))
        i = torch.arange(T, device=device)
        return AttnLayout("mask", mask=allowed(None, None, i[:, None], i[None, :])[None, None])

    @staticmethod
    def memory(prefix: int, T: int, device: torch.device, mode: str = "mask") -> AttnLayout:
        """``T`` right-padded history tokens whose every query also reads ``prefix`` memory keys and values placed
        before them (summary tokens read as keys and values only, ``model.summary.read: memory``): causal among the
        history tokens. ``mode`` flex: a (T, prefix + T) block mask; otherwise a (1, 1, T, prefix + T) SDPA mask."""

        def allowed(b: Tensor | None, h: Tensor | None, q: Tensor, k: Tensor) -> Tensor:
            return (k < prefix) | (k - prefix <= q)

        if mode == "flex":
            block = create_block_mask(allowed, None, None, T, prefix + T, device=device)
            return AttnLayout(mode, block_mask=block)
        q, k = torch.arange(T, device=device), torch.arange(prefix + T, device=device)
        return AttnLayout("mask", mask=allowed(None, None, q[:, None], k[None, :])[None, None])

    def attend(self, qkv: Tensor, dropout_p: float, kv: Tensor | None = None) -> Tensor:
        """``qkv``: (R, T, 3, heads, head_dim) -> attention output (R, T, heads, head_dim). ``kv``: memory keys and
        values before the row's own: (R, P, 2, heads, head_dim), a row's (a :meth:`memory` layout), or (histories,
        P, 2, heads, head_dim), a history's (packed rows, ``build(..., memory=P)``)."""
        R, T, _, H, Dh = qkv.shape
        if self.mode != "segments":
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            if kv is not None:
                if self.memory_index is not None:  # each row's histories' memories, one after another
                    P = kv.shape[1]
                    kv = kv.index_select(0, self.memory_index.clamp_min(0).reshape(-1))
                    kv = kv.view(R, -1, P, 2, H, Dh).flatten(1, 2)
                km, vm = kv.permute(2, 0, 3, 1, 4).unbind(0)
                k, v = torch.cat([km, k], dim=2), torch.cat([vm, v], dim=2)
            if self.mode == "flex":  # no dropout: Config.validate refuses attn_dropout with flex
                y = _flex(qkv.device)(q, k, v, block_mask=self.block_mask)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, dropout_p=dropout_p)
            return y.transpose(1, 2)
        # One gather and one scatter for all groups: per-group index_select would zero a full-size gradient each.
        chunks = qkv.reshape(R * T, 3 * H * Dh).index_select(0, self.gather).split([n * L for n, L in self.shapes])
        ys = []
        for g, ((n, L), chunk) in enumerate(zip(self.shapes, chunks)):
            q, k, v = chunk.view(n, L, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
            if kv is None:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
            else:  # the group's histories' own memories before their keys: every query sees them, causal after
                km, vm = kv.index_select(0, self.groups[g]).permute(2, 0, 3, 1, 4).unbind(0)
                mask = AttnLayout.memory(km.shape[2], L, qkv.device).mask
                k, v = torch.cat([km, k], dim=2), torch.cat([vm, v], dim=2)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
            ys.append(y.transpose(1, 2).reshape(n * L, H * Dh))
        ys.append(qkv.new_zeros(1, H * Dh))
        return torch.cat(ys).index_select(0, self.inverse).view(R, T, H, Dh)


def attend(qkv: Tensor, layout: AttnLayout | None, dropout_p: float, kv: Tensor | None = None) -> Tensor:
    """``qkv`` (R, T, 3, heads, head_dim) -> (R, T, heads, head_dim): causal attention, within each packed history
    (``layout``), or over the whole row (None); ``kv``: memory keys and values (``AttnLayout.memory``)."""
    if layout is not None:
        return layout.attend(qkv, dropout_p, kv)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    # Causal alone is exact for right-padded rows: every key a real query can see
    # is real. It also keeps the flash kernel available and needs no (B,T,T) mask.
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head causal self-attention: fused qkv projection + SDPA (``dropout``: on attention probabilities)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, out_std: float) -> None:
        super().__init__()
        # n_heads is this rank's count: DeepSpeed's AutoTP divides it by the tensor-parallel size when it shards qkv
        self.n_heads, self.head_dim, self.dropout = n_heads, d_model // n_heads, dropout
        self.qkv = _Linear(d_model, 3 * d_model)
        self.out = _Linear(d_model, d_model, std=out_std)
        # qkv (R, T, 3, H, Dh) -> (R, T, H, Dh) in its place, when set: sequence parallelism's all-to-all attention
        # (trainer/model/sequence_parallel.py)
        self.core: nn.Module | None = None

    def forward(self, x: Tensor, layout: AttnLayout | None = None, memory: Tensor | None = None) -> Tensor:
        """``layout``: how packed histories attend (``AttnLayout``); None = one history per row. ``memory``: (B, P,
        d_model) tokens every query also reads, as keys and values of this layer's own projection (their queries are
        computed and dropped: one call of the fused projection, as ZeRO-3 and AutoTP need); on packed rows
        (histories, P, d_model), each history's own (``AttnLayout.build(..., memory=P)``)."""
        B, T, _ = x.shape
        dropout_p = self.dropout if self.training else 0.0
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim)
        kv = None
        if memory is not None:  # a row's memory (B rows), or a packed history's (one per history)
            kv = self.qkv(memory).view(*memory.shape[:2], 3, self.n_heads, self.head_dim)[:, :, 1:]
        y = self.core(qkv, layout) if self.core is not None else attend(qkv, layout, dropout_p, kv)
        return self.out(y.reshape(B, T, self.n_heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(
        self, d_model: int, n_heads: int, d_ff: int, dropout: float, out_std: float, attn_dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, attn_dropout, out_std)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff1 = _Linear(d_model, d_ff)
        self.ff2 = _Linear(d_ff, d_model, std=out_std)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, layout: AttnLayout | None = None, memory: Tensor | None = None) -> Tensor:
        """``memory``: tokens read as keys and values only (:meth:`Attention.forward`), through this block's norm."""
        x = x + self.drop(self.attn(self.ln1(x), layout, None if memory is None else self.ln1(memory)))
        return x + self.drop(self.ff2(F.gelu(self.ff1(self.ln2(x)))))


class Encoder(nn.Module):
    """Causal pre-norm transformer with learned absolute positions; see the module docstring."""

    @dataclass
    class Config:
        preset: str = "mini"  # one of PRESETS, or "custom" (then all four sizes must be given)
        d_model: int = 0  # 0 = take from the preset; nonzero overrides it
        n_layers: int = 0
        n_heads: int = 0
        d_ff: int = 0
        max_seq_len: int = 512  # positions (context length), <= MAX_CONTEXT (x parallel.sp)
        dropout: float | None = None  # residual + embedding dropout; None = the preset's (PRESET_DROPOUT)
        attn_dropout: float = 0.0  # on attention probabilities (SDPA's dropout_p)
        activation_checkpointing: bool = False
        # Attention of packed rows (forward given ``segments``): auto | mask | segments | flex; see AttnLayout.
        # auto = flex on CUDA (mask there if attn_dropout > 0: flex has none), AUTO_CPU_ATTENTION elsewhere.
        attention: str = "auto"

        def resolved(self) -> "Encoder.Config":
            """A copy with the preset's sizes (where this config leaves them 0) and dropout (None) filled in."""
            base = PRESETS.get(self.preset, {})
            dropout = PRESET_DROPOUT.get(self.preset, 0.0) if self.dropout is None else self.dropout
            return dataclasses.replace(
                self, dropout=dropout, **{k: getattr(self, k) or base.get(k, 0) for k in SIZE_KEYS}
            )

        def validate(self, where: str = "model", max_context: int | None = MAX_CONTEXT) -> None:
            """``max_context``: the longest ``max_seq_len`` allowed (the run's: MAX_CONTEXT x parallel.sp); None =
            not checked here (the encoder's constructor: the run config was checked)."""

            def bad(key: str, msg: str) -> ValueError:
                return ValueError(f"{where}.{key}: {msg}")

            if self.preset != "custom" and self.preset not in PRESETS:
                raise bad(
                    "preset", f"unknown preset {self.preset!r}; expected one of {', '.join([*PRESETS, 'custom'])}"
                )
            r = self.resolved()
            for k in SIZE_KEYS:
                v = getattr(r, k)
                if v == 0:
                    raise bad(k, "is required with preset 'custom'")
                if v < 0:
                    raise bad(k, f"must be > 0, got {v}")
            if r.d_model % r.n_heads:
                raise bad("d_model", f"{r.d_model} is not divisible by {where}.n_heads={r.n_heads}")
            if self.max_seq_len < 1:
                raise bad("max_seq_len", f"must be >= 1, got {self.max_seq_len}")
            if max_context is not None and self.max_seq_len > max_context:
                more = " (parallel.sp=N allows N times more)" if max_context == MAX_CONTEXT else ""
                raise bad("max_seq_len", f"{self.max_seq_len} exceeds the longest context {max_context}{more}")
            for key in ("dropout", "attn_dropout"):
                if not 0.0 <= getattr(r, key) < 1.0:
                    raise bad(key, f"must be in [0, 1), got {getattr(r, key)}")
            if self.attention not in ATTENTION_MODES:
                raise bad("attention", f"unknown {self.attention!r}; expected one of {', '.join(ATTENTION_MODES)}")
            if self.attention == "flex" and self.attn_dropout > 0:
                raise bad("attention", f"'flex' has no attention dropout; {where}.attn_dropout must be 0 with it")

        def build(self) -> "Encoder":
            return Encoder(self)

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        cfg.validate(max_context=None)  # the context limit depends on the run's layout: JobConfig checks it
        self.cfg = cfg = cfg.resolved()
        out_std = INIT_STD / math.sqrt(2 * cfg.n_layers)  # GPT-2: residual branches add up over 2L sums
        self.pos = _Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, out_std, cfg.attn_dropout)
            for _ in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model)
        self.compiled = False  # compile_blocks() ran
        self.sequence_group: torch.distributed.ProcessGroup | None = None  # sequence_parallel.enable_sequence_parallel

    def reset_parameters(self) -> None:
        """Re-initialise everything (e.g. after ``to_empty`` on a meta-device model)."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        positions: Tensor | None = None,
        segments: Tensor | None = None,
        prefix: Tensor | None = None,
        read: str = "tokens",
    ) -> Tensor:
        """``x``: (R, T, d_model); ``mask``: (R, T) bool, True = real token, a prefix of each row.

        ``positions``: (R, T) int64, each token's position in its own history (None = ``arange(T)``).
        ``segments``: (R, T) int64, each token's history (ids increasing along a row, -1 = padding) for rows that
        pack several histories: attention stays causal within a history and never crosses to another one
        (``cfg.attention`` says how). None = one history per row, plain causal attention.

        ``prefix``: (R, P, d_model) summary tokens (``model.summary``) that every token of its row attends to, placed
        before the row without a position (``AttnLayout.prefixed``: they never see the row); no sequence parallelism.
        ``read``: ``tokens``, the summary tokens run through every block beside the row; ``memory``, they are only
        read, as each block's keys and values of them (``AttnLayout.memory``: no queries, no feed-forward for them:
        cheaper). Packed rows (``segments`` given) read them as memory only, ``prefix`` then (histories, P, d_model),
        one per history in row-major order, each read by its own history alone.

        Returns (R, T, d_model). Real positions never see padding; padded positions come out as zeros.

        Under sequence parallelism (``sequence_group`` set) ``x``, ``mask`` and ``positions`` are this rank's chunk
        of the rows (``sequence_parallel.local_chunk``) and ``segments`` the whole rows'; so is the output.
        """
        T = x.shape[1]
        offset = 0
        if self.sequence_group is not None:
            sp = torch.distributed.get_world_size(self.sequence_group)
            offset, T = torch.distributed.get_rank(self.sequence_group) * T, T * sp
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cfg.max_seq_len}")
        if positions is None:
            positions = torch.arange(offset, offset + x.shape[1], device=x.device)
        # Through the module call (not .weight) so ZeRO-3 gathers the table.
        x = self.drop(x + self.pos(positions))
        packed_memory = prefix is not None and segments is not None
        if packed_memory and read != "memory":
            raise ValueError("model.summary.read: packed rows (data.batch_tokens) read summary tokens as memory only")
        layout = None
        if segments is not None:
            memory_len = prefix.shape[1] if packed_memory else 0
            layout = AttnLayout.build(segments, self.attention_mode(x.device), memory_len)
        P, memory = 0, None
        if prefix is not None:
            if self.sequence_group is not None:
                raise ValueError("model.summary: summary tokens need no parallel.sp")
            if read == "memory":  # packed rows: each history's own, laid out by build() above
                memory = prefix.to(x.dtype)
                if not packed_memory:
                    layout = AttnLayout.memory(memory.shape[1], x.shape[1], x.device, self.attention_mode(x.device))
            else:
                P = prefix.shape[1]
                x = torch.cat([prefix.to(x.dtype), x], dim=1)
                layout = AttnLayout.prefixed(P, x.shape[1], x.device, self.attention_mode(x.device))
        ckpt = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, layout, memory, use_reentrant=False) if ckpt else block(x, layout, memory)
        x = self.norm(x[:, P:])
        # Padded outputs are finite but depend on pad contents; zero them so nothing can leak.
        return x.masked_fill(~mask.to(torch.bool).unsqueeze(-1), 0.0)

    def attention_mode(self, device: torch.device) -> str:
        """``cfg.attention`` with ``auto`` resolved for ``device`` (compiled blocks: never ``segments``, whose
        per-length loop would recompile for every new set of history lengths)."""
        mode = self.cfg.attention
        if mode != "auto":
            return mode
        if device.type == "cuda":
            return "flex" if self.cfg.attn_dropout == 0 else "mask"
        return "mask" if self.compiled else AUTO_CPU_ATTENTION

    def compile_blocks(self) -> None:
        """``torch.compile`` each block in place (as torchtitan does): the blocks are where the FLOPs are, their
        shapes are fixed by the packed grid, and a per-block graph composes with ZeRO's per-module hooks and
        activation checkpointing; index bookkeeping around them stays eager."""
        if self.cfg.attention == "segments":
            raise ValueError(
                "model.attention: 'segments' recompiles for every new set of history lengths; "
                "use mask or flex (or auto) with train.compile"
            )
        for block in self.blocks:
            block.compile()
        self.compiled = True


def encoder_param_count(cfg: Encoder.Config, include_positions: bool = False) -> int:
    """Parameters of the blocks + final LayerNorm (+ the position table if asked), from the sizes alone."""
    r = cfg.resolved()
    d, f = r.d_model, r.d_ff
    per_block = (
        2 * d  # ln1
        + 3 * d * d
        + 3 * d  # qkv
        + d * d
        + d  # attention output
        + 2 * d  # ln2
        + d * f
        + f  # ff1
        + f * d
        + d  # ff2
    )
    return r.n_layers * per_block + 2 * d + (r.max_seq_len * d if include_positions else 0)
