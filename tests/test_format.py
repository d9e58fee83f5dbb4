"""The on-disk format: documented decoder, stock readers, manifest errors, encode/decode round trip."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from trainer.data.manifest import Manifest, ManifestError
from trainer.data.schema import FIELDS, SampleError, decode_sample, encode_sample
from trainer.data.writer import Holdout, chunk_bounds, split_history

DOCS = Path(__file__).resolve().parents[1] / "docs" / "data-format.md"


def test_documented_decoder_reads_shards(dataset_factory, tmp_path):
    m = dataset_factory(2, users=6, seed=1)
    code = re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S).group(1)
    assert len([ln for ln in code.splitlines() if ln.strip()]) <= 10
    script = tmp_path / "decode.py"
    script.write_text(code)
    shard = m.root / m.splits["train"].shards[0].path
    out = subprocess.run([sys.executable, str(script), str(shard)], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == m.splits["train"].shards[0].samples
    with tarfile.open(shard) as t:
        first = t.getmembers()[0]
        s = decode_sample(first.name.split(".")[0], t.extractfile(first).read())
    assert lines[0].split()[:4] == [s.key, str(s.user), str(s.offset), str(len(s))]


def test_stock_webdataset_reads_shards(dataset_factory):
    import webdataset as wds

    m = dataset_factory(3, users=9, seed=2)
    urls = [str(m.root / sh.path) for sh in m.splits["train"].shards]
    got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    assert len(got) == m.splits["train"].samples
    assert sum(s["msg"]["n"] for s in got) == m.splits["train"].interactions


def test_encode_decode_round_trip_and_errors():
    rng = np.random.default_rng(0)
    cols = {name: rng.integers(0, 100, 7).astype(dt) for name, dt in FIELDS.items()}
    s = decode_sample("k", encode_sample(3, 11, cols, target_start=5))
    assert (s.user, s.offset, s.target_start, len(s)) == (3, 11, 5, 7)
    for name in FIELDS:
        assert np.array_equal(s.cols[name], cols[name])
    with pytest.raises(SampleError, match="'k'"):
        decode_sample("k", b"\xc1garbage")
    bad = dict(cols, item=cols["item"][:3])
    with pytest.raises(SampleError, match="has 7 rows, expected 3"):
        encode_sample(1, 0, bad)


def test_manifest_errors_name_file_and_key(dataset_factory, tmp_path):
    with pytest.raises(ManifestError, match="manifest.json: not found"):
        Manifest.load(tmp_path / "nothing")
    m = dataset_factory(1, users=3)
    path = m.root / "manifest.json"
    d = json.loads(path.read_text())
    del d["splits"]["train"]["shards"][0]["samples"]
    path.write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=r"splits\.train\.shards\[0\]\.samples"):
        Manifest.load(m.root)
    d["schema_version"] = 99
    path.write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="schema_version 99"):
        Manifest.load(m.root)
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="invalid JSON"):
        Manifest.load(m.root)


def test_chunks_and_holdouts():
    assert chunk_bounds(10, 4) == [(0, 2), (2, 6), (6, 10)]
    assert chunk_bounds(0, 4) == []
    ts = np.array([10, 20, 30, 40, 50, 60])
    n_train, pieces, gap = split_history(ts, Holdout("loo"), max_len=4)
    assert n_train == 4 and pieces["test"].rows == slice(2, 6) and pieces["test"].target_start == 3
    assert pieces["val"].rows == slice(1, 5) and pieces["val"].target_start == 3
    # temporal: train < 35 - 10, val targets in [35, 55), test >= 55, gap rows [25, 35) are context only
    n_train, pieces, gap = split_history(ts, Holdout("temporal", val_start=35, test_start=55, gap=10), max_len=10)
    assert n_train == 2 and gap == 1
    assert pieces["val"].rows == slice(0, 5) and pieces["val"].target_start == 3
    assert pieces["test"].rows == slice(0, 6) and pieces["test"].target_start == 5
    # eval sample longer than max_len keeps the most recent rows and counts targets it cut
    _, pieces, _ = split_history(ts, Holdout("temporal", val_start=15, test_start=15), max_len=3)
    assert pieces["test"].rows == slice(3, 6) and pieces["test"].targets_cut == 2
