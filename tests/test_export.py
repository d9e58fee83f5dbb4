"""`argus export` / `argus retrieve`: sharded = unsharded, dot products = the model's scores, every user and
item exactly once, bf16, the --at cutoff, retrieve = eval, the documented loader, one-line errors."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL, argus_own_process, argus_ranks
from helpers import read_samples as samples

from trainer.data.batch import BATCH_DTYPES, Batch, collate
from trainer.data.manifest import Manifest
from trainer.data.schema import FIELDS, EventType
from trainer.export import context_rows, encode_users, load_export
from trainer.retrieve import _keys, top_k

REPO = Path(__file__).resolve().parents[1]
TINY = [*TINY_MODEL, "data.num_workers=0", "optim.warmup_steps=2"]
CONTEXT = 31  # TINY: model.max_seq_len=32 -> data.max_seq_len 32 -> default context 31
# The real `argus` once launch/cli.py registers the commands; until then their own entry point (same parsers).
CLI = "launch.cli"


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(module: str, *args: str, nproc: int = 0, ok: bool = True) -> subprocess.CompletedProcess | None:
    """`argus ARGS` in a process of its own (nproc=0), or on nproc ranks: both forked in-process
    (helpers.argus_ranks, torchrun's environment), with ok=True. ok=False: a real plain process, its exit code."""
    if ok:
        assert module == CLI
        argus_ranks(*args, nproc=nproc or 1)
        return None
    assert not nproc
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600
    )


def _sorted(export: Path) -> tuple[np.ndarray, ...]:
    users, uv, nxt, items, iv = load_export(export)
    o, p = np.argsort(users), np.argsort(items)
    return users[o], uv[o], nxt[o], items[p], iv[p]


# ---- fixtures: one pre-trained run, its exports --------------------------------------------------------------------
@pytest.fixture(scope="module")
def pre(imp_pretrained) -> Path:
    """2 ranks, ZeRO-2, 3 steps on imp_data (shared with test_finetune)."""
    return imp_pretrained


@pytest.fixture(scope="module")
def at_time(imp_data) -> int:
    """A cutoff before a quarter of the users' first interaction: cuts every history, skips some users."""
    return int(np.percentile([s.cols["timestamp"][0] for s in samples(imp_data, "test")], 25))


@pytest.fixture(scope="module")
def exports(pre, imp_data, at_time, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    common = [str(pre), "--data", str(imp_data), "--batch-size", "16"]
    _run(CLI, "export", *common, "--out", str(root / "sharded"), nproc=2)
    _run(CLI, "export", *common, "--out", str(root / "plain"))
    _run(CLI, "export", *common, "--out", str(root / "bf16"), "--dtype", "bf16")
    _run(CLI, "export", *common, "--out", str(root / "at"), "--at", str(at_time), nproc=2)
    return {k: root / k for k in ("sharded", "plain", "bf16", "at")}


# ---- the reference: the unsharded model, one user at a time, its own scoring ----------------------------------------
def reference(ckpt: Path, data: Path, split: str, at: int | None, context: int = CONTEXT) -> dict[int, dict]:
    """user -> {scores over the item table, next_item, history_len}, by brute force (cut, then window)."""
    from trainer.checkpoint import load_model
    from trainer.model.heads import score
    from trainer.model.interaction import lookup_interactions
    from trainer.model.two_tower import TwoTower

    cfg, sparse, dense = load_model(ckpt, Manifest.load(data).num_items)
    table = sparse.items.embeddings["item"].weight.detach()
    held_out = Manifest.load(data).split(split).kind == "eval"
    out = {}
    for s in samples(data, split):
        ts, end = s.cols["timestamp"], s.target_start if held_out else s.n
        cut = 0
        while cut < end and (at is None or ts[cut] < at):
            cut += 1
        row = {"next_item": int(s.cols["item"][cut]) if cut < s.n else -1, "history_len": min(cut, context)}
        out[s.user] = row
        if cut == 0:
            continue
        lo = max(0, cut - context)
        b = Batch(
            keys=[s.key],
            users=torch.tensor([s.user]),
            offsets=torch.tensor([lo]),
            lengths=torch.tensor([cut - lo]),
            target_start=torch.zeros(1, dtype=torch.long),
            padded=False,
            values={k: torch.from_numpy(s.cols[k][lo:cut].astype(BATCH_DTYPES[k])) for k in FIELDS},
        )
        item, side, _ = lookup_interactions(
            sparse, b, cfg, sparse.item_rows, torch.zeros(0, dtype=torch.long), torch.device("cpu")
        )
        lengths = b.lengths
        with torch.no_grad():
            if isinstance(dense, TwoTower):  # the ranker's forward: every item of the table as a shown item
                m = table.shape[0]
                row["scores"] = dense(
                    item,
                    side,
                    lengths,
                    lengths - 1,
                    table,
                    torch.zeros(m, dtype=torch.long),
                    torch.zeros(0, dtype=torch.long),
                    torch.zeros(0, dtype=torch.long),
                )["scores"]
            else:  # what `argus eval` ranks by: the next-item head's logits
                h = dense.user_vectors(dense.states(item, side, lengths), lengths, lengths - 1)
                ni = cfg.heads.next_item
                row["scores"] = score(h, table, ni.normalize, ni.temperature)[0]
    return out


def assert_reproduces(export: Path, ref: dict[int, dict]) -> None:
    users, uv, nxt, items, iv = _sorted(export)
    m = json.loads((export / "manifest.json").read_text())
    assert np.array_equal(items, np.arange(m["item_rows"]))
    scored = {u for u, r in ref.items() if "scores" in r}
    assert users.tolist() == sorted(scored) and m["users_skipped"] == len(ref) - len(scored)
    got = torch.from_numpy(uv @ iv.T)
    want = torch.stack([ref[u]["scores"] for u in users.tolist()])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (got - want).abs().max()
    assert nxt.tolist() == [ref[u]["next_item"] for u in users.tolist()]
    hist = np.concatenate([load_part(export / f, "history_len") for f in m["files"]["users"]])
    user_col = np.concatenate([load_part(export / f, "user") for f in m["files"]["users"]])
    assert dict(zip(user_col.tolist(), hist.tolist())) == {u: ref[u]["history_len"] for u in scored}


def load_part(path: Path, column: str) -> np.ndarray:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=[column]).column(column).to_numpy()


# ---- tests --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sharded_export_equals_one_process_export(exports):
    sharded, plain = _sorted(exports["sharded"]), _sorted(exports["plain"])
    for a, b in zip(sharded, plain):
        assert a.shape == b.shape and np.array_equal(a, b)  # bitwise: same lookups, same per-user math
    ms, mp = (json.loads((exports[k] / "manifest.json").read_text()) for k in ("sharded", "plain"))
    assert ms["world_size"] == 2 and mp["world_size"] == 1
    assert (ms["users"], ms["items"]) == (mp["users"], mp["items"])


@pytest.mark.slow
@pytest.mark.parametrize("which", ["sharded", "at"])
def test_every_user_and_item_exactly_once(exports, imp_data, at_time, which):
    export = exports[which]
    m = json.loads((export / "manifest.json").read_text())
    assert m["files"] == {
        "users": ["users/part-00000.parquet", "users/part-00001.parquet"],
        "items": ["items/part-00000.parquet", "items/part-00001.parquet"],
    }
    files = sorted(str(p.relative_to(export)) for p in export.rglob("*") if p.is_file())
    assert files == sorted(["manifest.json", *m["files"]["items"], *m["files"]["users"]])  # no *.tmp left
    per_file = {
        f: load_part(export / f, "user" if f.startswith("users") else "item") for fs in m["files"].values() for f in fs
    }
    assert {f: len(v) for f, v in per_file.items()} == m["counts"]
    users = np.concatenate([per_file[f] for f in m["files"]["users"]])
    items = np.concatenate([per_file[f] for f in m["files"]["items"]])
    assert np.array_equal(np.sort(items), np.arange(m["item_rows"])) and m["item_rows"] == 150
    assert np.array_equal(items, np.arange(150))  # rank r: one contiguous id range, ranks in order
    # users: unique, and exactly those of the split with history before the cutoff
    at = at_time if which == "at" else None
    want = {
        s.user for s in samples(imp_data, "test") if s.target_start > 0 and (at is None or s.cols["timestamp"][0] < at)
    }
    assert len(set(users.tolist())) == len(users) and set(users.tolist()) == want
    assert m["users"] + m["users_skipped"] == Manifest.load(imp_data).split("test").samples
    assert (m["users_skipped"] > 0) == (which == "at")


@pytest.mark.slow
def test_dot_products_are_the_models_scores(exports, pre, imp_data, at_time):
    from trainer.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(pre)
    assert_reproduces(exports["plain"], reference(ckpt, imp_data, "test", None))
    ref = reference(ckpt, imp_data, "test", at_time)
    assert_reproduces(exports["at"], ref)
    assert any(r["next_item"] >= 0 and r["history_len"] < CONTEXT for r in ref.values())
    # the plain export windows histories longer than the context (the first check covers that path)
    assert max(s.target_start for s in samples(imp_data, "test")) > CONTEXT


@pytest.mark.slow
def test_bf16_export_is_fp32_rounded(exports):
    m = json.loads((exports["bf16"] / "manifest.json").read_text())
    assert m["dtype"] == "bf16" and "uint16" in m["vector_encoding"]
    import pyarrow.parquet as pq

    assert (
        str(pq.read_schema(exports["bf16"] / m["files"]["users"][0]).field("vector").type)
        == "fixed_size_list<element: uint16>[16]"
    )
    for a, b in zip(_sorted(exports["bf16"]), _sorted(exports["plain"])):
        if a.dtype == np.float32:
            assert np.all(np.abs(a - b) <= 2.0**-8 * np.abs(b))  # round to nearest: half a bf16 ulp
            assert not np.array_equal(a, b)
            assert np.array_equal(a, torch.from_numpy(b).bfloat16().float().numpy())
        else:
            assert np.array_equal(a, b)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The command line, in this process (no process group is made before the checks that fail here)."""
    code = importlib.import_module(CLI).main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_retrieve_recall_equals_eval_hr(exports, pre, imp_data, capsys):
    code, out, err = argus_own_process("eval", str(pre), "--data", str(imp_data), "--ks", "10,100", "--json")
    assert code == 0, err[-2000:]
    rep = json.loads(out)
    assert rep["ranking"] == "full" and rep["split"] == "test"
    code, out, _ = cli(capsys, "retrieve", str(exports["sharded"]), "--k", "100", "--json")
    got = json.loads(out)
    assert code == 0 and got["users"] == rep["users"] > 100 and got["items"] == 150
    assert got["recall@10"] == rep["model"]["hr@10"] and got["recall@100"] == rep["model"]["hr@100"]
    assert 0 < got["recall@10"] < got["recall@100"] < 1  # both cutoffs really discriminate
    # --users: the first N users by id; the rich table names both cutoffs
    few = json.loads(cli(capsys, "retrieve", str(exports["plain"]), "--users", "7", "--json", "--k", "5")[1])
    assert few["users"] == 7 and "recall@5" in few and "recall@10" not in few
    code, table, _ = cli(capsys, "retrieve", str(exports["plain"]), "--k", "20")
    assert code == 0 and "Recall@K" in table and "│ 20 " in table and "│ 10 " in table


@pytest.mark.slow
def test_events_at_or_after_the_cutoff_cannot_change_a_user_vector(pre, imp_data, at_time):
    from trainer.checkpoint import load_model, resolve_checkpoint

    cfg, sparse, dense = load_model(resolve_checkpoint(pre), Manifest.load(imp_data).num_items)

    def encode(batch: Batch) -> tuple:
        with torch.no_grad():
            return encode_users(
                batch, cfg, dense, sparse, sparse.item_rows, CONTEXT, at_time, True, torch.device("cpu")
            )

    def batch() -> Batch:
        return collate(samples(imp_data, "test"), padded=False)

    ref = batch()
    rows, vecs = encode(ref)
    late = ref.values["timestamp"] >= at_time
    owner = torch.repeat_interleave(torch.arange(ref.size), ref.lengths)
    pos = torch.arange(int(ref.lengths.sum())) - (torch.cumsum(ref.lengths, 0) - ref.lengths)[owner]
    assert int((late & (pos < ref.target_start[owner])).sum()) > 100  # the cutoff really cuts histories
    edited = batch()
    edited.values["item"][late] = (edited.values["item"][late] + 7) % 150
    edited.values["event"][late] = EventType.SKIP
    edited.values["played"][late] = 3
    edited.values["context"][late] = 1
    rows2, vecs2 = encode(edited)
    assert torch.equal(rows.kept, rows2.kept) and torch.equal(vecs, vecs2)
    assert torch.equal(rows.history_len, rows2.history_len)
    # the check above can fail: an edit before the cutoff moves every vector
    edited = batch()
    edited.values["item"][~late] = (edited.values["item"][~late] + 7) % 150
    _, vecs3 = encode(edited)
    assert not torch.isclose(vecs3, vecs).all(1).any()


def test_context_rows_match_a_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 12, (40,), generator=g)
    n = int(lengths.sum())
    ts = torch.cat([torch.sort(torch.randint(0, 100, (int(k),), generator=g)).values for k in lengths])
    b = Batch(
        keys=[str(i) for i in range(40)],
        users=torch.arange(40),
        offsets=torch.zeros(40, dtype=torch.long),
        lengths=lengths,
        target_start=(lengths - torch.randint(0, 3, (40,), generator=g)).clamp_min(0),
        values={"item": torch.arange(n), "timestamp": ts, "event": torch.zeros(n, dtype=torch.uint8)},
        padded=False,
    )
    starts = (torch.cumsum(lengths, 0) - lengths).tolist()
    for at, context, held in [(None, 5, True), (50, 3, True), (50, 100, False), (0, 4, True)]:
        r = context_rows(b, context, at, held)
        want_rows, want_next, want_len, kept = [], [], [], []
        for i, (s, k) in enumerate(zip(starts, lengths.tolist())):
            end = int(b.target_start[i]) if held else k
            cut = 0
            while cut < end and (at is None or int(ts[s + cut]) < at):
                cut += 1
            want_next.append(s + cut if cut < k else -1)  # items are flat row numbers here
            want_len.append(min(cut, context))
            if cut:
                kept.append(i)
                want_rows += list(range(s + max(0, cut - context), s + cut))
        assert r.next_item.tolist() == want_next and r.kept.tolist() == kept
        assert r.history_len.tolist() == want_len
        if not kept:
            assert r.context is None
            continue
        assert r.context.values["item"].tolist() == want_rows
        assert r.context.lengths.tolist() == [want_len[i] for i in kept] and r.context.users.tolist() == kept


@pytest.mark.parametrize("seed", range(3))
def test_top_k_is_exact_with_ties_lower_id_first(seed):
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(-2, 3, (37, 4), generator=g).float()
    items = torch.randint(-2, 3, (203, 4), generator=g).float()  # integer vectors: many exactly tied scores
    scores = users @ items.T
    want = [sorted(range(203), key=lambda j: (-float(row[j]), j))[:50] for row in scores]
    for batch, chunk in [(1024, 1 << 16), (5, 17), (1, 203)]:
        assert top_k(users, items, 50, batch=batch, item_chunk=chunk).tolist() == want
    assert top_k(users, items, 500).shape == (37, 203)
    # the int64 keys: -0.0 ties with +0.0 (lower id first); NaN is never ahead of anything, as in eval
    keys = _keys(torch.tensor([[0.0, -0.0, float("nan"), float("-inf"), float("inf"), -1.5, 2.0]]), 0)
    assert keys.topk(7).indices.tolist() == [[4, 6, 0, 1, 5, 3, 2]]
    # top_k agrees with eval's rank (trainer.metrics): in the top K <=> fewer than K items ahead
    from trainer.metrics import ranks_of_targets

    targets = torch.randint(0, 203, (37,), generator=g)
    ranks = ranks_of_targets(scores, targets)
    top = top_k(users, items, 10)
    assert ((top == targets[:, None]).any(1) == (ranks < 10)).all()


@pytest.mark.slow
def test_documented_load_snippet_runs(exports):
    text = (REPO / "docs" / "export.md").read_text()
    snippet = {name: code for name, code in re.findall(r"<!-- snippet: (\w+) -->\n```python\n(.*?)```", text, re.S)}
    assert set(snippet) == {"load", "use"} and "argus" not in snippet["load"].replace("argus-export", "")
    for which in ("sharded", "bf16"):
        ns: dict = {}
        exec(snippet["load"], ns)
        exec(snippet["use"].replace('"exports/pre"', repr(str(exports[which]))), ns)
        users, uv, nxt, items, iv = load_export(exports[which])
        order = np.argsort(items)
        assert np.array_equal(ns["scores"], uv[:5] @ iv[order].T)
        want = top_k(torch.from_numpy(uv[:5]), torch.from_numpy(iv[order]), 10)
        assert np.array_equal(ns["top10"], want.numpy())
        for a, b in zip(ns["load_export"](exports[which]), load_export(exports[which])):
            assert np.array_equal(a, b)


@pytest.mark.slow
def test_finetuned_export_reproduces_the_rankers_scores(pre, imp_data, tmp_path):
    from trainer.checkpoint import resolve_checkpoint

    run, out = tmp_path / "ft", tmp_path / "export"
    _run(
        "launch.cli",
        "finetune",
        "configs/mini.yaml",
        "--init",
        str(pre),
        f"data.path={imp_data}",
        *TINY,
        f"out={run}",
        "train.steps=2",
        "finetune.item_mlp=8",
    )
    _run(CLI, "export", str(run), "--data", str(imp_data), "--out", str(out), "--split", "impressions_test")
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"] == "two_tower" and m["split_kind"] == "impressions"
    ref = reference(resolve_checkpoint(run), imp_data, "impressions_test", None)
    assert all(r["next_item"] == -1 for r in ref.values())  # impression samples hold no held-out target
    assert_reproduces(out, ref)


@pytest.fixture
def config_only_checkpoint(tmp_path) -> Path:
    """A checkpoint directory with only meta.json and config.yaml: enough for every check before loading."""
    from trainer.config import load_config, save_config
    from trainer.job import JobConfig

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text("{}")
    (ckpt.parent / "latest").write_text(ckpt.name)
    save_config(
        load_config(JobConfig, REPO / "configs" / "mini.yaml", [*TINY, "out=x", "data.path=x"]), ckpt / "config.yaml"
    )
    return tmp_path / "run"


@pytest.mark.parametrize(
    "args, message, exit_code",  # launch/exit_codes.py: 2 config, 4 data, 5 checkpoint
    [
        (["/nonexistent/run"], "/nonexistent/run: no checkpoint (expected a run directory", 5),
        (["{run}", "--split", "nope"], "no split 'nope'", 4),
        (["{run}", "--at", "yesterday"], "--at: expected unix seconds or an ISO-8601 time", 2),
        (["{run}", "--context", "40"], "context: must be in [1, 32]", 2),
    ],
)
def test_bad_export_input_is_one_line(args, message, exit_code, config_only_checkpoint, tmp_path, imp_data, capsys):
    args = [a.replace("{run}", str(config_only_checkpoint)) for a in args]
    code, _, err = cli(capsys, "export", *args, "--data", str(imp_data), "--out", str(tmp_path / "o"))
    assert code == exit_code and err.count("\n") == 1 and err.startswith("argus: error: ") and message in err, err
    assert not (tmp_path / "o").exists() and not torch.distributed.is_initialized()


@pytest.mark.slow
def test_export_refuses_an_existing_export_unless_overwrite(exports, pre, imp_data, tmp_path, capsys):
    """An export in --out: one line naming it and --overwrite, before any process group, every file byte-identical.
    --overwrite replaces it (a 2-rank export by a 1-rank one: no part of the old one is left); a directory that
    holds anything else is refused even with --overwrite."""
    import shutil

    from helpers import one_line_error, tree_digest

    out = tmp_path / "o"
    shutil.copytree(exports["sharded"], out)
    before = tree_digest(out)
    args = [str(pre), "--data", str(imp_data), "--batch-size", "16", "--out", str(out)]
    code, _, err = cli(capsys, "export", *args)
    users, items = (json.loads((out / "manifest.json").read_text())[k] for k in ("users", "items"))
    assert code == 2 and one_line_error(err) == (
        f"argus: error: out {out}: holds an export ({users:,} users, {items:,} items of 'test'); "
        "pass --overwrite to replace it"
    )
    assert tree_digest(out) == before and not torch.distributed.is_initialized()
    (out / "users" / "notes.txt").write_text("mine")
    before = tree_digest(out)
    code, _, err = cli(capsys, "export", *args, "--overwrite")
    assert code == 2 and one_line_error(err) == (
        f"argus: error: out {out}: not empty and not an argus export (users/notes.txt is not one of the files an "
        "export holds); refusing to write into it, even with --overwrite: choose a new or empty directory"
    )
    assert tree_digest(out) == before
    (out / "users" / "notes.txt").unlink()

    _run(CLI, "export", *args, "--overwrite")
    m = json.loads((out / "manifest.json").read_text())
    assert m["world_size"] == 1 and m["files"]["users"] == ["users/part-00000.parquet"]
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert on_disk == sorted(["manifest.json", *m["files"]["users"], *m["files"]["items"]])
    for a, b in zip(_sorted(out), _sorted(exports["plain"])):
        assert np.array_equal(a, b)


def test_bad_retrieve_and_dtype_input(tmp_path, capsys):
    from trainer.export import export

    with pytest.raises(ValueError, match="dtype: expected one of fp32, bf16, got 'fp16'"):
        export(tmp_path, tmp_path, tmp_path / "o", dtype="fp16")
    code, _, err = cli(capsys, "retrieve", str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "no manifest.json" in err, err
    # a plain process, end to end: `--dtype` is checked by the parser, one usage line + one error line
    out = _run(
        CLI, "export", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--dtype", "fp16", ok=False
    )
    assert out.returncode == 2 and "argument --dtype: invalid choice: 'fp16'" in out.stderr


def test_at_accepts_unix_seconds_and_iso_times():
    from launch.export_cli import parse_time

    assert parse_time("1706659200") == 1706659200
    assert parse_time("2024-01-31T00:00:00") == parse_time("2024-01-31") == 1706659200  # naive = UTC
    assert parse_time("2024-01-31T01:00:00+01:00") == 1706659200
    with pytest.raises(ValueError, match="--at: expected unix seconds or an ISO-8601 time"):
        parse_time("last tuesday")
