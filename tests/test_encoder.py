"""Encoder: preset sizes, causality, padding, a naive attention reference, checkpointing, config errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import trainer.model.encoder as enc
from trainer.model.encoder import MAX_CONTEXT, PRESETS, Encoder, encoder_param_count

NOMINAL = {"nano": 0.2e6, "mini": 3.2e6, "small": 12.6e6, "medium": 100e6, "large": 1.0e9}


def small_cfg(**kw) -> Encoder.Config:
    base = dict(preset="custom", d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64)
    return Encoder.Config(**{**base, **kw})


def encoder_params(e: Encoder) -> int:
    return sum(p.numel() for m in (e.blocks, e.norm) for p in m.parameters())


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_param_counts(preset: str) -> None:
    cfg = Encoder.Config(preset=preset)
    with torch.device("meta"):
        e = cfg.build()
    n = encoder_params(e)
    assert n == encoder_param_count(cfg)
    assert abs(n - NOMINAL[preset]) / NOMINAL[preset] < 0.05
    total = sum(p.numel() for p in e.parameters())
    assert total == encoder_param_count(cfg, include_positions=True) == n + cfg.max_seq_len * PRESETS[preset]["d_model"]


def test_overrides_and_custom_counts() -> None:
    cfg = Encoder.Config(preset="mini", n_layers=3, d_ff=100, max_seq_len=10)
    r = cfg.resolved()
    assert (r.d_model, r.n_layers, r.n_heads, r.d_ff) == (256, 3, 4, 100)
    assert cfg.n_layers == 3 and cfg.d_model == 0  # resolved() copies
    for c in (cfg, small_cfg(d_model=24, n_heads=3, d_ff=40, n_layers=5)):
        assert encoder_params(c.build()) == encoder_param_count(c)


def test_init_is_deterministic_and_scaled() -> None:
    cfg = small_cfg(d_model=64, n_layers=8, d_ff=256)
    torch.manual_seed(3)
    a = cfg.build()
    torch.manual_seed(3)
    b = cfg.build()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    blk = a.blocks[0]
    assert blk.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert a.pos.weight.std().item() == pytest.approx(0.02, rel=0.1)
    scaled = 0.02 / math.sqrt(2 * 8)
    assert blk.attn.out.weight.std().item() == pytest.approx(scaled, rel=0.1)
    assert blk.ff2.weight.std().item() == pytest.approx(scaled, rel=0.1)
    assert all(torch.count_nonzero(m.bias) == 0 for m in a.modules() if isinstance(m, torch.nn.Linear))


def test_meta_build_then_materialize() -> None:
    cfg = small_cfg()
    with torch.device("meta"):
        e = cfg.build()
    e.to_empty(device="cpu")
    torch.manual_seed(0)
    e.reset_parameters()
    assert e.blocks[1].ff1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(e.norm.weight, torch.ones(32))
    assert torch.isfinite(e(torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool))).all()


def test_causality() -> None:
    torch.manual_seed(0)
    e = small_cfg().build().eval()
    x = torch.randn(3, 20, 32)
    mask = torch.ones(3, 20, dtype=torch.bool)
    y = e(x, mask)
    for t in (0, 7, 18):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :]) * 5
        y2 = e(x2, mask)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=0, atol=1e-6)
        assert (y2[:, t + 1 :] - y[:, t + 1 :]).abs().max() > 1e-3  # the future does change the future


def test_padding_invariance() -> None:
    torch.manual_seed(1)
    e = small_cfg().build().eval()
    lengths = [9, 4, 1, 13]
    T = max(lengths)
    rows = [torch.randn(n, 32) for n in lengths]

    def run(width: int) -> torch.Tensor:
        x = torch.randn(len(rows), width, 32) * 3  # garbage in the padding
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for b, r in enumerate(rows):
            x[b, : len(r)], mask[b, : len(r)] = r, True
        y = e(x, mask)
        assert torch.isfinite(y).all()
        assert (y[~mask] == 0).all()
        return y

    y_t, y_t7 = run(T), run(T + 7)
    for b, r in enumerate(rows):
        n = len(r)
        alone = e(r.unsqueeze(0), torch.ones(1, n, dtype=torch.bool))[0]
        torch.testing.assert_close(y_t[b, :n], alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(y_t7[b, :n], alone, rtol=0, atol=1e-5)


def test_fully_padded_row_is_finite() -> None:
    e = small_cfg().build().eval()
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, :3] = True
    y = e(torch.randn(2, 6, 32), mask)
    assert torch.isfinite(y).all() and (y[1] == 0).all()


def _layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def naive_forward(e: Encoder, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference: explicit pre-norm blocks, softmax(QK^T/sqrt(d) + mask)V with causal & key-padding masking."""
    B, T, D = x.shape
    H = e.cfg.n_heads
    dh = D // H
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    allowed = (causal & mask[:, None, :]) | torch.eye(T, dtype=torch.bool)  # (B, T, T)
    additive = torch.zeros(B, T, T, dtype=x.dtype).masked_fill(~allowed, float("-inf"))
    h = x + e.pos.weight[:T]
    for blk in e.blocks:
        a = _layer_norm(h, blk.ln1)
        qkv = a @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
        q, k, v = qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]
        heads = []
        for i in range(H):
            sl = slice(i * dh, (i + 1) * dh)
            s = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(dh) + additive
            heads.append(torch.softmax(s, dim=-1) @ v[..., sl])
        att = torch.cat(heads, dim=-1) @ blk.attn.out.weight.T + blk.attn.out.bias
        h = h + att
        f = _layer_norm(h, blk.ln2) @ blk.ff1.weight.T + blk.ff1.bias
        f = 0.5 * f * (1 + torch.erf(f / math.sqrt(2)))  # exact GELU
        h = h + f @ blk.ff2.weight.T + blk.ff2.bias
    return _layer_norm(h, e.norm)


@pytest.mark.parametrize("seed", range(6))
def test_matches_naive_attention_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rint = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    heads, dh = rint(1, 4), rint(2, 9)
    B, T = rint(1, 4), rint(1, 17)
    torch.manual_seed(seed)
    e = small_cfg(d_model=heads * dh, n_heads=heads, d_ff=rint(4, 40), n_layers=rint(1, 3), max_seq_len=32)
    e = e.build().double().eval()
    with torch.no_grad():  # non-trivial LayerNorm/bias values so every term of the reference matters
        for p in e.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    x = torch.randn(B, T, heads * dh, generator=g, dtype=torch.float64)
    y, ref = e(x, mask), naive_forward(e, x, mask)
    torch.testing.assert_close(y[mask], ref[mask], rtol=1e-9, atol=1e-9)
    assert (y[~mask] == 0).all()


def test_activation_checkpointing_same_outputs_and_grads(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = enc.checkpoint
    monkeypatch.setattr(enc, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    plain = small_cfg(dropout=0.1, n_layers=3).build().train()
    ckpt = small_cfg(dropout=0.1, n_layers=3, activation_checkpointing=True).build().train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 11, 32)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 6:] = False
    outs, grads = [], []
    for m in (plain, ckpt):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(123)  # same dropout masks
        y = m(xi, mask)
        (y * torch.linspace(-1, 1, 32)).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    assert len(calls) == 3
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    ckpt.eval()
    ckpt(x, mask)
    assert len(calls) == 3  # no checkpointing outside training


def test_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    e = small_cfg(dropout=0.5).build()
    x, mask = torch.randn(2, 8, 32), torch.ones(2, 8, dtype=torch.bool)
    e.eval()
    torch.testing.assert_close(e(x, mask), e(x, mask), rtol=0, atol=0)
    e.train()
    assert not torch.allclose(e(x, mask), e(x, mask))


def test_too_long_input_rejected() -> None:
    e = small_cfg(max_seq_len=8).build()
    with pytest.raises(ValueError, match="max_seq_len 8"):
        e(torch.randn(1, 9, 32), torch.ones(1, 9, dtype=torch.bool))


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(max_seq_len=MAX_CONTEXT + 808), "model.max_seq_len: 9000 exceeds the longest context 8192"),
        (dict(max_seq_len=0), "model.max_seq_len"),
        (dict(preset="mini", d_model=250), "model.d_model"),
        (dict(preset="huge"), "model.preset"),
        (dict(preset="custom", d_model=64, n_heads=4, d_ff=128), "model.n_layers"),
        (dict(preset="mini", n_heads=-2), "model.n_heads"),
        (dict(dropout=1.0), "model.dropout"),
    ],
)
def test_validate_names_key(kw: dict, key: str) -> None:
    cfg = Encoder.Config(**kw)
    with pytest.raises(ValueError, match=key):
        cfg.validate()
    with pytest.raises(ValueError, match=key.replace("model.", "m.enc.")):
        cfg.validate("m.enc")
    if "longest context" in key:  # the limit is the run's (MAX_CONTEXT x parallel.sp): JobConfig checks it
        assert cfg.build().cfg.max_seq_len == 9000
        return
    with pytest.raises(ValueError):
        cfg.build()


def test_valid_configs_pass() -> None:
    for preset in PRESETS:
        Encoder.Config(preset=preset, max_seq_len=MAX_CONTEXT).validate()
    small_cfg().validate()


def test_bf16_autocast_runs() -> None:
    e = small_cfg().build()
    x, mask = torch.randn(2, 8, 32), torch.ones(2, 8, dtype=torch.bool)
    mask[0, 5:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = e(x, mask)
    assert torch.isfinite(y.float()).all()
    F.mse_loss(y.float(), torch.zeros_like(x)).backward()
