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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
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


class Attention(nn.Module):
    """Multi-head causal self-attention: fused qkv projection + SDPA (``dropout``: on attention probabilities)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, out_std: float) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = _Linear(d_model, 3 * d_model)
        self.out = _Linear(d_model, d_model, std=out_std)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4).unbind(0)
        # Causal alone is exact for right-padded rows: every key a real query can see
        # is real. It also keeps the flash kernel available and needs no (B,T,T) mask.
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


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

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
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
        max_seq_len: int = 512  # positions (context length), <= MAX_CONTEXT
        dropout: float | None = None  # residual + embedding dropout; None = the preset's (PRESET_DROPOUT)
        attn_dropout: float = 0.0  # on attention probabilities (SDPA's dropout_p)
        activation_checkpointing: bool = False

        def resolved(self) -> "Encoder.Config":
            """A copy with the preset's sizes (where this config leaves them 0) and dropout (None) filled in."""
            base = PRESETS.get(self.preset, {})
            dropout = PRESET_DROPOUT.get(self.preset, 0.0) if self.dropout is None else self.dropout
            return dataclasses.replace(
                self, dropout=dropout, **{k: getattr(self, k) or base.get(k, 0) for k in SIZE_KEYS}
            )

        def validate(self, where: str = "model") -> None:
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
            if self.max_seq_len > MAX_CONTEXT:
                raise bad("max_seq_len", f"{self.max_seq_len} exceeds the longest context {MAX_CONTEXT}")
            for key in ("dropout", "attn_dropout"):
                if not 0.0 <= getattr(r, key) < 1.0:
                    raise bad(key, f"must be in [0, 1), got {getattr(r, key)}")

        def build(self) -> "Encoder":
            return Encoder(self)

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg = cfg.resolved()
        out_std = INIT_STD / math.sqrt(2 * cfg.n_layers)  # GPT-2: residual branches add up over 2L sums
        self.pos = _Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, out_std, cfg.attn_dropout)
            for _ in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model)

    def reset_parameters(self) -> None:
        """Re-initialise everything (e.g. after ``to_empty`` on a meta-device model)."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x``: (B, T, d_model); ``mask``: (B, T) bool, True = real token, a prefix of each row.

        Returns (B, T, d_model). Real positions never see padding (causality plus
        right padding); padded positions come out as zeros.
        """
        T = x.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cfg.max_seq_len}")
        # Through the module call (not .weight) so ZeRO-3 gathers the table.
        x = self.drop(x + self.pos(torch.arange(T, device=x.device)))
        ckpt = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if ckpt else block(x)
        x = self.norm(x)
        # Padded outputs are finite but depend on pad contents; zero them so nothing can leak.
        return x.masked_fill(~mask.to(torch.bool).unsqueeze(-1), 0.0)


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
