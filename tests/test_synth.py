"""trainer.data.synth: determinism, counts vs the manifest, holdout/chunking, and the planted structure."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from trainer.data import synth
from trainer.data.manifest import Manifest
from trainer.data.schema import FIELDS, PLAYED_NA, EventType, decode_sample


# ---- helpers ---------------------------------------------------------------------------------------------------
def read_shard(path: Path) -> list:
    """Every sample of one shard, read with plain tarfile + decode_sample (independent of the writer)."""
    out = []
    with tarfile.open(path) as tf:
        for member in tf:
            key, ext = member.name.rsplit(".", 1)
            assert ext == "msg"
            out.append(decode_sample(key, tf.extractfile(member).read()))
    return out


def read_split(root: Path, split: str) -> list[list]:
    m = Manifest.load(root)
    return [read_shard(root / s.path) for s in m.split(split).shards]


def file_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def flat_rows(samples: list) -> dict[str, np.ndarray]:
    """Concatenate train samples into rows (+ a user column), in file order."""
    cols = {k: np.concatenate([s.cols[k] for s in samples]) for k in FIELDS}
    cols["user"] = np.concatenate([np.full(len(s), s.user, np.int64) for s in samples])
    return cols


SMALL = dict(users=240, items=400, mean_len=60.0, shards=3, max_len=64, seed=7)


@pytest.fixture(scope="module")
def loo_ds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loo") / "ds"
    synth.synthesize(root, holdout="loo", workers=1, **SMALL)
    return root


@pytest.fixture(scope="module")
def big_ds(tmp_path_factory):
    """Enough interactions (~200k) to see the planted structure; read back once."""
    root = tmp_path_factory.mktemp("big") / "ds"
    synth.synthesize(root, users=1500, items=3000, mean_len=150.0, shards=2, seed=3, holdout="none", workers=1)
    rows = flat_rows([s for shard in read_split(root, "train") for s in shard])
    items, users = synth.load_truth(root)
    return root, rows, items, users


# ---- determinism -----------------------------------------------------------------------------------------------
def test_deterministic_across_runs_and_workers(tmp_path, loo_ds):
    a = tmp_path / "a"
    b = tmp_path / "b"
    c = tmp_path / "c"
    ma = synth.synthesize(a, holdout="loo", workers=1, **SMALL)
    mb = synth.synthesize(b, holdout="loo", workers=2, **SMALL)  # spawn pool: shards in other processes
    mc = synth.synthesize(c, holdout="loo", workers=1, **{**SMALL, "seed": SMALL["seed"] + 1})

    da, db, dc = file_digests(a), file_digests(b), file_digests(c)
    assert da == db  # every byte: shards, item counts, truth, manifest
    assert da == file_digests(loo_ds)  # same arguments, an earlier run
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    sha = lambda m: [(sp, s.path, s.sha256) for sp, info in m.splits.items() for s in info.shards]  # noqa: E731
    assert sha(ma) == sha(mb)
    assert all(x[2] != y[2] for x, y in zip(sha(ma), sha(mc)))
    assert da["truth/items.npz"] != dc["truth/items.npz"]
    assert ma.source["kind"] == "synth" and "workers" not in ma.source
    for k in (
        "users",
        "items",
        "mean_len",
        "shards",
        "seed",
        "holdout",
        "max_len",
        "clusters",
        "days",
        "val_days",
        "test_days",
        "gap_seconds",
    ):
        assert k in ma.source, k
    assert ma.source["seed"] == SMALL["seed"] and mc.source["seed"] == SMALL["seed"] + 1


def test_shard_depends_only_on_seed_and_index():
    cfg = synth.make_config(users=90, items=200, mean_len=30, shards=3, seed=5)
    first = [(u, {k: v.copy() for k, v in c.items()}) for u, c in synth.iter_histories(cfg, 2)]
    for _ in synth.iter_histories(cfg, 0):  # generating another shard first changes nothing
        pass
    again = list(synth.iter_histories(cfg, 2))
    assert [u for u, _ in first] == [u for u, _ in again] == list(range(60, 90))
    for (_, x), (_, y) in zip(first, again):
        for k in FIELDS:
            np.testing.assert_array_equal(x[k], y[k])


# ---- counts vs the manifest ---------------------------------------------------------------------------------------
def test_counts_match_manifest(loo_ds):
    m = Manifest.load(loo_ds)
    assert m.num_items == SMALL["items"] and m.max_len == SMALL["max_len"]
    assert set(m.splits) == {"train", "val", "test"}
    for split, info in m.splits.items():
        assert len(info.shards) == SMALL["shards"]
        counts = np.zeros(SMALL["items"], np.int64)
        for sh, samples in zip(info.shards, read_split(loo_ds, split)):
            assert sh.samples == len(samples)
            assert sh.interactions == sum(len(s) for s in samples)
            assert sh.users == len({s.user for s in samples})
            if split != "train":
                assert sh.targets == sum(len(s) - s.target_start for s in samples)
            for s in samples:
                assert len(s) <= SMALL["max_len"]
                counts += np.bincount(s.cols["item"], minlength=SMALL["items"])
        np.testing.assert_array_equal(m.item_counts(split), counts)
        assert counts.sum() == info.interactions


# ---- holdout, chunking, ordering -----------------------------------------------------------------------------------
def test_loo_splits_chunks_and_order(loo_ds):
    cfg = synth.make_config(holdout="loo", **SMALL)
    full = {u: c for i in range(cfg.shards) for u, c in synth.iter_histories(cfg, i)}
    assert sorted(full) == list(range(SMALL["users"]))

    by_split = {sp: {} for sp in ("train", "val", "test")}
    for sp in by_split:
        for shard_i, samples in enumerate(read_split(loo_ds, sp)):
            lo, hi = cfg.user_range(shard_i)
            users = [s.user for s in samples]
            assert users == sorted(users) and all(lo <= u < hi for u in users)  # contiguous ranges, id order
            for s in samples:
                by_split[sp].setdefault(s.user, []).append(s)
    seen = set().union(*(set(d) for d in by_split.values()))
    assert seen == set(range(SMALL["users"]))

    max_len = SMALL["max_len"]
    n_chunked = 0
    for u, h in full.items():
        n = len(h["item"])
        assert n >= 1
        assert np.all(np.diff(h["timestamp"]) >= 0), f"user {u}: timestamps not sorted"
        train = by_split["train"].get(u, [])
        n_train = n - 2 if n >= 3 else n
        # train chunks: contiguous offsets covering [0, n_train)
        offsets = [s.offset for s in train]
        assert offsets == sorted(offsets)
        pos = 0
        for s in train:
            assert s.offset == pos and s.target_start == 0 and len(s) <= max_len
            for k in FIELDS:
                np.testing.assert_array_equal(s.cols[k], h[k][pos : pos + len(s)])
            pos += len(s)
        assert pos == n_train
        n_chunked += len(train) > 1
        if n < 3:
            assert u not in by_split["val"] and u not in by_split["test"]
            continue
        (val,) = by_split["val"][u]
        (test,) = by_split["test"][u]
        for s, end in ((val, n - 1), (test, n)):
            assert s.offset == max(0, end - max_len) and s.offset + len(s) == end
            assert s.target_start == len(s) - 1  # exactly one target: the second-to-last / last interaction
            for k in FIELDS:
                np.testing.assert_array_equal(s.cols[k], h[k][s.offset : end])
    assert n_chunked > 5  # histories longer than max_len exist and were chunked


def test_temporal_holdout(tmp_path):
    root = tmp_path / "t"
    m = synth.synthesize(
        root,
        users=150,
        items=300,
        mean_len=80,
        shards=2,
        seed=1,
        holdout="temporal",
        days=30,
        val_days=3,
        test_days=4,
        gap_seconds=3600,
        workers=1,
    )
    t_end = synth.T0 + 30 * 86400
    test_start, val_start = t_end - 4 * 86400, t_end - 7 * 86400
    assert (m.source["val_start"], m.source["test_start"]) == (val_start, test_start)
    train = [s for sh in read_split(root, "train") for s in sh]
    assert all(s.cols["timestamp"].max() < val_start - 3600 for s in train)
    assert all(s.cols["timestamp"].min() >= synth.T0 for s in train)
    for split, lo, hi in (("val", val_start, test_start), ("test", test_start, t_end)):
        samples = [s for sh in read_split(root, split) for s in sh]
        assert samples
        for s in samples:
            tgt = s.cols["timestamp"][s.target_start :]
            assert tgt.size and tgt.min() >= lo and tgt.max() < hi
            assert np.all(s.cols["timestamp"][: s.target_start] < lo)


# ---- history shape ---------------------------------------------------------------------------------------------------
def test_lengths_heavy_tailed_with_requested_mean():
    cfg = synth.make_config(users=4000, items=1000, mean_len=50, shards=1, seed=11)
    n = np.array([len(c["item"]) for _, c in synth.iter_histories(cfg, 0)])
    assert n.min() >= 1
    assert abs(n.mean() / 50 - 1) < 0.1
    assert np.median(n) < 0.8 * n.mean() and n.max() > 6 * n.mean()  # lognormal: long right tail


def test_event_rows(big_ds):
    _, r, _, _ = big_ds
    ev, played, item, user, ts = r["event"], r["played"], r["item"], r["user"], r["timestamp"]
    counts = np.bincount(ev, minlength=len(EventType))
    assert all(counts[e] > 0 for e in EventType), counts
    plays = (ev == EventType.LISTEN) | (ev == EventType.SKIP)
    assert np.all(played[plays] <= 100) and np.all(played[~plays] == PLAYED_NA)
    assert np.all(played[ev == EventType.SKIP] < synth.SKIP_BELOW)
    assert np.all(played[ev == EventType.LISTEN] >= synth.SKIP_BELOW)
    # LIKE/DISLIKE follow a play of the same item; UNLIKE/UNDISLIKE follow the LIKE/DISLIKE
    for e, prev in (
        (EventType.LIKE, (EventType.LISTEN,)),
        (EventType.DISLIKE, (EventType.LISTEN, EventType.SKIP)),
        (EventType.UNLIKE, (EventType.LIKE,)),
        (EventType.UNDISLIKE, (EventType.DISLIKE,)),
    ):
        i = np.flatnonzero(ev == e)
        assert np.all(i > 0)
        assert np.all(np.isin(ev[i - 1], prev)), e
        assert np.all(item[i - 1] == item[i]) and np.all(user[i - 1] == user[i]) and np.all(ts[i] >= ts[i - 1])
    assert 0.02 < counts[EventType.LIKE] / plays.sum() < 0.2
    assert 0.3 < r["organic"].mean() < 0.45
    assert set(np.unique(r["context"])) == {1, 2, 3, 4}
    assert np.all((ts >= synth.T0) & (ts < synth.T0 + 120 * 86400))
    # organic events sit mostly on search/album surfaces, recommended ones on feed/radio
    org = r["organic"].astype(bool)
    assert np.mean(np.isin(r["context"][org], (3, 4))) > 0.4 > np.mean(np.isin(r["context"][~org], (3, 4)))


# ---- planted structure ----------------------------------------------------------------------------------------------
def _plays(r):
    return (r["event"] == EventType.LISTEN) | (r["event"] == EventType.SKIP)


def test_popularity_is_zipf_like(big_ds):
    _, r, items, _ = big_ds
    cnt = np.bincount(r["item"][_plays(r)], minlength=3000)
    top = np.sort(cnt)[::-1]
    assert top[:30].sum() / top.sum() > 0.15  # top 1% of items: >15% of plays (uniform would be 1%)
    # and it follows the planted prior popularity
    assert np.corrcoef(np.log1p(cnt), np.log(items["item_pop"]))[0, 1] > 0.6


def test_users_concentrate_on_their_taste(big_ds):
    _, r, items, users = big_ds
    p = _plays(r)
    u, cl = r["user"][p], items["item_cluster"].astype(np.int64)[r["item"][p]]
    C = items["cluster_pop"].shape[0]
    global_share = np.bincount(cl, minlength=C) / cl.size
    top = users["taste_support"][np.arange(users["user"].size), users["taste"].argmax(axis=1)]
    n_u = np.bincount(u, minlength=users["user"].size)
    on_top = np.bincount(u, weights=cl == top[u], minlength=users["user"].size)
    ok = n_u >= 30
    assert ok.sum() > 300
    user_share, base = (on_top[ok] / n_u[ok]).mean(), global_share[top[ok]].mean()
    assert user_share > 2.0 * base, (user_share, base)
    # a taste computed from the truth beats one computed from popularity alone at predicting a user's clusters
    taste = np.zeros((users["user"].size, C))
    np.add.at(
        taste,
        (np.repeat(users["user"], users["taste_support"].shape[1]), users["taste_support"].ravel()),
        users["taste"].ravel(),
    )
    assert np.mean(np.log(taste[u, cl] + 1e-3)) > np.mean(np.log(global_share[cl] + 1e-3))


def test_feedback_follows_affinity(big_ds):
    _, r, items, users = big_ds
    ev, item, user = r["event"], r["item"], r["user"]
    p = np.flatnonzero(_plays(r))
    nxt = np.minimum(p + 1, ev.size - 1)
    liked = (ev[nxt] == EventType.LIKE) & (item[nxt] == item[p]) & (user[nxt] == user[p]) & (nxt > p)
    disliked = (ev[nxt] == EventType.DISLIKE) & (item[nxt] == item[p]) & (user[nxt] == user[p]) & (nxt > p)
    C = items["cluster_pop"].shape[0]
    taste = np.zeros((users["user"].size, C))
    np.add.at(
        taste,
        (np.repeat(users["user"], users["taste_support"].shape[1]), users["taste_support"].ravel()),
        users["taste"].ravel(),
    )
    cl = items["item_cluster"].astype(np.int64)[item[p]]
    aff = np.log(taste[user[p], cl] * users["taste_support"].shape[1] + 0.05) + synth.user_item_noise(
        3, user[p], item[p]
    )
    hi, lo = aff > 1.0, aff < -1.0
    assert hi.sum() > 1000 and lo.sum() > 1000
    listen = ev[p] == EventType.LISTEN  # likes only follow listens: compare like rates among listens
    assert liked[hi & listen].mean() > 5 * liked[lo & listen].mean() and liked[hi & listen].mean() > 0.05
    assert disliked[lo].mean() > 5 * disliked[hi].mean()
    played = r["played"][p].astype(float)
    assert played[hi].mean() > played[lo].mean() + 30
    assert (ev[p][lo] == EventType.SKIP).mean() > 3 * (ev[p][hi] == EventType.SKIP).mean()


def test_weekly_modulation_visible(big_ds):
    _, r, items, _ = big_ds
    assert dt.datetime.fromtimestamp(synth.T0, dt.timezone.utc).weekday() == 0  # hour of week 0 = Monday 00h
    p = _plays(r)
    cl = items["item_cluster"].astype(np.int64)[r["item"][p]]
    how = (r["timestamp"][p] - synth.T0) // 3600 % 168
    C = items["cluster_pop"].shape[0]
    lm = items["cluster_logmod"]

    def share(mask):
        return np.bincount(cl[mask], minlength=C) / mask.sum()

    weekend = how >= 120
    obs = np.log(share(weekend) / share(~weekend))
    planted = lm[:, 120:].mean(axis=1) - lm[:, :120].mean(axis=1)
    assert np.corrcoef(obs, planted)[0, 1] > 0.8
    hod = np.arange(168) % 24
    evening, morning = (how % 24) >= 18, ((how % 24) >= 6) & ((how % 24) < 12)
    obs = np.log(share(evening) / share(morning))
    planted = lm[:, hod >= 18].mean(axis=1) - lm[:, (hod >= 6) & (hod < 12)].mean(axis=1)
    assert np.corrcoef(obs, planted)[0, 1] > 0.8
    # sessions start more in the evening than at night
    h = np.bincount(how % 24, minlength=24)
    assert h[19:23].mean() > 2 * h[2:5].mean()


def test_sequential_structure(big_ds):
    _, r, items, _ = big_ds
    p = np.flatnonzero(_plays(r))
    a, b = p[:-1], p[1:]
    same = r["user"][a] == r["user"][b]
    a, b = a[same], b[same]
    succ_rate = np.mean(items["item_successor"][r["item"][a]] == r["item"][b])
    pop = np.bincount(r["item"][p], minlength=3000) / p.size
    chance = np.mean(pop[items["item_successor"][r["item"][a]]])  # successor hit rate if next ~ popularity
    assert succ_rate > 0.1 and succ_rate > 10 * chance
    cl = items["item_cluster"][r["item"]]
    assert np.mean(cl[a] == cl[b]) > 0.5


def test_truth_files(big_ds):
    root, _, items, users = big_ds
    assert np.array_equal(users["user"], np.arange(1500))
    assert items["item_cluster"].shape == (3000,) and items["item_cluster"].max() < items["cluster_pop"].shape[0]
    np.testing.assert_allclose(users["taste"].sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(items["item_pop"].sum(), 1.0, rtol=1e-4)
    assert np.array_equal(np.sort(items["item_successor"]), np.arange(3000))  # a permutation of the items
    m = Manifest.load(root)
    assert users["length"].sum() == m.split("train").interactions
    assert (root / "truth" / "users-000001.npz").stat().st_size < 200_000


# ---- arguments and output directory ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(users=0), "users"),
        (dict(items=0), "items"),
        (dict(shards=0), "shards"),
        (dict(shards=11), "shards"),
        (dict(mean_len=0.5), "mean_len"),
        (dict(holdout="random"), "holdout"),
        (dict(max_len=0), "max_len"),
        (dict(clusters=51), "clusters"),
        (dict(days=0), "days"),
        (dict(seed=-1), "seed"),
        (dict(workers=-1), "workers"),
        (dict(holdout="temporal", val_days=60, test_days=60), "val_days"),
        (dict(holdout="temporal", test_days=0), "test_days"),
        (dict(gap_seconds=-5), "gap_seconds"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, name):
    args = dict(users=10, items=50, shards=2, days=100, **{"mean_len": 5.0})
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        synth.synthesize(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()  # validated before anything is written


def test_refuses_an_existing_dataset_unless_overwrite_and_a_foreign_directory_always(tmp_path):
    from helpers import tree_digest

    from trainer.data.convert import convert
    from trainer.data.outdir import OutputExistsError

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match=f"out {foreign}: not empty and not an argus dataset"):
            synth.synthesize(foreign, users=10, items=20, mean_len=5, shards=1, workers=1, overwrite=overwrite)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    root = tmp_path / "ds"
    synth.synthesize(root, users=30, items=40, mean_len=5, shards=3, holdout="loo", workers=1)
    assert (root / "val" / "shard-000002.tar").exists()
    before = tree_digest(root)
    with pytest.raises(OutputExistsError, match=f"out {root}: holds a dataset .* pass --overwrite to replace it"):
        synth.synthesize(root, users=30, items=40, mean_len=5, shards=2, holdout="none", workers=1)
    assert tree_digest(root) == before, "a refused write changes nothing"
    (root / "README").write_text("mine")  # a dataset with a file argus did not write: refused even with overwrite
    with pytest.raises(OutputExistsError, match=r"README is not one of the files a dataset holds.*even with"):
        synth.synthesize(root, users=30, items=40, mean_len=5, shards=2, holdout="none", workers=1, overwrite=True)
    (root / "README").unlink()
    assert tree_digest(root) == before

    m = synth.synthesize(root, users=30, items=40, mean_len=5, shards=2, holdout="none", workers=1, overwrite=True)
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "train", "truth"]
    assert sorted(p.name for p in (root / "train").iterdir()) == [
        "item_counts.npy",
        "shard-000000.index.npy",
        "shard-000000.lengths.npy",
        "shard-000000.tar",
        "shard-000001.index.npy",
        "shard-000001.lengths.npy",
        "shard-000001.tar",
    ]
    assert sorted(p.name for p in (root / "truth").iterdir()) == ["items.npz", "users-000000.npz", "users-000001.npz"]
    assert json.loads((root / "manifest.json").read_text())["source"]["shards"] == 2 == len(m.split("train").shards)

    # over a converted dataset: its item map (which names other items) goes too
    conv = tmp_path / "conv"
    convert(Path(__file__).parent / "fixtures" / "ratings_small.csv", conv, shards=1, holdout="none")
    assert (conv / "item_map.parquet").is_file()
    synth.synthesize(conv, users=10, items=20, mean_len=5, shards=1, holdout="none", workers=1, overwrite=True)
    assert sorted(p.name for p in conv.iterdir()) == ["manifest.json", "train", "truth"]

    empty = tmp_path / "empty"  # an empty directory is not an earlier output
    empty.mkdir()
    synth.synthesize(empty, users=10, items=20, mean_len=5, shards=1, holdout="none", workers=1)
    assert (empty / "manifest.json").is_file()


def test_auto_clusters():
    assert synth.auto_clusters(1) == 1
    assert synth.auto_clusters(100) == 4
    assert synth.auto_clusters(1_000_000) == 250
    assert synth.auto_clusters(10**10) == synth.MAX_AUTO_CLUSTERS


def test_tiny_worlds(tmp_path):
    m = synth.synthesize(tmp_path / "one", users=1, items=1, mean_len=1, shards=1, workers=1)
    assert m.split("train").shards[0].users == 1 and m.item_counts("train").shape == (1,)
    m = synth.synthesize(
        tmp_path / "few",
        users=5,
        items=3,
        mean_len=500,
        shards=5,
        max_len=16,
        workers=1,
        holdout="temporal",
        days=2,
        val_days=0.5,
        test_days=0.5,
    )
    assert m.split("test").samples > 0


def test_new_items_and_item_features(tmp_path):
    """--new-items: the held-back items (truth item_new) appear in no interaction before the test window and in
    some after it (and would have before without the hold-back, whose stand-ins keep the cluster mix); no train
    count. --item-features: one row per item whose nearest cluster centroid is its true cluster."""
    kw = dict(users=300, items=400, mean_len=60, shards=2, seed=5, holdout="temporal", days=40, val_days=2,
              test_days=5, workers=1)  # fmt: skip
    plain, held = tmp_path / "plain", tmp_path / "held"
    synth.synthesize(plain, **kw)
    m = synth.synthesize(held, **kw, new_items=0.15, item_features=8)
    items, _ = synth.load_truth(held)
    new = items["item_new"]
    assert 0.1 < new.mean() < 0.2
    test_start = m.source["test_start"]

    def rows(root: Path) -> list[tuple[int, int, int]]:  # (timestamp, user, item) of every interaction
        out = []
        for split in ("train", "val", "test"):
            for sh in read_split(root, split):
                for s in sh:
                    held_out = s.cols["item"][s.target_start :] if split != "train" else s.cols["item"]
                    ts = s.cols["timestamp"][len(s.cols["item"]) - len(held_out) :]
                    out += [(int(t), s.user, int(i)) for t, i in zip(ts, held_out)]
        return sorted(out)

    a, b = rows(plain), rows(held)
    cluster = items["item_cluster"].astype(np.int64)
    assert new[np.array([i for t, _, i in a if t < test_start])].any()  # without the hold-back they do appear
    # the hold-back swaps items inside their cluster (feedback, and so times and like rows, may then differ)
    per_cluster = [np.bincount(cluster[[i for _, _, i in r]], minlength=cluster.max() + 1) for r in (a, b)]
    assert np.corrcoef(*per_cluster)[0, 1] > 0.99
    early = np.array([i for t, _, i in b if t < test_start])
    late = np.array([i for t, _, i in b if t >= test_start])
    assert not new[early].any() and new[late].any()
    assert (np.asarray(m.item_counts("train"))[new] == 0).all()

    from trainer.data.item_features import load_item_features

    f = load_item_features(m)
    assert f.shape == (400, 8) and m.item_features["rows"] == 400 and m.item_features["missing"] == 0
    centroids = np.stack([f[cluster == c].mean(0) for c in range(int(cluster.max()) + 1)])
    nearest = ((f[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == cluster).mean() > 0.9
    with pytest.raises(ValueError, match="^new_items needs holdout temporal"):
        synth.make_config(users=10, items=10, new_items=0.1)


def test_favourites_replay_each_users_own_items(tmp_path):
    """--favourites: each user's truth lists 32 favourites drawn from the whole catalog; a share of their
    interactions (about the option's share of fresh draws) are on them, far above what the same items get without
    the option; the oracle refuses the dataset (it does not model them)."""
    kw = dict(users=60, items=5000, mean_len=200, shards=2, seed=3, workers=1)
    plain, fav = tmp_path / "plain", tmp_path / "fav"
    synth.synthesize(plain, **kw)
    m = synth.synthesize(fav, **kw, favourites=0.3)
    _, truth = synth.load_truth(fav)
    picks = truth["favourites"]
    assert picks.shape == (60, synth.FAVOURITES) and m.source["favourites"] == 0.3
    assert m.source["favourite_items"] == synth.FAVOURITES
    assert "favourites" not in Manifest.load(plain).source and "favourite_items" not in Manifest.load(plain).source

    def share_on_favourites(root: Path) -> float:
        hits = total = 0
        for sh in read_split(root, "train"):
            for s in sh:
                hits += int(np.isin(s.cols["item"], picks[s.user]).sum())
                total += len(s.cols["item"])
        return hits / total

    with_fav, without = share_on_favourites(fav), share_on_favourites(plain)
    assert 0.3 * 0.2 < with_fav < 0.3 and with_fav > 10 * without
    from trainer.data.oracle import SynthOracle

    with pytest.raises(ValueError, match="does not model --favourites"):
        SynthOracle(fav)
    with pytest.raises(ValueError, match="^favourites must be < 1"):
        synth.make_config(users=10, items=10, favourites=1.0)

    # --favourite-items 4: four favourites per user, the same share of interactions on them
    few = tmp_path / "few"
    m4 = synth.synthesize(few, **kw, favourites=0.3, favourite_items=4)
    picks = synth.load_truth(few)[1]["favourites"]
    assert picks.shape == (60, 4) and m4.source["favourite_items"] == 4
    assert 0.3 * 0.2 < share_on_favourites(few) < 0.3
    with pytest.raises(ValueError, match="^favourite_items"):
        synth.make_config(users=10, items=10, favourites=0.3, favourite_items=0)
    with pytest.raises(ValueError, match="^favourite_items needs favourites"):
        synth.make_config(users=10, items=10, favourite_items=4)

    # --favourite-skew 1: the j-th favourite replayed with weight 1/j; counted apart from the generator
    def replays(root: Path, picks: np.ndarray) -> np.ndarray:
        n = np.zeros(picks.shape[1])
        for sh in read_split(root, "train"):
            for s in sh:
                n += (s.cols["item"][:, None] == picks[s.user][None, :]).sum(0)
        return n

    skew = tmp_path / "skew"
    ms = synth.synthesize(skew, **kw, favourites=0.3, favourite_skew=1.0)
    assert ms.source["favourite_skew"] == 1.0 and "favourite_skew" not in m.source
    flat, skewed = (
        replays(fav, synth.load_truth(fav)[1]["favourites"]),
        replays(skew, synth.load_truth(skew)[1]["favourites"]),
    )
    assert 0.5 < flat[:4].sum() / flat[-4:].sum() < 2  # all alike
    w = 1 / np.arange(1, 33)
    assert skewed[:4].sum() / skewed[-4:].sum() > 0.5 * w[:4].sum() / w[-4:].sum()  # about 16x
    with pytest.raises(ValueError, match="^favourite_skew needs favourites"):
        synth.make_config(users=10, items=10, favourite_skew=1.0)


def test_favourite_clusters_are_revisited_in_visits(tmp_path):
    """--favourite-clusters: favourites are clusters (each user's drawn uniformly from all of them): a replay opens
    a visit to one, the session's next draws stay in it; the share of interactions in a user's favourite clusters
    is far above what the same clusters get without the option, and those interactions come in runs."""
    kw = dict(users=60, items=5000, mean_len=200, shards=2, seed=3, workers=1, clusters=250)
    plain, fav = tmp_path / "plain", tmp_path / "fav"
    synth.synthesize(plain, **kw)
    m = synth.synthesize(fav, **kw, favourites=0.3, favourite_clusters=16)
    items, truth = synth.load_truth(fav)
    picks = truth["favourite_clusters"]
    assert picks.shape == (60, 16) and 0 <= picks.min() and picks.max() < 250 and "favourites" not in truth
    assert all(len(set(row)) == 16 for row in picks.tolist())  # distinct clusters
    assert m.source["favourite_clusters"] == 16 and "favourite_items" not in m.source
    assert "favourite_clusters" not in Manifest.load(plain).source
    cluster = items["item_cluster"].astype(np.int64)

    def on_favourites(root: Path) -> tuple[float, float]:
        """(share of interactions in the user's favourite clusters, share of those whose previous one is in the
        same cluster)"""
        hits = total = runs = 0
        for sh in read_split(root, "train"):
            for s in sh:
                c = cluster[s.cols["item"]]
                on = np.isin(c, picks[s.user])
                hits, total = hits + int(on.sum()), total + len(c)
                runs += int((on[1:] & (c[1:] == c[:-1])).sum())
        return hits / total, runs / max(hits, 1)

    (with_fav, run_share), (without, _) = on_favourites(fav), on_favourites(plain)
    assert with_fav > 0.3 * 0.3 and with_fav > 3 * without
    assert run_share > 0.5  # visits: the draws after a replay stay in its cluster (about 0.2 if they did not)
    for bad, match in (
        (dict(favourite_clusters=4), "^favourite_clusters needs favourites"),
        (dict(favourites=0.3, favourite_clusters=4, favourite_items=8), "^favourite_items and favourite_clusters"),
        (dict(favourites=0.3, favourite_clusters=4, favourite_items=32), "^favourite_items and favourite_clusters"),
        (dict(favourites=0.3, favourite_clusters=126, clusters=250), r"^favourite_clusters must be in \[0, 125\]"),
    ):
        with pytest.raises(ValueError, match=match):
            synth.make_config(users=10, items=5000, **bad)
