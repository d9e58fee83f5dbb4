"""Featurization: OOV policy, time features, jagged -> padded, KJT layout."""

from __future__ import annotations

import datetime
import math

import pytest
import torch

from embeddings.features import apply_oov
from embeddings.tables import init_rows
from trainer.model.interaction import GAP_BUCKETS, gap_bucket, hour_of_week, jagged_to_padded


def test_oov_hash_and_error():
    ids = torch.tensor([0, 4, 5, 12, -1])
    assert apply_oov(ids, 5, "hash", "item").tolist() == [0, 4, 0, 2, 4]
    assert apply_oov(torch.tensor([0, 4]), 5, "error", "item").tolist() == [0, 4]
    with pytest.raises(ValueError, match="feature 'item': id 5 outside the table's 5 rows"):
        apply_oov(ids, 5, "error", "item")


def test_hour_of_week_against_datetime():
    for ts in [0, 3600 * 5 + 7, 1_700_000_000, 1_234_567_890, 86_400 * 4]:
        d = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)
        assert int(hour_of_week(torch.tensor([ts]))[0]) == d.weekday() * 24 + d.hour


def test_gap_bucket_per_sample():
    ts = torch.tensor([100, 101, 164, 10, 10 + 2**20, 5])
    lengths = torch.tensor([3, 2, 1])
    got = gap_bucket(ts, lengths).tolist()
    want = [0, int(math.log2(2)) + 1, int(math.log2(64)) + 1, 0, min(int(math.log2(2**20 + 1)) + 1, GAP_BUCKETS - 1), 0]
    assert got == want


def test_jagged_to_padded_round_trip():
    values = torch.arange(12.0).reshape(6, 2)
    lengths = torch.tensor([2, 0, 3, 1])
    padded, mask, (row, col) = jagged_to_padded(values, lengths)
    assert padded.shape == (4, 3, 2) and mask.sum() == 6
    assert torch.equal(padded[row, col], values)
    assert mask.tolist() == [[True, True, False], [False] * 3, [True] * 3, [True, False, False]]
    assert padded[~mask].abs().sum() == 0


def test_init_rows_is_sharding_independent():
    full = init_rows("item", 0, 70_000, 8, seed=1, std=0.05)
    part = init_rows("item", 65_530, 65_540, 8, seed=1, std=0.05, col_start=2, col_end=6)  # crosses a block
    assert torch.equal(full[65_530:65_540, 2:6], part)
    assert not torch.equal(init_rows("item", 0, 5, 8, 1, 0.05), init_rows("event", 0, 5, 8, 1, 0.05))
