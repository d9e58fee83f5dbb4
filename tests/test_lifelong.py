"""In-line lifelong-history summaries (``model.summary``): windows, the prefixed encoder and the model's states,
each against a reference written with plain ops, plus the no-leakage perturbation test."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embeddings.tables import ItemEmbeddings
from trainer.model.argus import ArgusModel, HeadsConfig, ModelConfig
from trainer.model.encoder import Encoder
from trainer.model.interaction import jagged_to_windows, side_table_rows
from trainer.model.summary import Summariser, SummaryConfig, summary_flops, summary_param_count


def windows_by_hand(lengths: list[int], window: int) -> list[tuple[int, list[int]]]:
    """(sample, positions) of every window, sample by sample, oldest first, cut from each sample's end."""
    out = []
    for b, n in enumerate(lengths):
        cuts = list(range(n, 0, -window))[::-1]  # window ends, oldest first
        starts = [max(0, e - window) for e in cuts] or [0]
        ends = cuts or [0]
        out += [(b, list(range(s, e))) for s, e in zip(starts, ends)]
    return out


@pytest.mark.parametrize("window", [1, 3, 4, 8])
def test_windows_match_a_cut_by_hand(window: int) -> None:
    lengths = [7, 1, 4, 9, 0, 3]
    values = torch.arange(sum(lengths), dtype=torch.float).unsqueeze(1)
    w = jagged_to_windows(values, torch.tensor(lengths), window)
    want = windows_by_hand(lengths, window)
    starts = [0] + torch.cumsum(torch.tensor(lengths), 0).tolist()
    assert w.grid.shape[0] == len(want) and w.most == max(len(range(0, max(n, 1), window)) for n in lengths)
    for r, (b, positions) in enumerate(want):
        assert int(w.sample[r]) == b
        assert int(w.back[r]) == sum(1 for s, _ in want[r + 1 :] if s == b)
        assert w.mask[r].tolist() == [True] * len(positions) + [False] * (window - len(positions))
        assert w.grid[r, : len(positions), 0].tolist() == [float(starts[b] + p) for p in positions]
    # every jagged token's (row, column) points at itself
    assert torch.equal(w.grid[w.index][:, 0], values[:, 0])


def test_window_slots_count_the_windows_grid() -> None:
    """tokens/padding_share's positions under model.summary: the windows' grid, counted from host lengths."""
    from trainer.model.interaction import window_slots

    g = torch.Generator().manual_seed(5)
    for window in (1, 4, 16):
        lengths = torch.randint(0, 40, (9,), generator=g)
        w = jagged_to_windows(torch.zeros(int(lengths.sum()), 1), lengths, window)
        assert window_slots(lengths.numpy(), window) == w.mask.numel()


def summariser(attention: str, chunk: int = 3, grad_chunks: int = 1) -> Summariser:
    torch.manual_seed(0)
    cfg = SummaryConfig(tokens=3, dim=8, heads=2, attention=attention, layers=2, chunk=chunk, grad_chunks=grad_chunks)
    return Summariser(cfg, 6, 10).double()


@pytest.mark.parametrize("attention", ["linear", "softmax"])
@pytest.mark.parametrize("grad_windows", [1, 2])
def test_window_summaries_equal_a_summary_of_each_older_prefix(attention: str, grad_windows: int) -> None:
    m = summariser(attention)
    lengths = [10, 2, 7, 0, 5]
    g = torch.Generator().manual_seed(1)
    values = torch.randn(sum(lengths), 6, generator=g, dtype=torch.double, requires_grad=True)
    w = jagged_to_windows(values, torch.tensor(lengths), 3)
    got = m.window_summaries(w.grid, w.mask, w.sample, w.back, w.count, w.most, grad_windows)
    starts = [0] + torch.cumsum(torch.tensor(lengths), 0).tolist()
    for r, (b, positions) in enumerate(windows_by_hand(lengths, 3)):
        older = values[starts[b] : starts[b] + (positions[0] if positions else 0)]
        want = m(older.unsqueeze(0), torch.tensor([older.shape[0]]))[0]
        torch.testing.assert_close(got[r], want)
        # gradients reach the grad_windows windows just before this one, nothing older, nothing newer
        (grad,) = torch.autograd.grad(got[r].sum(), values, retain_graph=True)
        reached = grad.abs().sum(1) > 0
        first = positions[0] if positions else 0
        lo = max(0, first - 3 * grad_windows)
        span = first - lo
        assert not reached[: starts[b] + lo].any() and not reached[starts[b] + first :].any()
        if span:  # the last grad_windows windows before the cut (the oldest may be short): read with gradients
            assert reached[starts[b] + lo : starts[b] + first].all()


def reference_encoder(
    enc: Encoder, x: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor, read: str = "tokens"
) -> torch.Tensor:
    """Plain ops, one row at a time, attention masked by hand: the row's queries read keys and values of [its block's
    norm of the prefix | the row so far]. ``tokens``: the prefix runs through every block too, seeing only itself;
    ``memory``: it stays as given."""
    out = []
    P, T = prefix.shape[1], x.shape[1]
    allowed = torch.ones(T, P + T, dtype=torch.bool)
    allowed[:, P:] = torch.tril(torch.ones(T, T, dtype=torch.bool))

    def _proj(blk: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
        a = blk.attn
        return a.qkv(blk.ln1(t)).view(t.shape[0], 3, a.n_heads, a.head_dim).permute(1, 2, 0, 3)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        s = (q @ k.transpose(1, 2)) / q.shape[-1] ** 0.5
        return (s.masked_fill(~keep, float("-inf")).softmax(-1) @ v).transpose(0, 1).reshape(q.shape[1], -1)

    for r in range(x.shape[0]):
        z, h = prefix[r], x[r] + enc.pos.weight[:T]
        for blk in enc.blocks:
            a = blk.attn
            (qz, kz, vz), (q, k, v) = (_proj(blk, t) for t in (z, h))
            h = h + a.out(attend(q, torch.cat([kz, k], 1), torch.cat([vz, v], 1), allowed))
            h = h + blk.ff2(F.gelu(blk.ff1(blk.ln2(h))))
            if read == "tokens":
                z = z + a.out(attend(qz, kz, vz, torch.ones(P, P, dtype=torch.bool)))
                z = z + blk.ff2(F.gelu(blk.ff1(blk.ln2(z))))
        out.append(enc.norm(h) * mask[r, :, None])
    return torch.stack(out)


@pytest.mark.parametrize("read", ["tokens", "memory"])
def test_prefixed_encoder_equals_plain_ops(read: str) -> None:
    torch.manual_seed(0)
    enc = Encoder.Config(preset="custom", d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=6).build().double()
    enc.eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, 16, generator=g, dtype=torch.double)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 2, 4])[:, None]
    prefix = torch.randn(3, 4, 16, generator=g, dtype=torch.double)
    got = enc(x, mask, prefix=prefix, read=read)
    torch.testing.assert_close(got, reference_encoder(enc, x, mask, prefix, read))
    other_read = enc(x, mask, prefix=prefix, read="memory" if read == "tokens" else "tokens")
    assert not torch.allclose(got, other_read)
    # the prefix is read: a different one changes every real output
    other = enc(x, mask, prefix=torch.randn(3, 4, 16, generator=g, dtype=torch.double), read=read)
    assert ((other - got).abs().sum(-1) > 1e-6)[mask].all()
    # flex (what CUDA runs) allows the same keys (forward only: no CPU backward)
    flex = dataclasses.replace(enc.cfg, attention="flex").build().double().eval()
    flex.load_state_dict(enc.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(flex(x, mask, prefix=prefix, read=read), got)


def model_and_inputs(
    lengths: list[int], layout: str = "merged", attention: str = "linear", seed: int = 0, recon: float = 0.0,
    read: str = "tokens", tokens: int = 3, windows: bool = False,
) -> tuple[ArgusModel, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:  # fmt: skip
    """A small double model with ``tokens`` summary tokens (0: none) and ``model.windows``, and random inputs."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        preset="custom", d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8, token_layout=layout,
        num_contexts=4, side_dim=4, windows=windows,
        summary=SummaryConfig(tokens=tokens, dim=8, heads=2, attention=attention, chunk=4, reconstruction_weight=recon,
                              read=read),
    )  # fmt: skip
    model = ArgusModel(cfg, ItemEmbeddings.Config(item_dim=8), HeadsConfig()).double().eval()
    n = sum(lengths)
    g = torch.Generator().manual_seed(seed + 1)
    item = torch.randn(n, 8, generator=g, dtype=torch.double)
    side = {k: torch.randint(0, rows, (n,), generator=g) for k, rows in side_table_rows(4).items()}
    return model, item, side, torch.tensor(lengths)


@pytest.mark.parametrize(("layout", "read"), [("merged", "tokens"), ("interleaved", "tokens"), ("merged", "memory")])
def test_states_equal_windows_encoded_after_the_summary_of_older_ones(layout: str, read: str) -> None:
    lengths = [11, 3, 8]
    model, item, side, lengths_t = model_and_inputs(lengths, layout, read=read)
    got = model.states(item, side, lengths_t)
    k = 2 if layout == "interleaved" else 1
    tokens = model.interaction(item, side)
    window = model.window // k  # interactions per window
    starts = [0] + torch.cumsum(lengths_t * k, 0).tolist()
    for b, positions in windows_by_hand(lengths, window):
        first, n = positions[0] * k, len(positions) * k
        older = tokens[starts[b] : starts[b] + first]
        summary = model.summary(older.unsqueeze(0), torch.tensor([older.shape[0]]))
        x = torch.zeros(1, model.window, tokens.shape[1], dtype=torch.double)
        x[0, :n] = tokens[starts[b] + first : starts[b] + first + n]
        mask = torch.arange(model.window)[None, :] < n
        want = reference_encoder(model.encoder, x, mask, summary, read)[0, :n]
        torch.testing.assert_close(got[starts[b] + first : starts[b] + first + n], want)


@pytest.mark.parametrize("layout", ["merged", "interleaved"])
def test_windows_without_a_summary_are_each_encoded_on_their_own(layout: str) -> None:
    """model.windows (the control for model.summary on the same samples): every window of a sample, cut from its
    end, gets the states the same weights give it as a sample of its own (no window reads another)."""
    lengths = [11, 3, 8, 16]
    model, item, side, _ = model_and_inputs(lengths, layout, seed=3, tokens=0, windows=True)
    plain, *_ = model_and_inputs(lengths, layout, seed=3, tokens=0)  # the same weights, no windows
    plain.load_state_dict(model.state_dict())
    k = 2 if layout == "interleaved" else 1
    got = model.states(item, side, torch.tensor(lengths))
    starts = [0, *np.cumsum(lengths).tolist()]
    pieces = [[starts[b] + p for p in positions] for b, positions in windows_by_hand(lengths, model.window // k)]
    flat = torch.tensor([i for piece in pieces for i in piece])
    want = plain.states(item[flat], {key: v[flat] for key, v in side.items()}, torch.tensor([len(x) for x in pieces]))
    tokens = (flat[:, None] * k + torch.arange(k)).flatten()  # each interaction's k tokens, in order
    torch.testing.assert_close(got[tokens], want)
    # a sample no longer than the window: exactly the plain model's states
    short, m = torch.tensor([3, model.window // k]), 3 + model.window // k
    torch.testing.assert_close(model.states(item[:m], {key: v[:m] for key, v in side.items()}, short),
                               plain.states(item[:m], {key: v[:m] for key, v in side.items()}, short))  # fmt: skip


@pytest.mark.parametrize(("layout", "mode"), [("merged", "segments"), ("interleaved", "segments"),
                                             ("merged", "mask"), ("interleaved", "flex")])  # fmt: skip
def test_packed_windows_read_their_own_cached_summaries(layout: str, mode: str) -> None:
    """Cached summaries on packed rows (data.batch_tokens, read as memory): every sample's states equal those of the
    same sample on its own row after its own summary, wherever the packing puts it."""
    k = 2 if layout == "interleaved" else 1
    lengths = [3, 2, 4, 1, 1] if k == 2 else [5, 3, 8, 1, 2]
    model, item, side, lengths_t = model_and_inputs(lengths, layout, read="memory")
    model.encoder.cfg = dataclasses.replace(model.encoder.cfg, attention=mode)
    prefix = torch.randn(len(lengths), 3, 8, generator=torch.Generator().manual_seed(5), dtype=torch.double)
    with torch.no_grad():
        alone = model.states(item, side, lengths_t, None, prefix)
        row_len = model.window // k  # interactions per row: samples out of order, some rows shared, gaps between
        rows, cols = torch.tensor([1, 0, 2, 0, 1]), torch.tensor([0, 0, 0, row_len - 1, row_len - lengths[4]])
        packed = model.states(item, side, lengths_t, (rows, cols, (3, row_len)), prefix)
        torch.testing.assert_close(packed, alone)
        other = prefix.clone()
        other[3] = torch.randn(3, 8, dtype=torch.double)  # one sample's summary moves that sample's states only
        moved = model.states(item, side, lengths_t, (rows, cols, (3, row_len)), other)
    starts = [0, *torch.cumsum(lengths_t * k, 0).tolist()]
    changed = (moved - packed).abs().sum(1) > 1e-9
    assert changed[starts[3] : starts[4]].all() and not changed[: starts[3]].any() and not changed[starts[4] :].any()


@pytest.mark.parametrize(("attention", "read"), [("linear", "tokens"), ("softmax", "tokens"), ("linear", "memory")])
def test_no_future_interaction_reaches_an_earlier_state(attention: str, read: str) -> None:
    """Perturb one interaction: every state before it, in its sample and in the others, stays the same."""
    lengths = [21, 9, 16]
    model, item, side, lengths_t = model_and_inputs(lengths, attention=attention, read=read)
    base = model.states(item, side, lengths_t)
    starts = [0] + torch.cumsum(lengths_t, 0).tolist()
    for b, t in [(0, 3), (0, 8), (0, 17), (2, 8), (2, 15), (1, 0)]:
        moved = item.clone()
        moved[starts[b] + t] += 5.0
        out = model.states(moved, side, lengths_t)
        changed = (out - base).abs().sum(1) > 1e-9
        assert not changed[: starts[b] + t].any() and not changed[starts[b + 1] :].any()
        assert changed[starts[b] + t : starts[b + 1]].all()  # later windows read it through their summary


def test_model_summary_config_params_and_flops() -> None:
    from trainer.flops import encoder_flops_per_interaction
    from trainer.job import JobConfig
    from trainer.memory import dense_params

    model, *_ = model_and_inputs([4])
    s = model.summary
    assert summary_param_count(s.cfg, 16, 16) == sum(p.numel() for p in s.parameters())
    job = JobConfig(out="x")
    job.model = ModelConfig(preset="nano", max_seq_len=64, summary=SummaryConfig(tokens=8, dim=16, chunk=64))
    job.data = dataclasses.replace(job.data, max_seq_len=256)
    built = ArgusModel(job.model, job.embeddings, job.heads)
    assert dense_params(job).total == sum(p.numel() for p in built.parameters())
    job.model.summary.reconstruction_weight = 0.5
    built = ArgusModel(job.model, job.embeddings, job.heads)
    assert built.reconstruction is not None
    assert dense_params(job).total == sum(p.numel() for p in built.parameters())
    job.model.summary.reconstruction_weight = 0.0
    plain = dataclasses.replace(job, model=dataclasses.replace(job.model, summary=SummaryConfig()))
    plain.data = dataclasses.replace(plain.data, max_seq_len=64)
    # a window of 64 after 8 summary tokens costs more per interaction than 64 alone, far less than 256
    longer = dataclasses.replace(plain, model=dataclasses.replace(plain.model, max_seq_len=256))
    longer.data = dataclasses.replace(plain.data, max_seq_len=256)
    f_sum, f_plain, f_long = (encoder_flops_per_interaction(c) for c in (job, plain, longer))
    assert f_plain < f_sum < f_long
    # read from a cache (one window per sample): the encoder's share as in-line, the summariser's reads replaced by
    # the projection of the cached tokens (8 x 16 -> d_model per 64-token window, x3 to train)
    cached = dataclasses.replace(job, data=dataclasses.replace(job.data, max_seq_len=64, summary_cache="c"))
    d = job.model.resolved().d_model
    reads = summary_flops(job.model.summary, d, d, 64)
    assert encoder_flops_per_interaction(cached) == pytest.approx(f_sum - reads + 3 * 2 * 8 * 16 * d / 64)
    # read as memory: the window's own rows (with 8 more keys each) and each layer's qkv of the 8 tokens, x3 to train
    from trainer.flops import encoder_flops_per_token

    memory = dataclasses.replace(
        job, model=dataclasses.replace(job.model, summary=dataclasses.replace(job.model.summary, read="memory"))
    )
    enc = job.model.resolved()
    per_token = encoder_flops_per_token(dense_params(job).matmul - summary_param_count(job.model.summary, d, d),
                                        enc.n_layers, d, 64 + 2 * 8)  # fmt: skip
    want = per_token + 6 * enc.n_layers * 3 * d * d * 8 / 64 + reads
    assert encoder_flops_per_interaction(memory) == pytest.approx(want)
    assert f_plain < encoder_flops_per_interaction(memory) < f_sum
    # the reconstruction head is counted once, by its own term, not again in the encoder's 6N
    from trainer.flops import flops_per_interaction, reconstruction_head_flops

    recon = dataclasses.replace(
        job,
        model=dataclasses.replace(job.model, summary=dataclasses.replace(job.model.summary, reconstruction_weight=1.0)),
    )
    assert encoder_flops_per_interaction(recon) == pytest.approx(f_sum)
    extra = reconstruction_head_flops(recon, 1000)
    assert extra > 0 and flops_per_interaction(recon, 1000) - flops_per_interaction(job, 1000) == pytest.approx(extra)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"data.max_seq_len": 0}, "data.max_seq_len"),
        ({"data.batch_tokens": 512}, "data.batch_tokens"),
        # packed rows: only on a summary cache read as memory
        ({"data.batch_tokens": 512, "data.summary_cache": "c", "data.max_seq_len": 64}, "data.batch_tokens"),
        ({"parallel.sp": 2}, "parallel.sp"),
        (
            {"model.summary.tokens": 0, "model.summary.reconstruction_weight": 0.5},
            "model.summary.reconstruction_weight",
        ),
        ({"model.summary.heads": 3}, "model.summary.heads"),
    ],
)
def test_summary_settings_are_checked_with_one_line_naming_the_key(override: dict, key: str) -> None:
    from trainer.config import ConfigError, from_dict
    from trainer.job import JobConfig

    base = {
        "out": "x",
        "model": {"max_seq_len": 64, "summary": {"tokens": 8, "dim": 16}},
        "data": {"path": "d", "max_seq_len": 256},
    }
    ok = from_dict(JobConfig, base)
    ok.validate()
    for dotted, value in override.items():
        node = base
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    with pytest.raises(ConfigError) as err:
        from_dict(JobConfig, base).validate()
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"data.max_seq_len": 0}, "data.max_seq_len"),
        ({"data.batch_tokens": 512}, "data.batch_tokens"),
        ({"parallel.sp": 2}, "parallel.sp"),
        ({"finetune.init": "pre"}, "model.windows"),
        ({"model.windows": "yes"}, "model.windows"),
    ],
)
def test_windows_settings_are_checked_with_one_line_naming_the_key(override: dict, key: str) -> None:
    from trainer.config import ConfigError, from_dict
    from trainer.job import JobConfig

    base = {"out": "x", "model": {"max_seq_len": 64, "windows": True}, "data": {"path": "d", "max_seq_len": 256}}
    from_dict(JobConfig, base).validate()
    with pytest.raises(ConfigError, match="^data.max_seq_len: 256 interactions x 1 tokens exceed"):  # not without it
        from_dict(JobConfig, {**base, "model": {"max_seq_len": 64}}).validate()
    for dotted, value in override.items():
        section, leaf = dotted.split(".")
        base[section] = {**base.get(section, {}), leaf: value}
    with pytest.raises(ConfigError) as err:
        from_dict(JobConfig, base).validate()
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_windows_is_no_model_difference_for_fine_tuning_or_init_from() -> None:
    from trainer.finetune import model_difference
    from trainer.job import JobConfig

    pre = JobConfig(out="x", model=ModelConfig(max_seq_len=64, windows=True))
    assert model_difference(pre, dataclasses.replace(pre, model=dataclasses.replace(pre.model, windows=False))) is None
    other = dataclasses.replace(pre, model=dataclasses.replace(pre.model, max_seq_len=32))
    assert model_difference(pre, other) == ("model.max_seq_len", 32, 64)


def test_windows_cost_what_the_same_context_costs_on_samples_cut_to_it() -> None:
    """The planner's FLOPs and activations of model.windows (windows of 64 on samples of 256) equal those of context
    64 on samples of 64, four times as many a batch: the same rows through the same blocks; samples of 200 fill as
    many windows (the oldest padded), and a window runs its context however short the sample."""
    from trainer.flops import encoder_flops_per_interaction
    from trainer.job import JobConfig
    from trainer.memory import activations

    windows = JobConfig(out="x")
    windows.model = ModelConfig(preset="nano", max_seq_len=64, windows=True)
    windows.data = dataclasses.replace(windows.data, max_seq_len=256, batch_size=8)
    cut = dataclasses.replace(windows, model=dataclasses.replace(windows.model, windows=False))
    cut.data = dataclasses.replace(windows.data, max_seq_len=64, batch_size=32)
    whole = dataclasses.replace(cut, model=dataclasses.replace(cut.model, max_seq_len=256))
    whole.data = dataclasses.replace(windows.data)
    assert encoder_flops_per_interaction(windows) == encoder_flops_per_interaction(cut)
    assert encoder_flops_per_interaction(windows) < encoder_flops_per_interaction(whole)
    assert activations(windows).total == activations(cut).total
    padded = dataclasses.replace(windows, data=dataclasses.replace(windows.data, max_seq_len=200))
    assert activations(padded).layers == activations(windows).layers
    assert encoder_flops_per_interaction(padded) == encoder_flops_per_interaction(windows)
    short = dataclasses.replace(windows, data=dataclasses.replace(windows.data, max_seq_len=32))
    plain32 = dataclasses.replace(short, model=dataclasses.replace(short.model, windows=False))
    assert encoder_flops_per_interaction(short) == encoder_flops_per_interaction(plain32)


def test_packed_rows_on_a_summary_cache_read_as_memory_only_and_not_in_fine_tuning() -> None:
    from trainer.config import ConfigError, from_dict
    from trainer.job import JobConfig

    base = {"out": "x", "model": {"max_seq_len": 64, "summary": {"tokens": 8, "dim": 16, "read": "memory"}},
            "data": {"path": "d", "max_seq_len": 64, "summary_cache": "c", "batch_tokens": 512}}  # fmt: skip
    from_dict(JobConfig, base).validate()
    base["finetune"] = {"init": "pre"}  # a fine-tuning run
    with pytest.raises(ConfigError, match="^data.batch_tokens"):
        from_dict(JobConfig, base).validate()


def test_reconstruction_predictions_see_no_future_and_train_only_the_summary_side() -> None:
    """The reconstruction head's prediction for a position never depends on a later interaction; its loss, added to
    the total with its weight, reaches the summariser and not the encoder's blocks."""
    from trainer.model.argus import target_index
    from trainer.model.heads import sampled_softmax_loss

    lengths = [21, 9, 16]
    model, item, side, lengths_t = model_and_inputs(lengths, recon=0.5)
    _, base = model._states(item, side, lengths_t)
    starts = [0] + torch.cumsum(lengths_t, 0).tolist()
    for b, t in [(0, 3), (0, 17), (2, 8)]:
        moved = item.clone()
        moved[starts[b] + t] += 5.0
        _, out = model._states(moved, side, lengths_t)
        changed = (out - base).abs().sum(1) > 1e-9
        assert not changed[: starts[b] + t].any() and not changed[starts[b + 1] :].any()
        assert changed[starts[b] + t : starts[b + 1]].any()

    model.train()
    n, g = item.shape[0], torch.Generator().manual_seed(4)
    tgt = target_index(lengths_t)
    neg, neg_ids = torch.randn(5, 8, generator=g, dtype=torch.double), torch.arange(100, 105)
    ids = torch.arange(n)
    event, played = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 101, (n,), generator=g)
    zeros = torch.zeros(tgt.numel(), dtype=torch.double)
    args = (item, side, neg, lengths_t, tgt, torch.zeros(0, dtype=torch.long), ids, neg_ids, event, played, zeros,
            torch.zeros(5, dtype=torch.double))  # fmt: skip
    torch.manual_seed(7)
    out = model(*args)
    torch.manual_seed(7)  # the same dropout masks
    _, recon = model._states(item, side, lengths_t)
    rows, _ = model.state_rows(tgt)
    cand = torch.cat([item[tgt][:0].float(), neg.float()])
    want = sampled_softmax_loss(recon[rows].float(), item[tgt].float(), ids[tgt], cand, neg_ids, zeros,
                                torch.zeros(5, dtype=torch.double), model.heads_cfg.next_item)  # fmt: skip
    torch.testing.assert_close(out["loss/reconstruction"], want)
    hc = model.heads_cfg
    total = hc.next_item.weight * out["loss/next_item"] + hc.feedback.weight * out["loss/feedback"]
    torch.testing.assert_close(out["loss"], total + 0.5 * out["loss/reconstruction"])
    blocks = list(model.encoder.blocks.parameters())
    grads = torch.autograd.grad(out["loss/reconstruction"], [model.summary.seeds, *blocks], allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert all(g is None or not g.abs().sum() for g in grads[1:])


# ---- the summary cache (argus summarize, export --summary-cache) ----------------------------------------------------
@pytest.fixture(scope="module")
def long_samples(tmp_path_factory) -> Path:
    """Histories of up to 48 interactions, written as samples of 48."""
    from trainer.data.synth import synthesize

    data = tmp_path_factory.mktemp("long_samples") / "data"
    synthesize(data, users=40, items=120, mean_len=40, shards=2, seed=4, holdout="loo", max_len=48, workers=1)
    return data


@pytest.fixture(scope="module")
def summary_run(tmp_path_factory, long_samples) -> tuple[Path, Path]:
    """A run with summary tokens (windows of 8 interactions, samples of 48) on histories of up to 48."""
    from helpers import TINY_MODEL, argus_ranks

    root, data = tmp_path_factory.mktemp("lifelong"), long_samples
    tiny = [x for x in TINY_MODEL if not x.startswith("model.max_seq_len")]
    argus_ranks("train", "configs/mini.yaml", f"data.path={data}", f"out={root / 'run'}", *tiny,
                "model.max_seq_len=8", "data.max_seq_len=48", "model.summary.tokens=4", "model.summary.dim=16",
                "model.summary.chunk=8", "train.steps=3", "train.log_every=1", "data.batch_size=8",
                "data.num_workers=0", "optim.warmup_steps=1", "eval.every=0", nproc=1)  # fmt: skip
    return root / "run", data


@pytest.mark.slow
@pytest.mark.parametrize("read", ["tokens", "memory"])
def test_zero3_trains_the_summariser_as_zero2_does(summary_run, tmp_path, read: str) -> None:
    """ZeRO-3 partitions the summariser's parameters too (the seed tokens are read through a module call, so they
    are gathered while used): 2 ranks, the same losses step by step as ZeRO-2."""
    from helpers import TINY_MODEL, argus_ranks, losses

    _, data = summary_run
    tiny = [x for x in TINY_MODEL if not x.startswith("model.max_seq_len")]
    runs = {}
    for stage in (2, 3):
        runs[stage] = tmp_path / f"zero{stage}"
        argus_ranks("train", "configs/mini.yaml", f"data.path={data}", f"out={runs[stage]}", *tiny,
                    "model.max_seq_len=8", "data.max_seq_len=48", "model.summary.tokens=4", "model.summary.dim=16",
                    "model.summary.chunk=8", "model.summary.reconstruction_weight=0.5", "train.steps=3",
                    "data.num_workers=0", "optim.warmup_steps=1", "eval.every=0", f"deepspeed.stage={stage}",
                    f"model.summary.read={read}", nproc=2)  # fmt: skip
    two, three = losses(runs[2]), losses(runs[3])
    assert two.keys() == three.keys() == {1, 2, 3}
    for step in two:
        assert three[step] == pytest.approx(two[step], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("read", ["tokens", "memory"])
def test_tensor_parallel_trains_the_summary_model_as_one_rank_does(summary_run, tmp_path, read: str) -> None:
    """parallel.tp=2 shards the encoder's blocks and leaves the summariser whole on both ranks of the group (which
    read the same rows): the same losses as one rank."""
    from helpers import TINY_MODEL, argus_ranks, losses

    _, data = summary_run
    tiny = [x for x in TINY_MODEL if not x.startswith("model.max_seq_len")]
    runs = {}
    for ranks, extra in ((1, []), (2, ["parallel.tp=2"])):
        runs[ranks] = tmp_path / f"ranks{ranks}"
        argus_ranks("train", "configs/mini.yaml", f"data.path={data}", f"out={runs[ranks]}", *tiny,
                    "model.max_seq_len=8", "data.max_seq_len=48", "model.summary.tokens=4", "model.summary.dim=16",
                    "model.summary.chunk=8", "train.steps=3", "data.num_workers=0", "data.on_error=raise",
                    "optim.warmup_steps=1", "eval.every=0", "model.dropout=0", f"model.summary.read={read}", *extra,
                    nproc=ranks)  # fmt: skip
    one, tp = losses(runs[1]), losses(runs[2])
    assert one.keys() == tp.keys() == {1, 2, 3}
    for step in one:
        assert tp[step] == pytest.approx(one[step], rel=1e-5)


def _vectors(export: Path) -> dict[int, np.ndarray]:
    from trainer.export import load_export

    users, vectors, *_ = load_export(export)
    return dict(zip(users.tolist(), vectors))


def test_a_windows_run_trains_and_serves_from_its_last_window(long_samples, tmp_path) -> None:
    """model.windows end to end: a run on samples of 48 in windows of 8 trains, and its exported state of every user
    is the one its last 9 interactions give (--context 9: the last window, its first interaction's time gap from the
    one before): no window reads an older one. From the last 8 alone the first one's gap is unknown: another state."""
    from helpers import TINY_MODEL, argus_ranks

    data, run = long_samples, tmp_path / "run"
    tiny = [x for x in TINY_MODEL if not x.startswith("model.max_seq_len")]
    argus_ranks("train", "configs/mini.yaml", f"data.path={data}", f"out={run}", *tiny, "model.max_seq_len=8",
                "data.max_seq_len=48", "model.windows=true", "train.steps=2", "data.batch_size=8",
                "data.num_workers=0", "optim.warmup_steps=1", "eval.every=0", nproc=1)  # fmt: skip
    vectors = {}
    for context in ("47", "9", "8"):
        argus_ranks("export", str(run), "--data", str(data), "--out", str(tmp_path / context), "--context", context,
                    nproc=1)  # fmt: skip
        vectors[context] = _vectors(tmp_path / context)
    full, last = vectors["47"], vectors["9"]
    assert full.keys() == last.keys() and len(full) > 30
    for user, v in full.items():
        np.testing.assert_allclose(v, last[user], rtol=1e-5, atol=1e-6)
    assert max(float(np.abs(v - vectors["8"][u]).max()) for u, v in full.items()) > 1e-4


@pytest.mark.slow
def test_cached_summaries_give_the_in_line_states_and_stale_or_newer_caches_are_told(summary_run, tmp_path) -> None:
    """export --summary-cache (each state from its last window after the cached tokens) = export computing the
    summaries in-line; a cache built at an earlier cutoff is reported stale (and changes those users' vectors); a
    cache newer than the history it is read with is refused in one line naming it."""
    import json

    from helpers import argus_own_process, argus_ranks

    run, data = summary_run
    common = [str(run), "--data", str(data)]
    argus_ranks("export", *common, "--out", str(tmp_path / "inline"), "--context", "48", nproc=1)
    argus_ranks("summarize", *common, "--out", str(tmp_path / "cache"), nproc=2)
    argus_ranks("export", *common, "--out", str(tmp_path / "cached"), "--summary-cache", str(tmp_path / "cache"),
                nproc=1)  # fmt: skip
    inline, cached = _vectors(tmp_path / "inline"), _vectors(tmp_path / "cached")
    assert inline.keys() == cached.keys() and len(inline) > 30
    from helpers import read_samples

    longer = {s.user for s in read_samples(data, "test") if s.offset > 0}  # the in-line export sees 48 rows only
    assert 0 < len(longer) < len(inline) - 20
    for u in inline:
        if u not in longer:
            np.testing.assert_allclose(cached[u], inline[u], rtol=1e-5, atol=1e-5)
    assert all(not np.allclose(cached[u], inline[u], atol=1e-5) for u in longer)  # the cache reads more
    m = json.loads((tmp_path / "cached" / "manifest.json").read_text())
    assert m["summary_cache"]["stale_users"] == 0

    from trainer.data.manifest import Manifest

    t0, t1 = Manifest.load(data).source["t0"], Manifest.load(data).source["t_end"]
    mid = (t0 + t1) // 2
    argus_ranks("summarize", *common, "--out", str(tmp_path / "old"), "--at", str(mid), "--dtype", "bf16", nproc=1)
    argus_ranks("export", *common, "--out", str(tmp_path / "stale"), "--summary-cache", str(tmp_path / "old"),
                nproc=1)  # fmt: skip
    m = json.loads((tmp_path / "stale" / "manifest.json").read_text())["summary_cache"]
    assert m["stale_users"] > 0 and m["interactions_left_out"] > 0
    stale = _vectors(tmp_path / "stale")
    changed = sum(not np.allclose(stale[u], inline[u], atol=1e-3) for u in inline)
    assert 0 < changed <= m["stale_users"]

    # a cache built at the export's own cutoff is fresh, and gives the in-line vectors, users without history
    # before it skipped alike
    argus_ranks("summarize", *common, "--out", str(tmp_path / "mid"), "--at", str(mid), nproc=1)
    argus_ranks("export", *common, "--out", str(tmp_path / "inline-mid"), "--at", str(mid), "--context", "48",
                nproc=1)  # fmt: skip
    argus_ranks("export", *common, "--out", str(tmp_path / "cached-mid"), "--at", str(mid), "--summary-cache",
                str(tmp_path / "mid"), nproc=1)  # fmt: skip
    a, b = _vectors(tmp_path / "inline-mid"), _vectors(tmp_path / "cached-mid")
    assert a.keys() == b.keys() and 0 < len(a) < len(inline)
    for u in a.keys() - longer:
        np.testing.assert_allclose(b[u], a[u], rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "cached-mid" / "manifest.json").read_text())["summary_cache"]["stale_users"] == 0
    # a cache is its checkpoint's: another one's is refused
    manifest = json.loads((tmp_path / "mid" / "manifest.json").read_text())
    (tmp_path / "mid" / "manifest.json").write_text(json.dumps({**manifest, "checkpoint": str(tmp_path / "other")}))
    code, _, err = argus_own_process("export", *common, "--out", str(tmp_path / "other-ckpt"), "--at", str(mid),
                                     "--summary-cache", str(tmp_path / "mid"))  # fmt: skip
    assert code != 0 and "written by checkpoint" in err and err.strip().count("\n") == 0

    code, _, err = argus_own_process("export", *common, "--out", str(tmp_path / "bad"), "--at", str(mid),
                                     "--summary-cache", str(tmp_path / "cache"))  # fmt: skip
    assert code != 0 and str(tmp_path / "cache") in err and "newer than this history" in err
    assert err.strip().count("\n") == 0
    # an earlier cache is replaced only when told; a directory holding anything else never
    before = sorted(p.name for p in (tmp_path / "cache" / "users").iterdir())
    code, _, err = argus_own_process("summarize", *common, "--out", str(tmp_path / "cache"))
    assert code != 0 and "holds a summary cache" in err and "--overwrite" in err
    assert sorted(p.name for p in (tmp_path / "cache" / "users").iterdir()) == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    code, _, err = argus_own_process("summarize", *common, "--out", str(tmp_path / "mine"), "--overwrite")
    assert code != 0 and "notes.txt" in err and (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def _cache_rows(cache: Path) -> dict[tuple[int, int], tuple[int, np.ndarray]]:
    """(user, offset) -> (covered, tokens) of an fp32 cache, read with pyarrow and numpy alone (the layout in
    trainer/summary_cache.py: each part's rows, and their tokens in order in the file beside it)."""
    import json

    import pyarrow.parquet as pq

    m = json.loads((cache / "manifest.json").read_text())
    assert m["dtype"] == "fp32"
    out = {}
    for part, tokens in zip(m["files"], m["token_files"]):
        t = pq.read_table(cache / part).to_pydict()
        tok = np.fromfile(cache / tokens, dtype="<f4").reshape(len(t["user"]), m["tokens"], m["dim"])
        for u, o, c, x in zip(t["user"], t["offset"], t["covered"], tok):
            out[(u, o)] = (c, x)
    return out


@pytest.mark.slow
def test_summaries_of_histories_cut_into_members_equal_those_of_whole_histories(summary_run, tmp_path) -> None:
    """argus summarize reads a user's older members (train, and the train members beside an eval sample): the
    same histories written whole (one member per user) give the same summaries, on 2 ranks and on 1."""
    from helpers import argus_ranks

    from trainer.data.synth import synthesize

    run, data = summary_run
    whole = tmp_path / "whole"
    synthesize(whole, users=40, items=120, mean_len=40, shards=2, seed=4, holdout="loo", max_len=10_000, workers=1)
    for split in ("test", "train"):
        argus_ranks("summarize", str(run), "--data", str(data), "--split", split,
                    "--out", str(tmp_path / f"cut-{split}"), nproc=2)  # fmt: skip
        argus_ranks("summarize", str(run), "--data", str(whole), "--split", split,
                    "--out", str(tmp_path / f"whole-{split}"), nproc=1)  # fmt: skip
    cut, full = _cache_rows(tmp_path / "cut-test"), _cache_rows(tmp_path / "whole-test")
    by_user = {u: v for (u, _), v in full.items()}
    assert len(cut) == len(full) > 30 and sum(o > 0 for _, o in cut) > 3  # some test samples have older members
    for (u, _), (covered, tokens) in cut.items():
        assert covered == by_user[u][0]
        np.testing.assert_allclose(tokens, by_user[u][1], rtol=1e-5, atol=1e-5)
    # train: a row per member; a user's last member's summary covers what the whole history's last window does not
    cut, full = _cache_rows(tmp_path / "cut-train"), _cache_rows(tmp_path / "whole-train")
    last = {}
    for (u, _o), v in sorted(cut.items()):
        last[u] = v
    assert len(cut) > len(full) and last.keys() == {u for u, _ in full}
    for (u, _), (covered, tokens) in full.items():
        assert last[u][0] == covered
        np.testing.assert_allclose(last[u][1], tokens, rtol=1e-5, atol=1e-5)
    # a cache of other data (the whole histories' members) is told apart before any step, in one line
    from helpers import TINY_MODEL, argus_own_process

    tiny = [x for x in TINY_MODEL if not x.startswith("model.max_seq_len")]
    code, _, err = argus_own_process("train", "configs/mini.yaml", f"data.path={data}", f"out={tmp_path / 'x'}", *tiny,
                                     "model.max_seq_len=8", "data.max_seq_len=8", "model.summary.tokens=4",
                                     "model.summary.dim=16", "model.summary.chunk=8", "eval.every=0",
                                     f"data.summary_cache={tmp_path / 'whole-train'}")  # fmt: skip
    assert code != 0 and "rebuild it from this data" in err and err.strip().count("\n") == 0


@pytest.mark.slow
def test_a_run_trained_on_a_cache_reads_it_in_training_eval_and_export(summary_run, tmp_path) -> None:
    """data.summary_cache: a new run trains on window-long samples after the cached summaries of another run's
    summariser (every sample finds its own summary: none stale), validating after the val split's cache
    (eval.val_summary_cache: the live model's metrics equal argus eval's of the saved checkpoint); argus eval
    --summary-cache ranks from the same states export serves (checked against the export's vectors, ranked by brute
    force); caches are checked."""
    import torch
    from helpers import TINY_MODEL, argus_own_process, argus_ranks, read_samples

    from trainer.export import load_export
    from trainer.metrics import RankingAccumulator, ranks_of_targets
    from trainer.ranking import scores

    run, data = summary_run
    for split in ("train", "val", "test"):
        argus_ranks("summarize", str(run), "--data", str(data), "--split", split, "--out", str(tmp_path / split),
                    nproc=1)  # fmt: skip
    tiny = [x for x in TINY_MODEL if not x.startswith("model.max_seq_len")]
    job = [
        "configs/mini.yaml",
        f"data.path={data}",
        *tiny,
        "model.max_seq_len=8",
        "data.max_seq_len=8",
        "model.summary.tokens=4",
        "model.summary.dim=16",
        "model.summary.chunk=8",
        "train.steps=4",
        "train.log_every=1",
        "data.batch_size=8",
        "data.num_workers=0",
        "optim.warmup_steps=1",
        "eval.every=0",
    ]
    down = tmp_path / "down"
    val = ["eval.every=2", f"eval.val_summary_cache={tmp_path / 'val'}"]
    outs = argus_ranks("train", *job, f"out={down}", f"data.summary_cache={tmp_path / 'train'}", *val, nproc=2)
    assert not any("stale cache" in o for o in outs)
    import json

    logged = [json.loads(x) for x in (down / "metrics.jsonl").read_text().splitlines() if '"eval/ndcg@10"' in x]
    assert [r["step"] for r in logged] == [2, 4]
    from trainer import checkpoint

    step4 = checkpoint.resolve_checkpoint(down)  # the last validation's checkpoint (argus eval RUN would read best)
    assert step4.name.endswith("4")
    rep = _json_of(argus_ranks("eval", str(step4), "--data", str(data), "--split", "val", "--summary-cache",
                               str(tmp_path / "val"), "--json", nproc=1))  # fmt: skip
    for k in ("hr@10", "ndcg@10", "hr@100", "ndcg@100"):
        assert logged[-1][f"eval/{k}"] == pytest.approx(rep["model"][k], abs=1e-6), k
    # training reads the cache: one built at an earlier cutoff leaves interactions out, and says so
    from trainer.data.manifest import Manifest

    src = Manifest.load(data).source
    argus_ranks("summarize", str(run), "--data", str(data), "--split", "train", "--out", str(tmp_path / "old"),
                "--at", str((src["t0"] + src["t_end"]) // 2), nproc=1)  # fmt: skip
    outs = argus_ranks("train", *job, f"out={tmp_path / 'stale'}", f"data.summary_cache={tmp_path / 'old'}",
                       "train.steps=2", nproc=1)  # fmt: skip
    assert "samples read a summary that leaves out" in outs[0]
    rep = _json_of(argus_ranks("eval", str(down), "--data", str(data), "--summary-cache", str(tmp_path / "test"),
                               "--json", nproc=1))  # fmt: skip
    argus_ranks("export", str(down), "--data", str(data), "--out", str(tmp_path / "export"), "--summary-cache",
                str(tmp_path / "test"), nproc=1)  # fmt: skip
    users, vectors, nxt, item_ids, item_vecs = load_export(tmp_path / "export")
    items = torch.zeros(int(item_ids.max()) + 1, item_vecs.shape[1])
    items[torch.from_numpy(item_ids.copy())] = torch.from_numpy(item_vecs.copy())
    ranks = ranks_of_targets(scores(torch.from_numpy(vectors.copy()), items), torch.from_numpy(nxt.copy()))
    acc = RankingAccumulator((10, 100), "")
    acc.add(ranks, torch.arange(len(users)))
    want = acc.compute()
    assert rep["users"] == len(users) > 30 and rep["summary_cache"]["stale_users"] == 0
    assert want.keys() <= rep["model"].keys()
    for k, v in want.items():
        assert rep["model"][k] == pytest.approx(v, abs=1e-6), k
    assert {s.user for s in read_samples(data, "test")} >= set(users.tolist())
    # the tokens are mapped from their files, not loaded; a token file cut short is told in one line
    import shutil

    from trainer.checkpoint import saved_job
    from trainer.summary_cache import SummaryCache

    mapped = SummaryCache.load(tmp_path / "test", saved_job(step4), "test")
    assert len(mapped.tokens) == len(mapped.before) > 30
    assert all(isinstance(p, np.memmap) for p in mapped.tokens.parts if len(p))
    shutil.copytree(tmp_path / "test", tmp_path / "cut")
    tok = next((tmp_path / "cut" / "users").glob("*.tokens"))
    tok.write_bytes(tok.read_bytes()[:-2])
    code, _, err = argus_own_process("eval", str(down), "--data", str(data), "--summary-cache", str(tmp_path / "cut"))
    assert code != 0 and "bytes where" in err and err.strip().count("\n") == 0
    meta = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    (tmp_path / "cut" / "manifest.json").write_text(json.dumps({**meta, "version": 2}))  # tokens in the parquet
    code, _, err = argus_own_process("eval", str(down), "--data", str(data), "--summary-cache", str(tmp_path / "cut"))
    assert code != 0 and "a version 2 summary cache" in err and err.strip().count("\n") == 0
    # the cache must fit the run, and a run trained on a cache reads its summariser's caches only
    code, _, err = argus_own_process("eval", str(down), "--data", str(data), "--summary-cache", str(tmp_path / "nope"))
    assert code != 0 and "not a summary cache" in err and err.strip().count("\n") == 0
    code, _, err = argus_own_process("summarize", str(down), "--data", str(data), "--out", str(tmp_path / "own"))
    assert code != 0 and "data.summary_cache" in err and err.strip().count("\n") == 0  # its summariser never trained
    cache = f"data.summary_cache={tmp_path / 'train'}"
    code, _, err = argus_own_process("train", *job, f"out={tmp_path / 'bad'}", cache, "model.summary.dim=8")
    assert code != 0 and "dim" in err and err.strip().count("\n") == 0
    code, _, err = argus_own_process("eval", str(down), "--data", str(data))  # its summaries are only in caches
    assert code != 0 and "--summary-cache" in err and err.strip().count("\n") == 0
    code, _, err = argus_own_process("train", *job, f"out={tmp_path / 'bad'}", cache, "eval.every_epochs=1")
    assert code != 0 and "eval.val_summary_cache" in err and err.strip().count("\n") == 0
    for bad_val, why in ((tmp_path / "test", "split 'test'"), (tmp_path / "old", "split 'train'")):
        code, _, err = argus_own_process("train", *job, f"out={tmp_path / 'bad'}", cache, "eval.every=2",
                                         f"eval.val_summary_cache={bad_val}")  # fmt: skip
        assert code != 0 and why in err and err.strip().count("\n") == 0
    code, _, err = argus_own_process("train", *job, f"out={tmp_path / 'bad'}", "eval.every=2",
                                     f"eval.val_summary_cache={tmp_path / 'val'}")  # in-line summaries  # fmt: skip
    assert code != 0 and "eval.val_summary_cache" in err and err.strip().count("\n") == 0
    code, _, err = argus_own_process(
        "train", *job, f"out={tmp_path / 'bad'}", f"data.summary_cache={tmp_path / 'test'}"
    )
    assert code != 0 and "split 'test'" in err and err.strip().count("\n") == 0

    # train.init_from: the downstream model starts from the summariser's run (tables and dense weights); at a
    # vanishing learning rate its weights stay the summariser run's, which a fresh init's are not
    tiny_lr = ["optim.lr=1e-12", "embeddings.lr=1e-12", "train.steps=1"]
    for name, init in (("warm", [f"train.init_from={run}"]), ("fresh", [])):
        argus_ranks("train", *job, f"out={tmp_path / name}", cache, *tiny_lr, *init, nproc=1)
    src = checkpoint.dense_weights(checkpoint.resolve_checkpoint(run))
    warm, fresh = (checkpoint.dense_weights(checkpoint.resolve_checkpoint(tmp_path / n)) for n in ("warm", "fresh"))
    assert warm.keys() == src.keys()
    for k in src:
        torch.testing.assert_close(warm[k], src[k], rtol=0, atol=1e-8)
    assert any(not torch.allclose(fresh[k], src[k], atol=1e-3) for k in src)
    # the run pins the checkpoint it started from, and a resume no longer needs it
    shutil.copytree(run, tmp_path / "src")
    init = f"train.init_from={tmp_path / 'src'}"
    argus_ranks("train", *job, f"out={tmp_path / 'pinned'}", cache, "train.steps=1", init, nproc=1)
    pinned = saved_job(checkpoint.resolve_checkpoint(tmp_path / "pinned")).train.init_from
    assert pinned == str(checkpoint.resolve_checkpoint(tmp_path / "src").resolve())
    shutil.rmtree(tmp_path / "src")
    argus_ranks("train", *job, f"out={tmp_path / 'pinned'}", cache, "train.steps=2", init, "resume=true", nproc=1)
    assert checkpoint.resolve_checkpoint(tmp_path / "pinned").name.endswith("2")
    code, _, err = argus_own_process("train", *job, f"out={tmp_path / 'bad'}", f"train.init_from={run}", cache,
                                     "model.n_layers=3")  # fmt: skip
    assert code != 0 and "differs from the pre-trained model" in err and err.strip().count("\n") == 0
    code, _, err = argus_own_process("train", *job, f"out={run}", f"train.init_from={run}", cache,
                                     "train.overwrite=true")  # fmt: skip
    assert code != 0 and "is train.init_from's run" in err and err.strip().count("\n") == 0
    assert checkpoint.resolve_checkpoint(run).exists()  # nothing of the run it would start from was removed


@pytest.mark.slow
def test_packed_rows_train_on_a_summary_cache(summary_run, tmp_path) -> None:
    """data.batch_tokens on a summary cache read as memory: trains on packed rows (less padding than one window a
    row), validates equal to argus eval --summary-cache of the checkpoint; read as tokens it is refused in one
    line."""
    import json

    from helpers import TINY_MODEL, argus_own_process, argus_ranks

    from trainer import checkpoint

    run, data = summary_run
    for split in ("train", "val"):
        argus_ranks("summarize", str(run), "--data", str(data), "--split", split, "--out", str(tmp_path / split),
                    nproc=1)  # fmt: skip
    tiny = [x for x in TINY_MODEL if not x.startswith("model.max_seq_len")]
    job = ["configs/mini.yaml", f"data.path={data}", *tiny, "model.max_seq_len=8", "data.max_seq_len=8",
           "model.summary.tokens=4", "model.summary.dim=16", "model.summary.chunk=8", "data.num_workers=0",
           "optim.warmup_steps=1", "train.steps=4", f"data.summary_cache={tmp_path / 'train'}", "eval.every=4",
           f"eval.val_summary_cache={tmp_path / 'val'}", "model.summary.read=memory"]  # fmt: skip
    share = {}
    for name, extra in (("packed", ["data.batch_tokens=32"]), ("rows", ["data.batch_size=4"])):
        argus_ranks("train", *job, f"out={tmp_path / name}", *extra, nproc=1)
        records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "loss/total" in r]
        assert len(steps) == 4 and all(np.isfinite(r["loss/total"]) for r in steps)
        share[name] = np.mean([r["tokens/padding_share"] for r in steps])
    assert share["packed"] < share["rows"]
    logged = [json.loads(x) for x in (tmp_path / "packed" / "metrics.jsonl").read_text().splitlines()
              if '"eval/ndcg@10"' in x]  # fmt: skip
    best = checkpoint.resolve_checkpoint(tmp_path / "packed")
    rep = _json_of(argus_ranks("eval", str(best), "--data", str(data), "--split", "val", "--summary-cache",
                               str(tmp_path / "val"), "--json", nproc=1))  # fmt: skip
    for key in ("hr@10", "ndcg@10", "hr@100"):
        assert logged[-1][f"eval/{key}"] == pytest.approx(rep["model"][key], abs=1e-6), key
    code, _, err = argus_own_process("train", *job[:-1], f"out={tmp_path / 'bad'}", "data.batch_tokens=32")
    assert code != 0 and err.startswith("argus: error: data.batch_tokens") and err.strip().count("\n") == 0


@pytest.mark.slow
def test_zero3_validates_on_cached_summaries_with_uneven_batches(tmp_path) -> None:
    """eval.val_summary_cache under ZeRO-3 with every weight partitioned: 5 validation users on 2 ranks, one a
    batch, so one rank ends on an empty padding batch, which still runs the forward (a dummy one) that ZeRO-3
    gathers the weights for on every rank; validation equals argus eval --summary-cache of the checkpoint."""
    import json

    from helpers import TINY_MODEL, argus_ranks

    from trainer import checkpoint
    from trainer.data.synth import synthesize

    data, run = tmp_path / "data", tmp_path / "run"
    synthesize(data, users=5, items=120, mean_len=40, shards=2, seed=4, holdout="loo", max_len=48, workers=1)
    tiny = [x for x in TINY_MODEL if not x.startswith("model.max_seq_len")]
    job = ["configs/mini.yaml", f"data.path={data}", *tiny, "model.max_seq_len=8", "model.summary.tokens=4",
           "model.summary.dim=16", "model.summary.chunk=8", "data.batch_size=2", "data.num_workers=0",
           "optim.warmup_steps=1", "train.steps=2"]  # fmt: skip
    argus_ranks("train", *job, f"out={run}", "data.max_seq_len=48", "eval.every=0", nproc=1)
    for split in ("train", "val"):
        argus_ranks("summarize", str(run), "--data", str(data), "--split", split, "--out", str(tmp_path / split),
                    nproc=1)  # fmt: skip
    ds = json.loads((Path(__file__).resolve().parents[1] / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    down = tmp_path / "down"
    argus_ranks("train", *job, f"out={down}", "data.max_seq_len=8", f"data.summary_cache={tmp_path / 'train'}",
                "deepspeed.stage=3", f"deepspeed.config={tmp_path / 'zero3.json'}", "eval.every=2",
                "eval.batch_size=1", f"eval.val_summary_cache={tmp_path / 'val'}", nproc=2)  # fmt: skip
    logged = [json.loads(x) for x in (down / "metrics.jsonl").read_text().splitlines() if '"eval/ndcg@10"' in x]
    assert [r["step"] for r in logged] == [2]
    rep = _json_of(argus_ranks("eval", str(checkpoint.resolve_checkpoint(down)), "--data", str(data), "--split",
                               "val", "--summary-cache", str(tmp_path / "val"), "--json", nproc=1))  # fmt: skip
    assert rep["users"] == 5
    for k in ("hr@10", "ndcg@10", "hr@100"):
        assert logged[0][f"eval/{k}"] == pytest.approx(rep["model"][k], abs=1e-6), k


@pytest.mark.slow
def test_a_summary_newer_than_its_window_on_one_rank_stops_every_rank_with_its_line(summary_run, tmp_path) -> None:
    """data.summary_cache on 2 ranks (a cache with an empty part), one shard's summaries made newer than their
    windows: the rank that reads them and the other both stop with that rank's line naming the user, printed once
    (the other is not left in the step's collectives until train.timeout_s: the ranks get 300 s, the test 150);
    argus eval --summary-cache the same way."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from helpers import TINY_MODEL, argus_ranks, argus_ranks_failing

    run, data = summary_run
    cache = tmp_path / "cache"
    # 3 ranks on 2 shards: rank 2 writes an empty part (an empty token file, which readers cannot map: held as none)
    argus_ranks("summarize", str(run), "--data", str(data), "--split", "train", "--out", str(cache), nproc=3)
    assert (cache / "users" / "part-00002.parquet.tokens").stat().st_size == 0
    part = cache / "users" / "part-00001.parquet"  # rank 1's shards: their every summary now reaches past its window
    t = pq.read_table(part)
    t = t.set_column(t.schema.get_field_index("until"), "until", pa.array([2**62] * len(t), pa.int64()))
    t = t.set_column(t.schema.get_field_index("covered"), "covered", pa.array([1] * len(t), pa.int64()))
    pq.write_table(t, part)
    tiny = [x for x in TINY_MODEL if not x.startswith(("model.max_seq_len", "train.timeout_s"))]
    outs = argus_ranks_failing(
        "train", "configs/mini.yaml", f"data.path={data}", f"out={tmp_path / 'down'}", *tiny, "model.max_seq_len=8",
        "data.max_seq_len=8", "model.summary.tokens=4", "model.summary.dim=16", "model.summary.chunk=8",
        "train.steps=4", "data.batch_size=8", "data.num_workers=0", "eval.every=0", f"data.summary_cache={cache}",
        "train.timeout_s=300", nproc=2, timeout=150,
    )  # fmt: skip
    errs = [err.strip() for _, _, err in outs if err.strip()]
    assert all(code != 0 for code, _, _ in outs)
    assert len(errs) == 1 and errs[0].count("\n") == 0  # printed once, by whichever rank failed first
    assert "past the start of the window it would be read with" in errs[0]  # the failing rank's line, the user's
    # argus eval --summary-cache of the summariser's own run, on 2 ranks, the same way
    test_cache = tmp_path / "test-cache"
    argus_ranks("summarize", str(run), "--data", str(data), "--split", "test", "--out", str(test_cache), nproc=2)
    part = test_cache / "users" / "part-00001.parquet"  # one user's summary only: the users are split over the ranks
    t = pq.read_table(part)
    one = np.asarray(t.column("user")) == int(np.asarray(t.column("user"))[0])
    until, covered = np.asarray(t.column("until")).copy(), np.asarray(t.column("covered")).copy()
    until[one], covered[one] = 2**62, np.maximum(covered[one], 1)
    t = t.set_column(t.schema.get_field_index("until"), "until", pa.array(until))
    t = t.set_column(t.schema.get_field_index("covered"), "covered", pa.array(covered))
    pq.write_table(t, part)
    outs = argus_ranks_failing("eval", str(run), "--data", str(data), "--summary-cache", str(test_cache), nproc=2,
                               timeout=150)  # fmt: skip
    errs = [err.strip() for _, _, err in outs if err.strip()]
    assert all(code != 0 for code, _, _ in outs)
    assert len(errs) == 1 and "past the start of the window it would be read with" in errs[0]


def _json_of(outs: list[str]) -> dict:
    import json

    text = next(o for o in outs if "{" in o)
    return json.loads(text[text.index("{") :])


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_summary_read_flops_match_what_torch_counts(attention: str) -> None:
    """The planner's per-token cost of reading a history into the summariser's state (summary_flops at inference,
    readout spread over an endless window) against torch's FLOP counter over Summariser.update."""
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.model.summary import summary_flops

    cfg = SummaryConfig(tokens=4, dim=16, heads=2, attention=attention, layers=3)
    m = Summariser(cfg, 12, 20)
    n = 50
    x, mask = torch.randn(1, n, 12), torch.ones(1, n, dtype=torch.bool)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        m.update(m.init_state(1), x, mask)
    per_token = summary_flops(cfg, 12, 20, window=10**12, training=False)
    per_chunk = 2 * cfg.layers * cfg.tokens * cfg.dim**2 if attention == "softmax" else 0  # the seeds' queries
    assert counter.get_total_flops() == pytest.approx(per_token * n + per_chunk, rel=1e-6)


# ---- reading a cache: which summary a window gets; fine-tuning's windows ----------------------------------------
def test_a_window_reads_its_users_freshest_summary_that_ends_before_it(tmp_path) -> None:
    from trainer.summary_cache import SummaryCache

    tokens = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3), np.float32)  # row r: all r
    cache = SummaryCache(
        tmp_path, {}, {7: (0, 3), 9: (3, 4)},
        before=np.array([0, 8, 16, 10]), covered=np.array([0, 8, 16, 6]), until=np.array([-1, 100, 200, 50]),
        tokens=tokens, empty=np.full((2, 3), -1.0, np.float32),
    )  # fmt: skip
    got, left = cache.summaries([7, 7, 7, 9, 11], np.array([12, 16, 3, 10, 4]), np.array([150, 250, 50, 60, 0]))
    assert got[:, 0, 0].tolist() == [1, 2, 0, 3, -1]  # the freshest at or before the window; unknown user: empty
    assert left.tolist() == [4, 0, 3, 4, 4]  # user 9's summary read 6 of the 10 rows before it: 4 left out
    with pytest.raises(ValueError, match="newer than this history"):  # every summary of user 9 ends inside it
        cache.summaries([9], np.array([5]), np.array([40]))
    got, left = cache.summaries([9], np.array([5]), np.array([40]), strict=False)
    assert got[0, 0, 0] == -1 and left.tolist() == [5]  # not strict: nothing fits, the empty summary
    with pytest.raises(ValueError, match="newer than this history"):  # in order, but its last row is later in time
        cache.summaries([7], np.array([16]), np.array([150]))


def test_a_cache_of_more_parts_than_half_the_open_file_limit_is_refused() -> None:
    """Every part's token file stays open while mapped: past half the open-file limit, one line naming ulimit."""
    import resource

    from trainer.summary_cache import _check_open_files

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        pytest.skip("no open-file limit here")
    _check_open_files(Path("cache"), soft // 2)
    with pytest.raises(ValueError, match=r"^cache: its \d+ token files .* \(ulimit -n\)"):
        _check_open_files(Path("cache"), soft // 2 + 1)


def test_impression_windows_cut_each_impressions_history_like_a_loop(imp_data) -> None:
    from helpers import read_samples

    from trainer.data.batch import collate
    from trainer.finetune import impression_inputs, impression_windows

    batch = collate(read_samples(imp_data, "impressions")[:15], padded=False)
    last = impression_inputs(batch, 3600)["last"]
    starts = torch.cumsum(batch.lengths, 0) - batch.lengths
    for window in (1, 5, 10_000):
        w, w_last = impression_windows(batch, last, window)
        assert w.size == last.numel() and w_last.tolist() == (torch.cumsum(w.lengths, 0) - 1).tolist()
        at = 0
        for k, row in enumerate(last.tolist()):
            b = int(torch.searchsorted(starts, torch.tensor(row), right=True)) - 1
            lo = max(row - window + 1, int(starts[b]))
            n = row - lo + 1
            assert int(w.lengths[k]) == n and int(w.users[k]) == int(batch.users[b])
            assert int(w.offsets[k]) == int(batch.offsets[b]) + lo - int(starts[b])
            for f, v in batch.values.items():
                assert torch.equal(w.values[f][at : at + n], v[lo : row + 1]), f
            at += n


@pytest.mark.slow
def test_fine_tuning_reads_a_summary_cache(tmp_path) -> None:
    """A pre-trained summary model's train-split cache (history written in members of one window): fine-tuning
    from it reads each impression's window after the cached summary, trains, is scored (with the pre-trained model
    alike) and exported with caches; a stale cache is reported."""
    import json

    from helpers import TINY_MODEL, argus_own_process, argus_ranks

    from trainer.data.manifest import Manifest
    from trainer.data.synth import synthesize

    data = tmp_path / "data"
    synthesize(data, users=60, items=100, mean_len=40, shards=2, seed=6, holdout="loo", workers=1, days=40,
               impressions=4, slate=5, max_len=8)  # fmt: skip
    tiny = [x for x in TINY_MODEL if not x.startswith("model.max_seq_len")]
    shape = [*tiny, "model.max_seq_len=8", "model.summary.tokens=4", "model.summary.dim=16", "model.summary.chunk=8",
             "data.num_workers=0", "data.batch_size=8", "optim.warmup_steps=1", "eval.every=0"]  # fmt: skip
    pre = tmp_path / "pre"
    argus_ranks("train", "configs/mini.yaml", f"data.path={data}", f"out={pre}", *shape, "data.max_seq_len=8",
                "train.steps=3", nproc=1)  # fmt: skip
    src = Manifest.load(data).source
    for name, at in (("cache", []), ("old", ["--at", str((src["t0"] + src["t_end"]) // 2)])):
        argus_ranks("summarize", str(pre), "--data", str(data), "--split", "train", "--out", str(tmp_path / name),
                    *at, nproc=1)  # fmt: skip
    ft = tmp_path / "ft"
    argus_ranks("finetune", "configs/mini.yaml", "--init", str(pre), f"data.path={data}", f"out={ft}", *shape,
                f"data.summary_cache={tmp_path / 'cache'}", "train.steps=3", "train.log_every=1", nproc=2)  # fmt: skip
    lines = (ft / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(x)["loss/pairwise"] for x in lines if '"loss/pairwise"' in x]
    assert len(losses) == 3 and all(np.isfinite(losses))
    # a summary newer than an impression's window, read on one rank only (a user of rank 1's first batch): both
    # ranks stop at the first step with that rank's line, printed once (on gloo a departed peer is noticed even
    # without the ranks' agreement, trainer/dist.py: together; the hang it prevents shows on NCCL only)
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from helpers import argus_ranks_failing

    from trainer.config import load_config
    from trainer.job import JobConfig

    saved = load_config(JobConfig, ft / "config.yaml")
    first = [set(next(iter(saved.loader_config().build(r, 2))).users.tolist()) for r in (0, 1)]
    bad_user = min(first[1] - first[0])
    shutil.copytree(tmp_path / "cache", tmp_path / "newer")
    part = tmp_path / "newer" / "users" / "part-00000.parquet"
    t = pq.read_table(part)
    one = np.asarray(t.column("user")) == bad_user
    until, covered = np.asarray(t.column("until")).copy(), np.asarray(t.column("covered")).copy()
    until[one], covered[one] = 2**62, np.maximum(covered[one], 1)
    t = t.set_column(t.schema.get_field_index("until"), "until", pa.array(until))
    t = t.set_column(t.schema.get_field_index("covered"), "covered", pa.array(covered))
    pq.write_table(t, part)
    shape_300 = [x for x in shape if not x.startswith("train.timeout_s")]
    outs = argus_ranks_failing("finetune", "configs/mini.yaml", "--init", str(pre), f"data.path={data}",
                               f"out={tmp_path / 'ft-newer'}", *shape_300, f"data.summary_cache={tmp_path / 'newer'}",
                               "train.steps=3", "train.timeout_s=300", nproc=2, timeout=150)  # fmt: skip
    errs = [err.strip() for _, _, err in outs if err.strip()]
    assert all(code != 0 for code, _, _ in outs)
    assert len(errs) == 1 and errs[0].count("\n") == 0 and f"user {bad_user}'s summary" in errs[0]
    # training reads the cache: the same run on the earlier cache's summaries takes other steps
    argus_ranks("finetune", "configs/mini.yaml", "--init", str(pre), f"data.path={data}",
                f"out={tmp_path / 'ft-old'}", *shape, f"data.summary_cache={tmp_path / 'old'}", "train.steps=3",
                "train.log_every=1", nproc=2)  # fmt: skip
    lines = (tmp_path / "ft-old" / "metrics.jsonl").read_text().splitlines()
    other = [json.loads(x)["loss/pairwise"] for x in lines if '"loss/pairwise"' in x]
    assert other != losses
    out = argus_ranks("eval", str(ft), "--data", str(data), "--json", nproc=1)[0]
    rep = json.loads(out[out.index("{") :])
    assert rep["impressions"] > 0 and {"model", "pretrained"} <= rep.keys()
    fresh = rep["summary_cache"]
    assert 0 < fresh["stale_impressions"] < rep["impressions"]  # summaries at window boundaries: most a bit stale
    # the same run scored with the earlier cache in its place (the run's config names the cache it reads) leaves
    # more interactions out
    shutil.move(tmp_path / "cache", tmp_path / "cache-kept")
    shutil.copytree(tmp_path / "old", tmp_path / "cache")
    out = argus_ranks("eval", str(ft), "--data", str(data), "--json", nproc=1)[0]
    old = json.loads(out[out.index("{") :])["summary_cache"]
    assert old["interactions_left_out"] > fresh["interactions_left_out"]
    # serving: export with a cache of the test split by the same summariser
    argus_ranks("summarize", str(pre), "--data", str(data), "--out", str(tmp_path / "test"), nproc=1)
    argus_ranks("export", str(ft), "--data", str(data), "--out", str(tmp_path / "export"), "--summary-cache",
                str(tmp_path / "test"), nproc=1)  # fmt: skip
    code, _, err = argus_own_process("export", str(ft), "--data", str(data), "--out", str(tmp_path / "e2"))
    assert code != 0 and "--summary-cache" in err and err.strip().count("\n") == 0
