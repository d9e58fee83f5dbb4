"""Item metadata vectors (a text or content embedding per item), stored beside the shards.

One float32 ``.npy`` of shape (num_items, dim), row = item id, written by ``argus data synth --item-features
DIM`` or ``argus data convert --item-features FILE`` and recorded in the manifest (``item_features``: path,
sha256, dim, the rows that had a vector). Items without a vector keep a zero row and count as ``missing``. The
semantic item tower (``model.item_tower``: trainer/model/item_tower.py) reads it; nothing else does.

A plain memory-mapped ``.npy`` rather than another shard format: the tower needs row ``i`` for any item id in
any order, and the whole table is small next to the item embedding table (dim x 4 bytes per item).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.manifest import Manifest, ManifestError, sha256_file
from trainer.data.storage import local_copy, redact

FEATURES_NAME = "item_features.npy"


def write_item_features(root: str | Path, vectors: np.ndarray, has: np.ndarray | None = None) -> dict[str, Any]:
    """Write ``vectors`` (num_items, dim) as ``root/item_features.npy``; return the manifest's ``item_features``
    entry. ``has``: which rows carry a real vector (default: all)."""
    root = Path(root)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] < 1:
        raise ValueError(f"item features: expected a (num_items, dim) array, got shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError("item features: NaN or infinite values")
    tmp = root / (FEATURES_NAME + ".tmp.npy")
    np.save(tmp, vectors)
    tmp.replace(root / FEATURES_NAME)
    rows = int(vectors.shape[0]) if has is None else int(np.count_nonzero(has))
    return {
        "path": FEATURES_NAME,
        "sha256": sha256_file(root / FEATURES_NAME),
        "dim": int(vectors.shape[1]),
        "rows": rows,
        "missing": int(vectors.shape[0]) - rows,
    }


def attach_item_features(root: str | Path, vectors: np.ndarray, has: np.ndarray | None = None) -> Manifest:
    """Write the vectors beside the dataset at ``root`` and record them in its manifest (saved atomically)."""
    manifest = Manifest.load(root)
    if vectors.shape[0] != manifest.num_items:
        raise ValueError(f"item features: {vectors.shape[0]} rows for a catalog of {manifest.num_items} items")
    manifest.item_features = write_item_features(root, vectors, has)
    manifest.save(root)
    return manifest


def feature_dim(manifest: Manifest) -> int:
    """The dataset's item-feature width (0 = none)."""
    return int(manifest.item_features.get("dim", 0)) if manifest.item_features else 0


def load_item_features(manifest: Manifest) -> np.ndarray:
    """The (num_items, dim) float32 vectors, memory-mapped; one line naming the dataset when it has none."""
    info = manifest.item_features
    where = redact(manifest.root / "manifest.json")
    if not info:
        raise ManifestError(
            f"{where}: no item_features (write them with `argus data synth --item-features DIM` or "
            "`argus data convert --item-features FILE`)"
        )
    arr = np.load(local_copy(manifest.root / info["path"], info.get("sha256", "")), mmap_mode="r")
    if arr.shape != (manifest.num_items, int(info["dim"])):
        raise ManifestError(
            f"{where}: item_features {info['path']} has shape {arr.shape}, "
            f"expected ({manifest.num_items}, {info['dim']})"
        )
    return arr


def cold_items(manifest: Manifest, split: str) -> np.ndarray:
    """Boolean per item: never seen in ``split`` (for the training split: the items whose ID embedding training
    never updated)."""
    return np.asarray(manifest.item_counts(split)) == 0
