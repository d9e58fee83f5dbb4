"""Output directories: nothing argus writes replaces an earlier output unless told, and nothing else ever.

Every command that writes a directory (``data synth``, ``data convert``, ``train``, ``finetune``, ``export``)
checks its target first, read-only, before it writes anything:

- missing, or an empty directory: written;
- holding an earlier output of the same kind (every entry in it is one argus writes there, see
  :class:`Layout`): refused with one line naming the target and the flag that replaces it (``--overwrite``;
  runs: ``resume=true`` / ``train.overwrite=true``); with the flag, exactly those entries are removed first;
- holding anything else (a file argus does not write there, another kind of output): refused, even with the
  flag. So argus never deletes a file it did not write.

The layouts of a dataset live here (this package is the leaf every other one may import), an export's in
``trainer/export.py`` and a run's in ``trainer/rundir.py``, each beside the code that writes it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from trainer.data.manifest import FORMAT_NAME, MANIFEST_NAME
from trainer.data.storage import PIPE, filesystem, is_url, location, redact, scheme, upload_tree, with_retries


class OutputExistsError(ValueError):
    """An output directory that holds something: an earlier output (the message names the flag that replaces
    it) or files argus did not write (refused whatever the flags)."""


class Layout:
    """What argus writes in one kind of output directory: glob patterns (``fnmatch``) of paths relative to it.

    ``files``: files (and symlinks); ``dirs``: directories argus makes, whose entries must match too;
    ``trees``: directories whose whole contents argus writes (checkpoints, TensorBoard, spill files).
    """

    kind = "output"  # the word in messages: dataset, export, run
    files: tuple[str, ...] = ()
    dirs: tuple[str, ...] = ()
    trees: tuple[str, ...] = ()
    removed_last: tuple[str, ...] = ()  # what unvouched() reads: a half-cleared directory still checks the same

    def unvouched(self, root: Path) -> str | None:
        """Why an entry whose name matches is not argus's after all (a manifest of another kind), or None."""
        return None

    def describe(self, root: Path) -> str:
        """What ``root`` holds, for the refusal: ``a dataset (splits train, val, test)``."""
        return f"an earlier {self.kind}"

    def foreign(self, root: Path) -> str | None:
        """Why ``root`` holds something argus does not write there (``notes.txt is not one of the files a run
        holds``: the first such entry, relative, ``/`` after a directory), or None."""
        pending = [""]
        while pending:
            rel_dir = pending.pop()
            for entry in sorted(os.scandir(root / rel_dir), key=lambda e: e.name):
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                if entry.is_dir(follow_symlinks=False):
                    if _matches(rel, self.trees):
                        continue
                    if _matches(rel, self.dirs):
                        pending.append(rel)
                        continue
                    return f"{rel}/ is not one of the files {_a(self.kind)} holds"
                if not _matches(rel, self.files):
                    return f"{rel} is not one of the files {_a(self.kind)} holds"
        return self.unvouched(root)


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _matches(rel: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) for p in patterns)


def check_output(
    out: str | os.PathLike, layout: Layout, *, overwrite: bool, flag: str, remedy: str | None = None
) -> bool:
    """Read-only: may ``out`` be written? False: it is missing or empty. True: it holds an earlier output of
    ``layout``'s kind and ``overwrite`` is set (the caller clears it with :func:`clear_output` before its first
    write). Otherwise raises OutputExistsError, one line naming ``out`` and ``flag`` (``remedy``: what to pass,
    default ``pass FLAG to replace it``)."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return False
    if not out.is_dir():
        raise OutputExistsError(f"out {out}: exists and is not a directory")
    if not any(out.iterdir()):
        return False
    bad = layout.foreign(out)
    if bad is not None:
        raise OutputExistsError(
            f"out {out}: not empty and not an argus {layout.kind} ({bad}); refusing to write into it, even with "
            f"{flag}: choose a new or empty directory"
        )
    if overwrite:
        return True
    raise OutputExistsError(f"out {out}: holds {layout.describe(out)}; {remedy or f'pass {flag} to replace it'}")


def clear_output(out: str | os.PathLike, layout: Layout) -> None:
    """Remove an earlier output from ``out``, keeping the directory. Checks again that everything in it is
    argus's (it may have changed since :func:`check_output`): then every entry is, and all of them go."""
    out = Path(out)
    if not out.is_dir():
        return
    bad = layout.foreign(out)
    if bad is not None:
        raise OutputExistsError(f"out {out}: changed since it was checked ({bad}); removed nothing")
    for entry in sorted(out.iterdir(), key=lambda p: (p.name in layout.removed_last, p.name)):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing or not one."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


# ---- a dataset (argus data synth / convert) ------------------------------------------------------------------
SPLITS = ("train", "val", "test", "impressions", "impressions_test")  # trainer.data.writer: holdout + impressions
LEGACY_WRITING_MARKER = ".argus-synth-writing"  # left by an earlier version's synth that stopped part-way


class DatasetLayout(Layout):
    """``manifest.json`` (written last: without it the dataset is incomplete), shards, per-shard lengths and
    item counts per split, convert's id maps and spill directories, synth's ground truth."""

    kind = "dataset"
    files = (
        MANIFEST_NAME,
        MANIFEST_NAME + ".tmp",
        "item_map.parquet",  # convert
        "user_map.parquet",
        "item_features.npy",  # --item-features (trainer/data/item_features.py)
        "item_features.npy.tmp.npy",
        LEGACY_WRITING_MARKER,
        *(f"{s}/shard-*{x}" for s in SPLITS for x in (".tar", ".tar.tmp", ".lengths.npy", ".index.npy")),
        *(f"{s}/item_counts.npy" for s in SPLITS),
        "truth/items.npz",  # synth
        "truth/items.npz.tmp",
        "truth/users-*.npz",
        "truth/users-*.npz.tmp",
    )
    dirs = (*SPLITS, "truth")
    trees = (".convert-spill-*",)

    def unvouched(self, root: Path) -> str | None:
        path = root / MANIFEST_NAME
        if path.exists() and (read_json(path) or {}).get("format") != FORMAT_NAME:
            return f"{MANIFEST_NAME} is not a dataset's"  # another tool's, or an export's
        return None

    def describe(self, root: Path) -> str:
        m = read_json(root / MANIFEST_NAME)
        if m is None:
            return f"an incomplete dataset (no {MANIFEST_NAME}: a write that stopped part-way)"
        splits = sorted(m.get("splits", {}), key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))
        return f"a dataset (splits {', '.join(splits)})"


DATASET = DatasetLayout()


def prepare_dataset_out(out: str | os.PathLike, overwrite: bool) -> None:
    """For ``data synth``: check ``out`` (see :func:`check_output`), clear an earlier dataset when ``overwrite``,
    and create the directory. ``data convert`` checks first and clears only once its input has been read."""
    if check_output(out, DATASET, overwrite=overwrite, flag="--overwrite"):
        clear_output(out, DATASET)
    Path(out).mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def dataset_output(out: str | os.PathLike[str], overwrite: bool) -> Iterator[str]:
    """Where a dataset writer writes: ``out`` itself when local; for a URL a local staging directory
    (``ARGUS_STAGING`` or the system's temporary directory) uploaded to ``out`` when the writer returns, the
    manifest last, then removed.

    The URL is checked first, as a local output is (:func:`check_output`): an existing dataset there (its
    manifest) needs ``overwrite``, whose upload starts by deleting the old manifest so that no reader takes the
    half-replaced dataset for a whole one; anything else under the prefix is refused."""
    if not is_url(out):
        yield str(out)
        return
    if str(out).startswith(PIPE) or scheme(out) in ("http", "https"):
        raise ValueError(f"out {redact(out)}: read-only URL; write to a directory or an object-store URL")
    dest = location(out)
    fs, prefix = filesystem(dest), dest.path.rstrip("/")
    present = [p.lstrip("/") for p in with_retries(lambda: fs.find(prefix), str(dest))]
    base = prefix.lstrip("/") + "/"
    rel = [p[len(base) :] if p.startswith(base) else p for p in present]
    patterns = (*DATASET.files, *(f"{t}/*" for t in DATASET.trees))
    foreign = [r for r in rel if not _matches(r, patterns)]
    if foreign:
        raise ValueError(
            f"out {redact(out)}: not empty and not an argus dataset ({foreign[0]} is not one of the files a dataset "
            "holds); refusing to write there"
        )
    manifest = f"{prefix}/{MANIFEST_NAME}"
    if MANIFEST_NAME in rel:
        fmt = json.loads(with_retries(lambda: fs.cat_file(manifest), str(dest / MANIFEST_NAME))).get("format")
        if fmt != FORMAT_NAME:
            raise ValueError(f"out {redact(out)}: {MANIFEST_NAME} is not a dataset's; refusing to write there")
    if rel and not overwrite:
        what = "a dataset" if MANIFEST_NAME in rel else "an incomplete dataset (no manifest)"
        raise ValueError(f"out {redact(out)}: holds {what}; pass --overwrite to replace it")
    staging = Path(tempfile.mkdtemp(prefix="argus-upload-", dir=os.environ.get("ARGUS_STAGING") or None))
    try:
        yield str(staging / "dataset")
        # the old dataset goes first, its manifest before anything else: no reader takes a half-replaced dataset
        # for a whole one, and no file of the old one stays beside the new one
        for r in sorted(rel, key=lambda r: r != MANIFEST_NAME):
            with_retries(lambda r=r: fs.rm_file(f"{prefix}/{r}"), str(dest / r))
        upload_tree(staging / "dataset", dest, MANIFEST_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
