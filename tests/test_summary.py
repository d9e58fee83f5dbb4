"""Lifelong-history summaries (trainer/model/summary.py) against brute-force references written with plain ops."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from trainer.model.summary import ReconstructionHead, Summariser, SummaryConfig

D_IN, D_OUT = 8, 12


def make(attention: str = "linear", chunk: int = 4, grad_chunks: int = 1, layers: int = 2, seed: int = 0) -> Summariser:
    torch.manual_seed(seed)
    cfg = SummaryConfig(
        tokens=4, dim=16, heads=2, attention=attention, layers=layers, chunk=chunk, grad_chunks=grad_chunks
    )
    return Summariser(cfg, D_IN, D_OUT).double()


def histories(lengths: list[int], length: int | None = None, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    length = max(lengths) if length is None else length
    return torch.randn(len(lengths), length, D_IN, generator=g, dtype=torch.double), torch.tensor(lengths)


def heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """(n, d) -> (h, n, d / h)."""
    return t.reshape(t.shape[0], h, t.shape[1] // h).transpose(0, 1)


def unheads(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def reference(m: Summariser, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """One user at a time, the whole unpadded history at once, attention matrices materialised."""
    h_, dh = m.cfg.heads, m.cfg.dim // m.cfg.heads
    out = []
    for b in range(x.shape[0]):
        n = int(lengths[b])
        hist = m.in_proj(x[b, :n])  # (n, dim)
        z = m.seeds
        for layer in m.layers:
            if layer.hist_mlp is not None:
                hist = hist + layer.hist_mlp(hist)
            k, v = (heads(t, h_) for t in layer.kv(layer.kv_norm(hist)).chunk(2, dim=-1))  # (H, n, dh)
            if m.cfg.attention == "linear":
                q = heads(layer.q(layer.q_norm(z)), h_) * dh**-0.5
                a = F.silu(q) @ F.silu(k).transpose(1, 2) / max(n, 1)  # (H, T, n)
            else:
                q = heads(layer.q(layer.q_norm(m.seeds)), h_)
                s = q @ k.transpose(1, 2) * dh**-0.5
                a = (s - s.max(-1, keepdim=True).values).exp() if n else s
                a = a / a.sum(-1, keepdim=True) if n else a
            z = z + layer.o(unheads(a @ v))
            qs, ks, vs = (heads(t, h_) for t in layer.qkv_self(layer.sa_norm(z)).chunk(3, dim=-1))
            att = (qs @ ks.transpose(1, 2) * dh**-0.5).exp()
            z = z + layer.o_self(unheads(att / att.sum(-1, keepdim=True) @ vs))
            z = z + layer.ff(z)
        out.append(m.out_proj(m.out_norm(z)))
    return torch.stack(out)


@pytest.mark.parametrize("attention", ["linear", "softmax"])
@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_streamed_matches_brute_force(attention: str, chunk: int) -> None:
    m = make(attention, chunk=chunk)
    x, lengths = histories([17, 0, 5, 11, 1])
    with torch.no_grad():
        torch.testing.assert_close(m(x, lengths), reference(m, x, lengths))


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_brute_force_reference_can_tell_modes_apart(attention: str) -> None:
    """Guards the reference: the other mode's (or a history-blind) output must not pass for this one."""
    m = make(attention)
    x, lengths = histories([9, 6])
    other = copy.deepcopy(m)
    other.cfg = dataclasses.replace(m.cfg, attention="softmax" if attention == "linear" else "linear")
    with torch.no_grad():
        ref = reference(m, x, lengths)
        assert not torch.allclose(other(x, lengths), ref)
        assert not torch.allclose(m(x, torch.zeros_like(lengths)), ref)


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_chunk_invariance(attention: str) -> None:
    x, lengths = histories([23, 4, 0, 19])
    with torch.no_grad():
        outs = [make(attention, chunk=c)(x, lengths) for c in (1, 5, 1000)]
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2])


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_padding_contributes_nothing(attention: str) -> None:
    m = make(attention, chunk=3)
    x, lengths = histories([10, 3, 0], length=14)
    pad = torch.arange(14)[None, :] >= lengths[:, None]
    y = x.clone()
    y[pad] = torch.randn(int(pad.sum()), D_IN, dtype=torch.double) * 1e3
    y[0, 12, 0] = float("nan")
    with torch.no_grad():
        out = m(x, lengths)
        torch.testing.assert_close(m(y, lengths), out)
        assert torch.isfinite(out).all()
        z = x.clone()
        z[1, 2] += 1.0  # a valid position does matter
        assert not torch.allclose(m(z, lengths), out)


@pytest.mark.parametrize("attention", ["linear", "softmax"])
@pytest.mark.parametrize("grad_chunks", [1, 2])
def test_gradients_only_through_each_history_last_chunks(attention: str, grad_chunks: int) -> None:
    chunk = 4
    m = make(attention, chunk=chunk, grad_chunks=grad_chunks)
    x, lengths = histories([20, 13, 3])
    x.requires_grad_(True)
    out = m(x, lengths)
    out.square().sum().backward()
    nonzero = x.grad.abs().sum(-1) > 0  # (B, L)
    pos = torch.arange(x.shape[1])[None, :]
    window = (pos < lengths[:, None]) & (pos >= lengths[:, None] - grad_chunks * chunk)
    assert torch.equal(nonzero, window)
    assert all(p.grad is not None for p in m.parameters())

    full = copy.deepcopy(m)
    full.cfg = dataclasses.replace(m.cfg, grad_chunks=1000)
    x2 = x.detach().clone().requires_grad_(True)
    out2 = full(x2, lengths)
    torch.testing.assert_close(out2, out)
    out2.square().sum().backward()
    assert torch.equal(x2.grad.abs().sum(-1) > 0, pos < lengths[:, None])


def saved_and_state_shapes(m: Summariser, length: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Shapes of every tensor autograd saved during forward, and of the state handed to readout."""
    saved: list[tuple[int, ...]] = []
    states = []
    readout = m.readout
    m.readout = lambda st, *a: (states.append(st), readout(st, *a))[1]  # instance attribute: forward calls it

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    x = torch.randn(2, length, D_IN, requires_grad=True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x, torch.tensor([length, length - 123])).sum().backward()
    finally:
        del m.readout
    assert saved and len(states) == 1 and x.grad is not None
    return saved, [tuple(t.shape) for t in states[0].tensors()]


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_memory_saved_for_backward_does_not_grow_with_history(attention: str) -> None:
    torch.manual_seed(0)
    cfg = SummaryConfig(tokens=4, dim=16, heads=2, attention=attention, layers=2, chunk=300, grad_chunks=2)
    m = Summariser(cfg, D_IN, D_OUT)
    saved_short, state_short = saved_and_state_shapes(m, 10**3)
    saved_long, state_long = saved_and_state_shapes(m, 10**5)
    assert saved_short == saved_long
    assert state_short == state_long
    # Nothing longer than a chunk of the batch (2 x 300 rows) was kept; the no-grad chunks kept nothing at all.
    assert max(s for shape in saved_long for s in shape) <= 2 * cfg.chunk


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_incremental_updates_match_forward(attention: str) -> None:
    m = make(attention, chunk=6)
    x, lengths = histories([15, 8, 0])
    with torch.no_grad():
        state = m.init_state(3)
        sizes = [tuple(t.shape) for t in state.tensors()]
        s = 0
        for c in (1, 4, 2, 5, 3):  # chunks of any size, in arrival order
            mask = torch.arange(s, s + c)[None, :] < lengths[:, None]
            state = m.update(state, x[:, s : s + c], mask)
            s += c
        assert [tuple(t.shape) for t in state.tensors()] == sizes
        assert state.count.tolist() == lengths.tolist()
        torch.testing.assert_close(m.readout(state), m(x, lengths))


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_pieces_read_apart_and_combined_match_one_stream(attention: str) -> None:
    m = make(attention, chunk=5)
    x, lengths = histories([13, 6, 0, 9])
    cuts = [0, 0, 2, 3, 9, 9, 13]  # pieces of every size: empty for every history, and for the shorter ones
    with torch.no_grad():
        state = m.init_state(4)
        for s, e in zip(cuts, cuts[1:]):
            mask = torch.arange(s, e)[None, :] < lengths[:, None]
            piece = m.update(m.init_state(4), x[:, s:e], mask)  # read on its own
            state = m.combine(state, piece)
        torch.testing.assert_close(m.readout(state), m(x, lengths))
        torch.testing.assert_close(m.readout(state.rows(torch.tensor([3, 0]))), m(x, lengths)[[3, 0]])


def test_summariser_rejects_zero_tokens() -> None:
    with pytest.raises(ValueError, match=r"^model\.summary\.tokens:"):
        Summariser(SummaryConfig(tokens=0), D_IN, D_OUT)


def recon_inputs(seed: int = 0) -> tuple[ReconstructionHead, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    head = ReconstructionHead(d_model=8, d_item=6, n_heads=2).double()
    summary = torch.randn(2, 3, 8, dtype=torch.double)
    window = torch.randn(2, 7, 8, dtype=torch.double)
    return head, summary, window, torch.tensor([7, 5])


def test_reconstruction_head_is_causal() -> None:
    head, summary, window, lengths = recon_inputs()
    with torch.no_grad():
        pred = head(summary, window, lengths)
        assert pred.shape == (2, 7, 6)
        for j in range(6):
            w = window.clone()
            w[:, j + 1 :] += torch.randn_like(w[:, j + 1 :])
            new = head(summary, w, lengths)
            torch.testing.assert_close(new[:, : j + 1], pred[:, : j + 1])
            assert not torch.allclose(new[0, j + 1], pred[0, j + 1])
        w = window.clone()
        w[1, 5:] = float("nan")  # padding of the second user
        torch.testing.assert_close(head(summary, w, lengths), pred)


def test_reconstruction_head_sees_summary_everywhere() -> None:
    head, summary, window, lengths = recon_inputs()
    with torch.no_grad():
        pred = head(summary, window, lengths)
        new = head(summary + torch.randn_like(summary), window, lengths)
    for b in range(2):
        for j in range(int(lengths[b])):
            assert not torch.allclose(new[b, j], pred[b, j])


@pytest.mark.parametrize(
    "key, value",
    [
        ("tokens", -1),
        ("dim", 0),
        ("heads", 3),  # does not divide dim 16
        ("heads", 0),
        ("attention", "Linear"),
        ("layers", 0),
        ("chunk", 0),
        ("grad_chunks", 1.5),
        ("reconstruction_weight", -0.1),
        ("reconstruction_weight", float("nan")),
    ],
)
def test_validate_names_the_key_on_one_line(key: str, value: object) -> None:
    cfg = dataclasses.replace(SummaryConfig(tokens=4, dim=16, heads=2), **{key: value})
    before = dataclasses.asdict(cfg)
    with pytest.raises(ValueError) as err:
        cfg.validate("job.model.summary")
    msg = str(err.value)
    assert msg.startswith(f"job.model.summary.{key}: ") and "\n" not in msg
    assert dataclasses.asdict(cfg) == before or value != value  # nan != nan


def test_validate_accepts_and_does_not_mutate() -> None:
    cfgs = [SummaryConfig(), SummaryConfig(tokens=128, dim=256, heads=4, attention="softmax", reconstruction_weight=1)]
    for cfg in cfgs:
        before = copy.deepcopy(cfg)
        cfg.validate()
        assert cfg == before and type(cfg.reconstruction_weight) is type(before.reconstruction_weight)
