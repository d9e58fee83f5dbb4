"""The oracle of planted synthetic data: each user's true next-item distribution at the holdout time.

For a dataset written by ``argus data synth --holdout loo`` (generator version >= 2), the truth
files hold, for each user's last two rows (the ``val`` and ``test`` targets), the generator's state
right before that row. :func:`next_item_probs` turns it into the exact distribution the generator
draws that row from, so ranking by it is the best any model can do in expectation; a model's
NDCG@10 over the oracle's says how much of the learnable structure the model found.

Conditioned on (everything determined before the held-out row):

- the previous row: its item, and whether it is a play (then a LIKE/DISLIKE row of the same item
  follows with the probability its affinity and played ratio give), a LIKE/DISLIKE (an UNLIKE /
  UNDISLIKE follows with probability ``UNDO_P``) or an undo (no repeat);
- the previous play's session: its drifted taste (weights over the taste slots), hour of the week
  (weekly modulation) and surface; the previous play's item (stay in its cluster, or its successor);
- the user's taste support and drift step (the size of the taste's step at a new session).

Marginalised (the held-out event's own random draws): whether the row repeats the previous item,
whether the next play starts a new session (probability ``1 / SESSION_MEAN``), its surface (the
session's with probability ``CONTEXT_KEEP``, else a fresh draw), whether it is organic, and so
whether a fresh draw follows taste or global popularity, whether it takes the successor or stays in
the cluster, its cluster and item. A new session's taste is the previous session's plus a Gaussian
step on the logits (integrated to second order in the step, exact to O(step^4)); its start hour is
not known before the event either, so it is averaged over the generator's start-hour profile
(``activity``, every day of the week equally likely; the shift that keeps sessions from overlapping
is ignored).

Not conditioned on: that the held-out row is the last (or second-to-last) row of the history. The
generator draws each user's number of plays up front, so strictly the end of the history carries a
little information (e.g. the last row is a bit more often a LIKE row than an interior one); no
model sees the length either, and the effect is a few percent of the repeat mass. The oracle is the
one-step distribution of the process, exactly as for an interior row.

Only ``loo`` holdouts: with ``temporal`` the test window holds many targets per user, ranked from
one state, and there is no single next row to take the distribution of.

Memory: one shard's per-user state (about 100 bytes a user) and one batch of probability rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from trainer.data import synth
from trainer.data.manifest import Manifest

ORACLE_VERSION = 2  # the first generator version whose truth holds the oracle state
SPLIT_ROW = {"val": 0, "test": 1}  # index into the truth's oracle_* arrays: second-to-last, last row
STATE_KEYS = ("taste", "support", "drift_step", "how", "context", "prev_item", "repeat_p")


def session_hour_prior(activity: np.ndarray) -> np.ndarray:
    """(168,) distribution of a new session's hour of the week: a uniform day, the hour from ``activity``."""
    a = np.asarray(activity, np.float64)
    return (a / a.sum(axis=1, keepdims=True) / a.shape[0]).ravel()


class ItemTruth:
    """The item-side truth the oracle needs (from ``truth/items.npz``), in float64."""

    def __init__(self, items: dict[str, np.ndarray]) -> None:
        self.item_cluster = items["item_cluster"].astype(np.int64)
        within = items["item_within_pop"].astype(np.float64)  # stored in float32: renormalised per cluster
        self.within = within / np.bincount(self.item_cluster, weights=within)[self.item_cluster]
        self.successor = items["item_successor"].astype(np.int64)
        self.num_items = self.item_cluster.shape[0]
        self.num_clusters = items["cluster_pop"].shape[0]
        self.modexp = np.exp(items["cluster_logmod"].astype(np.float64))  # [C, 168]
        pop = items["cluster_pop"].astype(np.float64)[:, None] * self.modexp
        self.pop_by_how = (pop / pop.sum(axis=0, keepdims=True)).T  # [168, C]: popularity-driven cluster draws
        self.hour_prior = session_hour_prior(items["activity"])  # [168]
        self.pop_new = self.hour_prior @ self.pop_by_how  # [C]: the same for a session at an unknown hour


def _scatter_clusters(w: np.ndarray, support: np.ndarray, num_clusters: int) -> np.ndarray:
    """[U, K] weights of taste slots -> [U, C] weights of clusters (repeated clusters add up)."""
    U = w.shape[0]
    flat = np.repeat(np.arange(U) * num_clusters, w.shape[1]) + support.ravel()
    return np.bincount(flat, weights=w.ravel(), minlength=U * num_clusters).reshape(U, num_clusters)


def next_item_probs(world: ItemTruth, state: dict[str, np.ndarray]) -> np.ndarray:
    """(U, num_items) float64: the distribution of the next row's item for each of U states.

    ``state`` holds (U,)- or (U, K)-arrays ``taste`` (session taste over the slots), ``support`` (cluster
    of each slot), ``drift_step``, ``how`` (hour of week of the previous play's session), ``context``
    (that session's surface, 1..4), ``prev_item`` (the previous play's item) and ``repeat_p`` (the
    probability that the row repeats ``prev_item`` as a LIKE/DISLIKE/UN* row). See the module docstring.
    Reads the generator's constants from :mod:`trainer.data.synth` at call time.
    """
    taste = np.asarray(state["taste"], np.float64)
    support = np.asarray(state["support"], np.int64)
    how = np.asarray(state["how"], np.int64)
    ctx = np.asarray(state["context"], np.int64)
    prev = np.asarray(state["prev_item"], np.int64)
    rep = np.asarray(state["repeat_p"], np.float64)
    sd = np.asarray(state["drift_step"], np.float64)
    U, C = taste.shape[0], world.num_clusters
    if np.any(prev < 0):
        raise ValueError("a state without a previous row (prev_item -1): that user has no target here")
    rows = np.arange(U)

    # surface of a continuing event: the session's with CONTEXT_KEEP, else a fresh draw; what follows from it
    succ_p, org_p = synth.SUCCESSOR_P[synth.CONTEXTS], synth.ORGANIC_P[synth.CONTEXTS]
    q = (1.0 - synth.CONTEXT_KEEP) * np.broadcast_to(synth.CONTEXT_P, (U, 4)).copy()
    q[rows, ctx - 1] += synth.CONTEXT_KEEP
    fresh = (1.0 - succ_p) * (1.0 - synth.STAY_P)
    w_succ = q @ succ_p
    w_stay = q @ ((1.0 - succ_p) * synth.STAY_P)
    w_pop = q @ (fresh * (1.0 - org_p) * synth.POPULAR_P)
    w_taste = q @ (fresh * (1.0 - (1.0 - org_p) * synth.POPULAR_P))
    # a new session: surface from CONTEXT_P, always a fresh draw
    w_pop_new = float(synth.CONTEXT_P @ ((1.0 - org_p) * synth.POPULAR_P))

    # taste-driven cluster draws: taste x weekly modulation at the session's hour
    sel = taste * world.modexp[support, how[:, None]]
    taste_c = _scatter_clusters(sel / sel.sum(axis=1, keepdims=True), support, C)
    # ... at a new session: logits + drift_step * N(0, I), an unknown hour
    s = taste[:, None, :] * world.modexp[support].transpose(0, 2, 1)  # [U, 168, K]
    s /= s.sum(axis=2, keepdims=True)
    s += sd[:, None, None] ** 2 * s * ((s * s).sum(axis=2, keepdims=True) - s)  # E[softmax(a + sd z)], 2nd order
    taste_new = _scatter_clusters(np.einsum("h,uhk->uk", world.hour_prior, s), support, C)

    p_new = 1.0 / synth.SESSION_MEAN
    cl = (1.0 - p_new) * (w_pop[:, None] * world.pop_by_how[how] + w_taste[:, None] * taste_c) + p_new * (
        w_pop_new * world.pop_new[None, :] + (1.0 - w_pop_new) * taste_new
    )
    cl[rows, world.item_cluster[prev]] += (1.0 - p_new) * w_stay
    probs = cl[:, world.item_cluster] * world.within[None, :]
    probs[rows, world.successor[prev]] += (1.0 - p_new) * w_succ
    probs *= (1.0 - rep)[:, None]
    probs[rows, prev] += rep
    return probs


def _truth_file(root: Path, index: int) -> Path:
    return root / synth.TRUTH_DIR / f"users-{index:06d}.npz"


class SynthOracle:
    """The oracle of one synthetic ``loo`` dataset: :meth:`probs` for any users, one shard's state cached.

    ``taste="initial"`` is a diagnostic: the user's initial taste instead of the drifted one (what the
    generator stored before version 2), to see how much the drift matters.
    """

    def __init__(self, data_dir: str | os.PathLike, taste: str = "drifted") -> None:
        if taste not in ("drifted", "initial"):
            raise ValueError(f"taste must be drifted or initial (got {taste!r})")
        self.root = Path(data_dir)
        self.taste = taste
        self.manifest = m = Manifest.load(self.root)
        src = m.source
        if src.get("kind") != "synth":
            raise ValueError(f"{self.root}: the oracle needs a synth dataset (source.kind is {src.get('kind')!r})")
        version = int(src.get("generator_version", 0))
        first = _truth_file(self.root, 0)
        if version < ORACLE_VERSION:
            raise ValueError(
                f"{first}: no oracle state (written by {src.get('generator', 'argus-synth')} version {version};"
                f" the oracle needs version >= {ORACLE_VERSION}): regenerate the dataset with argus data synth"
            )
        if src.get("favourites"):
            raise ValueError(f"{self.root}: the oracle does not model --favourites (source.favourites)")
        if src.get("holdout") != "loo":
            raise ValueError(
                f"{self.root}: the oracle is defined for --holdout loo only (this dataset: {src.get('holdout')!r})"
            )
        self.users, self.shards = int(src["users"]), int(src["shards"])
        self.bounds = np.array([i * self.users // self.shards for i in range(self.shards + 1)], np.int64)
        with np.load(self.root / synth.TRUTH_DIR / "items.npz") as z:
            self.world = ItemTruth({k: z[k] for k in z.files})
        self._cached: tuple[int, dict[str, np.ndarray]] | None = None

    @property
    def num_items(self) -> int:
        return self.world.num_items

    def _shard_state(self, index: int) -> dict[str, np.ndarray]:
        if self._cached is None or self._cached[0] != index:
            path = _truth_file(self.root, index)
            with np.load(path) as z:
                if "oracle_taste" not in z.files:
                    raise ValueError(
                        f"{path}: no oracle state (oracle_* arrays missing; the oracle needs argus-synth version"
                        f" >= {ORACLE_VERSION}): regenerate the dataset with argus data synth"
                    )
                st = {k: z[k] for k in z.files if k.startswith("oracle_")}
                for k in ("user", "taste", "taste_support", "drift_step", "length"):
                    st[k] = z[k]
            self._cached = (index, st)
        return self._cached[1]

    def state(self, users: np.ndarray, split: str) -> dict[str, np.ndarray]:
        """The oracle state of ``users`` (ids) before their ``split`` target, as :func:`next_item_probs` takes it."""
        if split not in SPLIT_ROW:
            raise ValueError(f"the oracle knows the loo splits val and test (got {split!r})")
        row = SPLIT_ROW[split]
        users = np.asarray(users, np.int64)
        if users.size and (users.min() < 0 or users.max() >= self.users):
            raise ValueError(f"user ids outside [0, {self.users})")
        shard = np.searchsorted(self.bounds, users, side="right") - 1
        out: dict[str, np.ndarray] = {}
        for i in np.unique(shard).tolist():
            sel = np.flatnonzero(shard == i)
            st = self._shard_state(i)
            local = users[sel] - self.bounds[i]
            part = {
                "taste": (st["oracle_taste"][local, row] if self.taste == "drifted" else st["taste"][local]),
                "support": st["taste_support"][local],
                "drift_step": st["drift_step"][local],
                "how": st["oracle_how"][local, row],
                "context": st["oracle_context"][local, row],
                "prev_item": st["oracle_prev_item"][local, row].astype(np.int64),
                "repeat_p": st["oracle_repeat_p"][local, row],
                "length": st["length"][local],
            }
            for k, v in part.items():
                if k not in out:
                    out[k] = np.empty((users.shape[0],) + v.shape[1:], v.dtype)
                out[k][sel] = v
        if not out:
            return {k: np.zeros(0) for k in (*STATE_KEYS, "length")}
        return out

    def probs(self, users: np.ndarray, split: str) -> np.ndarray:
        """(len(users), num_items) float64: each user's true distribution of their ``split`` target."""
        st = self.state(users, split)
        if st["length"].size and st["length"].min() < 3:
            bad = int(np.asarray(users)[np.argmin(st["length"])])
            raise ValueError(f"user {bad} has fewer than 3 interactions: no {split} target under loo")
        return next_item_probs(self.world, st)


def oracle_scores(
    data_dir: str | os.PathLike, split: str = "test", batch_users: int = 0, taste: str = "drifted"
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(users, probs)`` for every user with a ``split`` target, in id order, ``batch_users`` at a time.

    ``probs`` is (len(users), num_items) float64, rows summing to 1. ``batch_users=0`` keeps a batch
    at about 2**24 probabilities.
    """
    oracle = SynthOracle(data_dir, taste=taste)
    if split not in SPLIT_ROW:
        raise ValueError(f"the oracle knows the loo splits val and test (got {split!r})")
    batch_users = batch_users or max(1, min(4096, (1 << 24) // max(1, oracle.num_items)))
    for i in range(oracle.shards):
        lo = int(oracle.bounds[i])
        st = oracle._shard_state(i)
        users = lo + np.flatnonzero(st["length"] >= 3)
        for b in range(0, users.shape[0], batch_users):
            u = users[b : b + batch_users]
            yield u, oracle.probs(u, split)
