"""Fine-tuning: impression data, the lag, pairs and metrics against brute force, and the whole
pre-train -> fine-tune -> eval path through the real CLI (ranks forked in-process: helpers.argus_ranks; the
pre-trained run is the session's `imp_pretrained`)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL, argus_inproc, argus_own_process, argus_ranks
from helpers import read_samples as samples

from trainer.data.batch import collate
from trainer.data.manifest import Manifest
from trainer.data.schema import PLAYED_NA, EventType, relevance
from trainer.finetune import impression_inputs, ndcg_within, pairwise_accuracy
from trainer.model.two_tower import pairs_of

REPO = Path(__file__).resolve().parents[1]
TINY = [*TINY_MODEL, "data.num_workers=0", "optim.warmup_steps=2"]


# The shorter run (train.steps=3) is continued to train.steps=6: a schedule that depends on train.steps (cosine,
# the default) would differ between the two, so these resume checks hold the learning rate constant. Resuming
# with an unchanged config under cosine is checked bitwise by the Ray fault drill.
CONSTANT_LR = "optim.schedule=constant"


def test_impression_splits_hold_history_before_each_request(imp_data, capsys):
    m = Manifest.load(imp_data)
    assert m.split("impressions").kind == m.split("impressions_test").kind == "impressions"
    test_start = m.source["t_end"] - int(m.source["imp_test_days"] * 86400)
    for split in ("impressions", "impressions_test"):
        got = samples(imp_data, split)
        info = m.split(split)
        assert len(got) == info.samples > 0
        assert sum(s.imps for s in got) == sum(sh.targets for sh in info.shards)
        assert sum(s.shown for s in got) == info.stats["shown"]
        for s in got:
            c = s.cols
            assert c["imp_size"].sum() == s.shown == c["imp_item"].size == c["imp_event"].size
            assert np.all(np.diff(c["imp_time"]) >= 0)
            assert (
                (c["imp_time"] >= test_start).all()
                if split == "impressions_test"
                else (c["imp_time"] < test_start).all()
            )
            assert s.n == 0 or c["timestamp"].max() < c["imp_time"][-1]  # nothing at or after the last request
    code, out, err = argus_inproc(capsys, "data", "verify", str(imp_data))
    assert code == 0, out + err


def test_synth_impressions_deterministic_and_histories_unchanged(tmp_path):
    from trainer.data.synth import synthesize

    kw = dict(users=40, items=60, mean_len=20, shards=2, seed=5, holdout="none", days=30)
    a = synthesize(tmp_path / "a", workers=1, impressions=3, **kw)
    b = synthesize(tmp_path / "b", workers=2, impressions=3, **kw)
    plain = synthesize(tmp_path / "c", workers=1, **kw)
    for split in a.splits:
        for sa, sb in zip(a.split(split).shards, b.split(split).shards):
            assert sa.sha256 == sb.sha256  # byte-identical whatever the number of workers
    assert [s.sha256 for s in a.split("train").shards] == [s.sha256 for s in plain.split("train").shards]


def test_impression_feedback_follows_the_planted_taste(tmp_path):
    from trainer.data.synth import load_truth, synthesize

    root = tmp_path / "d"
    synthesize(
        root, users=400, items=2000, mean_len=30, shards=1, seed=7, holdout="none", days=30, impressions=8, workers=1
    )
    items, users = load_truth(root)
    support = {int(u): set(s.tolist()) for u, s in zip(users["user"], users["taste_support"])}
    in_taste, grades = [], []
    for split in ("impressions", "impressions_test"):
        for s in samples(root, split):
            clusters = items["item_cluster"][s.cols["imp_item"]]
            in_taste += [int(c) in support[s.user] for c in clusters]
            grades += relevance(s.cols["imp_event"], s.cols["imp_played"]).tolist()
    in_taste, grades = np.array(in_taste), np.array(grades)
    assert 0.2 < in_taste.mean() < 0.9
    assert grades[in_taste].mean() > grades[~in_taste].mean() + 0.3


def test_relevance_grades():
    ev = np.array(
        [EventType.LIKE, EventType.LISTEN, EventType.LISTEN, EventType.LISTEN, EventType.SKIP, EventType.DISLIKE],
        np.uint8,
    )
    played = np.array([10, 80, 40, PLAYED_NA, 5, 90], np.uint16)
    assert relevance(ev, played).tolist() == [3, 2, 1, 2, 0, 0]


@pytest.mark.parametrize("seed", range(5))
def test_pairs_and_metrics_equal_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 9, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g)
    grades = torch.randint(0, 4, (int(sizes.sum()),), generator=g)
    scores = torch.randint(0, 5, (int(sizes.sum()),), generator=g).float()  # ties on purpose
    hi, lo = pairs_of(grades, sizes)
    want, correct, start = set(), 0.0, 0
    for size in sizes.tolist():
        for i, j in itertools.permutations(range(start, start + size), 2):
            if grades[i] > grades[j]:
                want.add((i, j))
                correct += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
        start += size
    assert set(zip(hi.tolist(), lo.tolist())) == want and len(hi) == len(want)
    if want:
        assert pairwise_accuracy(scores.numpy(), hi.numpy(), lo.numpy()) == pytest.approx(correct / len(want))
    # NDCG: perfect order scores 1, and a brute-force DCG for a random order
    s, gr, sz = np.random.default_rng(seed).random(int(sizes.sum())), grades.numpy(), sizes.numpy()
    per, start = [], 0
    for size in sz.tolist():
        gg, ss = gr[start : start + size].astype(float), s[start : start + size]
        start += size
        if gg.max() > 0:
            dcg = sum((2 ** gg[k] - 1) / np.log2(r + 2) for r, k in enumerate(np.argsort(-ss)))
            idcg = sum((2**v - 1) / np.log2(r + 2) for r, v in enumerate(sorted(gg, reverse=True)))
            per.append(dcg / idcg)
    if per:
        assert ndcg_within(s, gr, sz) == pytest.approx(np.mean(per))
        assert ndcg_within(gr.astype(float), gr, sz) == pytest.approx(1.0)


def _tiny_two_tower(lag_layout: str = "merged"):
    from trainer.config import load_config
    from trainer.job import JobConfig
    from trainer.model.two_tower import TwoTower

    cfg = load_config(
        JobConfig,
        REPO / "configs" / "mini.yaml",
        [*TINY_MODEL, f"model.token_layout={lag_layout}", "finetune.item_mlp=8"],
        validate=False,
    )
    torch.manual_seed(0)
    return cfg, TwoTower(cfg.model, cfg.embeddings, cfg.heads, cfg.finetune).eval()


def _scores(model, batch, lag: int, emb: torch.nn.Embedding) -> torch.Tensor:
    """Score every shown item with a plain lookup standing in for the TorchRec item table."""
    from trainer.model.interaction import side_features

    inp = impression_inputs(batch, lag)
    item = emb(batch.values["item"] % emb.num_embeddings)
    side = side_features(batch, model.argus.interaction.side["context"].num_embeddings, torch.device("cpu"))
    with torch.no_grad():
        users = model.user_vectors(item, side, batch.lengths, inp["last"])
        shown = model.item_vectors(emb(inp["shown_item"] % emb.num_embeddings))
    return (users[inp["shown_imp"]] * shown).sum(-1), inp


@pytest.mark.parametrize("layout", ["merged", "interleaved"])
def test_events_at_or_after_request_minus_lag_cannot_change_the_user_state(imp_data, layout):
    cfg, model = _tiny_two_tower(layout)
    ctx, lag = cfg.model.max_seq_len // cfg.tokens_per_interaction(), 3 * 86_400

    def batch():
        return collate(samples(imp_data, "impressions"), padded=False, max_seq_len=ctx)

    torch.manual_seed(1)
    emb = torch.nn.Embedding(150, cfg.embeddings.item_dim)
    ref = batch()
    base, inp = _scores(model, ref, lag, emb)
    imp, lengths = ref.impressions, ref.lengths
    starts = torch.cumsum(lengths, 0) - lengths
    assert inp["kept"].numel() > 5
    changed = 0
    for j, k in enumerate(inp["kept"].tolist()):
        # rewrite everything impression k's user did at or after its cutoff: items, events, played ratios
        b = int(imp["sample"][k])
        rows = torch.arange(int(starts[b]), int(starts[b] + lengths[b]))
        late = rows[ref.values["timestamp"][rows] >= imp["time"][k] - lag]
        if not late.numel():
            continue
        edited = batch()
        edited.values["item"][late] = (edited.values["item"][late] + 7) % 150
        edited.values["event"][late] = EventType.SKIP
        edited.values["played"][late] = 3
        got, _ = _scores(model, edited, lag, emb)
        mine = inp["shown_imp"] == j
        assert torch.allclose(got[mine], base[mine], atol=1e-6), k
        changed += 1
    assert changed >= 5, changed
    # an edit before the cutoff does change the scores (the check above can fail)
    edited = batch()
    edited.values["item"][inp["last"]] = (edited.values["item"][inp["last"]] + 7) % 150
    got, _ = _scores(model, edited, lag, emb)
    assert not torch.allclose(got, base)


def test_impression_inputs_cut_histories_like_a_brute_force_loop(imp_data):
    batch = collate(samples(imp_data, "impressions")[:20], padded=False)
    for lag in (0, 3600, 86_400, 3 * 86_400):
        inp = impression_inputs(batch, lag)
        imp, lengths = batch.impressions, batch.lengths
        starts = torch.cumsum(lengths, 0) - lengths
        want = []
        for k in range(imp["time"].numel()):
            b = int(imp["sample"][k])
            ts = batch.values["timestamp"][starts[b] : starts[b] + lengths[b]].tolist()
            c = sum(t < int(imp["time"][k]) - lag for t in ts)
            if c:
                want.append(int(starts[b]) + c - 1)
        assert inp["last"].tolist() == want
        assert int(inp["no_history"]) == imp["time"].numel() - len(want)


def _torchrun(command: str, *args: str, nproc: int = 2) -> None:
    """`torchrun --nproc_per_node=NPROC -m launch.cli COMMAND ARGS`, the ranks forked in-process."""
    argus_ranks(command, *args, nproc=nproc)


@pytest.fixture(scope="module")
def pretrained(imp_pretrained) -> Path:
    return imp_pretrained


@pytest.fixture
def pretrained_config(imp_data, tmp_path) -> Path:
    """What the checks before any process group read of a pre-training run: its checkpoint's config (TINY)."""
    from trainer.config import load_config, save_config
    from trainer.job import JobConfig

    ckpt = tmp_path / "pre" / "checkpoints" / "step_00000003"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text("{}")
    (ckpt.parent / "latest").write_text(ckpt.name)
    save_config(
        load_config(
            JobConfig,
            REPO / "configs" / "mini.yaml",
            [*TINY, f"data.path={imp_data}", f"out={tmp_path / 'pre'}", "train.steps=3"],
        ),
        ckpt / "config.yaml",
    )
    return tmp_path / "pre"


def _pairwise_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss/pairwise"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _finetune_args(imp_data: Path, pretrained: Path) -> list[str]:
    return [
        "configs/mini.yaml",
        "--init",
        str(pretrained),
        f"data.path={imp_data}",
        *TINY,
        "finetune.item_mlp=16",
        "deepspeed.stage=2",
        CONSTANT_LR,
    ]


@pytest.fixture(scope="module")
def finetuned(imp_data, pretrained, tmp_path_factory) -> Path:
    """A 2-rank fine-tuning run (ZeRO-2, 6 steps) from the session's pre-trained run; read-only. Its eval batches
    are small (7 users), so that 2 and 3 ranks get several batches, and empty padding ones."""
    run = tmp_path_factory.mktemp("ft") / "full"
    _torchrun("finetune", *_finetune_args(imp_data, pretrained), f"out={run}", "train.steps=6", "eval.batch_size=7")
    return run


@pytest.mark.slow
def test_finetune_resumes_bitwise_and_evaluates(imp_data, pretrained, finetuned, tmp_path, capsys):
    common = _finetune_args(imp_data, pretrained)
    part = tmp_path / "part"
    _torchrun("finetune", *common, f"out={part}", "train.steps=3")
    _torchrun("finetune", *common, f"out={part}", "train.steps=6", "resume=true")
    lf, lp = _pairwise_losses(finetuned), _pairwise_losses(part)
    assert sorted(lf) == sorted(lp) == [1, 2, 3, 4, 5, 6]
    assert [lf[s] for s in lf] == [lp[s] for s in lf], "bitwise equal loss curve"
    # before any fine-tuning step the two-tower model ranks exactly like the pre-trained one; this run packs its
    # histories into rows (data.batch_tokens), in training and in eval, which must change nothing
    zero = tmp_path / "zero"
    _torchrun(
        "finetune",
        *common,
        f"out={zero}",
        "train.steps=1",
        "optim.lr=1e-12",
        "embeddings.lr=1e-12",
        "data.batch_tokens=64",
        nproc=1,
    )
    rep0 = json.loads(argus_own_process("eval", str(zero), "--data", str(imp_data), "--json")[1])
    assert rep0["model"]["pairwise_acc"] == pytest.approx(rep0["pretrained"]["pairwise_acc"], abs=2e-3)


def _one_process_reference(run: Path, data: Path) -> dict:
    """The one-process implementation the collective eval replaced: unsharded models (checkpoint.load_model), the
    loader's order, and the pairs enumerated impression by impression."""
    from trainer import checkpoint
    from trainer.data.loader import ShardLoader
    from trainer.export import History, served_vectors
    from trainer.finetune import init_checkpoint
    from trainer.model.interaction import lookup_interactions

    manifest = Manifest.load(data)
    cfg, sparse, dense = checkpoint.load_model(run, manifest.num_items)
    _, init_sparse, init_dense = checkpoint.load_model(init_checkpoint(cfg.finetune.init), manifest.num_items)
    models = {"model": (sparse, dense), "pretrained": (init_sparse, init_dense)}
    split, lag = cfg.finetune.eval_split, cfg.finetune.lag_seconds
    context = cfg.interactions_per_sample()
    loader = ShardLoader.Config(
        path=str(data), split=split, batch_size=5, num_workers=0, shuffle=False, max_seq_len=context
    ).build(0, 1, manifest)
    counts = np.asarray(manifest.item_counts("train"), np.float64)
    scores: dict[str, list] = {"model": [], "pretrained": [], "popularity": [], "data": []}
    grades, sizes, impressions, no_history = [], [], 0, 0
    with torch.no_grad():
        for batch in loader:
            inp = impression_inputs(batch, lag)
            impressions, no_history = impressions + int(inp["impressions"]), no_history + int(inp["no_history"])
            shown = inp["shown_item"] % sparse.item_rows
            for name, (sp, model) in models.items():
                item, side, emb = lookup_interactions(sp, batch, cfg, sp.item_rows, shown, torch.device("cpu"))
                users, items = served_vectors(cfg, model, History(item, side, batch.lengths, inp["last"]), emb)
                scores[name].append((users[inp["shown_imp"]] * items).sum(-1).numpy())
            scores["popularity"].append(np.log1p(counts[shown.numpy()]))
            scores["data"].append(inp["score"].numpy())
            grades.append(inp["grades"].numpy())
            sizes.append(torch.bincount(inp["shown_imp"], minlength=int(inp["impressions"])).numpy())
    g, sz = np.concatenate(grades), np.concatenate(sizes)
    hi, lo, start = [], [], 0
    for size in sz.tolist():
        for i, j in itertools.permutations(range(start, start + size), 2):
            if g[i] > g[j]:
                hi.append(i)
                lo.append(j)
        start += size
    hi, lo = np.array(hi), np.array(lo)
    rep = {"split": split, "impressions": impressions, "impressions_no_history": no_history, "shown": int(g.size)}
    rep.update(pairs=int(hi.size), lag_seconds=lag)
    for name, parts in scores.items():
        s = np.nan_to_num(np.concatenate(parts), nan=-np.inf)
        rep[name] = {"pairwise_acc": pairwise_accuracy(s, hi, lo), "ndcg": ndcg_within(s, g, sz)}
    for base in ("data", "popularity", "pretrained"):
        rep["model"][f"pau_vs_{base}"] = rep["model"]["pairwise_acc"] - rep[base]["pairwise_acc"]
    return rep


def _assert_same_report(got: dict, want: dict, who: str) -> None:
    for key in ("split", "impressions", "impressions_no_history", "shown", "pairs", "lag_seconds"):
        assert got[key] == want[key], (who, key)
    for scorer in ("model", "pretrained", "data", "popularity"):
        assert got[scorer].keys() == want[scorer].keys(), (who, scorer)
        for k, v in want[scorer].items():
            assert got[scorer][k] == pytest.approx(v, rel=0, abs=1e-9), (who, scorer, k)


@pytest.mark.slow
def test_finetune_with_tensor_parallelism_equals_one_rank(imp_data, pretrained, tmp_path):
    """`argus finetune parallel.tp=2` (the pre-trained weights loaded whole, then split by AutoTP): the loss curve,
    the training counts (a tp group's batch counted once) and the consolidated weights are one rank's."""
    from trainer.checkpoint import load_model

    runs = {"one": (1, []), "tp2": (2, ["parallel.tp=2"])}
    for name, (nproc, extra) in runs.items():
        _torchrun("finetune", *_finetune_args(imp_data, pretrained), *extra, f"out={tmp_path / name}",
                  "train.steps=3", nproc=nproc)  # fmt: skip
    one, tp2 = (
        [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines() if "loss/pairwise" in x]
        for n in runs
    )
    assert [r["step"] for r in one] == [r["step"] for r in tp2] == [1, 2, 3]
    assert [r["loss/pairwise"] for r in tp2] == pytest.approx([r["loss/pairwise"] for r in one], rel=1e-5)
    assert [r["impressions"] for r in tp2] == [r["impressions"] for r in one]
    from helpers import shard_shape  # the two-tower's encoder was split: half of qkv's rows on each rank

    assert shard_shape(tmp_path / "tp2", 3, 1, "argus.encoder.blocks.0.attn.qkv.weight") == (48, 32)
    num_items = json.loads((imp_data / "manifest.json").read_text())["num_items"]
    wa, wb = (load_model(tmp_path / n, num_items)[2].state_dict() for n in runs)
    assert wa.keys() == wb.keys() and any(".attn.qkv." in k for k in wa)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=2e-5, rtol=1e-4, msg=k)


@pytest.mark.slow
def test_finetune_eval_is_the_same_on_one_two_and_three_ranks(finetuned, imp_data, tmp_path, capsys):
    """`argus eval` of a fine-tuning run: item tables sharded, users split over the ranks; the report on 1 process
    equals the unsharded one-process reference and the reports on 2 (the CLI, rank 0 prints) and 3 ranks (Ray)."""
    code, out, err = argus_own_process("eval", str(finetuned), "--data", str(imp_data), "--json")
    assert code == 0, err[-2000:]
    one = json.loads(out)
    assert one["split"] == "impressions_test" and one["pairs"] > 0 and one["cost"]["ranks"] == 1
    for who in ("model", "pretrained", "data", "popularity"):
        assert 0.0 <= one[who]["pairwise_acc"] <= 1.0 and 0.0 < one[who]["ndcg"] <= 1.0
    assert one["model"]["pau_vs_popularity"] == pytest.approx(
        one["model"]["pairwise_acc"] - one["popularity"]["pairwise_acc"]
    )
    _assert_same_report(one, _one_process_reference(finetuned, imp_data), "reference")
    outs = argus_ranks("eval", str(finetuned), "--data", str(imp_data), "--json", nproc=2)
    printed = [json.loads(o[o.index("{") :]) for o in outs if "{" in o]
    assert len(printed) == 1 and printed[0]["cost"]["ranks"] == 2, outs
    _assert_same_report(printed[0], one, "2 ranks")
    # 3 ranks: Ray workers (`argus launch ray-eval`, rank 0's report printed by the driver)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": "/tmp"}
    ray = subprocess.run(
        [sys.executable, "-m", "launch.cli", "launch", "ray-eval", str(finetuned), "--data", str(imp_data), "--json",
         "--local", "--num-workers", "3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert ray.returncode == 0, ray.stderr[-3000:]
    three = json.loads(ray.stdout)
    assert three["cost"]["ranks"] == 3 and len(three["cost"]["peak_memory_gib"]) == 3
    _assert_same_report(three, one, "3 ranks")


@pytest.mark.parametrize(
    "args, message, exit_code",  # launch/exit_codes.py: 2 config, 4 data
    [
        (["model.d_model=48", "model.n_heads=2"], "model.d_model: 48 differs from the pre-trained model's 32", 2),
        (["finetune.split=nope"], "no split 'nope'", 4),
    ],
)
def test_finetune_bad_setup_is_one_line(
    imp_data, pretrained_config, tmp_path, args, message, exit_code, monkeypatch, capsys
):
    monkeypatch.chdir(REPO)
    code, _, err = argus_inproc(
        capsys,
        "finetune",
        "configs/mini.yaml",
        "--init",
        str(pretrained_config),
        f"data.path={imp_data}",
        *TINY,
        f"out={tmp_path / 'r'}",
        *args,
    )
    assert code == exit_code and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists() and not torch.distributed.is_initialized()


def test_finetune_init_without_checkpoint_is_refused(imp_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    code, _, err = argus_inproc(
        capsys,
        "finetune",
        "configs/mini.yaml",
        "--init",
        str(tmp_path),
        f"data.path={imp_data}",
        *TINY,
        f"out={tmp_path / 'r'}",
    )
    assert code == 2 and "finetune.init" in err and "no checkpoint" in err


def test_finetune_refuses_a_run_in_out_and_its_own_init(imp_data, pretrained_config, tmp_path, monkeypatch, capsys):
    """As `argus train` (test_train_cli): a run in `out` needs resume=true or train.overwrite=true (one line, every
    file byte-identical); and `out` may never be the pre-trained run it starts from, whatever is passed."""
    import shutil

    from helpers import one_line_error, tree_digest

    monkeypatch.chdir(REPO)
    run = tmp_path / "earlier"
    shutil.copytree(pretrained_config, run)  # a run's layout: checkpoints/step_00000003, latest
    before, init_before = tree_digest(run), tree_digest(pretrained_config)
    common = ["finetune", "configs/mini.yaml", "--init", str(pretrained_config), f"data.path={imp_data}", *TINY]
    code, _, err = argus_inproc(capsys, *common, f"out={run}")
    assert code == 2 and one_line_error(err) == (
        f"argus: error: out {run}: holds a run (checkpoints up to step 3); "
        "pass resume=true to continue it or train.overwrite=true to start over"
    )
    for out in (pretrained_config, pretrained_config / "checkpoints" / "step_00000003"):
        code, _, err = argus_inproc(capsys, *common, f"out={out}", "train.overwrite=true")
        assert code == 2 and one_line_error(err) == (
            f"argus: error: out {out}: is finetune.init's run; the run that starts from it needs a directory of its own"
        )
    assert tree_digest(run) == before and tree_digest(pretrained_config) == init_before
    assert not torch.distributed.is_initialized()
