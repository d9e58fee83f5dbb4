"""Token-budget batches: packing plan, exactly-once loader, balanced ranks, resume, sample-length tables."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from test_loader import all_keys

from trainer.data.inspect import verify
from trainer.data.layout import Packing, pack_stream
from trainer.data.loader import ShardLoader
from trainer.data.manifest import Manifest


def heavy_tailed(n: int, cap: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.minimum(rng.lognormal(np.log(cap / 4), 1.0, n).astype(np.int64) + 1, cap)


@pytest.mark.parametrize("rows,cap,window", [(4, 64, 64), (1, 32, 8), (8, 16, 3), (3, 50, 200)])
def test_pack_stream_places_every_sample_once_without_overlap(rows, cap, window):
    lengths = heavy_tailed(3000, cap, seed=rows)
    lengths[::97] = cap  # some fill a row exactly
    take, bounds, row, col = pack_stream(lengths, Packing(rows, cap, window))
    assert sorted(take.tolist()) == list(range(len(lengths)))
    assert bounds[0] == 0 and bounds[-1] == len(lengths) and np.all(np.diff(bounds) > 0)
    for b in range(len(bounds) - 1):
        grid = np.zeros((rows, cap), np.int64)
        for i in range(bounds[b], bounds[b + 1]):
            grid[row[i], col[i] : col[i] + lengths[take[i]]] += 1
        assert grid.max() <= 1, "two samples overlap"
        assert grid.sum() == lengths[take[bounds[b] : bounds[b + 1]]].sum(), "a sample runs past its row"
        for r in range(rows):  # each row is filled from column 0 without gaps
            filled = grid[r]
            assert not np.any(np.diff(filled) > 0), "a gap inside a row"
    # A sample waits at most one batch past the one its window position allows: reordering stays local.
    emitted_at = np.empty(len(lengths), np.int64)
    emitted_at[take] = np.arange(len(take))
    assert np.all(np.abs(emitted_at - np.arange(len(lengths))) <= window + rows * cap)


def test_pack_stream_fills_rows_on_heavy_tailed_lengths():
    lengths = heavy_tailed(20_000, 2048, seed=1)
    packing = Packing(4, 2048, 64)
    take, bounds, _, _ = pack_stream(lengths, packing)
    fill = np.add.reduceat(lengths[take], bounds[:-1]) / packing.budget
    assert fill[:-2].min() > 0.85 and fill.mean() > 0.97, (fill.min(), fill.mean())


def loader_cfg(root, **kw) -> ShardLoader.Config:
    base = dict(path=str(root), batch_tokens=40, max_seq_len=10, num_workers=2, shuffle_buffer=6, seed=4)
    return ShardLoader.Config(**(base | kw))


def check_batch(b) -> None:
    rows, row_len = b.pack_shape
    grid = torch.zeros(rows, row_len, dtype=torch.int64)
    for r, c, n in zip(b.pack_row.tolist(), b.pack_col.tolist(), b.lengths.tolist()):
        grid[r, c : c + n] += 1
    assert int(grid.max()) <= 1 and int(grid.sum()) == b.num_interactions
    assert int(b.lengths.max()) <= row_len


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 1)])
def test_packed_epoch_exactly_once_equal_steps_balanced(dataset_factory, world, workers):
    m = dataset_factory(5, users=120, seed=7, max_hist=60)
    cfg = loader_cfg(m.root, num_workers=workers)
    per_rank_tokens, keys = [], Counter()
    for rank in range(world):
        tokens = []
        for b in cfg.build(rank, world):
            if b.size:
                check_batch(b)
            keys.update(b.keys)
            tokens.append(b.num_interactions)
        per_rank_tokens.append(tokens)
    assert sorted(keys.elements()) == sorted(all_keys(m)), "every sample exactly once"
    steps = {len(t) for t in per_rank_tokens}
    assert len(steps) == 1, f"step counts differ across ranks: {steps}"
    # Balance: every step but the last two (where parts run dry), each rank's real interactions are within
    # 25% of the budget of 40 (rows of 10 with histories up to 10); their spread is what a step waits for.
    tokens = np.array(per_rank_tokens)
    body = tokens[:, : max(tokens.shape[1] - 2 * max(workers, 1), 0)]
    assert body.size and body.min() >= 0.75 * 40, tokens


@pytest.mark.parametrize("stop_after", [1, 5])
def test_packed_resume_mid_epoch_equals_uninterrupted(dataset_factory, stop_after):
    m = dataset_factory(4, users=60, seed=3)
    cfg = loader_cfg(m.root)

    def signature(b) -> tuple:
        return (tuple(b.keys), tuple(b.pack_row.tolist()), tuple(b.pack_col.tolist()))

    for rank in range(2):
        full = cfg.build(rank, 2)
        reference = [signature(b) for b in full] + [signature(b) for b in full]  # two epochs
        first = cfg.build(rank, 2)
        got = []
        for i, b in enumerate(first):
            got.append(signature(b))
            if i + 1 == stop_after:
                break
        state = json.loads(json.dumps(first.state_dict()))
        resumed = cfg.build(rank, 2)
        resumed.load_state_dict(state)
        got += [signature(b) for b in resumed] + [signature(b) for b in resumed]
        assert got == reference


@pytest.mark.parametrize(
    "new", [dict(world=3), dict(world=1, batch_tokens=0, batch_size=3), dict(world=2, batch_tokens=30)]
)
def test_packed_resume_on_new_world_or_budget_covers_rest_once(dataset_factory, new):
    m = dataset_factory(6, users=70, seed=9)
    cfg = loader_cfg(m.root)
    consumed, states = [], []
    for rank in range(2):
        loader = cfg.build(rank, 2)
        for i, b in enumerate(loader):
            consumed += b.keys
            if i == 3:
                break
        states.append(loader.state_dict())
    world = new.pop("world")
    cfg2 = loader_cfg(m.root, **new)
    rest = [k for rank in range(world) for b in _loaded(cfg2, rank, world, states) for k in b.keys]
    assert sorted(consumed + rest) == sorted(all_keys(m))


def _loaded(cfg, rank, world, states):
    loader = cfg.build(rank, world)
    loader.load_state_dict(states)
    return loader


def test_sample_length_tables_written_verified_and_optional(dataset_factory):
    m = dataset_factory(3, users=30, seed=2)
    for sh in m.splits["train"].shards:
        lengths = np.load(m.root / sh.lengths)
        assert lengths.sum() == sh.interactions and lengths.size == sh.samples
    assert verify(m.root)["ok"]

    packed = [(b.keys, b.pack_row.tolist(), b.pack_col.tolist()) for b in loader_cfg(m.root).build()]
    # A dataset written before the tables existed: the loader reads the shards once and plans the same batches.
    manifest = json.loads((m.root / "manifest.json").read_text())
    for sh in manifest["splits"]["train"]["shards"]:
        sh["lengths"], sh["lengths_sha256"] = "", ""
    (m.root / "manifest.json").write_text(json.dumps(manifest))
    assert Manifest.load(m.root).splits["train"].shards[0].lengths == ""
    again = [(b.keys, b.pack_row.tolist(), b.pack_col.tolist()) for b in loader_cfg(m.root).build()]
    assert again == packed

    # A table that disagrees with its shard is caught by `data verify`.
    m2 = dataset_factory(2, users=10, seed=5)
    sh = m2.splits["train"].shards[0]
    bad = np.load(m2.root / sh.lengths)
    bad[0] += 1
    np.save(m2.root / sh.lengths, bad)
    errors = verify(m2.root)["errors"]
    assert any(sh.lengths in e for e in errors), errors


def test_skipped_sample_leaves_no_gap_in_its_row(dataset_factory):
    from test_loader import _second_member

    m = dataset_factory(3, users=12, seed=10)
    shard = m.root / m.splits["train"].shards[1].path
    mem = _second_member(shard)
    data = bytearray(shard.read_bytes())
    data[mem.offset_data : mem.offset_data + 8] = b"\xc1" * 8
    shard.write_bytes(bytes(data))
    loader = loader_cfg(m.root, on_error="skip").build()
    batches = list(loader)
    assert loader.stats["skipped"] == 1
    for b in batches:
        if b.size:
            check_batch(b)
            for r in b.pack_row.unique().tolist():  # the row's samples tile columns 0..filled-1
                sel = b.pack_row == r
                ends = sorted(zip(b.pack_col[sel].tolist(), b.lengths[sel].tolist()))
                pos = 0
                for c, n in ends:
                    assert c == pos
                    pos += n


def test_batch_tokens_settings_are_checked(dataset_factory):
    m = dataset_factory(2, users=8, seed=1)
    with pytest.raises(ValueError, match="data.batch_tokens"):
        loader_cfg(m.root, batch_tokens=5).build()
    with pytest.raises(ValueError, match="data.batch_tokens"):
        loader_cfg(m.root, batch_format="padded").build()


# ---- the model on packed batches ------------------------------------------------------------------------------
@pytest.mark.parametrize("token_layout", ["merged", "interleaved"])
@pytest.mark.parametrize("attention", ["mask", "segments"])
def test_packed_model_equals_one_history_per_row(token_layout, attention):
    """Both losses, the feedback logits and every gradient of the ARGUS model on a packed grid equal those of the
    same histories one per row (the padded path, which packing must not change)."""
    from embeddings.tables import ItemEmbeddings
    from trainer.model.argus import ArgusModel, HeadsConfig, ModelConfig, target_index
    from trainer.model.heads import FeedbackHead, NextItemLossConfig
    from trainer.model.interaction import side_table_rows

    g = torch.Generator().manual_seed(len(token_layout) + len(attention))
    k = 2 if token_layout == "interleaved" else 1
    row_len = 12
    model_cfg = ModelConfig(
        preset="custom",
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=64,
        max_seq_len=row_len * k,
        token_layout=token_layout,
        dropout=0.0,
        attention=attention,
    )
    heads = HeadsConfig(
        next_item=NextItemLossConfig(uniform_negatives=6, in_batch_negatives=6, temperature=0.1),
        feedback=FeedbackHead.Config(weight=0.5),
    )
    torch.manual_seed(0)
    model = ArgusModel(model_cfg, ItemEmbeddings.Config(item_dim=8), heads).eval()
    lengths = torch.tensor([12, 1, 5, 7, 3, 12, 2, 9, 4, 6, 1, 11])  # two fill a row exactly; ones of length 1
    n, b = int(lengths.sum()), lengths.numel()
    take, bounds, row, col = pack_stream(lengths.numpy(), Packing(rows=7, row_len=row_len, window=b))
    assert bounds[1] == b, "all histories in one packed batch"
    rows, cols = torch.empty(b, dtype=torch.int64), torch.empty(b, dtype=torch.int64)
    rows[take], cols[take] = torch.from_numpy(row), torch.from_numpy(col)
    side = {name: torch.randint(0, r, (n,), generator=g) for name, r in side_table_rows(model_cfg.num_contexts).items()}
    tgt = target_index(lengths)
    sel = torch.randperm(tgt.numel(), generator=g)[:6]
    item_ids = torch.randint(0, 50, (n,), generator=g)
    neg_ids = torch.randint(0, 50, (6,), generator=g)

    def run(pack):
        model.zero_grad()
        item = torch.randn(n, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
        neg = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
        out = model(
            item,
            side,
            neg,
            lengths,
            tgt,
            sel,
            item_ids,
            neg_ids,
            side["event"],
            torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(3)),
            torch.zeros(tgt.numel()),
            torch.zeros(sel.numel() + 6),
            pack,
        )
        out["loss"].backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return out, grads, item.grad.clone()

    ref, ref_grads, ref_item = run(None)
    got, got_grads, got_item = run((rows, cols, (7, row_len)))
    for key in ("loss/next_item", "loss/feedback", "logits/event", "logits/played"):
        torch.testing.assert_close(got[key], ref[key], atol=2e-5, rtol=1e-5)
    assert got_grads.keys() == ref_grads.keys() and len(ref_grads) > 10
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(got_item, ref_item, atol=2e-5, rtol=1e-4)


def test_batch_pack_first_fit_decreasing_and_finetune_tower_on_packed_rows():
    """Eval/export/fine-tuning pack a batch's own samples (first-fit decreasing); the two-tower ranker's user
    vectors on the packed grid equal those one history per row."""
    from embeddings.tables import ItemEmbeddings
    from trainer.data.batch import Batch
    from trainer.model.argus import HeadsConfig, ModelConfig
    from trainer.model.interaction import side_table_rows
    from trainer.model.two_tower import FinetuneConfig, TwoTower

    lengths = torch.tensor([3, 8, 1, 5, 8, 2, 4])
    n = int(lengths.sum())
    values = {
        k: torch.zeros(n, dtype=torch.int64) for k in ("item", "timestamp", "event", "played", "organic", "context")
    }
    batch = Batch([f"u{i}" for i in range(7)], torch.arange(7), torch.zeros(7), lengths, torch.zeros(7), values, False)
    batch.pack(8)
    check_batch(batch)
    assert batch.pack_shape == (4, 8), "31 interactions fit 4 rows of 8 first-fit decreasing"
    with pytest.raises(ValueError, match="does not fit"):
        batch.pack(7)

    torch.manual_seed(0)
    model_cfg = ModelConfig(preset="custom", d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=8, dropout=0.0)
    tower = TwoTower(model_cfg, ItemEmbeddings.Config(item_dim=8), HeadsConfig(), FinetuneConfig(item_mlp=16)).eval()
    g = torch.Generator().manual_seed(1)
    side = {k: torch.randint(0, r, (n,), generator=g) for k, r in side_table_rows(model_cfg.num_contexts).items()}
    item = torch.randn(n, 8, generator=g)
    last = torch.cumsum(lengths, 0) - 1
    ref = tower.user_vectors(item, side, lengths, last)
    got = tower.user_vectors(item, side, lengths, last, batch.grid())
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
