"""Lifelong histories in the data layer (trainer/data/lifelong.py) against the same data written whole.

The same synthetic histories are written twice: cut into members of 7 interactions, and with every history in one
member. What the stream reads before each sample of the cut data must be exactly the whole history's first rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import read_samples
from trainer.data import synth
from trainer.data.lifelong import pieces
from trainer.data.manifest import Manifest
from trainer.data.schema import FIELDS

WINDOW, PIECE, CUT = 5, 4, 7


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lifelong_data")
    kw = dict(users=12, items=50, mean_len=25, shards=2, seed=3, holdout="loo", workers=1)
    synth.synthesize(root / "cut", max_len=CUT, **kw)
    synth.synthesize(root / "whole", max_len=10_000, **kw)
    return root / "cut", root / "whole"


def whole_histories(whole: Path, split: str = "test") -> dict[int, dict[str, np.ndarray]]:
    """Every user's full history: its test sample, which holds all of it (loo: the last row is the target)."""
    return {s.user: s.cols for s in read_samples(whole, split)}


def streamed(cut: Path, split: str, at: int | None = None) -> dict[tuple[int, int], tuple[dict, int, int, int]]:
    """(user, sample offset) -> (the rows read before the sample's summary point, its point, covered, until)."""
    m = Manifest.load(cut)
    read: dict[int, list[dict]] = {}
    out = {}
    for p in pieces(m, split, list(range(len(m.split(split).shards))), WINDOW, PIECE, at):
        assert 0 <= p.rows <= PIECE and p.lead in (0, 1)
        so_far = read.setdefault(p.user, [])
        if p.lead:  # the leading row is the last one read before
            assert all(p.cols[f][0] == so_far[-1][f][-1] for f in FIELDS)
        assert all(p.cols[f].dtype == np.dtype(dt) for f, dt in FIELDS.items())
        so_far.append({f: p.cols[f][p.lead :] for f in FIELDS})
        if p.emit is not None:
            rows = {f: np.concatenate([c[f] for c in so_far]) for f in FIELDS}
            out[(p.user, p.emit.offset)] = (rows, p.emit.before, p.emit.covered, p.emit.until)
    return out


@pytest.mark.parametrize("split", ["train", "test", "val"])
def test_each_sample_reads_the_whole_history_before_its_window(data, split: str) -> None:
    cut, whole = data
    full = whole_histories(whole)
    samples = read_samples(cut, split)
    got = streamed(cut, split)
    assert set(got) == {(s.user, s.offset) for s in samples}
    long_ones = 0
    for s in samples:
        history = s.target_start if split != "train" else s.n  # eval: the held-out targets are not history
        covered = s.offset + max(0, history - WINDOW)
        rows, before, n, until = got[(s.user, s.offset)]
        assert n == before == covered
        for f in FIELDS:
            np.testing.assert_array_equal(rows[f], full[s.user][f][:covered])
        assert until == (int(full[s.user]["timestamp"][covered - 1]) if covered else -1)
        long_ones += covered > CUT
    assert long_ones  # histories longer than a member were read across members


@pytest.mark.parametrize("split", ["train", "test"])
def test_rows_at_or_after_the_cutoff_are_never_read(data, split: str) -> None:
    cut, whole = data
    full = whole_histories(whole)
    at = int(np.median(np.concatenate([c["timestamp"] for c in full.values()])))
    got = streamed(cut, split, at)
    for s in read_samples(cut, split):
        rows, before, n, _ = got[(s.user, s.offset)]
        history = min(s.target_start if split == "test" else s.n, int(np.searchsorted(s.cols["timestamp"], at)))
        older = int((full[s.user]["timestamp"][: s.offset] < at).sum())
        want = s.offset + max(0, history - WINDOW) if history else older
        assert n == want and before == s.offset + max(0, history - WINDOW) and (rows["timestamp"] < at).all()
        np.testing.assert_array_equal(rows["item"], full[s.user]["item"][:want])


def test_a_temporal_split_reads_what_the_shards_hold_and_passes_over_users_without_train_rows(tmp_path) -> None:
    """Temporal holdout: some test users have no train rows (all their history is in the val period), the rows in
    the gap and val period before a test sample are in no split read: the summary covers fewer rows than its point."""
    kw = dict(users=30, items=50, mean_len=12, shards=2, seed=5, holdout="temporal", workers=1, val_days=30.0,
              test_days=20.0, gap_seconds=86_400)  # fmt: skip
    synth.synthesize(tmp_path / "cut", max_len=CUT, **kw)
    synth.synthesize(tmp_path / "whole", max_len=10_000, **kw)
    train = {}
    for s in read_samples(tmp_path / "whole", "train"):
        train[s.user] = s.cols
    got = streamed(tmp_path / "cut", "test")
    samples = read_samples(tmp_path / "cut", "test")
    assert set(got) == {(s.user, s.offset) for s in samples}
    no_train = short = 0
    for s in samples:
        rows, before, n, _ = got[(s.user, s.offset)]
        assert before == s.offset + max(0, s.target_start - WINDOW)
        older = train.get(s.user, {"item": np.zeros(0, np.int64)})["item"][: s.offset]  # train rows before the sample
        want = np.concatenate([older, s.cols["item"][: before - s.offset]])
        np.testing.assert_array_equal(rows["item"], want)
        assert n == want.size <= before
        no_train += s.user not in train
        short += n < before
    assert no_train and short  # both cases happened
