"""`argus data inspect / verify / stream` and the CLI's error contract."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

from launch.cli import main
from trainer.data.schema import decode_sample


def argus(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True)


def test_help_lists_subcommands():
    out = argus("--help")
    assert out.returncode == 0 and "data" in out.stdout
    out = argus("data", "--help")
    for cmd in ("synth", "convert", "inspect", "verify", "stream"):
        assert cmd in out.stdout


def test_inspect_json_matches_independent_counts(dataset_factory, capsys):
    m = dataset_factory(3, users=20, seed=4, max_len=8)
    assert main(["data", "inspect", str(m.root), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)["splits"]["train"]
    users, events, items = {}, np.zeros(6, int), set()
    for sh in m.splits["train"].shards:
        with tarfile.open(m.root / sh.path) as t:
            for x in t:
                s = decode_sample(x.name.split(".")[0], t.extractfile(x).read())
                users[s.user] = users.get(s.user, 0) + len(s)
                events += np.bincount(s.cols["event"], minlength=6)
                items.update(s.cols["item"].tolist())
    assert rep["users"] == len(users)
    assert rep["interactions"] == sum(users.values())
    assert rep["items_seen"] == len(items)
    assert rep["history_length"]["p100"] == max(users.values())
    assert rep["history_length"]["p50"] == float(np.percentile(list(users.values()), 50))
    assert rep["events"]["like"] == round(events[1] / events.sum(), 4)
    assert rep["shard_balance"]["samples_max"] == max(s.samples for s in m.splits["train"].shards)


def test_verify_ok_then_names_each_bad_shard(dataset_factory, capsys):
    m = dataset_factory(3, users=12, seed=6)
    assert main(["data", "verify", str(m.root)]) == 0
    # corrupt one sample in shard 0, truncate shard 1 at a member boundary, delete shard 2
    shards = [m.root / sh.path for sh in m.splits["train"].shards]
    with tarfile.open(shards[0]) as t:
        mem = t.getmembers()[1]
    data = bytearray(shards[0].read_bytes())
    data[mem.offset_data : mem.offset_data + 4] = b"\xc1\xc1\xc1\xc1"
    shards[0].write_bytes(bytes(data))
    with tarfile.open(shards[1]) as t:
        cut = t.getmembers()[-1].offset  # drop the last member entirely: still a valid tar
    shards[1].write_bytes(shards[1].read_bytes()[:cut] + bytes(1024))
    shards[2].unlink()
    capsys.readouterr()
    assert main(["data", "verify", str(m.root), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    errors = "\n".join(rep["errors"])
    assert mem.name.split(".")[0] in errors and "shard-000000.tar" in errors
    assert "shard-000001.tar: manifest says samples=" in errors
    assert "shard-000002.tar: missing" in errors


def test_stream_reports_exactly_once(dataset_factory, capsys):
    m = dataset_factory(3, users=17, seed=7)
    assert (
        main(["data", "stream", str(m.root), "--world-size", "3", "--num-workers", "0", "--batch-size", "4", "--json"])
        == 0
    )
    rep = json.loads(capsys.readouterr().out)
    assert rep["exactly_once"] and rep["samples_seen"] == m.splits["train"].samples
    counts = [r["samples"] for r in rep["ranks"]]
    assert max(counts) - min(counts) <= 1 and len({r["batches"] for r in rep["ranks"]}) == 1


def test_bad_input_is_one_line_error(tmp_path):
    out = argus("data", "inspect", str(tmp_path / "missing"))
    assert out.returncode == 4  # DATA (launch/exit_codes.py): a ManifestError
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "manifest.json: not found" in lines[0]


def test_synth_and_convert_refuse_an_existing_dataset_unless_overwrite(tmp_path, capsys):
    """One line naming --out and --overwrite, every file byte-identical; --overwrite replaces an argus dataset
    (removed first: nothing of the old one is left beside the new one), never a directory holding anything else."""
    from helpers import argus_inproc, one_line_error, tree_digest

    csv = Path(__file__).parent / "fixtures" / "ratings_small.csv"
    ds = tmp_path / "ds"
    synth = ["data", "synth", "--users", "20", "--items", "30", "--mean-len", "5", "--shards", "2", "--workers", "1"]
    convert = ["data", "convert", str(csv), "--shards", "1", "--holdout", "none"]
    assert argus_inproc(capsys, *synth, "--out", str(ds))[0] == 0
    before = tree_digest(ds)
    for argv in (synth, convert):
        code, _, err = argus_inproc(capsys, *argv, "--out", str(ds))
        assert code == 2
        assert one_line_error(err) == (
            f"argus: error: out {ds}: holds a dataset (splits train, val, test); pass --overwrite to replace it"
        )
        assert tree_digest(ds) == before
    # bad input: the old dataset is still there (convert removes it only once the input has been read)
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item,timestamp\n,a,1\n")
    code, _, err = argus_inproc(
        capsys, "data", "convert", str(bad), "--out", str(ds), "--on-error", "skip", "--overwrite"
    )
    assert code == 2 and "all 1 rows are bad" in one_line_error(err) and tree_digest(ds) == before

    assert argus_inproc(capsys, *convert, "--out", str(ds), "--overwrite")[0] == 0
    assert sorted(p.name for p in ds.iterdir()) == ["item_map.parquet", "manifest.json", "train", "user_map.parquet"]
    assert json.loads((ds / "manifest.json").read_text())["source"]["kind"] == "convert"
    assert argus_inproc(capsys, *synth, "--out", str(ds), "--overwrite")[0] == 0
    assert sorted(p.name for p in ds.iterdir()) == ["manifest.json", "test", "train", "truth", "val"]  # no id maps

    foreign = tmp_path / "foreign"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "sub" / "notes.txt").write_text("mine")
    before = tree_digest(foreign)
    for argv in (synth, convert):
        code, _, err = argus_inproc(capsys, *argv, "--out", str(foreign), "--overwrite")
        assert code == 2
        assert one_line_error(err) == (
            f"argus: error: out {foreign}: not empty and not an argus dataset (sub/ is not one of the files a "
            "dataset holds); refusing to write into it, even with --overwrite: choose a new or empty directory"
        )
        assert tree_digest(foreign) == before
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, _, err = argus_inproc(capsys, *synth, "--out", str(afile), "--overwrite")
    assert code == 2 and one_line_error(err) == f"argus: error: out {afile}: exists and is not a directory"
    assert afile.read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert argus_inproc(capsys, *convert, "--out", str(empty))[0] == 0, "an empty directory is fine"


def test_convert_errors_count_rows_from_1_and_name_the_flags(tmp_path, capsys):
    """`argus data convert` names rows as a user counts them (from 1; in a CSV/TSV file from the line after the
    header, and it says so) and the flags that fix a problem, never the Python API's words."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from helpers import argus_inproc, one_line_error

    def error(*argv: str) -> str:
        code, _, err = argus_inproc(capsys, "data", "convert", *argv, "--out", str(tmp_path / "out"))
        assert code == 2
        line = one_line_error(err)
        assert "on_error" not in line and "ColumnMap" not in line and "fmt" not in line, line
        return line

    bad = tmp_path / "bad.csv"
    bad.write_text("user,item,timestamp\na,x,1\n,y,2\nb,z,3\n")  # the null user is on line 3, data row 2
    assert error(str(bad)) == (
        f"argus: error: {bad}: row 2 after the header, column 'user': null id [null_user]; "
        "pass --on-error skip to drop and count such rows"
    )
    bad.write_text("user,item,timestamp\na,x,1\nb,y,2,extra\n")
    assert error(str(bad)) == (
        f"argus: error: {bad}: malformed CSV line in the block starting at row 1 after the header (expected 3 "
        "fields, got 4: 'b,y,2,extra') [malformed_row]; pass --on-error skip to drop and count such rows"
    )
    parquet = tmp_path / "bad.parquet"  # no header: row 3 is the third row
    pq.write_table(
        pa.table({"uid": [1, 1, 2], "item_id": [10, 11, None], "timestamp": [1, 2, 3], "event_type": ["listen"] * 3}),
        parquet,
    )
    assert error(str(parquet)) == (
        f"argus: error: {parquet}: row 3, column 'item_id': null id [null_item]; "
        "pass --on-error skip to drop and count such rows"
    )
    assert error(str(parquet), "--user-col", "u") == (
        "argus: error: --user-col/--item-col/--timestamp-col: user/item/timestamp column names apply to csv/tsv "
        "input; Yambda parquet has fixed column names (uid, item_id, timestamp, event_type, ...)"
    )
    cols = tmp_path / "cols.csv"
    cols.write_text("uid,iid,ts\na,x,1\n")
    assert error(str(cols)) == (
        f"argus: error: {cols}: missing required user column 'user'; columns found: ['uid', 'iid', 'ts']; "
        "name the user column with --user-col NAME"
    )
    named = ["--user-col", "uid", "--item-col", "iid", "--timestamp-col", "ts"]
    assert error(str(cols), *named, "--rating-col", "stars") == (
        f"argus: error: {cols}: missing rating column 'stars'; columns found: ['uid', 'iid', 'ts']; name the rating "
        "column with --rating-col NAME (--rating-col none reads every row as a listen)"
    )
    assert error(str(cols), *named, "--shards", "0") == "argus: error: --shards: must be >= 1, got 0"
    assert error(str(cols), *named, "--like-threshold", "1") == (
        "argus: error: --dislike-threshold (2.0) must be < --like-threshold (1.0)"
    )
    odd = tmp_path / "log.dat"
    odd.write_text("user,item,timestamp\na,x,1\n")
    assert error(str(odd)) == (
        f"argus: error: {odd}: cannot tell the format from the extension; pass --format (one of yambda, csv, tsv)"
    )
    code, _, _ = argus_inproc(capsys, "data", "convert", str(cols), *named, "--out", str(tmp_path / "ok"))
    assert code == 0  # the flags the messages name are the ones that work


def test_synth_flags_reach_the_generator(tmp_path, capsys):
    """--clusters and --favourite-clusters reach the dataset (its manifest and truth); a conflicting pair of flags
    is one line naming them."""
    from trainer.data import synth

    out = tmp_path / "d"
    args = ["data", "synth", "--out", str(out), "--users", "8", "--items", "200", "--mean-len", "20", "--shards", "2",
            "--workers", "1", "--clusters", "40", "--favourites", "0.3", "--favourite-clusters", "5"]  # fmt: skip
    assert main(args) == 0
    items, truth = synth.load_truth(out)
    assert int(items["item_cluster"].max()) == 39 and truth["favourite_clusters"].shape == (8, 5)
    code = main([*args[:3], str(tmp_path / "e"), *args[4:], "--favourite-items", "32"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "favourite_items and favourite_clusters" in err and err.count("\n") == 0
