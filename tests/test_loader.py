"""The exactly-once loader: equal counts, resume, re-layout on a new world size, named errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import free_port, rank_env, start_ranks

from trainer.data.batch import collate
from trainer.data.layout import buffer_order, split_intervals
from trainer.data.loader import ShardLoader, gather_states
from trainer.data.reader import ShardReadError
from trainer.data.schema import decode_sample


def all_keys(manifest) -> list[str]:
    """Every sample key in the train split, read independently with plain tarfile."""
    keys = []
    for sh in manifest.splits["train"].shards:
        with tarfile.open(manifest.root / sh.path) as t:
            keys += [m.name.partition(".")[0] for m in t]
    return keys


def run_epoch(cfg: ShardLoader.Config, rank: int, world: int) -> tuple[list[str], int]:
    loader = cfg.build(rank, world)
    keys, batches = [], 0
    for b in loader:
        keys += b.keys
        batches += 1
    return keys, batches


# ---- real torch.distributed (gloo) processes ----------------------------------------------------------------
def _dist_worker(rank: int, world: int, root: str, port: int, out: str) -> None:
    rank_env(rank, world, port)
    from trainer.dist import init_distributed

    info = init_distributed("cpu", timeout_s=120)
    assert info.backend == "gloo" and torch.distributed.get_world_size() == world
    cfg = ShardLoader.Config(path=root, batch_size=3, num_workers=2, shuffle_buffer=8)
    loader = cfg.build(info.rank, info.world_size)
    keys, batches = [], 0
    for b in loader:
        keys += b.keys
        batches += 1
        torch.distributed.barrier()  # a rank with fewer batches would hang here (timeout -> failure)
    states = gather_states(loader)
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, {"keys": keys, "batches": batches})
    if rank == 0:
        Path(out).write_text(json.dumps({"ranks": gathered, "states": len(states)}))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("shards", [7, 8, 3])
def test_exactly_once_equal_counts_gloo(dataset_factory, tmp_path, shards):
    m = dataset_factory(shards, users=5 * shards + 2, seed=shards)
    expected = all_keys(m)
    out = tmp_path / "result.json"
    start_ranks(_dist_worker, (2, str(m.root), free_port(), str(out)), nprocs=2)  # forked from the fork server
    res = json.loads(out.read_text())
    per_rank = [r["keys"] for r in res["ranks"]]
    got = [k for ks in per_rank for k in ks]
    assert sorted(got) == sorted(expected), "every sample exactly once across ranks x workers"
    assert len(set(got)) == len(got)
    counts = [len(k) for k in per_rank]
    assert max(counts) - min(counts) <= 1, counts
    assert res["ranks"][0]["batches"] == res["ranks"][1]["batches"]
    assert res["states"] == 2


# ---- in-process: layout properties --------------------------------------------------------------------------
@pytest.mark.parametrize("shards,world,workers", [(7, 2, 2), (8, 2, 2), (3, 2, 2), (1, 3, 4), (5, 4, 1)])
def test_layout_covers_every_sample_once(dataset_factory, shards, world, workers):
    m = dataset_factory(shards, users=23, seed=1)
    cfg = ShardLoader.Config(path=str(m.root), batch_size=4, num_workers=0 if workers == 1 else workers)
    per_rank = [run_epoch(cfg, r, world) for r in range(world)]
    got = [k for ks, _ in per_rank for k in ks]
    assert sorted(got) == sorted(all_keys(m))
    counts = [len(ks) for ks, _ in per_rank]
    assert max(counts) - min(counts) <= 1
    assert len({b for _, b in per_rank}) == 1, "same number of batches on every rank"


def test_buffer_order_is_permutation_and_bounded():
    rng = np.random.default_rng(0)
    for n, s in [(0, 4), (1, 4), (10, 4), (100, 7), (50, 200)]:
        order = buffer_order(n, s, np.random.default_rng(n))
        assert sorted(order.tolist()) == list(range(n))
        # position i can be emitted only once i - s earlier positions were read
        for t, pos in enumerate(order[: max(0, n - s)]):
            assert pos <= t + s
    assert split_intervals([(0, 3), (10, 12)], 2) == [[(0, 3)], [(10, 12)]]
    assert [sum(e - s for s, e in p) for p in split_intervals([(0, 10)], 3)] == [4, 3, 3]
    del rng


def test_epochs_differ_and_seed_is_deterministic(dataset_factory):
    m = dataset_factory(4, users=30)
    cfg = ShardLoader.Config(path=str(m.root), batch_size=4, num_workers=0)
    loader = cfg.build(0, 1)
    e0 = [k for b in loader for k in b.keys]
    e1 = [k for b in loader for k in b.keys]
    assert sorted(e0) == sorted(e1) and e0 != e1
    assert [k for b in cfg.build(0, 1) for k in b.keys] == e0


# ---- resume ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_after", [1, 4, 7])
def test_resume_mid_epoch_equals_uninterrupted(dataset_factory, workers, stop_after):
    m = dataset_factory(5, users=31, seed=3)
    cfg = ShardLoader.Config(path=str(m.root), batch_size=3, num_workers=workers, shuffle_buffer=5)
    world = 2
    for rank in range(world):
        full = cfg.build(rank, world)
        reference = [b.keys for b in full] + [b.keys for b in full]  # two epochs
        first = cfg.build(rank, world)
        got = []
        for i, b in enumerate(first):
            got.append(b.keys)
            if i + 1 == stop_after:
                break
        state = json.loads(json.dumps(first.state_dict()))  # must survive serialisation
        resumed = cfg.build(rank, world)
        resumed.load_state_dict(state)
        got += [b.keys for b in resumed]
        got += [b.keys for b in resumed]  # the next epoch continues identically too
        assert got == reference


@pytest.mark.parametrize("new_world,new_workers", [(3, 0), (1, 2), (4, 3)])
def test_resume_on_different_world_size_covers_rest_exactly_once(dataset_factory, new_world, new_workers):
    m = dataset_factory(7, users=40, seed=5)
    cfg = ShardLoader.Config(path=str(m.root), batch_size=2, num_workers=2, shuffle_buffer=6)
    consumed, states = [], []
    for rank in range(2):
        loader = cfg.build(rank, 2)
        for i, b in enumerate(loader):
            consumed += b.keys
            if i == 4:
                break
        states.append(loader.state_dict())
    cfg2 = ShardLoader.Config(path=str(m.root), batch_size=2, num_workers=new_workers, shuffle_buffer=6)
    rest = []
    per_rank = []
    for rank in range(new_world):
        loader = cfg2.build(rank, new_world)
        loader.load_state_dict(states)
        keys = [k for b in loader for k in b.keys]
        per_rank.append(len(keys))
        rest += keys
    assert sorted(consumed + rest) == sorted(all_keys(m))
    assert len(set(consumed + rest)) == len(consumed + rest)
    assert max(per_rank) - min(per_rank) <= 1


def test_resume_state_for_wrong_dataset_is_refused(dataset_factory):
    a = dataset_factory(2, users=10, seed=1)
    b = dataset_factory(2, users=12, seed=2)
    la = ShardLoader.Config(path=str(a.root), num_workers=0).build()
    lb = ShardLoader.Config(path=str(b.root), num_workers=0).build()
    with pytest.raises(ValueError, match="samples"):
        lb.load_state_dict(la.state_dict())


# ---- batches --------------------------------------------------------------------------------------------------
def test_jagged_and_padded_batches_agree_and_truncate_recent(dataset_factory):
    m = dataset_factory(2, users=12, seed=7)
    samples = []
    for sh in m.splits["train"].shards:
        with tarfile.open(m.root / sh.path) as t:
            samples += [decode_sample(x.name.partition(".")[0], t.extractfile(x).read()) for x in t]
    jag = collate(samples, padded=False, max_seq_len=5)
    pad = collate(samples, padded=True, max_seq_len=5)
    assert torch.equal(jag.lengths, pad.lengths)
    assert torch.equal(pad.values["item"][pad.mask], jag.values["item"])
    pos = 0
    for b, s in enumerate(samples):
        n = min(len(s), 5)
        assert jag.values["item"][pos : pos + n].tolist() == s.cols["item"][-n:].tolist()  # most recent kept
        assert jag.offsets[b] == s.offset + len(s) - n
        pos += n
    assert jag.truncated == sum(max(0, len(s) - 5) for s in samples)
    kjt = jag.to_kjt(("item", "context"))
    assert kjt.keys() == ["item", "context"]
    assert torch.equal(kjt["item"].values(), jag.values["item"])
    assert torch.equal(kjt["context"].lengths(), jag.lengths)


def test_loader_padded_format_and_loader_truncation_counts(dataset_factory):
    m = dataset_factory(3, users=15, seed=8, max_len=16)
    cfg = ShardLoader.Config(path=str(m.root), batch_size=4, num_workers=0, batch_format="padded", max_seq_len=6)
    loader = cfg.build()
    total = 0
    for b in loader:
        assert b.values["item"].shape[0] == b.size and b.values["item"].shape[1] <= 6
        total += b.truncated
    assert loader.stats["truncated"] == total
    assert loader.stats["interactions"] + total == m.splits["train"].interactions


# ---- bad input ------------------------------------------------------------------------------------------------
def _second_member(path: Path) -> tarfile.TarInfo:
    with tarfile.open(path) as t:
        return t.getmembers()[1]


def test_truncated_shard_names_shard_and_key(dataset_factory):
    m = dataset_factory(2, users=10, seed=9)
    shard = m.root / m.splits["train"].shards[0].path
    mem = _second_member(shard)
    data = shard.read_bytes()
    shard.write_bytes(data[: mem.offset_data + mem.size // 2])
    cfg = ShardLoader.Config(path=str(m.root), batch_size=2, num_workers=0, shuffle=False)
    with pytest.raises(ShardReadError, match=f"{shard.name}.*{mem.name.partition('.')[0]}"):
        for _ in cfg.build():
            pass
    skipper = ShardLoader.Config(path=str(m.root), batch_size=2, num_workers=0, shuffle=False, on_error="skip").build()
    keys = [k for b in skipper for k in b.keys]
    n0 = m.splits["train"].shards[0].samples
    assert skipper.stats["skipped"] == n0 - 1  # everything from the cut member on
    assert len(keys) + skipper.stats["skipped"] == m.splits["train"].samples
    assert skipper.errors and shard.name in skipper.errors[0]


def test_a_shard_overwritten_with_garbage_names_the_shard(dataset_factory):
    """Bytes that are not a tar header (non-octal numbers) are the same named ShardReadError as a bad checksum."""
    m = dataset_factory(2, users=10, seed=9)
    shard = m.root / m.splits["train"].shards[1].path
    shard.write_bytes(b"not a tar: " * 200)
    cfg = ShardLoader.Config(path=str(m.root), batch_size=2, num_workers=0, shuffle=False)
    with pytest.raises(ShardReadError, match=f"shard .*{shard.name}: bad tar header checksum"):
        for _ in cfg.build():
            pass


def test_corrupt_sample_and_missing_shard(dataset_factory):
    m = dataset_factory(3, users=12, seed=10)
    shard = m.root / m.splits["train"].shards[1].path
    mem = _second_member(shard)
    data = bytearray(shard.read_bytes())
    data[mem.offset_data : mem.offset_data + 8] = b"\xc1" * 8  # 0xc1 is never valid msgpack
    shard.write_bytes(bytes(data))
    key = mem.name.partition(".")[0]
    cfg = ShardLoader.Config(path=str(m.root), batch_size=2, num_workers=2)
    with pytest.raises(Exception, match=key):
        for _ in cfg.build():
            pass
    skipper = ShardLoader.Config(path=str(m.root), batch_size=2, num_workers=2, on_error="skip").build()
    keys = [k for b in skipper for k in b.keys]
    assert skipper.stats["skipped"] == 1 and key not in keys
    assert len(keys) == m.splits["train"].samples - 1

    missing = m.root / m.splits["train"].shards[2].path
    missing.unlink()
    with pytest.raises(ShardReadError, match=missing.name):
        for _ in ShardLoader.Config(path=str(m.root), batch_size=2, num_workers=0).build():
            pass


def test_reader_handles_pax_and_long_names_from_stock_tar_writers(dataset_factory, tmp_path):
    """Shards rewritten by stdlib tarfile with pax headers (float mtimes) and long member paths read the same."""
    from trainer.data.reader import iter_members

    m = dataset_factory(1, users=6, seed=11)
    src = m.root / m.splits["train"].shards[0].path
    with tarfile.open(src) as t:
        members = [(x.name, t.extractfile(x).read()) for x in t]
    dst = tmp_path / "pax.tar"
    with tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as out:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        out.addfile(d)  # a non-file member is skipped, not counted
        for i, (name, data) in enumerate(members):
            ti = tarfile.TarInfo(("d" * 120 + "/" if i % 2 else "") + name)  # > 100 chars -> pax path
            ti.size, ti.mtime = len(data), 1234567890.25  # float mtime -> pax header
            out.addfile(ti, io.BytesIO(data))
    got = [(k, bytes(p)) for _, k, p in iter_members(dst, np.arange(len(members)))]
    assert got == [(n.partition(".")[0], d) for n, d in members]
    got_gnu = tmp_path / "gnu.tar"
    with tarfile.open(got_gnu, "w", format=tarfile.GNU_FORMAT) as out:
        for name, data in members:
            ti = tarfile.TarInfo("x" * 150 + "/" + name)  # GNU long-name member
            ti.size = len(data)
            out.addfile(ti, io.BytesIO(data))
    assert [k for _, k, _ in iter_members(got_gnu, np.arange(len(members)))] == [
        n.partition(".")[0] for n, _ in members
    ]
