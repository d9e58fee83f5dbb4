"""Packed rows (``Encoder.forward(..., positions, segments)``): each history must come out as if it ran alone.

The reference runs every history as its own unpacked row (the ``segments=None`` path) through the same weights.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.model.encoder import AUTO_CPU_ATTENTION, Encoder

D = 32
MODES = ["mask", "segments", "flex", "auto"]  # flex: forward only (no CPU backward in torch)
TRAINABLE = ["mask", "segments", "auto"]
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def build(seed: int = 0, **kw) -> Encoder:
    base = dict(preset="custom", d_model=D, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64, dropout=0.0)
    torch.manual_seed(seed)
    return Encoder.Config(**{**base, **kw}).build().eval()


@dataclass
class Packed:
    x: Tensor  # (R, T, D)
    mask: Tensor
    positions: Tensor
    segments: Tensor
    histories: list[tuple[int, int, int]]  # (row, start, length)


def pack(rows: list[list[int]], T: int, gen: torch.Generator) -> Packed:
    """Random tokens for histories of the given lengths, placed one after another in each row."""
    R = len(rows)
    x = torch.randn(R, T, D, generator=gen)
    mask = torch.zeros(R, T, dtype=torch.bool)
    positions = torch.zeros(R, T, dtype=torch.long)
    segments = torch.full((R, T), -1, dtype=torch.long)
    histories = []
    for r, lengths in enumerate(rows):
        start = 0
        for i, n in enumerate(lengths):
            mask[r, start : start + n] = True
            positions[r, start : start + n] = torch.arange(n)
            segments[r, start : start + n] = i
            histories.append((r, start, n))
            start += n
        assert start <= T
    return Packed(x, mask, positions, segments, histories)


def random_rows(seed: int) -> tuple[list[list[int]], int]:
    """Rows covering the edge cases (full rows, one history, many short ones incl. length 1, trailing padding, an
    all-padding row) plus first-fit-like random rows."""
    rng = random.Random(seed)
    T = rng.choice([17, 40, 64])
    cut = sorted(rng.sample(range(1, T), 3))
    rows = [
        [T],  # one history filling the row
        [b - a for a, b in zip([0, *cut], [*cut, T])],  # several histories filling the row exactly
        [rng.randint(1, T - 1)],  # one history, trailing padding
        [1, 2, 1, 1, 3, 1, 1][: max(1, T // 3)],  # many short ones, trailing padding
        [],  # all padding
    ]
    for _ in range(3):
        row, free = [], T
        while free > 0 and rng.random() < 0.8:
            n = min(free, max(1, int(rng.lognormvariate(2.0, 1.0))))
            row.append(n)
            free -= n
        rows.append(row)
    rng.shuffle(rows)
    return rows, T


def packed_forward(enc: Encoder, p: Packed, x: Tensor | None = None) -> Tensor:
    return enc(p.x if x is None else x, p.mask, p.positions, p.segments)


def reference(enc: Encoder, p: Packed, x: Tensor) -> list[Tensor]:
    """Each history alone, unpacked: the ``segments=None`` path."""
    return [enc(x[r, s : s + n][None], torch.ones(1, n, dtype=torch.bool))[0] for r, s, n in p.histories]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_outputs_match_each_history_alone(mode: str, seed: int) -> None:
    rows, T = random_rows(seed)
    p = pack(rows, T, torch.Generator().manual_seed(seed))
    enc = build(seed, attention=mode)
    with torch.no_grad():
        out = packed_forward(enc, p)
        ref = reference(enc, p, p.x)
    assert torch.isfinite(out).all()
    for (r, s, n), want in zip(p.histories, ref):
        torch.testing.assert_close(out[r, s : s + n], want, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(out[~p.mask]) == 0


@pytest.mark.parametrize("mode", TRAINABLE)
@pytest.mark.parametrize("seed", [0, 3])
def test_packed_gradients_match_each_history_alone(mode: str, seed: int) -> None:
    rows, T = random_rows(seed)
    gen = torch.Generator().manual_seed(seed)
    p = pack(rows, T, gen)
    weight = torch.randn(p.x.shape, generator=gen)  # loss = a fixed random projection of the real outputs

    enc = build(seed, attention=mode)
    x = p.x.clone().requires_grad_()
    (packed_forward(enc, p, x) * weight).sum().backward()
    got = {name: q.grad.clone() for name, q in enc.named_parameters()}

    enc.zero_grad()
    x_ref = p.x.clone().requires_grad_()
    sum((y * weight[r, s : s + n]).sum() for (r, s, n), y in zip(p.histories, reference(enc, p, x_ref))).backward()

    torch.testing.assert_close(x.grad[p.mask], x_ref.grad[p.mask], atol=1e-5, rtol=1e-4)
    assert torch.count_nonzero(x.grad[~p.mask]) == 0  # padding feeds nothing
    for name, q in enc.named_parameters():
        assert torch.isfinite(got[name]).all(), name
        torch.testing.assert_close(got[name], q.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_histories_are_isolated_and_causal(mode: str) -> None:
    rows, T = [[5, 1, 9, 3], [12, 4]], 24
    p = pack(rows, T, torch.Generator().manual_seed(7))
    enc = build(7, attention=mode)
    with torch.no_grad():
        base = packed_forward(enc, p)
        for r, s, n in p.histories:
            own = torch.zeros_like(p.mask)
            own[r, s : s + n] = True
            x = p.x.clone()
            x[r, s : s + n] = torch.randn(n, D)  # a different history in the same slot
            out = packed_forward(enc, p, x)
            assert torch.equal(out[~own], base[~own])
            assert not torch.equal(out[own], base[own])
            if n > 1:
                j = s + n // 2  # a later token changes nothing before it, in or out of its history
                x = p.x.clone()
                x[r, j] += 1.0
                out = packed_forward(enc, p, x)
                before = ~own.clone()
                before[r, s:j] = True
                assert torch.equal(out[before], base[before])
                assert not torch.equal(out[r, j], base[r, j])


@pytest.mark.parametrize("mode", TRAINABLE)
def test_attention_dropout_applies_when_training(mode: str) -> None:
    rows, T = [[6, 10], [16]], 16
    p = pack(rows, T, torch.Generator().manual_seed(1))
    enc = build(1, attention=mode, attn_dropout=0.5).train()
    a, b = packed_forward(enc, p), packed_forward(enc, p)
    assert not torch.equal(a[p.mask], b[p.mask])
    enc.eval()
    assert torch.equal(packed_forward(enc, p), packed_forward(enc, p))


@pytest.mark.parametrize("mode", TRAINABLE)
def test_activation_checkpointing_matches(mode: str) -> None:
    rows, T = random_rows(4)
    gen = torch.Generator().manual_seed(4)
    p = pack(rows, T, gen)
    weight = torch.randn(p.x.shape, generator=gen)
    grads = []
    for ckpt in (False, True):
        enc = build(4, attention=mode, activation_checkpointing=ckpt).train()
        out = packed_forward(enc, p)
        (out * weight).sum().backward()
        grads.append((out.detach(), [q.grad for q in enc.parameters()]))
    (out0, g0), (out1, g1) = grads
    torch.testing.assert_close(out1, out0, atol=0, rtol=0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_auto_resolution() -> None:
    assert build(attention="auto").attention_mode(torch.device("cpu")) == AUTO_CPU_ATTENTION
    assert AUTO_CPU_ATTENTION in ("mask", "segments")
    assert build(attention="auto").attention_mode(torch.device("cuda")) == "flex"
    assert build(attention="auto", attn_dropout=0.1).attention_mode(torch.device("cuda")) == "mask"


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"attention": "dense"}, "model.attention: unknown 'dense'"),
        ({"attention": "flex", "attn_dropout": 0.1}, "model.attention: 'flex' has no attention dropout"),
    ],
)
def test_attention_setting_is_validated(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Encoder.Config(**kw).validate()


def old_forward(enc: Encoder, x: Tensor, mask: Tensor) -> Tensor:
    """``Encoder.forward`` before packed rows existed, inlined."""
    T = x.shape[1]
    x = x + enc.pos(torch.arange(T))
    for blk in enc.blocks:
        a = blk.attn
        B, T, Dm = x.shape
        h = blk.ln1(x)
        q, k, v = a.qkv(h).view(B, T, 3, a.n_heads, Dm // a.n_heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=True)
        x = x + a.out(y.transpose(1, 2).reshape(B, T, Dm))
        x = x + blk.ff2(F.gelu(blk.ff1(blk.ln2(x))))
    return enc.norm(x).masked_fill(~mask.unsqueeze(-1), 0.0)


@pytest.mark.parametrize("mode", MODES)
def test_unpacked_path_is_bit_identical(mode: str) -> None:
    enc = build(5, attention=mode)
    x = torch.randn(3, 20, D)
    mask = torch.arange(20) < torch.tensor([20, 7, 1])[:, None]
    with torch.no_grad():
        want = old_forward(enc, x, mask)
        assert torch.equal(enc(x, mask), want)
        assert torch.equal(enc(x, mask, positions=torch.arange(20).expand(3, 20)), want)


@pytest.mark.parametrize("mode", MODES)
def test_all_padding_batch(mode: str) -> None:
    enc = build(attention=mode)
    p = pack([[], []], 8, torch.Generator().manual_seed(0))
    with torch.set_grad_enabled(mode != "flex"):
        x = p.x.clone().requires_grad_(mode != "flex")
        out = packed_forward(enc, p, x)
        assert torch.count_nonzero(out) == 0
        if mode != "flex":
            out.sum().backward()
            assert torch.count_nonzero(x.grad) == 0
            assert all(torch.isfinite(q.grad).all() for q in enc.parameters() if q.grad is not None)


@pytest.mark.slow
def test_compiled_blocks_equal_eager():
    """``train.compile``: the encoder with torch.compile'd blocks (inductor, CPU) equals eager within fp32
    tolerance on a packed batch, forward and backward."""
    torch.manual_seed(0)
    cfg = Encoder.Config(
        preset="custom", d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=12, dropout=0.0, attention="auto"
    )
    eager, compiled = Encoder(cfg), Encoder(cfg)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    assert compiled.attention_mode(torch.device("cpu")) == "mask"  # segments would recompile per length set
    segments = torch.tensor([[0] * 5 + [1] * 7, [2] * 12, [3] * 3 + [4] * 4 + [-1] * 5])
    positions = torch.zeros_like(segments)
    for r in range(segments.shape[0]):
        for t in range(segments.shape[1]):
            positions[r, t] = int((segments[r, :t] == segments[r, t]).sum()) if segments[r, t] >= 0 else 0
    x = torch.randn(3, 12, 16)
    weights = torch.linspace(-1, 1, 16)
    results = []
    for model in (eager, compiled):
        xi = x.clone().requires_grad_()
        y = model(xi, segments >= 0, positions, segments)
        (y * weights).sum().backward()
        results.append((y.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()}))
    (y0, gx0, g0), (y1, gx1, g1) = results
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx1, gx0, atol=1e-5, rtol=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="model.attention"):
        Encoder(dataclasses.replace(cfg, attention="segments")).compile_blocks()


def test_train_compile_compiles_the_encoder_blocks_of_both_models():
    """What the engine calls for ``train.compile`` reaches every block of the pre-training and the fine-tuning
    model (compilation itself is lazy: nothing compiles here)."""
    from embeddings.tables import ItemEmbeddings
    from trainer.model.argus import ArgusModel, HeadsConfig, ModelConfig
    from trainer.model.build import compile_dense
    from trainer.model.two_tower import FinetuneConfig, TwoTower

    model = ModelConfig(preset="custom", d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8)
    emb = ItemEmbeddings.Config(item_dim=8)
    for dense in (ArgusModel(model, emb, HeadsConfig()), TwoTower(model, emb, HeadsConfig(), FinetuneConfig())):
        encoder = dense.argus.encoder if isinstance(dense, TwoTower) else dense.encoder
        assert not encoder.compiled and all(b._compiled_call_impl is None for b in encoder.blocks)
        compile_dense(dense)
        assert encoder.compiled and all(b._compiled_call_impl is not None for b in encoder.blocks)


# ---- packed histories that each read their own memory tokens (cached summaries, model.summary.read=memory) -------
P = 3  # memory tokens per history


def with_memory_ids(p: Packed) -> Packed:
    """The histories numbered across rows, as jagged_to_packed numbers samples, every other id left out (as an
    empty sample's would be): history h reads memory 2h."""
    segments = torch.full_like(p.segments, -1)
    for h, (r, s, n) in enumerate(p.histories):
        segments[r, s : s + n] = 2 * h
    return dataclasses.replace(p, segments=segments)


def memory_reference(enc: Encoder, p: Packed, x: Tensor, mem: Tensor) -> list[Tensor]:
    """Each history alone, unpacked, reading its own memory tokens (the one-history-per-row memory path)."""
    one = torch.ones
    return [enc(x[r, s : s + n][None], one(1, n, dtype=torch.bool), prefix=mem[2 * h][None], read="memory")[0]
            for h, (r, s, n) in enumerate(p.histories)]  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_histories_read_their_own_memory(mode: str, seed: int) -> None:
    rows, T = random_rows(seed)
    gen = torch.Generator().manual_seed(seed)
    p = with_memory_ids(pack(rows, T, gen))
    mem = torch.randn(2 * len(p.histories), P, D, generator=gen)  # history h reads memory 2h
    enc = build(seed, attention=mode)
    with torch.no_grad():
        out = enc(p.x, p.mask, p.positions, p.segments, prefix=mem, read="memory")
        ref = memory_reference(enc, p, p.x, mem)
        plain = packed_forward(enc, p)
    assert torch.isfinite(out).all() and torch.count_nonzero(out[~p.mask]) == 0
    for (r, s, n), want in zip(p.histories, ref):
        torch.testing.assert_close(out[r, s : s + n], want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[p.mask], plain[p.mask])  # the memories are read
    if p.histories:  # another history's memory changes nothing outside it
        other = mem.clone()
        other[0] = torch.randn(P, D)
        r, s, n = p.histories[0]
        with torch.no_grad():
            moved = enc(p.x, p.mask, p.positions, p.segments, prefix=other, read="memory")
        own = torch.zeros_like(p.mask)
        own[r, s : s + n] = True
        assert torch.equal(moved[~own], out[~own]) and not torch.equal(moved[own], out[own])


@pytest.mark.parametrize("mode", TRAINABLE)
def test_packed_memory_gradients_match_each_history_alone(mode: str) -> None:
    rows, T = random_rows(3)
    gen = torch.Generator().manual_seed(3)
    p = with_memory_ids(pack(rows, T, gen))
    mem0 = torch.randn(2 * len(p.histories), P, D, generator=gen)
    weight = torch.randn(p.x.shape, generator=gen)
    enc = build(3, attention=mode)
    x, mem = p.x.clone().requires_grad_(), mem0.clone().requires_grad_()
    (enc(x, p.mask, p.positions, p.segments, prefix=mem, read="memory") * weight).sum().backward()
    got = {name: q.grad.clone() for name, q in enc.named_parameters()}
    enc.zero_grad()
    x_ref, mem_ref = p.x.clone().requires_grad_(), mem0.clone().requires_grad_()
    ref = memory_reference(enc, p, x_ref, mem_ref)
    sum((y * weight[r, s : s + n]).sum() for (r, s, n), y in zip(p.histories, ref)).backward()
    torch.testing.assert_close(x.grad[p.mask], x_ref.grad[p.mask], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mem.grad, mem_ref.grad, atol=1e-5, rtol=1e-4)
    for name, q in enc.named_parameters():
        torch.testing.assert_close(got[name], q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_rows_read_summary_tokens_as_memory_only() -> None:
    p = pack([[3, 2]], 8, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="^model.summary.read: packed rows"):
        build(0)(p.x, p.mask, p.positions, p.segments, prefix=torch.zeros(2, P, D), read="tokens")
