"""``trainer.data.convert``: logs -> shards, checked against expectations computed here.

The expectations are built with plain Python (csv module, sorted(), dicts) from
the fixture rows, never with the converter's own helpers; the output is read
back with ``tarfile`` + ``decode_sample``.
"""

from __future__ import annotations

import csv
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import read_samples

from trainer.data.convert import ColumnMap, ConvertError, convert
from trainer.data.manifest import Manifest
from trainer.data.outdir import OutputExistsError
from trainer.data.schema import PLAYED_MAX, PLAYED_NA, EventType, Sample, decode_sample

FIX = Path(__file__).resolve().parent / "fixtures"
PARQUET = FIX / "yambda_small.parquet"
CSV = FIX / "ratings_small.csv"
TSV = FIX / "events_small.tsv"
TSV_COLS = ColumnMap(user="user_id", item="item_id", timestamp="ts")
TSV_KW = dict(columns=TSV_COLS, timestamp_unit="ms")

LISTEN, LIKE, DISLIKE, UNLIKE, UNDISLIKE = 0, 1, 2, 3, 4  # written out, not taken from EventType
NA = 0xFFFF
assert (LISTEN, LIKE, DISLIKE, UNLIKE, UNDISLIKE, NA) == (
    EventType.LISTEN,
    EventType.LIKE,
    EventType.DISLIKE,
    EventType.UNLIKE,
    EventType.UNDISLIKE,
    PLAYED_NA,
)

# ------------------------------------------------------------------------- independent expectations


def parquet_rows(path: Path = PARQUET) -> list[dict]:
    names = {"listen": LISTEN, "like": LIKE, "dislike": DISLIKE, "unlike": UNLIKE, "undislike": UNDISLIKE}
    rows = []
    for r in pq.read_table(path).to_pylist():
        ev = names[r["event_type"]]
        played = r["played_ratio_pct"] if ev == LISTEN and r["played_ratio_pct"] is not None else NA
        rows.append(
            dict(user=r["uid"], item=r["item_id"], ts=r["timestamp"], event=ev, played=played, organic=r["is_organic"])
        )
    return rows


def rating_event(rating: float) -> int:
    return LIKE if rating >= 4.0 else DISLIKE if rating <= 2.0 else LISTEN


def csv_rows(path: Path = CSV) -> list[dict]:
    with open(path, newline="") as f:
        return [
            dict(
                user=r["user"],
                item=r["item"],
                ts=int(r["timestamp"]),
                event=rating_event(float(r["rating"])),
                played=NA,
                organic=1,
            )
            for r in csv.DictReader(f)
        ]


def tsv_rows(path: Path = TSV) -> list[dict]:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    rows = []
    for line in lines[1:]:
        d = dict(zip(header, line.split("\t")))
        rows.append(
            dict(
                user=int(d["user_id"]),
                item=int(d["item_id"]),
                ts=int(d["ts"]) // 1000,
                event=LISTEN,
                played=NA,
                organic=1,
            )
        )
    return rows


def expected(rows: list[dict], remap_users: bool) -> tuple[dict[int, list[tuple]], list]:
    """Per-user time-ordered histories (ties in input order) with dense items; and the sorted item ids."""
    items = sorted({r["item"] for r in rows})
    imap = {v: i for i, v in enumerate(items)}
    umap = {v: i for i, v in enumerate(sorted({r["user"] for r in rows}))} if remap_users else None
    hist: dict[int, list[dict]] = {}
    for r in rows:
        hist.setdefault(umap[r["user"]] if umap else r["user"], []).append(r)
    out = {}
    for u, h in hist.items():
        h = sorted(h, key=lambda r: r["ts"])  # sorted() is stable
        out[u] = [(imap[r["item"]], r["ts"], r["event"], r["played"], r["organic"], 0) for r in h]
    return out, items


# ----------------------------------------------------------------------------------- reading back


def read_split(root: Path, split: str) -> list[tuple[int, Sample]]:
    """(shard index, sample) for every member of every shard of a split, via tarfile."""
    m = Manifest.load(root)
    out = []
    for i, sh in enumerate(m.split(split).shards):
        with tarfile.open(root / sh.path) as tf:
            for mem in tf.getmembers():
                key, ext = mem.name.rsplit(".", 1)
                assert ext == "msg"
                out.append((i, decode_sample(key, tf.extractfile(mem).read())))
    return out


def sample_rows(s: Sample) -> list[tuple]:
    c = s.cols
    return [
        (
            int(c["item"][i]),
            int(c["timestamp"][i]),
            int(c["event"][i]),
            int(c["played"][i]),
            int(c["organic"][i]),
            int(c["context"][i]),
        )
        for i in range(len(s))
    ]


def train_histories(root: Path) -> dict[int, list[tuple]]:
    """Reassemble train chunks per user, checking that offsets tile the history."""
    by_user: dict[int, list[Sample]] = {}
    for _, s in read_split(root, "train"):
        assert s.target_start == 0
        by_user.setdefault(s.user, []).append(s)
    out = {}
    for u, samples in by_user.items():
        rows: list[tuple] = []
        for s in sorted(samples, key=lambda s: s.offset):
            assert s.offset == len(rows), f"user {u}: chunk offset {s.offset} != {len(rows)}"
            rows += sample_rows(s)
        out[u] = rows
    return out


def eval_samples(root: Path, split: str) -> dict[int, Sample]:
    out = {}
    for _, s in read_split(root, split):
        assert s.user not in out, f"two {split} samples for user {s.user}"
        out[s.user] = s
    return out


def check_loo(root: Path, exp: dict[int, list[tuple]]) -> None:
    train, val, test = train_histories(root), eval_samples(root, "val"), eval_samples(root, "test")
    assert set(train) == set(exp)
    for u, h in exp.items():
        n = len(h)
        if n < 3:
            assert train[u] == h and u not in val and u not in test
            continue
        assert train[u] == h[:-2]
        assert (val[u].offset, val[u].target_start, sample_rows(val[u])) == (0, n - 2, h[:-1])
        assert (test[u].offset, test[u].target_start, sample_rows(test[u])) == (0, n - 1, h)
    assert set(val) == set(test) == {u for u, h in exp.items() if len(h) >= 3}


# ---------------------------------------------------------------------------------------- tests


def test_parquet_loo_matches_independent_expectation(tmp_path):
    out = tmp_path / "out"
    m = convert(PARQUET, out, shards=3, batch_rows=4)  # 4-row batches over 6-row row groups
    exp, items = expected(parquet_rows(), remap_users=False)
    check_loo(out, exp)
    assert m.num_items == len(items) == 5
    imap = pq.read_table(out / "item_map.parquet").to_pydict()
    assert imap == {"item_id": items, "index": list(range(len(items)))}
    assert not (out / "user_map.parquet").exists()  # non-negative integer uids stay as they are
    assert m.source["user_ids"] == "original" and m.source["dropped_columns"] == ["track_length_seconds"]
    # Every user lives in shard user % shards, in every split.
    for split in ("train", "val", "test"):
        assert all(i == s.user % 3 for i, s in read_split(out, split))
    # Spot checks on the mapping itself (a wrong expectation helper must not hide a bug).
    full = {u: h for u, h in exp.items()}
    u100 = full[100]
    assert [r[1] for r in u100] == [15, 20, 40, 41, 50, 50, 50, 60, 70]
    assert [r[3] for r in u100 if r[1] == 50] == [80, 250, 100]  # tie at ts=50 keeps input order
    assert dict((r[1], r[3]) for r in full[7])[13] == PLAYED_MAX
    assert all(r[3] == PLAYED_NA for r in u100 if r[2] != LISTEN)
    assert [r[2] for r in full[7] if r[1] == 12] == [LIKE, UNDISLIKE]
    assert not any(p.name.startswith(".convert") for p in out.iterdir())  # spill files removed
    # The CLI always passes a ColumnMap: defaults are fine for parquet, custom names are not.
    m2 = convert(PARQUET, tmp_path / "out2", shards=3, columns=ColumnMap(rating=None))
    assert shard_hashes(m2) == shard_hashes(m)
    with pytest.raises(ValueError, match="csv/tsv"):
        convert(PARQUET, tmp_path / "out3", columns=ColumnMap(user="userId"))


def test_csv_string_ids_rating_events(tmp_path):
    out = tmp_path / "out"
    m = convert(CSV, out, shards=2)
    rows = csv_rows()
    exp, items = expected(rows, remap_users=True)
    check_loo(out, exp)
    assert items[0] == "m,5"  # quoted field with a comma; string ids sort by bytes
    assert pq.read_table(out / "item_map.parquet").to_pydict() == {"item_id": items, "index": list(range(6))}
    users = sorted({r["user"] for r in rows})
    assert pq.read_table(out / "user_map.parquet").to_pydict() == {"user_id": users, "index": list(range(5))}
    assert m.source["user_ids"] == "remapped" and m.source["num_users"] == 5
    # The thresholds are inclusive: 4.0 -> like, 2 -> dislike, 2.5 / 3.9 -> listen.
    events = {(r["user"], r["item"]): r["event"] for r in rows}
    assert events[("alice", "m,5")] == LIKE and events[("bob", "m,5")] == DISLIKE
    assert events[("alice", "m1")] == LISTEN and events[("carol", "m2")] == LISTEN
    assert {e for h in exp.values() for (_, _, e, *_) in h} == {LISTEN, LIKE, DISLIKE}
    # Custom thresholds change the mapping.
    out2 = tmp_path / "out2"
    convert(CSV, out2, shards=2, holdout="none", like_threshold=5, dislike_threshold=0.5)
    got = {e for h in train_histories(out2).values() for (_, _, e, *_) in h}
    assert sum(1 for h in train_histories(out2).values() for r in h if r[2] == LIKE) == 2
    assert got == {LISTEN, LIKE, DISLIKE}


def test_tsv_column_map_ms_and_numeric_ids(tmp_path):
    out = tmp_path / "out"
    m = convert(TSV, out, shards=2, holdout="none", **TSV_KW)
    exp, items = expected(tsv_rows(), remap_users=False)
    assert items == [7, 9, 10, 100]  # numeric order, not "10" < "100" < "7"
    assert train_histories(out) == exp
    assert set(exp) == {0, 5, 12, 30} and not (out / "user_map.parquet").exists()
    # ms are floored to seconds before sorting, so 1500 ms and 1999 ms tie and keep input order.
    assert [items[r[0]] for r in exp[5]] == [100, 10, 9, 10, 7, 100]
    assert m.splits.keys() == {"train"} and m.source["defaulted_columns"] == ["rating"]


@pytest.mark.parametrize("name", ["parquet", "tsv"])
def test_temporal_split_with_gap(tmp_path, name):
    out = tmp_path / "out"
    if name == "parquet":
        rows, kw, val_s, test_s, gap = parquet_rows(), {}, 20, 20, 10
    else:
        rows, kw, val_s, test_s, gap = tsv_rows(), TSV_KW, 1, 1, 1
    m = convert(
        PARQUET if name == "parquet" else TSV,
        out,
        shards=2,
        holdout="temporal",
        val_seconds=val_s,
        test_seconds=test_s,
        gap_seconds=gap,
        **kw,
    )
    max_ts = max(r["ts"] for r in rows)
    test_start = max_ts + 1 - test_s
    val_start = test_start - val_s
    assert (m.source["holdout"]["val_start"], m.source["holdout"]["test_start"]) == (val_start, test_start)
    exp, _ = expected(rows, remap_users=False)

    def part(ts: int) -> str:
        return "test" if ts >= test_start else "val" if ts >= val_start else "gap" if ts >= val_start - gap else "train"

    train, val, test = train_histories(out), eval_samples(out, "val"), eval_samples(out, "test")
    n_gap = 0
    for u, h in exp.items():
        parts = [part(r[1]) for r in h]
        assert train.get(u, []) == [r for r, p in zip(h, parts) if p == "train"]
        n_gap += parts.count("gap")
        for split, got in (("val", val), ("test", test)):
            targets = [r for r, p in zip(h, parts) if p == split]
            if not targets:
                assert u not in got
                continue
            s = got[u]
            end = h.index(targets[-1]) + 1 if split == "val" else len(h)
            # Context = everything before the targets (gap rows included); targets at the end.
            assert sample_rows(s) == h[:end] and s.offset == 0
            assert sample_rows(s)[s.target_start :] == targets
    assert n_gap > 0 and m.split("train").stats.get("gap_interactions", 0) == n_gap
    assert val and test  # the fixture exercises both eval splits


def test_chunking_small_max_len(tmp_path):
    out = tmp_path / "out"
    max_len = 3
    convert(PARQUET, out, shards=2, max_len=max_len)
    exp, _ = expected(parquet_rows(), remap_users=False)
    chunks: dict[int, list[Sample]] = {}
    for _, s in read_split(out, "train"):
        assert 1 <= len(s) <= max_len
        chunks.setdefault(s.user, []).append(s)
    assert max(len(v) for v in chunks.values()) >= 2  # some history really was cut
    for u, h in exp.items():
        n_train = len(h) - 2 if len(h) >= 3 else len(h)
        ordered = sorted(chunks[u], key=lambda s: s.offset)
        assert len(ordered[-1]) == min(max_len, n_train)  # cut from the end: the latest chunk is full
        assert [s.offset for s in ordered] == list(np.cumsum([0] + [len(s) for s in ordered[:-1]]))
        assert [r for s in ordered for r in sample_rows(s)] == h[:n_train]
    for split, drop in (("val", 1), ("test", 0)):
        for u, s in eval_samples(out, split).items():
            h = exp[u][: len(exp[u]) - drop]
            assert len(s) == min(max_len, len(h)) and s.offset == len(h) - len(s)
            assert sample_rows(s) == h[s.offset :] and s.target_start == len(s) - 1


@pytest.mark.parametrize(
    "case",
    [
        ("parquet", dict(holdout="loo", max_len=3)),
        ("parquet", dict(holdout="temporal", val_seconds=20, test_seconds=30, gap_seconds=10, max_len=1)),
        ("csv", dict(holdout="loo")),
        ("csv", dict(holdout="none")),
        ("tsv", dict(holdout="temporal", val_seconds=1, test_seconds=1, gap_seconds=1, **TSV_KW)),
    ],
)
def test_row_accounting(tmp_path, case):
    name, kw = case
    src, rows = {"parquet": (PARQUET, parquet_rows), "csv": (CSV, csv_rows), "tsv": (TSV, tsv_rows)}[name]
    m = convert(src, tmp_path / "out", shards=3, **kw)
    n_input = len(rows())
    train = sum(len(s) for _, s in read_split(tmp_path / "out", "train"))
    targets = sum(
        len(s) - s.target_start
        for split in m.splits
        if split != "train"
        for _, s in read_split(tmp_path / "out", split)
    )
    stats = [st for sp in m.splits.values() for st in [sp.stats]]
    cut = sum(st.get("targets_cut_to_max_len", 0) for st in stats)
    gap = sum(st.get("gap_interactions", 0) for st in stats)
    assert train + targets + cut + gap == n_input
    assert m.source["rows"] == {"read": n_input, "written": n_input, "skipped": 0}
    assert m.split("train").interactions == train
    if kw.get("max_len") == 1 and kw["holdout"] == "temporal":
        assert cut > 0  # the case really exercises targets cut to max_len


@pytest.mark.parametrize("name", ["parquet", "csv"])
def test_item_counts_equal_train_bincount(tmp_path, name):
    out = tmp_path / "out"
    m = convert(PARQUET if name == "parquet" else CSV, out, shards=2)
    items = np.concatenate([s.cols["item"] for _, s in read_split(out, "train")])
    np.testing.assert_array_equal(m.item_counts("train"), np.bincount(items, minlength=m.num_items))
    assert m.item_counts("train").shape == (m.num_items,)


def shard_hashes(m: Manifest) -> dict[str, list[str]]:
    return {name: [s.sha256 for s in sp.shards] for name, sp in m.splits.items()}


def test_batching_and_directory_input_do_not_change_output(tmp_path):
    a = convert(CSV, tmp_path / "a", shards=2)
    b = convert(CSV, tmp_path / "b", shards=2, batch_rows=2)
    lines = CSV.read_text().splitlines(keepends=True)
    d = tmp_path / "dir"
    d.mkdir()
    (d / "part-0.csv").write_text("".join(lines[:8]))
    (d / "part-1.csv").write_text(lines[0] + "".join(lines[8:]))
    (d / "_SUCCESS").write_text("")
    c = convert(d, tmp_path / "c", shards=2)
    assert shard_hashes(a) == shard_hashes(b) == shard_hashes(c)
    assert [f["rows"] for f in c.source["files"]] == [7, 11]
    p1 = convert(PARQUET, tmp_path / "p1", shards=3, batch_rows=1)
    p2 = convert(PARQUET, tmp_path / "p2", shards=3, workers=2)  # pass 3 in 2 processes
    assert shard_hashes(p1) == shard_hashes(p2)
    assert p2.source["rows"]["written"] == len(parquet_rows())


def test_iso_timestamps(tmp_path):
    f = tmp_path / "iso.csv"
    f.write_text(
        "user,item,timestamp\n"
        "1,a,2020-01-01T00:00:00Z\n"
        "1,b,2020-01-01 00:00:01\n"
        "1,c,2020-01-01T01:00:02+01:00\n"
        "1,d,2020-01-02\n"
        "1,e,1577836803\n"
    )
    convert(f, tmp_path / "out", holdout="none", shards=1)
    (h,) = train_histories(tmp_path / "out").values()
    assert [r[1] for r in h] == [1577836800, 1577836801, 1577836802, 1577836803, 1577923200]
    assert [r[0] for r in h] == [0, 1, 2, 4, 3]
    f.write_text("user,item,timestamp\n1,a,2020-01-01\n1,b,yesterday\n")
    with pytest.raises(ConvertError, match=r"iso\.csv: row 2 after the header, column 'timestamp'.*yesterday"):
        convert(f, tmp_path / "out2")


def test_parquet_timestamp_units(tmp_path):
    rows = [(1, 10, 1999, 1, 5, "listen"), (1, 11, 1000, 1, 5, "listen"), (1, 12, 2500, 1, 5, "like")]
    p = write_parquet(tmp_path / "ms.parquet", rows)
    convert(p, tmp_path / "a", holdout="none", shards=1, timestamp_unit="ms")
    (h,) = train_histories(tmp_path / "a").values()
    assert [(r[0], r[1]) for r in h] == [(0, 1), (1, 1), (2, 2)]  # floored; the 1 s tie keeps input order
    t = pq.read_table(p)
    t = t.set_column(2, "timestamp", pa.array([1999, 1000, 2500], pa.timestamp("ms")))
    pq.write_table(t, tmp_path / "ts.parquet")
    convert(tmp_path / "ts.parquet", tmp_path / "b", holdout="none", shards=1)  # unit comes from the type
    (h,) = train_histories(tmp_path / "b").values()
    assert [(r[0], r[1]) for r in h] == [(0, 1), (1, 1), (2, 2)]


# ------------------------------------------------------------------------------------- bad input


def write_parquet(path: Path, rows: list[tuple], drop: tuple[str, ...] = ()) -> Path:
    spec = {
        "uid": pa.int64(),
        "item_id": pa.int64(),
        "timestamp": pa.int64(),
        "is_organic": pa.uint8(),
        "played_ratio_pct": pa.int64(),
        "event_type": pa.string(),
    }
    cols = {k: pa.array([r[i] for r in rows], t) for i, (k, t) in enumerate(spec.items()) if k not in drop}
    pq.write_table(pa.table(cols), path)
    return path


GOOD = [(1, 10, 100, 1, 50, "listen"), (1, 11, 101, 0, None, "like"), (2, 10, 102, 1, 99, "listen")]


def test_missing_columns(tmp_path):
    f = tmp_path / "noitem.csv"
    f.write_text("user,timestamp,rating\na,1,5\n")
    with pytest.raises(
        ConvertError,
        match=r"noitem\.csv: missing required item column 'item'.*columns found.*"
        r"'user', 'timestamp', 'rating'",
    ):
        convert(f, tmp_path / "o1")
    p = write_parquet(tmp_path / "noevent.parquet", GOOD, drop=("event_type",))
    with pytest.raises(ConvertError, match=r"noevent\.parquet: missing required column 'event_type'.*columns found"):
        convert(p, tmp_path / "o2")
    g = tmp_path / "norating.csv"
    g.write_text("user,item,timestamp\na,x,1\n")
    with pytest.raises(ConvertError, match=r"norating\.csv: missing rating column 'stars'"):
        convert(g, tmp_path / "o3", columns=ColumnMap(rating="stars"))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()  # nothing written


def test_null_ids_raise_with_file_row_column(tmp_path):
    f = tmp_path / "nulluser.csv"
    f.write_text("user,item,timestamp\na,x,1\n,y,2\nb,z,3\n")
    with pytest.raises(ConvertError, match=r"nulluser\.csv: row 2 after the header, column 'user': null id"):
        convert(f, tmp_path / "o1")
    f.write_text("user,item,timestamp\na,x,1\nb,y,noon\n,z,3\n")  # the earliest bad row wins, any column
    with pytest.raises(ConvertError, match=r"nulluser\.csv: row 2 after the header, column 'timestamp'.*'noon'"):
        convert(f, tmp_path / "o1")
    assert not (tmp_path / "o1").exists()  # errors come from pass 1, before anything is written
    p = write_parquet(tmp_path / "nulluid.parquet", GOOD + [(3, None, 103, 1, 1, "listen")])
    with pytest.raises(ConvertError, match=r"nulluid\.parquet: row 4, column 'item_id': null id"):
        convert(p, tmp_path / "o2", batch_rows=2)  # row numbers count across batches


def test_unknown_event_type_raises(tmp_path):
    p = write_parquet(tmp_path / "events.parquet", GOOD + [(2, 12, 104, 1, 5, "play")])
    with pytest.raises(ConvertError, match=r"events\.parquet: row 4, column 'event_type': unknown event type.*'play'"):
        convert(p, tmp_path / "out")


def test_skip_counts_bad_rows_and_keeps_the_rest(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text(
        "user,item,rating,timestamp\n"
        "a,x,5,10\n"
        ",y,5,11\n"  # null user
        "a,,5,12\n"  # null item
        "a,y,five,13\n"  # bad rating
        "a,y,,13\n"  # null rating
        "b,y,1,noon\n"  # bad timestamp
        "b,y,1,14,extra\n"  # malformed line
        "b,x,3,15\n"
        "a,z,1,9\n"
    )
    # The reader parses a block before values are checked, so the malformed line is reported first.
    with pytest.raises(ConvertError, match=r"bad\.csv: malformed CSV line .*'b,y,1,14,extra'"):
        convert(f, tmp_path / "o0")
    g = tmp_path / "bad_value.csv"
    g.write_text("".join(line for line in f.read_text().splitlines(keepends=True) if "extra" not in line))
    with pytest.raises(ConvertError, match=r"bad_value\.csv: row 2 after the header, column 'user'"):
        convert(g, tmp_path / "o0")
    m = convert(f, tmp_path / "out", on_error="skip", holdout="none", shards=2)
    expect_skipped = {
        "null_user": 1,
        "null_item": 1,
        "bad_rating": 1,
        "null_rating": 1,
        "bad_timestamp": 1,
        "malformed_row": 1,
    }
    assert m.source["skipped_rows"] == expect_skipped
    assert m.source["rows"] == {"read": 9, "written": 3, "skipped": 6}
    assert Manifest.load(tmp_path / "out").source["skipped_rows"] == expect_skipped
    good = [
        dict(user=u, item=i, ts=t, event=rating_event(r), played=NA, organic=1)
        for u, i, r, t in (("a", "x", 5, 10), ("b", "x", 3, 15), ("a", "z", 1, 9))
    ]
    exp, items = expected(good, remap_users=True)
    assert train_histories(tmp_path / "out") == exp and m.num_items == len(items) == 2  # 'y' only in bad rows
    assert m.split("train").interactions + sum(expect_skipped.values()) == 9

    p = write_parquet(
        tmp_path / "bad.parquet",
        GOOD
        + [
            (2, 12, 104, 1, 5, "play"),  # unknown event type
            (2, 12, 105, 1, PLAYED_MAX + 1, "listen"),  # played ratio out of range (never clipped)
            (2, 12, 106, 1, PLAYED_MAX + 1, "like"),  # ...but ignored on a non-listen event: kept
            (None, 12, 107, 1, 5, "listen"),  # null uid
            (2, 12, None, 1, 5, "listen"),  # null timestamp
            (2, 12, 108, 1, 5, None),  # null event type
            (2, 13, 109, 1, 5, "LIKE"),  # case-insensitive: kept
        ],
    )
    m = convert(p, tmp_path / "pout", on_error="skip", holdout="loo", shards=2, batch_rows=3)
    assert m.source["skipped_rows"] == {
        "unknown_event_type": 1,
        "bad_played_ratio_pct": 1,
        "null_user": 1,
        "null_timestamp": 1,
        "null_event_type": 1,
    }
    assert m.source["rows"] == {"read": 10, "written": 5, "skipped": 5}
    total = m.split("train").interactions + sum(
        sh.targets for n, sp in m.splits.items() if n != "train" for sh in sp.shards
    )
    assert total == 5
    h2 = sample_rows(eval_samples(tmp_path / "pout", "test")[2])  # user 2's whole history
    assert [(r[1], r[2], r[3]) for r in h2] == [(102, LISTEN, 99), (106, LIKE, NA), (109, LIKE, NA)]
    p = write_parquet(tmp_path / "played.parquet", GOOD + [(2, 12, 105, 1, PLAYED_MAX + 1, "listen")])
    with pytest.raises(ConvertError, match=r"played\.parquet: row 4, column 'played_ratio_pct'.*65535"):
        convert(p, tmp_path / "pout2", batch_rows=2)


def test_empty_and_unusable_inputs(tmp_path):
    f = tmp_path / "header_only.csv"
    f.write_text("user,item,timestamp\n")
    with pytest.raises(ConvertError, match=r"header_only\.csv: empty input"):
        convert(f, tmp_path / "o1")
    d = tmp_path / "emptydir"
    d.mkdir()
    with pytest.raises(ConvertError, match=r"emptydir: empty input"):
        convert(d, tmp_path / "o2")
    g = tmp_path / "allbad.csv"
    g.write_text("user,item,timestamp\n,a,1\n")
    with pytest.raises(ConvertError, match=r"allbad\.csv: all 1 rows are bad"):
        convert(g, tmp_path / "o3", on_error="skip")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    for overwrite in (False, True):  # not a dataset: refused whatever is passed (test_cli_data: the CLI's line)
        with pytest.raises(OutputExistsError, match=f"out {busy}: not empty and not an argus dataset"):
            convert(CSV, busy, overwrite=overwrite)
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    with pytest.raises(ConvertError, match="cannot tell the format"):
        convert(shutil.copy(CSV, tmp_path / "ratings.dat"), tmp_path / "o4")


# ------------------------------------------------------------------------- impressions


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_convert_impressions_every_row_once_history_before_request(tmp_path):
    hist = _write_csv(
        tmp_path / "h.csv",
        ["user", "item", "timestamp"],
        [[u, 100 + (u * 7 + k) % 9, 1000 * k + u] for u in range(1, 6) for k in range(12)],
    )
    imp_rows = [
        [1, 101, 5500, "listen", 80, 0.5, ""],
        [1, 102, 5500, "skip", 5, 0.1, ""],
        [1, 999, 5500, "like", "", 0.9, ""],
        [2, 103, 9000, "listen", 20, "", 1],
        [2, 104, 9000, "skip", 1, "", 1],
        [2, 105, 9000, "listen", 100, "", 2],
        [2, 106, 9000, "dislike", "", "", 2],  # two impressions, same time
        [3, 107, 11_950, "listen", 60, 0.2, ""],
        [3, 108, 11_950, "like", "", 0.3, ""],
        [77, 101, 11_990, "listen", 90, 0.7, ""],
        [77, 102, 11_990, "skip", 3, 0.6, ""],  # a user without history
    ]
    header = ["uid", "item_id", "timestamp", "event_type", "played_ratio_pct", "score", "impression_id"]
    imps = _write_csv(tmp_path / "imp.csv", header, imp_rows)
    out = tmp_path / "out"
    m = convert(hist, out, holdout="none", shards=2, impressions=imps, impressions_test_seconds=100)
    item_ids = pq.read_table(out / "item_map.parquet").column("item_id").to_pylist()
    got = []
    for split in ("impressions", "impressions_test"):
        for s in read_samples(out, split):
            c = s.cols
            assert s.n == 0 or int(c["timestamp"].max()) < int(c["imp_time"][-1])
            times = np.repeat(c["imp_time"], c["imp_size"])
            for t, it, ev in zip(times, c["imp_item"], c["imp_event"]):
                got.append((split, s.user, int(item_ids[it]), int(t), int(ev)))
    names = {"listen": LISTEN, "like": LIKE, "dislike": DISLIKE, "skip": int(EventType.SKIP)}
    want = [
        ("impressions_test" if r[2] >= 11_990 + 1 - 100 else "impressions", r[0], r[1], r[2], names[r[3]])
        for r in imp_rows
    ]
    assert sorted(got) == sorted(want)  # every impression row exactly once, in the right split
    user2 = next(s for s in read_samples(out, "impressions") if s.user == 2)
    assert user2.cols["imp_size"].tolist() == [2, 2]  # impression ids split one request into two impressions
    assert 999 in item_ids  # an item only ever shown, never played, still gets a row
    assert m.source["impressions"]["rows"] == {"read": 11, "written": 11, "skipped": 0}


def test_convert_impressions_bad_row_named_or_counted(tmp_path):
    hist = _write_csv(tmp_path / "h.csv", ["user", "item", "timestamp"], [[1, 5, 10], [1, 6, 20]])
    imps = _write_csv(
        tmp_path / "imp.csv",
        ["uid", "item_id", "timestamp", "event_type"],
        [[1, 5, 30, "listen"], [1, 6, 30, "shrug"], [1, 7, 30, "skip"]],
    )
    with pytest.raises(
        ConvertError, match=r"imp\.csv: row 2 after the header, column 'event_type': unknown event type"
    ):
        convert(hist, tmp_path / "a", holdout="none", shards=1, impressions=imps)
    m = convert(hist, tmp_path / "b", holdout="none", shards=1, impressions=imps, on_error="skip")
    assert m.source["impression_skipped_rows"] == {"unknown_event_type": 1}
    assert m.split("impressions").stats.get("shown", 0) + m.split("impressions_test").stats.get("shown", 0) == 2


# ------------------------------------------------------------------------- item features


def write_features(
    path: Path, ids: list, vectors: list, id_col: str = "item_id", vec_col: str = "vector", **kw
) -> Path:
    """A features parquet file; ``kw``: arrow types (``id_type``, ``vec_type``)."""
    id_arr = pa.array(ids, kw.get("id_type"))
    vec_arr = pa.array(vectors, kw.get("vec_type", pa.list_(pa.float64())))
    pq.write_table(pa.table({id_col: id_arr, vec_col: vec_arr}), path)
    return path


def expected_features(catalog: list, feats: dict, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Row i = the input vector of catalog[i] (float32), zero where the file has none; and which rows have one."""
    want = np.zeros((len(catalog), dim), np.float32)
    has = np.zeros(len(catalog), bool)
    for i, item in enumerate(catalog):
        if item in feats:
            want[i] = np.asarray(feats[item], np.float32)
            has[i] = True
    return want, has


def test_item_features_rows_follow_the_item_map(tmp_path):
    from trainer.data.inspect import verify

    _, catalog = expected(parquet_rows(), remap_users=False)  # [5, 77, 31337, 900001, 123456789]
    feats = {
        900001: [0.5, -1.0, 2.0],
        42: [9.0, 9.0, 9.0],  # not in the logs
        5: [1.0, 0.1, 1e-3],  # 0.1 is not a float32: stored rounded
        123456789: [-3.0, 0.0, 7.25],
        7: [8.0, 8.0, 8.0],  # not in the logs
    }
    f = write_features(
        tmp_path / "feats.parquet", list(feats), list(feats.values()), vec_type=pa.list_(pa.float64(), 3)
    )
    out = tmp_path / "out"
    m = convert(PARQUET, out, shards=2, batch_rows=2, item_features=f)  # 2-row batches: rows cross batches
    assert pq.read_table(out / "item_map.parquet").column("item_id").to_pylist() == catalog
    got = np.load(out / "item_features.npy")
    want, has = expected_features(catalog, feats, 3)
    assert got.dtype == np.float32 and got.shape == (m.num_items, 3) == (5, 3)
    assert np.array_equal(got, want)
    assert np.array_equal(got[catalog.index(5)], np.float32([1.0, 0.1, 1e-3]))
    assert not got[catalog.index(77)].any() and not got[catalog.index(31337)].any()  # missing: zero rows
    known = [i for i in feats if i in catalog]
    e = m.item_features
    assert e["rows"] == len(known) == int(has.sum()) == 3
    assert e["missing"] == len(catalog) - len(known) == 2
    assert e["unknown_items"] == len(feats) - len(known) == 2
    assert e["read"] == len(feats) == e["rows"] + e["unknown_items"]
    assert e["dim"] == 3 and e["path"] == "item_features.npy"
    assert e["files"] == [{"path": "feats.parquet", "rows": 5, "id_column": "item_id", "vector_column": "vector"}]
    assert Manifest.load(out).item_features == e  # saved
    rep = verify(out)
    assert rep["ok"], rep["errors"]
    np.save(out / "item_features.npy", got + 1)  # verify checks the table's sha256
    assert verify(out)["errors"] == ["item_features.npy: sha256 differs from manifest"]


def test_item_features_directory_mixed_id_types_and_fallback_names(tmp_path):
    _, catalog = expected(tsv_rows(), remap_users=False)  # numeric ids [7, 9, 10, 100]
    d = tmp_path / "feats"
    d.mkdir()
    # ids as strings: canonical integers match the logs' integer ids, "010" is not 10
    write_features(d / "a.parquet", ["100", "010", "7"], [[1, 2], [3, 4], [5, 6]], vec_col="embedding")
    write_features(d / "b.parquet", [9, 55], [[7.5, 8], [9, 9]], id_type=pa.int32())
    out = tmp_path / "out"
    m = convert(TSV, out, shards=1, holdout="none", item_features=d, **TSV_KW)

    def key(v):  # independent of the converter: a string counts as the integer it canonically spells
        return v if isinstance(v, int) else int(v) if str(int(v)) == v else None

    feats = {key(i): v for i, v in [("100", [1, 2]), ("010", [3, 4]), ("7", [5, 6]), (9, [7.5, 8]), (55, [9, 9])]}
    want, has = expected_features(catalog, feats, 2)
    assert np.array_equal(np.load(out / "item_features.npy"), want)
    assert [c for c, h in zip(catalog, has) if not h] == [10]  # 10 has no vector ("010" is another id)
    e = m.item_features
    assert (e["rows"], e["missing"], e["unknown_items"], e["read"]) == (3, 1, 2, 5)
    assert [(f["path"], f["rows"], f["vector_column"]) for f in e["files"]] == [
        ("a.parquet", 3, "embedding"),
        ("b.parquet", 2, "vector"),
    ]
    # CSV logs with string ids: the features' id column is named like the logs' item column ("item") or item_id
    for id_col in ("item", "item_id"):
        f = write_features(tmp_path / f"{id_col}.parquet", ["x7", "m,5", "nope"], [[1.0], [2.0], [3.0]], id_col)
        m = convert(CSV, tmp_path / f"csv-{id_col}", shards=1, item_features=f)
        _, items = expected(csv_rows(), remap_users=True)
        want, _ = expected_features(items, {"x7": [1.0], "m,5": [2.0]}, 1)
        assert np.array_equal(np.load(tmp_path / f"csv-{id_col}" / "item_features.npy"), want)
        assert m.item_features["files"][0]["id_column"] == id_col
        assert (m.item_features["rows"], m.item_features["unknown_items"]) == (2, 1)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "table, match",
    [
        ({"id": [5], "vector": [[1.0]]}, r"missing item id column 'item_id'; columns found: \['id', 'vector'\]"),
        ({"item_id": [5], "vec": [[1.0]]}, r"missing vector column 'vector' \(or 'embedding'\); columns found"),
        ({"item_id": [5], "vector": ["1,2"]}, r"column 'vector': type string, expected a list of floats"),
        ({"item_id": [5.0], "vector": [[1.0]]}, r"column 'item_id': type double, expected integer or string ids"),
        ({"item_id": [5, None], "vector": [[1.0], [2.0]]}, r"row 2, column 'item_id': null item id"),
        ({"item_id": [5, 77], "vector": [None, [1.0]]}, r"row 1, column 'vector': null vector"),
        ({"item_id": [5, 77], "vector": [[1.0], []]}, r"row 2, column 'vector': empty vector"),
        (
            {"item_id": [5, 77, 31337], "vector": [[1.0, 2.0], [3.0, 4.0], [1.0, 2.0, 3.0]]},
            r"row 3, column 'vector': 3 values, expected 2 as in row 1 of \S*feats\.parquet: every vector must have",
        ),
        (
            {"item_id": [5, 77], "vector": [[1.0, 2.0], [1.0, NAN]]},
            r"row 2, column 'vector': NaN or infinite value nan at position 1",
        ),
        (
            {"item_id": [5, 77], "vector": [[1.0, 2.0], [-INF, 0.0]]},
            r"row 2, column 'vector': NaN or infinite value -inf at position 0",
        ),
        (
            {"item_id": [5], "vector": [[0.0, 1e300]]},
            r"row 1, column 'vector': NaN or infinite value 1e\+300 at position 1 \(as float32\)",
        ),
        ({"item_id": [5], "vector": [[0.0, None]]}, r"row 1, column 'vector': null value at position 1"),
        (
            {"item_id": [5, 77, 5], "vector": [[1.0], [2.0], [1.0]]},
            r"row 3, column 'item_id': duplicate item id 5 \(first at row 1\)",
        ),
        ({"item_id": [1, 2], "vector": [[1.0], [2.0]]}, r"none of the 2 item ids is in the logs' catalog of 5 items"),
    ],
)
def test_item_features_bad_file_is_one_line_before_anything_is_written(tmp_path, table, match):
    f = tmp_path / "feats.parquet"
    pq.write_table(pa.table(table), f)
    out = tmp_path / "out"
    with pytest.raises(ConvertError) as err:
        convert(PARQUET, out, shards=1, batch_rows=2, item_features=f)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{f}: ") and msg.endswith("(item features, item_features)")
    assert re.search(match, msg), msg
    assert not out.exists()  # checked before the shards: nothing written


def test_item_features_errors_across_files_and_unreadable(tmp_path):
    d = tmp_path / "feats"
    d.mkdir()
    write_features(d / "a.parquet", ["100", "7"], [[1.0], [2.0]])
    write_features(d / "b.parquet", [9, 7], [[3.0], [4.0]])  # 7 and "7" are one id
    with pytest.raises(
        ConvertError,
        match=r"b\.parquet: row 2, column 'item_id': duplicate item id '7' \(first at row 2 "
        rf"of {re.escape(str(d / 'a.parquet'))}\)",
    ):
        convert(TSV, tmp_path / "o1", holdout="none", item_features=d, **TSV_KW)
    write_features(d / "b.parquet", [9], [[3.0, 4.0]])
    with pytest.raises(ConvertError, match=r"b\.parquet: row 1, column 'vector': 2 values, expected 1 as in row 1 of "):
        convert(TSV, tmp_path / "o2", holdout="none", item_features=d, **TSV_KW)
    bad = tmp_path / "text.parquet"
    bad.write_text("item_id,vector\n5,1\n")
    with pytest.raises(ConvertError, match=r"text\.parquet: not a readable parquet file"):
        convert(PARQUET, tmp_path / "o3", item_features=bad)
    with pytest.raises(ConvertError, match=r"missing\.parquet: no such file or directory"):
        convert(PARQUET, tmp_path / "o4", item_features=tmp_path / "missing.parquet")
    empty = write_features(tmp_path / "empty.parquet", [], [], id_type=pa.int64())
    with pytest.raises(ConvertError, match=r"empty\.parquet: no rows in 1 file\(s\)"):
        convert(PARQUET, tmp_path / "o5", item_features=empty)
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o4", "o5"))


def test_item_features_cli_writes_verifies_and_names_the_flag(tmp_path, capsys):
    from helpers import argus_inproc, one_line_error, tree_digest

    f = write_features(tmp_path / "feats.parquet", [5, 77, 4], [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    out = tmp_path / "out"
    code, stdout, err = argus_inproc(
        capsys, "data", "convert", str(PARQUET), "--out", str(out), "--shards", "2", "--item-features", str(f)
    )
    assert code == 0, err
    assert "item features: 2 items (dim 2), 3 without (zero rows), 1 unknown ids dropped" in " ".join(stdout.split())
    assert argus_inproc(capsys, "data", "verify", str(out))[0] == 0
    # A bad features file: one line naming the file and the flag; an earlier dataset is left as it was.
    plain = tmp_path / "plain"
    assert argus_inproc(capsys, "data", "convert", str(PARQUET), "--out", str(plain), "--shards", "1")[0] == 0
    before = tree_digest(plain)
    g = write_features(tmp_path / "nan.parquet", [5], [[NAN]])
    code, _, err = argus_inproc(
        capsys, "data", "convert", str(PARQUET), "--out", str(plain), "--overwrite", "--item-features", str(g)
    )
    assert code == 2
    assert one_line_error(err) == (
        f"argus: error: {g}: row 1, column 'vector': NaN or infinite value nan at position 0 "
        "(item features, --item-features)"
    )
    assert tree_digest(plain) == before
