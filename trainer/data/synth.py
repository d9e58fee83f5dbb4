"""``argus data synth``: synthetic user histories with planted, checkable structure.

Not uniform noise: the generator plants structure a recommender can learn, and
writes the ground truth next to the shards so later checks can ask whether a
model learned more than popularity.

The world (global, from ``seed`` alone; recomputed cheaply in every worker):

- Items live in latent clusters ("genres") of varying size. Within a cluster,
  item popularity is Zipf-like (exponent :data:`ZIPF_EXPONENT`); clusters
  themselves have Zipf-like popularity. Item ids are a random permutation of
  (cluster, rank) positions.
- Every cluster has a weekly modulation: a log-multiplier per hour of the week
  (a weekend effect plus a daily cycle with its own phase).
- Items form "albums": with some probability (mostly on the album surface) the
  next item is the successor of the previous one, i.e. the next item of the
  same cluster in rank order. This is item-to-item sequential structure that
  popularity alone cannot predict.

A user (per shard, from ``(seed, shard index)``):

- has a heavy-tailed (lognormal) history length with mean about ``mean_len``,
  an activity window inside ``[T0, T0 + days*86400)`` (late joiners, churners),
  and sessions (bursts of events, normally >= 30 min apart) whose start
  hours follow a daily/weekly activity profile;
- has a sparse taste: :data:`TASTE_SUPPORT` clusters drawn by cluster
  popularity with Dirichlet(:data:`TASTE_ALPHA`) weights, drifting as a random
  walk in logit space from session to session (per-user step size);
- picks, for each fresh draw, a cluster from taste x weekly modulation (at the
  session's start hour); recommended events are partly popularity-driven
  (cluster from global popularity x modulation); within a session the next
  event often stays in the previous event's cluster or takes the successor item;
- reacts by affinity = log taste for the item's cluster + a fixed user-item
  noise term: the played ratio grows with affinity, a low played ratio is an
  explicit SKIP, LIKE/DISLIKE follow a listen as separate interactions (same
  item, ``played = PLAYED_NA``) with probabilities rising/falling with
  affinity, and are rarely undone (UNLIKE/UNDISLIKE).
- Each event has a surface (``context``: 1 feed/radio, 2 playlist, 3 search,
  4 album page), mostly the session's, and an ``organic`` flag that depends on
  the surface (about 40% organic overall).

Determinism: same arguments -> byte-identical shards and manifest, whatever
``workers`` is. Users are split into contiguous id ranges per shard; each
shard's RNG is seeded from ``(seed, shard index)`` only.

Memory is bounded by one batch of users (about :data:`BATCH_EVENTS` events,
or one user's history when that is longer), never a whole shard.

Ground truth goes to ``truth/items.npz`` (written by the parent) and
``truth/users-{index:06d}.npz`` (one per shard, written by its worker); see
:func:`load_truth`. Since generator version 2 the user truth also holds the
**oracle state** (``oracle_*`` arrays, ``[users, 2, ...]``): the generator's
state right before each user's second-to-last and last row (the ``loo``
validation and test targets): the drifted taste of the previous play's session,
that session's hour of the week and surface, the previous play's item and the
probability that the row repeats it as a LIKE/DISLIKE/UN* row.
:mod:`trainer.data.oracle` turns it into the true next-item distribution;
``trainer.evaluate.oracle_report`` ranks with it. Version 2 changed no history:
the shards are byte-identical to version 1's.
"""

from __future__ import annotations

import io
import math
import multiprocessing as mp
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from trainer.data.manifest import Manifest
from trainer.data.outdir import prepare_dataset_out
from trainer.data.schema import DAY, FIELDS, HOURS_PER_WEEK, IMPRESSION_FIELDS, PLAYED_NA, SHOWN_FIELDS, EventType
from trainer.data.writer import Holdout, ShardResult, ShardSetWriter, finalize

GENERATOR = "argus-synth"
GENERATOR_VERSION = 2  # 2: truth/users-*.npz hold the oracle state (histories unchanged since 1)

T0 = 1_704_067_200  # 2024-01-01T00:00:00Z, a Monday: hour of week = (t - T0) // 3600 % 168

# World
ZIPF_EXPONENT = 1.1  # item popularity within a cluster (rank r has weight ~ (r+1)^-a)
CLUSTER_POP_EXPONENT = 0.8  # popularity of clusters
MAX_AUTO_CLUSTERS = 2048
MAX_CLUSTERS = 65_536
WEEKEND_EFFECT_SD = 0.6  # per-cluster log-multiplier on Saturday/Sunday
DAILY_EFFECT_SD = 0.6  # per-cluster amplitude of the daily cycle (log scale)

# Users
LENGTH_SIGMA = 1.1  # lognormal sigma of history lengths
TASTE_SUPPORT = 8  # taste slots per user: clusters drawn by popularity; a repeat adds to the first slot
TASTE_ALPHA = 0.5  # Dirichlet concentration over the support
DRIFT_STEP = 0.08  # median per-session random-walk step of taste logits
SESSION_MEAN = 12.0  # mean events per session
SESSION_GAP = 1800  # seconds between sessions, at least
EARLY_USERS = 0.6  # fraction of users active from the start of the window
CHURN = 0.25  # fraction of users who stop before the end of the window

# Events
CONTEXTS = np.array([1, 2, 3, 4], np.int32)  # feed/radio, playlist, search, album page
CONTEXT_P = np.array([0.50, 0.25, 0.10, 0.15])  # session surface
CONTEXT_KEEP = 0.85  # an event is on its session's surface with this probability
ORGANIC_P = np.array([0.0, 0.08, 0.55, 0.95, 0.85])  # by context id
SUCCESSOR_P = np.array([0.0, 0.15, 0.35, 0.0, 0.75])  # next item = successor of previous, by context id
STAY_P = 0.4  # otherwise, stay in the previous event's cluster
POPULAR_P = 0.5  # recommended fresh draws that come from global popularity instead of taste
USER_ITEM_NOISE = 0.7  # user-item affinity noise: uniform in [-x, x]
SKIP_BELOW = 30  # played ratio (percent) under which a play is a SKIP
UNDO_P = 0.04  # a like/dislike is undone right away
# Extra LIKE/DISLIKE/UN* rows per base event are about this fraction; base lengths are scaled down so
# the mean history length including them stays close to mean_len.
EXTRA_RATE = 0.095
BATCH_EVENTS = 1 << 17

TRUTH_DIR = "truth"

_TAG_WORLD = 0x5752_4C44
_TAG_SHARD = 0x5348_5244
_TAG_NOISE = 0x4E4F_4953
_TAG_IMPRESSIONS = 0x494D_5052
_TAG_FEATURES = 0x4645_4154
_TAG_NEW = 0x4E45_5749
_TAG_FAV = 0x4641_5653
FAVOURITES = 32  # lifelong favourite items per user (--favourites; the default of --favourite-items)

# Item metadata (--item-features): the item's cluster centroid, plus noise, plus its within-cluster popularity
# along one fixed direction, so metadata alone place a new item near its cluster and hint at its popularity.
FEATURE_NOISE = 0.6
FEATURE_POP = 0.5

# Impressions (fine-tuning data)
IMPRESSION_TASTE_P = 0.5  # shown items drawn from the user's current taste; the rest from global popularity


# ---- parameters ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthConfig:
    """Every parameter that determines the output (``workers`` does not)."""

    users: int
    items: int
    mean_len: float
    shards: int
    seed: int
    holdout: str
    max_len: int
    clusters: int  # resolved (never 0)
    days: int
    val_days: float
    test_days: float
    gap_seconds: int
    impressions: int = 0  # impressions per active user in the last imp_days (0 = no impression splits)
    slate: int = 10  # items shown per impression
    imp_days: float = 7.0
    imp_test_days: float = 1.0  # the last imp_test_days of impressions form the impressions_test split
    item_features: int = 0  # width of the item metadata vectors written beside the shards (0 = none)
    new_items: float = 0.0  # fraction of items held back until the temporal test window ("new" at the cut)
    favourites: float = 0.0  # share of fresh draws that replay one of the user's lifelong favourite items
    favourite_items: int = FAVOURITES  # favourite items per user (with favourites > 0)
    favourite_skew: float = 0.0  # the j-th favourite (from 1) is replayed with weight j^-skew (0 = all alike)
    favourite_clusters: int = 0  # favourites are this many clusters per user instead of items (0 = items)

    @property
    def release_time(self) -> int:
        """When held-back items may first appear: the temporal holdout's test start."""
        return self.t_end - int(round(self.test_days * DAY))

    @property
    def imp_test_start(self) -> int | None:
        return self.t_end - int(round(self.imp_test_days * DAY)) if self.impressions else None

    @property
    def t_end(self) -> int:
        return T0 + self.days * DAY

    def holdout_spec(self) -> Holdout:
        if self.holdout == "temporal":
            test_start = self.t_end - int(round(self.test_days * DAY))
            val_start = test_start - int(round(self.val_days * DAY))
            return Holdout("temporal", val_start=val_start, test_start=test_start, gap=self.gap_seconds)
        return Holdout(self.holdout)

    def user_range(self, index: int) -> tuple[int, int]:
        return index * self.users // self.shards, (index + 1) * self.users // self.shards

    @property
    def batch_users(self) -> int:
        return int(max(1, min(4096, BATCH_EVENTS // max(1.0, self.mean_len))))


def auto_clusters(items: int) -> int:
    return int(min(items, MAX_AUTO_CLUSTERS, max(4, round(math.sqrt(items) / 4))))


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer (got {value!r})")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi if hi is not None else 'inf'}] (got {value})")


def _check_float(name: str, value: Any, lo: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not math.isfinite(value)
        or value < lo
    ):
        raise ValueError(f"{name} must be a finite number >= {lo} (got {value!r})")


def make_config(
    *,
    users: int,
    items: int,
    mean_len: float = 200.0,
    shards: int = 8,
    seed: int = 0,
    holdout: str = "loo",
    max_len: int = 8192,
    clusters: int = 0,
    days: int = 120,
    val_days: float = 7.0,
    test_days: float = 7.0,
    gap_seconds: int = 0,
    impressions: int = 0,
    slate: int = 10,
    imp_days: float = 7.0,
    imp_test_days: float = 1.0,
    item_features: int = 0,
    new_items: float = 0.0,
    favourites: float = 0.0,
    favourite_items: int | None = None,
    favourite_skew: float = 0.0,
    favourite_clusters: int = 0,
) -> SynthConfig:
    """Validate arguments (one ValueError line naming the bad one) and resolve defaults."""
    _check_int("users", users, 1)
    _check_int("items", items, 1, 2**62)
    _check_float("mean_len", mean_len, 1.0)
    _check_int("shards", shards, 1)
    if shards > users:
        raise ValueError(f"shards ({shards}) must be <= users ({users}): every shard needs at least one user")
    _check_int("seed", seed, 0, 2**63 - 1)
    if holdout not in ("none", "loo", "temporal"):
        raise ValueError(f"holdout must be none, loo or temporal (got {holdout!r})")
    _check_int("max_len", max_len, 1)
    _check_int("clusters", clusters, 0, min(items, MAX_CLUSTERS))
    _check_int("days", days, 1, 100_000)
    _check_float("val_days", val_days, 0.0)
    _check_float("test_days", test_days, 0.0)
    _check_int("gap_seconds", gap_seconds, 0)
    _check_int("impressions", impressions, 0, 10_000)
    _check_int("slate", slate, 2, 1000)
    _check_float("imp_days", imp_days, 0.0)
    _check_float("imp_test_days", imp_test_days, 0.0)
    _check_int("item_features", item_features, 0, 4096)
    _check_float("new_items", new_items, 0.0)
    if new_items >= 0.5:
        raise ValueError(f"new_items must be < 0.5 (got {new_items:g})")
    _check_float("favourites", favourites, 0.0)
    if favourites >= 1.0:
        raise ValueError(f"favourites must be < 1 (got {favourites:g})")
    if favourite_items is not None:
        _check_int("favourite_items", favourite_items, 1, 4096)
    _check_float("favourite_skew", favourite_skew, 0.0)
    resolved_clusters = int(clusters) or auto_clusters(int(items))
    # at most half the clusters: a favourite cluster must stand out from the rest
    _check_int("favourite_clusters", favourite_clusters, 0, resolved_clusters // 2)
    uses = (
        ("favourite_items", favourite_items is not None),
        ("favourite_skew", favourite_skew > 0),
        ("favourite_clusters", favourite_clusters > 0),
    )
    for key, used in uses:
        if used and not favourites:
            raise ValueError(f"{key} needs favourites > 0 (the share of fresh draws that replay the favourites)")
    if favourite_clusters and favourite_items is not None:
        raise ValueError("favourite_items and favourite_clusters: favourites are items or clusters, set one")
    if new_items and holdout != "temporal":
        raise ValueError("new_items needs holdout temporal: held-back items first appear in the test window")
    if impressions and not 0 < imp_test_days < imp_days <= days:
        raise ValueError(
            f"impressions need 0 < imp_test_days ({imp_test_days:g}) < imp_days ({imp_days:g}) <= days ({days})"
        )
    if holdout == "temporal":
        if test_days <= 0:
            raise ValueError(f"test_days must be > 0 for a temporal holdout (got {test_days})")
        if val_days + test_days + gap_seconds / DAY >= days:
            raise ValueError(
                f"val_days + test_days + gap_seconds/86400 ({val_days + test_days + gap_seconds / DAY:g})"
                f" must be < days ({days}) for a temporal holdout"
            )
    return SynthConfig(
        users=int(users),
        items=int(items),
        mean_len=float(mean_len),
        shards=int(shards),
        seed=int(seed),
        holdout=holdout,
        max_len=int(max_len),
        clusters=resolved_clusters,
        days=int(days),
        val_days=float(val_days),
        test_days=float(test_days),
        gap_seconds=int(gap_seconds),
        impressions=int(impressions),
        slate=int(slate),
        imp_days=float(imp_days),
        imp_test_days=float(imp_test_days),
        item_features=int(item_features),
        new_items=float(new_items),
        favourites=float(favourites),
        favourite_items=FAVOURITES if favourite_items is None else int(favourite_items),
        favourite_skew=float(favourite_skew),
        favourite_clusters=int(favourite_clusters),
    )


def _unset(cfg: SynthConfig, key: str, value: object) -> bool:
    """An option the dataset does not use, kept out of the manifest's source."""
    if key == "favourite_items":
        return not cfg.favourites or bool(cfg.favourite_clusters)
    if key in ("favourite_skew", "favourite_clusters"):
        return not value
    return not value and key in ("item_features", "new_items", "favourites")


# ---- the world -----------------------------------------------------------------------------------------------
def _cdf(p: np.ndarray) -> np.ndarray:
    """Row-wise cumulative distribution with the last entry exactly 1."""
    c = np.cumsum(p, axis=-1)
    c /= c[..., -1:]
    c[..., -1] = 1.0
    return c


def _flat_cdf(p: np.ndarray) -> np.ndarray:
    """Rows r of ``p`` as one increasing array: r + cdf_r. Sample row r with searchsorted(flat, r + U, 'right')."""
    rows = p.shape[0]
    return (_cdf(p) + np.arange(rows, dtype=np.float64)[:, None]).ravel()


def _id_dtype(n: int) -> type:
    return np.int32 if n < 2**31 else np.int64


class World:
    """Global item structure, from ``seed`` alone (deterministic, cheap: O(items) once per process)."""

    def __init__(self, items: int, clusters: int, seed: int) -> None:
        rng = np.random.default_rng([seed, _TAG_WORLD])
        C = self.num_clusters = clusters
        self.num_items = items
        # cluster sizes: lognormal weights, at least one item each
        w = rng.lognormal(0.0, 0.6, C)
        self.size = (1 + rng.multinomial(items - C, w / w.sum())).astype(np.int64)
        self.ptr = np.concatenate([[0], np.cumsum(self.size)]).astype(np.int64)
        # Zipf within cluster, sampled by inverting the continuous CDF of x^-a on [1, n+1) and flooring:
        # P(rank r) = ((r+2)^(1-a) - (r+1)^(1-a)) / ((n+1)^(1-a) - 1), close to (r+1)^-a / H.
        a = ZIPF_EXPONENT
        self._inv = 1.0 / (1.0 - a)
        self._g = (self.size + 1.0) ** (1.0 - a) - 1.0
        # cluster popularity, Zipf-like over a random order
        self.cluster_pop = (rng.permutation(C) + 1.0) ** -CLUSTER_POP_EXPONENT
        self.cluster_pop /= self.cluster_pop.sum()
        self.cluster_cdf = _cdf(self.cluster_pop)
        # weekly modulation (log-multiplier), centred per cluster over the week
        weekend = rng.normal(0.0, WEEKEND_EFFECT_SD, C)
        daily = np.abs(rng.normal(0.0, DAILY_EFFECT_SD, C))
        phase = rng.uniform(0.0, 24.0, C)
        how = np.arange(HOURS_PER_WEEK)
        dow, hod = how // 24, how % 24
        lm = weekend[:, None] * (dow >= 5)[None, :] + daily[:, None] * np.cos(
            2 * np.pi * (hod[None, :] - phase[:, None]) / 24.0
        )
        self.logmod = (lm - lm.mean(axis=1, keepdims=True)).astype(np.float64)  # [C, 168]
        # popularity-driven cluster draws per hour of week: cluster_pop x modulation
        self.expmod_flat = np.exp(self.logmod).ravel()  # [C * 168]
        self.pop_flat = _flat_cdf(self.cluster_pop[None, :] * np.exp(self.logmod.T))  # 168 rows of C
        # when sessions start: hour-of-day profile per day of week (evenings, lunch, commute; later on weekends)
        h = np.arange(24.0)
        wd = (
            0.25
            + np.exp(-(((h - 20.5) / 2.5) ** 2))
            + 0.6 * np.exp(-(((h - 8.0) / 1.2) ** 2))
            + 0.4 * np.exp(-(((h - 13.0) / 1.5) ** 2))
            + 0.05 * (h >= 7)
        )
        we = 0.2 + 1.1 * np.exp(-(((h - 21.0) / 3.0) ** 2)) + 0.8 * np.exp(-(((h - 14.0) / 3.0) ** 2)) + 0.05 * (h >= 9)
        self.activity = np.stack([wd] * 5 + [we] * 2)  # [7, 24]
        self.activity_flat = _flat_cdf(self.activity)
        # item ids: position (cluster-major, rank order) -> item id
        self.perm = rng.permutation(items).astype(_id_dtype(items))
        self.noise_salt = np.uint64(_mix64_scalar((seed ^ _TAG_NOISE) & (2**64 - 1)))

    # -- sampling ----------------------------------------------------------------------------------------------
    def zipf_rank(self, cluster: np.ndarray, u: np.ndarray) -> np.ndarray:
        g = self._g[cluster]
        r = np.floor((1.0 + u * g) ** self._inv).astype(np.int64) - 1
        return np.clip(r, 0, self.size[cluster] - 1)

    def item_id(self, cluster: np.ndarray, rank: np.ndarray) -> np.ndarray:
        return self.perm[self.ptr[cluster] + rank]

    # -- truth -------------------------------------------------------------------------------------------------
    def rank_pmf(self, cluster: np.ndarray, rank: np.ndarray) -> np.ndarray:
        b = 1.0 - ZIPF_EXPONENT
        return ((rank + 2.0) ** b - (rank + 1.0) ** b) / self._g[cluster]

    def truth_arrays(self) -> dict[str, np.ndarray]:
        pos = np.arange(self.num_items, dtype=np.int64)
        cl = np.repeat(np.arange(self.num_clusters, dtype=np.int64), self.size)
        rank = pos - self.ptr[cl]
        item_cluster = np.empty(self.num_items, np.uint16 if self.num_clusters <= 2**16 else np.int32)
        item_cluster[self.perm] = cl
        item_rank = np.empty(self.num_items, _id_dtype(self.num_items))
        item_rank[self.perm] = rank
        within = self.rank_pmf(cl, rank)
        item_pop = np.empty(self.num_items, np.float32)
        item_pop[self.perm] = within * self.cluster_pop[cl]
        succ = np.empty(self.num_items, self.perm.dtype)
        succ[self.perm] = self.perm[self.ptr[cl] + (rank + 1) % self.size[cl]]
        return {
            "item_cluster": item_cluster,  # item -> cluster
            "item_rank": item_rank,  # popularity rank inside its cluster (0 = most popular)
            "item_pop": item_pop,  # prior popularity: cluster_pop[c] * P(rank | c)
            "item_within_pop": _scatter(self.perm, within.astype(np.float32)),  # P(rank | cluster)
            "item_successor": succ,  # the "album" next item
            "cluster_size": self.size.astype(np.int64),
            "cluster_pop": self.cluster_pop.astype(np.float32),
            "cluster_logmod": self.logmod.astype(np.float32),  # [C, 168] log-multiplier by hour of week
            "activity": self.activity.astype(np.float32),  # [7, 24] session-start weights
            "zipf_exponent": np.float32(ZIPF_EXPONENT),
            "t0": np.int64(T0),
        }


def held_back(world: World, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(is_new, stand_in) per item id: ``fraction`` of the items, drawn at random but never a cluster's most
    popular, are new; before their release an event on a new item goes to ``stand_in``, the nearest more popular
    item of the same cluster that is not new. Cached on ``world``."""
    key = (fraction, seed)
    if getattr(world, "_held_back", (None,))[0] != key:
        rng = np.random.default_rng([seed, _TAG_NEW])
        new_pos = rng.random(world.num_items) < fraction  # by position (cluster-major, rank order)
        new_pos[world.ptr[:-1]] = False  # rank 0 stays: every cluster keeps a stand-in
        pos = np.arange(world.num_items)
        stand_pos = np.maximum.accumulate(np.where(new_pos, 0, pos))  # the last warm position at or before
        is_new = _scatter(world.perm, new_pos)
        stand_in = np.empty_like(world.perm)
        stand_in[world.perm] = world.perm[stand_pos]
        world._held_back = (key, is_new, stand_in)  # type: ignore[attr-defined]
    return world._held_back[1], world._held_back[2]  # type: ignore[attr-defined]


def item_feature_vectors(world: World, dim: int, seed: int) -> np.ndarray:
    """(items, dim) float32 metadata: cluster centroid + FEATURE_NOISE noise + FEATURE_POP x the item's standardised
    log within-cluster popularity along one fixed direction (a pure function of the world and ``seed``)."""
    rng = np.random.default_rng([seed, _TAG_FEATURES])
    centroid = rng.normal(0.0, 1.0, (world.num_clusters, dim))
    direction = rng.normal(0.0, 1.0, dim)
    direction /= np.linalg.norm(direction)
    pos = np.arange(world.num_items, dtype=np.int64)
    cl = np.repeat(np.arange(world.num_clusters, dtype=np.int64), world.size)
    logp = np.log(world.rank_pmf(cl, pos - world.ptr[cl]))
    z = (logp - logp.mean()) / max(float(logp.std()), 1e-9)
    noise = rng.normal(0.0, 1.0, (world.num_items, dim))
    by_pos = centroid[cl] + FEATURE_NOISE * noise + FEATURE_POP * z[:, None] * direction
    return _scatter(world.perm, by_pos.astype(np.float32))


def _scatter(perm: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.empty_like(values)
    out[perm] = values
    return out


# ---- hashing (user-item noise) -------------------------------------------------------------------------------
_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix64_scalar(x: int) -> int:
    m = 2**64 - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def _mix64(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def user_item_noise(seed: int, user: np.ndarray, item: np.ndarray) -> np.ndarray:
    """The fixed user-item affinity noise term (uniform in [-USER_ITEM_NOISE, USER_ITEM_NOISE])."""
    salt = np.uint64(_mix64_scalar((seed ^ _TAG_NOISE) & (2**64 - 1)))
    return _noise(salt, np.asarray(user), np.asarray(item))


def _noise(salt: np.uint64, user: np.ndarray, item: np.ndarray) -> np.ndarray:
    x = (user.astype(np.uint64) * _GOLD) ^ (item.astype(np.uint64) + salt)
    u = (_mix64(x) >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)
    return (2.0 * u - 1.0) * USER_ITEM_NOISE


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _softmax_rows(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


_CONTEXT_CDF = _cdf(CONTEXT_P)


# ---- one batch of users ---------------------------------------------------------------------------------------
def _favourites(
    cfg: SynthConfig, u0: int, B: int, pool: int, user_of: np.ndarray, fresh: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``--favourites P``: every user has ``--favourite-items`` (:data:`FAVOURITES`) favourite items, or with
    ``--favourite-clusters F`` F distinct favourite clusters, drawn uniformly from the ``pool`` (the catalog, or the
    clusters: so neither popularity nor the user's taste predicts them), and a fresh draw replays one of them with
    probability P: the j-th (from 1) with weight j^-``favourite_skew`` (0: all alike; with a skew a user replays a
    few favourites often, which teaches a model that users replay their own, and the rest seldom, beyond a short
    window). A short recent window shows only some of them; the whole history shows them all. Drawn from a stream of
    their own.
    Returns (is a replay [N], the favourite replayed [replays], each user's favourites [B, F])."""
    count = cfg.favourite_clusters or cfg.favourite_items
    rng = np.random.default_rng([cfg.seed, _TAG_FAV, u0])
    if cfg.favourite_clusters:  # distinct clusters (at most half of them: make_config)
        picks = np.stack([rng.choice(pool, count, replace=False) for _ in range(max(B, 1))])[:B]
    else:  # items drawn with replacement, as in the first datasets made with --favourites (the same bytes)
        picks = rng.integers(0, pool, size=(B, count))
    fav = fresh & (rng.random(fresh.shape[0]) < cfg.favourites)
    idx = np.flatnonzero(fav)
    if cfg.favourite_skew:
        w = np.arange(1, count + 1, dtype=np.float64) ** -cfg.favourite_skew
        j = np.searchsorted(np.cumsum(w) / w.sum(), rng.random(idx.shape[0]), side="right")
        j = j.clip(0, count - 1)
    else:
        j = rng.integers(0, count, idx.shape[0])
    return fav, picks[user_of[idx], j], picks


def _favourite_key(cfg: SynthConfig) -> str:
    """The per-user truth key of the favourites: items (``favourites``) or clusters (``favourite_clusters``)."""
    return "favourite_clusters" if cfg.favourite_clusters else "favourites"


@dataclass
class _Batch:
    users: np.ndarray  # [B] user ids
    ptr: np.ndarray  # [B+1] row offsets into cols
    cols: dict[str, np.ndarray]  # FIELDS columns, storage dtypes
    truth: dict[str, np.ndarray]  # per-user truth rows
    imps: dict[str, np.ndarray] | None = None  # impression columns + "user_ptr" [B+1] into imp_time
    probe: dict[str, np.ndarray] | None = None  # oracle state before every row (``probe=True``; tests)


def _gen_batch(
    world: World, cfg: SynthConfig, rng: np.random.Generator, u0: int, u1: int, probe: bool = False
) -> _Batch:
    B = u1 - u0
    C = world.num_clusters
    K = TASTE_SUPPORT
    W = cfg.days * DAY
    t_end = cfg.t_end

    # -- users: length, activity window, taste ------------------------------------------------------------------
    base_mean = max(1.0, cfg.mean_len / (1.0 + EXTRA_RATE))
    mu = math.log(base_mean) - 0.5 * LENGTH_SIGMA**2
    n = np.maximum(1, np.rint(rng.lognormal(mu, LENGTH_SIGMA, B))).astype(np.int64)
    late = rng.random(B) >= EARLY_USERS
    act_start = T0 + np.where(late, np.floor(rng.random(B) * 0.7 * W), 0).astype(np.int64)
    churn = rng.random(B) < CHURN
    act_end = np.where(churn, act_start + np.floor((t_end - act_start) * (0.2 + 0.8 * rng.random(B))), t_end)
    act_end = np.clip(act_end.astype(np.int64), np.minimum(act_start + 3600, t_end), t_end)
    # taste: K clusters drawn by popularity with replacement; a repeated cluster's weight goes to its first slot
    support = np.minimum(np.searchsorted(world.cluster_cdf, rng.random((B, K)), side="right"), C - 1)
    taste = rng.gamma(TASTE_ALPHA, size=(B, K)) + 1e-12
    order = np.argsort(support, axis=1, kind="stable")
    s_sorted = np.take_along_axis(support, order, axis=1)
    dup_sorted = np.zeros((B, K), bool)
    dup_sorted[:, 1:] = s_sorted[:, 1:] == s_sorted[:, :-1]
    run_start = np.maximum.accumulate(np.where(dup_sorted, 0, np.arange(K)[None, :]), axis=1)
    canon = np.empty((B, K), np.int64)  # slot -> first slot holding the same cluster
    np.put_along_axis(canon, order, np.take_along_axis(order, run_start, axis=1), axis=1)
    rows = np.repeat(np.arange(B), K)
    merged = np.zeros(B * K)
    np.add.at(merged, rows * K + canon.ravel(), taste.ravel())
    taste = merged.reshape(B, K)
    taste /= taste.sum(axis=1, keepdims=True)
    log_taste = np.log(np.maximum(taste, 1e-12))
    drift = DRIFT_STEP * np.exp(rng.normal(0.0, 0.5, B))

    # -- sessions -----------------------------------------------------------------------------------------------
    N = int(n.sum())
    uptr = np.concatenate([[0], np.cumsum(n)])
    user_of = np.repeat(np.arange(B), n)
    new_sess = rng.random(N) < 1.0 / SESSION_MEAN
    new_sess[uptr[:-1]] = True
    sess_first = np.flatnonzero(new_sess)
    S = sess_first.shape[0]
    sess_id = np.cumsum(new_sess) - 1
    sess_user = user_of[sess_first]
    u_first_sess = np.searchsorted(sess_user, np.arange(B), side="left")  # first session of each user

    # in-session gaps (seconds from the previous event), 0 at session starts; heavy users get shorter gaps
    gap = 40.0 + rng.exponential(140.0, N)
    gap[sess_first] = 0.0
    dur = np.add.reduceat(gap, sess_first)
    n_sess = np.diff(np.concatenate([u_first_sess, [S]]))
    need = np.bincount(sess_user, weights=dur, minlength=B) + n_sess * SESSION_GAP
    avail = 0.6 * (act_end - act_start)
    scale = np.minimum(1.0, avail / np.maximum(need, 1.0))
    gap = np.floor(gap * scale[user_of]).astype(np.int64)
    sess_gap = np.floor(SESSION_GAP * scale[sess_user]).astype(np.int64)

    # session start times: a uniform day in the activity window, hour from the activity profile
    span = (act_end - act_start)[sess_user]
    t = act_start[sess_user] + np.floor(rng.random(S) * span).astype(np.int64)
    day = (t - T0) // DAY
    dow = day % 7
    slot = np.searchsorted(world.activity_flat, dow + rng.random(S), side="right")
    hod = np.clip(slot - dow * 24, 0, 23)
    start = T0 + day * DAY + hod * 3600 + np.floor(rng.random(S) * 3600).astype(np.int64)
    start = np.clip(start, act_start[sess_user], act_end[sess_user] - 1)
    big = 4 * (W + int(need.max()) + 2 * DAY)
    start = np.sort(start + sess_user * big) - sess_user * big  # sorted within each user
    # push sessions apart so they never overlap: s'_i = D_i + cummax(s_i - D_i), D = exclusive cumsum of steps
    step = np.add.reduceat(gap, sess_first) + sess_gap
    cs = np.cumsum(step) - step
    D = cs - cs[u_first_sess][sess_user]
    key = (start - D - T0 + big // 2) + sess_user * big
    start = np.maximum.accumulate(key) - sess_user * big - big // 2 + T0 + D
    how = ((start - T0) // 3600) % HOURS_PER_WEEK

    # taste per session, as [K, S]: drifting logits; selection weights add the weekly modulation
    walk = rng.normal(0.0, 1.0, (K, S)) * drift[sess_user][None, :]
    walk[:, u_first_sess] = 0.0
    np.cumsum(walk, axis=1, out=walk)
    walk -= walk[:, u_first_sess][:, sess_user]
    logit = log_taste.T[:, sess_user] + walk
    e = np.exp(logit - logit.max(axis=0, keepdims=True))
    p_taste = e / e.sum(axis=0, keepdims=True)
    sup_s = support.T[:, sess_user]  # [K, S]
    sel_cum = np.cumsum(e * world.expmod_flat[sup_s * HOURS_PER_WEEK + how[None, :]], axis=0)

    # -- events: surface, organic, cluster, item ------------------------------------------------------------------
    sess_ctx = CONTEXTS[np.searchsorted(_CONTEXT_CDF, rng.random(S), side="right").clip(0, 3)]
    ctx = sess_ctx[sess_id]
    other = np.flatnonzero(rng.random(N) >= CONTEXT_KEEP)
    ctx[other] = CONTEXTS[np.searchsorted(_CONTEXT_CDF, rng.random(other.shape[0]), side="right").clip(0, 3)]
    organic = rng.random(N) < ORGANIC_P[ctx]
    cont = ~new_sess
    succ = cont & (rng.random(N) < SUCCESSOR_P[ctx])
    stay = cont & ~succ & (rng.random(N) < STAY_P)
    fresh_c = ~(succ | stay)
    popular = fresh_c & ~organic & (rng.random(N) < POPULAR_P)
    by_taste = fresh_c & ~popular

    ar = np.arange(N)
    cluster = np.zeros(N, np.int64)
    slot_k = np.full(N, -1, np.int64)  # support slot of the event's cluster, -1 = not in the taste support
    idx = np.flatnonzero(by_taste)
    sid = sess_id[idx]
    u = rng.random(idx.shape[0]) * sel_cum[K - 1][sid]
    k = np.zeros(idx.shape[0], np.int64)
    for j in range(K - 1):  # row loops over [K, S]: much faster than [n, K] temporaries
        k += u >= sel_cum[j][sid]
    cluster[idx] = support[user_of[idx], k]
    slot_k[idx] = canon[user_of[idx], k]
    idx = np.flatnonzero(popular)
    h = how[sess_id[idx]]
    pos = np.searchsorted(world.pop_flat, h + rng.random(idx.shape[0]), side="right")
    cluster[idx] = np.clip(pos - h * C, 0, C - 1)
    sid = sess_id[idx]
    for j in range(K - 1, -1, -1):  # descending: the first slot of a repeated cluster wins
        hit = sup_s[j][sid] == cluster[idx]
        slot_k[idx[hit]] = j
    fav, fav_picks = np.zeros(N, bool), None
    if cfg.favourites and cfg.favourite_clusters:  # a replay opens a visit to a favourite cluster: stays follow it
        fav, cluster_fav, fav_picks = _favourites(cfg, u0, B, C, user_of, fresh_c)
        cluster[fav], slot_k[fav] = cluster_fav, -1
    src = np.maximum.accumulate(np.where(fresh_c, ar, 0))
    cluster = cluster[src]
    slot_k = slot_k[src]
    fav = fav[src]

    fresh_i = ~succ
    idx = np.flatnonzero(fresh_i)
    rank = np.zeros(N, np.int64)
    rank[idx] = world.zipf_rank(cluster[idx], rng.random(idx.shape[0]))
    base = np.maximum.accumulate(np.where(fresh_i, ar, 0))
    rank = (rank[base] + (ar - base)) % world.size[cluster]
    item = world.item_id(cluster, rank)
    if cfg.favourites and not cfg.favourite_clusters:  # lifelong favourites: signal that only older history holds
        fav, fav_item, fav_picks = _favourites(cfg, u0, B, cfg.items, user_of, fresh_c)
        item = item.copy()
        item[fav] = fav_item
    if cfg.new_items:  # held-back items: sessions that start before the release play a stand-in instead
        is_new, stand_in = held_back(world, cfg.new_items, cfg.seed)
        early = start[sess_id] < cfg.release_time
        item = np.where(early & is_new[item], stand_in[item], item)

    # -- feedback -----------------------------------------------------------------------------------------------
    p_c = np.where(slot_k >= 0, p_taste.ravel()[np.maximum(slot_k, 0) * S + sess_id], 0.0)
    p_c = np.where(fav, 1.0, p_c)  # a favourite is liked as much as the user's whole taste
    aff = np.log(p_c * K + 0.05) + _noise(world.noise_salt, (u0 + user_of).astype(np.int64), item)
    q = _sigmoid(1.2 * aff + 0.4 + 0.9 * rng.normal(0.0, 1.0, N))
    played = np.rint(100.0 * q).astype(np.int64)
    skip = played < SKIP_BELOW
    like = ~skip & (rng.random(N) < _sigmoid(1.5 * aff - 4.5))
    dislike = ~like & (rng.random(N) < _sigmoid(-1.0 * aff - 5.5 + 1.0 * skip))
    undo = (like | dislike) & (rng.random(N) < UNDO_P)

    # final timestamps: the play after a skip comes sooner
    after_skip = np.flatnonzero(skip[:-1] & cont[1:]) + 1
    gap[after_skip] = gap[after_skip] * np.maximum(played[after_skip - 1], 5) // 100
    cg = np.cumsum(gap)
    ts = start[sess_id] + (cg - cg[sess_first][sess_id])
    ts = np.minimum(ts, act_end[user_of] - 1)

    # -- expand LIKE/DISLIKE (+ UNLIKE/UNDISLIKE) rows right after their play ------------------------------------------
    reps = 1 + (like | dislike) + undo
    src = np.repeat(ar, reps)
    first_out = np.cumsum(reps) - reps
    ex = np.flatnonzero(reps > 1)  # base events with attached rows
    ex1 = first_out[ex] + 1  # output rows of the like/dislike
    ex2 = first_out[ex[undo[ex]]] + 2  # output rows of the undo
    nxt = np.empty(N, np.int64)  # attached rows stay before the user's next play
    nxt[:-1] = ts[1:]
    nxt[uptr[1:] - 1] = act_end - 1
    event = np.where(skip, np.uint8(EventType.SKIP), np.uint8(EventType.LISTEN))[src]
    event[ex1] = np.where(like[ex], np.uint8(EventType.LIKE), np.uint8(EventType.DISLIKE))
    event[ex2] = np.where(like[src[ex2]], np.uint8(EventType.UNLIKE), np.uint8(EventType.UNDISLIKE))
    ts_out = ts[src]
    d1 = 1 + rng.integers(0, 30, ex.shape[0])
    ts_out[ex1] = np.minimum(ts_out[ex1] + d1, nxt[ex])
    ts_out[ex2] = np.minimum(ts_out[ex2] + d1[undo[ex]] + 1 + rng.integers(0, 60, ex2.shape[0]), nxt[src[ex2]])
    played_out = played.astype(FIELDS["played"])[src]
    played_out[ex1] = PLAYED_NA
    played_out[ex2] = PLAYED_NA
    cols = {
        "item": item.astype(FIELDS["item"])[src],
        "timestamp": ts_out.astype(FIELDS["timestamp"], copy=False),
        "event": event.astype(FIELDS["event"], copy=False),
        "played": played_out,
        "organic": organic.astype(FIELDS["organic"])[src],
        "context": ctx.astype(FIELDS["context"])[src],
    }
    out_n = np.add.reduceat(reps, uptr[:-1])
    imps = None
    if cfg.impressions:
        imps = _gen_impressions(world, cfg, u0, act_start, act_end, sess_user, start, u_first_sess, p_taste, support)

    # -- the oracle's state before each user's last two rows (the loo validation and test targets) ---------------------
    def oracle_state(rows: np.ndarray) -> dict[str, np.ndarray]:
        """What the distribution of output row ``rows`` depends on, fixed before it (each row has a predecessor
        of the same user). Computed from the draws above: no extra random numbers, the stream is unchanged."""
        j = src[rows - 1]  # the play the previous row belongs to
        prev_event = event[rows - 1]
        p_like = np.where(skip[j], 0.0, _sigmoid(1.5 * aff[j] - 4.5))
        p_dislike = _sigmoid(-1.0 * aff[j] - 5.5 + 1.0 * skip[j])
        repeat = np.where(
            played_out[rows - 1] != PLAYED_NA,
            p_like + (1.0 - p_like) * p_dislike,  # a LIKE/DISLIKE row follows the play
            np.where((prev_event == EventType.LIKE) | (prev_event == EventType.DISLIKE), UNDO_P, 0.0),
        )
        s = sess_id[j]
        return {
            "taste": p_taste[:, s].T,
            "how": how[s],
            "context": sess_ctx[s],
            "prev_item": item[j],
            "repeat_p": repeat,
        }

    out_ptr = np.concatenate([[0], np.cumsum(out_n)])
    held = out_ptr[1:, None] - np.array([2, 1])[None, :]  # [B, 2]: second-to-last, last row
    has = held > out_ptr[:-1, None]  # the row exists and has a predecessor
    st = {k: v.reshape((B, 2) + v.shape[1:]) for k, v in oracle_state(np.where(has, held, 1).ravel()).items()}
    ostate = {  # [B, 2, ...]: (second-to-last, last row); -1 / 0 where the user has no such row
        "oracle_taste": np.where(has[:, :, None], st["taste"], 0.0).astype(np.float32),  # [B, 2, K] drifted taste
        "oracle_how": np.where(has, st["how"], -1).astype(np.int16),  # hour of week of the previous play's session
        "oracle_context": np.where(has, st["context"], -1).astype(np.int8),  # that session's surface
        "oracle_prev_item": np.where(has, st["prev_item"], -1).astype(world.perm.dtype),  # the previous play's item
        "oracle_repeat_p": np.where(has, st["repeat_p"], 0.0).astype(np.float32),  # P(row repeats prev_item)
    }
    truth = {
        "user": np.arange(u0, u1, dtype=np.int64),
        "taste_support": support.astype(np.int32),  # [B, K] cluster of each taste slot
        "taste": taste.astype(np.float32),  # [B, K] initial weights (0 on a slot repeating an earlier cluster)
        "drift_step": drift.astype(np.float32),  # sd of the per-session random walk of the taste logits
        "active_start": act_start,
        "active_end": act_end,
        "length": out_n.astype(np.int64),  # interactions written for the user (all splits together)
        **ostate,
        # [B, favourite_items] or [B, favourite_clusters]
        **({} if fav_picks is None else {_favourite_key(cfg): fav_picks.astype(np.int64)}),
    }
    probe_rows = None
    if probe:  # every row with a predecessor (for tests): the oracle state before it, and the row's item
        out_user = np.repeat(np.arange(B), out_n)
        rows = np.flatnonzero(out_user[1:] == out_user[:-1]) + 1
        probe_rows = {
            **oracle_state(rows),
            "user": u0 + out_user[rows],
            "pos": rows - out_ptr[out_user[rows]],  # the row's position in the user's history
            "item": cols["item"][rows].astype(np.int64),
            "support": support[out_user[rows]],
            "initial_taste": taste[out_user[rows]],
            "drift_step": drift[out_user[rows]],
        }
    return _Batch(users=truth["user"], ptr=out_ptr, cols=cols, truth=truth, imps=imps, probe=probe_rows)


def _gen_impressions(
    world: World,
    cfg: SynthConfig,
    u0: int,
    act_start: np.ndarray,
    act_end: np.ndarray,
    sess_user: np.ndarray,
    start: np.ndarray,
    u_first_sess: np.ndarray,
    p_taste: np.ndarray,
    support: np.ndarray,
) -> dict[str, np.ndarray]:
    """``cfg.impressions`` impressions per user active in the last ``imp_days``, at uniform times.

    A slate mixes items from the user's taste at that moment (the taste of their latest session) and
    globally popular items; the reaction follows the same affinity model as the history (log taste
    of the item's cluster + the fixed user-item noise), so a model that learned the user's taste
    ranks liked items above skipped ones. ``imp_score`` is a stand-in production score: the item's
    log prior popularity. Uses its own RNG stream: histories are identical with or without impressions.
    """
    rng = np.random.default_rng([cfg.seed, _TAG_IMPRESSIONS, u0])
    B, K, m, L = act_start.shape[0], TASTE_SUPPORT, cfg.impressions, cfg.slate
    lo = np.maximum(act_start, cfg.t_end - int(round(cfg.imp_days * DAY)))
    users = np.flatnonzero(act_end > lo)
    U = users.shape[0]
    t = lo[users][:, None] + np.floor(rng.random((U, m)) * (act_end - lo)[users][:, None]).astype(np.int64)
    t.sort(axis=1)
    # the latest session that started at or before t (sessions are sorted within a user)
    big = np.int64(1) << 40
    key = sess_user.astype(np.int64) * big + (start - T0)
    sess = np.searchsorted(key, users[:, None] * big + (t - T0), side="right") - 1
    sess = np.maximum(sess, u_first_sess[users][:, None]).ravel()
    who = np.repeat(users, m)  # impression -> user (batch-local)
    p = p_taste[:, sess].T  # [U*m, K]
    sup = support[who]  # [U*m, K]
    slot = (rng.random((U * m, L, 1)) > np.cumsum(p, axis=1)[:, None, :]).sum(axis=2).clip(0, K - 1)
    c_taste = np.take_along_axis(sup, slot, axis=1)
    c_pop = np.minimum(np.searchsorted(world.cluster_cdf, rng.random((U * m, L)), side="right"), world.num_clusters - 1)
    cluster = np.where(rng.random((U * m, L)) < IMPRESSION_TASTE_P, c_taste, c_pop)
    rank = world.zipf_rank(cluster.ravel(), rng.random(U * m * L)).reshape(U * m, L)
    item = world.item_id(cluster, rank)
    if cfg.new_items:  # held-back items are shown only from their release on, as in the histories
        is_new, stand_in = held_back(world, cfg.new_items, cfg.seed)
        swap = (t.ravel()[:, None] < cfg.release_time) & is_new[item]
        if swap.any():
            pos = np.empty(world.num_items, np.int64)
            pos[world.perm] = np.arange(world.num_items)
            item = np.where(swap, stand_in[item], item)
            rank = pos[item] - world.ptr[cluster]  # the stand-in's rank: the production score follows the swap
    p_c = (p[:, :, None] * (sup[:, :, None] == cluster[:, None, :])).sum(axis=1)  # [U*m, L]
    aff = np.log(p_c * K + 0.05) + _noise(
        world.noise_salt, np.repeat(u0 + who, L).astype(np.int64), item.ravel()
    ).reshape(U * m, L)
    q = _sigmoid(1.2 * aff + 0.4 + 0.9 * rng.normal(0.0, 1.0, aff.shape))
    played = np.rint(100.0 * q).astype(np.int64)
    skip = played < SKIP_BELOW
    like = ~skip & (rng.random(aff.shape) < _sigmoid(1.5 * aff - 4.5))
    dislike = ~like & (rng.random(aff.shape) < _sigmoid(-1.0 * aff - 5.5 + 1.0 * skip))
    event = np.full(aff.shape, np.uint8(EventType.LISTEN))
    event[skip] = EventType.SKIP
    event[like] = EventType.LIKE
    event[dislike] = EventType.DISLIKE
    score = np.log(world.cluster_pop[cluster] * world.rank_pmf(cluster, rank))
    per_user = np.bincount(users, minlength=B) * m
    return {
        "user_ptr": np.concatenate([[0], np.cumsum(per_user)]).astype(np.int64),
        "imp_time": t.ravel().astype(IMPRESSION_FIELDS["imp_time"]),
        "imp_size": np.full(U * m, L, IMPRESSION_FIELDS["imp_size"]),
        "imp_item": item.ravel().astype(SHOWN_FIELDS["imp_item"]),
        "imp_event": event.ravel().astype(SHOWN_FIELDS["imp_event"]),
        "imp_played": played.ravel().astype(SHOWN_FIELDS["imp_played"]),
        "imp_score": score.ravel().astype(SHOWN_FIELDS["imp_score"]),
    }


# ---- shards ----------------------------------------------------------------------------------------------------
def iter_histories(
    cfg: SynthConfig, index: int, world: World | None = None, truth: dict[str, list[np.ndarray]] | None = None
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield ``(user, columns)`` for every user of shard ``index``, in id order (full, time-ordered histories).

    This is exactly what :func:`synthesize` writes; if ``truth`` is given, per-user truth arrays are appended to it.
    """
    for user, cols, _ in iter_users_with_impressions(cfg, index, world, truth):
        yield user, cols


def iter_users_with_impressions(
    cfg: SynthConfig, index: int, world: World | None = None, truth: dict[str, list[np.ndarray]] | None = None
) -> Iterator[tuple[int, dict[str, np.ndarray], dict[str, np.ndarray] | None]]:
    """Like :func:`iter_histories`, plus each user's impressions (None without ``cfg.impressions``)."""
    if not 0 <= index < cfg.shards:
        raise ValueError(f"shard index {index} outside [0, {cfg.shards})")
    world = world or World(cfg.items, cfg.clusters, cfg.seed)
    rng = np.random.default_rng([cfg.seed, _TAG_SHARD, index])
    lo, hi = cfg.user_range(index)
    for b0 in range(lo, hi, cfg.batch_users):
        batch = _gen_batch(world, cfg, rng, b0, min(hi, b0 + cfg.batch_users))
        if truth is not None:
            for k, v in batch.truth.items():
                truth.setdefault(k, []).append(v)
        ptr = batch.ptr.tolist()
        cols, imps = batch.cols, batch.imps
        shown_ptr = np.concatenate([[0], np.cumsum(imps["imp_size"], dtype=np.int64)]) if imps is not None else None
        for i, user in enumerate(batch.users.tolist()):
            s, e = ptr[i], ptr[i + 1]
            user_imps = None
            if imps is not None:
                a, b = int(imps["user_ptr"][i]), int(imps["user_ptr"][i + 1])
                user_imps = {k: imps[k][a:b] for k in IMPRESSION_FIELDS}
                user_imps.update({k: imps[k][shown_ptr[a] : shown_ptr[b]] for k in SHOWN_FIELDS})
            yield user, {k: v[s:e] for k, v in cols.items()}, user_imps


def probe_states(cfg: SynthConfig, index: int) -> dict[str, np.ndarray]:
    """The oracle state before every row of shard ``index`` that has a predecessor, with the row's item.

    For checking the oracle away from the end of histories (tests): the same state as the truth files
    store for the held-out rows, at every position. Holds the whole shard in memory.
    """
    world = World(cfg.items, cfg.clusters, cfg.seed)
    rng = np.random.default_rng([cfg.seed, _TAG_SHARD, index])
    lo, hi = cfg.user_range(index)
    parts: dict[str, list[np.ndarray]] = {}
    for b0 in range(lo, hi, cfg.batch_users):
        batch = _gen_batch(world, cfg, rng, b0, min(hi, b0 + cfg.batch_users), probe=True)
        assert batch.probe is not None
        for k, v in batch.probe.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def _write_shard(args: tuple[str, int, SynthConfig]) -> ShardResult:
    out, index, cfg = args
    writer = ShardSetWriter(out, index, cfg.holdout_spec(), cfg.max_len, impressions_test_start=cfg.imp_test_start)
    truth: dict[str, list[np.ndarray]] = {}
    for user, cols, imps in iter_users_with_impressions(cfg, index, truth=truth):
        writer.add_user(user, cols, imps)
    save_npz(Path(out) / TRUTH_DIR / f"users-{index:06d}.npz", **{k: np.concatenate(v) for k, v in truth.items()})
    return writer.close()


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez with fixed zip timestamps (byte-identical for identical arrays), published by rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, buf.getbuffer(), compress_type=zipfile.ZIP_STORED)
    os.replace(tmp, path)


def load_truth(root: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(item/world truth, per-user truth concatenated over shards in user order) of a synth dataset.

    Per user: ``user``, ``taste_support`` / ``taste`` (initial), ``drift_step``, ``active_start`` /
    ``active_end``, ``length``, and (version >= 2) the oracle state ``oracle_taste``, ``oracle_how``,
    ``oracle_context``, ``oracle_prev_item``, ``oracle_repeat_p`` (see the module docstring); with
    ``--favourites``, ``favourites`` [users, favourite_items] (the items), or with ``--favourite-clusters``
    ``favourite_clusters`` [users, favourite_clusters] (the clusters).
    """
    root = Path(root)
    m = Manifest.load(root)
    if m.source.get("kind") != "synth":
        raise ValueError(f"{root}: not a synth dataset (source.kind is {m.source.get('kind')!r})")
    with np.load(root / TRUTH_DIR / "items.npz") as z:
        items = {k: z[k] for k in z.files}
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(int(m.source["shards"])):
        with np.load(root / TRUTH_DIR / f"users-{i:06d}.npz") as z:
            for k in z.files:
                parts.setdefault(k, []).append(z[k])
    return items, {k: np.concatenate(v) for k, v in parts.items()}


# ---- entry point ---------------------------------------------------------------------------------------------
def synthesize(
    out: str | os.PathLike,
    *,
    users: int,
    items: int,
    mean_len: float = 200.0,
    shards: int = 8,
    seed: int = 0,
    holdout: str = "loo",
    max_len: int = 8192,
    workers: int = 0,
    clusters: int = 0,
    days: int = 120,
    val_days: float = 7.0,
    test_days: float = 7.0,
    gap_seconds: int = 0,
    impressions: int = 0,
    slate: int = 10,
    imp_days: float = 7.0,
    imp_test_days: float = 1.0,
    item_features: int = 0,
    new_items: float = 0.0,
    favourites: float = 0.0,
    favourite_items: int | None = None,
    favourite_skew: float = 0.0,
    favourite_clusters: int = 0,
    overwrite: bool = False,
) -> Manifest:
    """Write a synthetic dataset with planted structure to ``out`` and return its manifest.

    ``out`` must be missing or empty; an earlier dataset there is replaced only with ``overwrite`` (removed
    first), and a directory holding anything else is refused (:mod:`trainer.data.outdir`).

    ``impressions > 0`` also writes the fine-tuning splits ``impressions`` / ``impressions_test``.
    ``item_features > 0`` writes item metadata vectors of that width (:func:`item_feature_vectors`,
    trainer/data/item_features.py); ``new_items`` (a temporal holdout) holds that fraction of the items back
    until the test window (:func:`held_back`; truth ``item_new``); ``favourites`` > 0 plants lifelong favourite
    items (``favourite_items`` per user, or ``favourite_clusters`` clusters a replay visits, replayed with weights
    ``favourite_skew``: :func:`_favourites`), a signal beyond a short context (the oracle does not model it).

    ``workers=0`` uses min(shards, cpu count) processes; the output does not depend on ``workers``.
    ``clusters=0`` picks max(4, round(sqrt(items)/4)) (at most 2048). See the module docstring.
    """
    cfg = make_config(
        users=users,
        items=items,
        mean_len=mean_len,
        shards=shards,
        seed=seed,
        holdout=holdout,
        max_len=max_len,
        clusters=clusters,
        days=days,
        val_days=val_days,
        test_days=test_days,
        gap_seconds=gap_seconds,
        impressions=impressions,
        slate=slate,
        imp_days=imp_days,
        imp_test_days=imp_test_days,
        item_features=item_features,
        new_items=new_items,
        favourites=favourites,
        favourite_items=favourite_items,
        favourite_skew=favourite_skew,
        favourite_clusters=favourite_clusters,
    )
    _check_int("workers", workers, 0)
    n_workers = min(cfg.shards, workers or os.cpu_count() or 1)
    root = Path(out)
    prepare_dataset_out(root, overwrite)
    hold = cfg.holdout_spec()

    world = World(cfg.items, cfg.clusters, cfg.seed)
    truth = world.truth_arrays()
    if cfg.new_items:
        truth["item_new"] = held_back(world, cfg.new_items, cfg.seed)[0]
    save_npz(root / TRUTH_DIR / "items.npz", **truth)
    features = item_feature_vectors(world, cfg.item_features, cfg.seed) if cfg.item_features else None
    del world

    jobs = [(str(root), i, cfg) for i in range(cfg.shards)]
    if n_workers <= 1:
        results = [_write_shard(j) for j in jobs]
    else:
        with mp.get_context("spawn").Pool(n_workers) as pool:
            results = pool.map(_write_shard, jobs, chunksize=1)

    source = {
        "kind": "synth",
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        # options a dataset does not use stay out (the manifests of datasets without them are unchanged)
        **{k: v for k, v in asdict(cfg).items() if not _unset(cfg, k, v)},
        "clusters_requested": int(clusters),
        "t0": T0,
        "t_end": cfg.t_end,
        "truth": TRUTH_DIR,
    }
    if hold.kind == "temporal":
        source.update(val_start=hold.val_start, test_start=hold.test_start)
    manifest = finalize(root, results, hold, num_items=cfg.items, max_len=cfg.max_len, source=source)
    if features is not None:
        from trainer.data.item_features import attach_item_features

        manifest = attach_item_features(root, features)
    return manifest
