"""The semantic item tower (model.item_tower, cold_start_mask_rate) against references: the tower's vectors against
the formula written out with plain tensor ops; ``both`` at initialisation equal to the ID tower (losses and
gradients); the cold-start mask; the planner's parameter and FLOP counts against the built module; and, end to end,
a run whose cold items' exported vectors are recomputed from their metadata alone and whose `argus eval --items
cold` ranks exactly the cold targets, as the full report ranks them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embeddings.tables import ItemEmbeddings
from trainer.model.argus import ArgusModel, HeadsConfig, ModelConfig, target_index
from trainer.model.interaction import side_table_rows
from trainer.model.item_tower import SemanticItems, cold_start_mask

FEAT, DIM = 6, 8


def _tower(kind: str, items: int = 40, seed: int = 0) -> SemanticItems:
    torch.manual_seed(seed)
    t = SemanticItems(kind, FEAT, DIM, init_std=0.05)
    with torch.no_grad():  # every weight random (both's output layer starts at zero)
        for p in t.parameters():
            p.normal_(0.0, 0.5)
    t.features = torch.randn(items, FEAT)
    t.cold = torch.rand(items) < 0.3
    return t


def _reference(t: SemanticItems, emb: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor | None) -> torch.Tensor:
    z = t.features[ids]
    mu, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
    zn = (z - mu) / torch.sqrt(var + t.norm.eps) * t.norm.weight + t.norm.bias
    hid = zn @ t.fc1.weight.T + t.fc1.bias
    hid = 0.5 * hid * (1.0 + torch.erf(hid / math.sqrt(2.0)))
    sem = hid @ t.fc2.weight.T + t.fc2.bias
    if t.tower == "semantic":
        return sem
    out = []
    for k in range(ids.numel()):
        no_id = bool(t.cold[ids[k]]) or (masked is not None and bool(masked[k]))
        out.append((t.oov.weight[0] if no_id else emb[k]) + sem[k])
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["semantic", "both"])
def test_tower_equals_the_written_out_formula(kind):
    t = _tower(kind)
    ids = torch.randint(0, 40, (50,))
    emb = torch.randn(50, DIM)
    masked = torch.rand(50) < 0.4
    for m in (None, masked):
        torch.testing.assert_close(t(emb, ids, m), _reference(t, emb, ids, m))
    if kind == "both":  # a cold or masked row reads no ID row: changing it changes nothing
        no_id = t.cold[ids] | masked
        emb2 = emb + 10.0 * no_id[:, None]
        torch.testing.assert_close(t(emb2, ids, masked), t(emb, ids, masked))
        assert not torch.allclose(t(emb + 1.0, ids, masked), t(emb, ids, masked))


def test_under_bf16_the_tower_returns_the_lookup_dtype_and_both_starts_at_the_id_rows():
    """Mixed precision: the tower's weights in bf16, the lookups in fp32 (TorchRec) -> fp32 vectors, so the head
    scores in fp32; ``both`` at initialisation (psi's output layer zero) returns the warm ID rows bit for bit."""
    torch.manual_seed(3)
    both = SemanticItems("both", FEAT, DIM, init_std=0.05).to(torch.bfloat16)
    both.features, both.cold = torch.randn(40, FEAT, dtype=torch.bfloat16), torch.zeros(40, dtype=torch.bool)
    ids, emb = torch.randint(0, 40, (30,)), torch.randn(30, DIM)
    out = both(emb, ids)
    assert out.dtype == torch.float32 and torch.equal(out, emb)
    masked = torch.arange(30) % 2 == 0
    out = both(emb, ids, masked)
    assert torch.equal(out[~masked], emb[~masked])
    assert torch.equal(out[masked], both.oov.weight.float().expand(15, DIM))
    sem = _tower("semantic").to(torch.bfloat16)
    assert sem(emb, ids).dtype == torch.float32


def test_cold_start_mask_is_per_id_and_near_its_rate():
    ids = torch.arange(200_000)
    m = cold_start_mask(ids, salt=12345, rate=0.1)
    assert abs(float(m.float().mean()) - 0.1) < 0.005
    again = cold_start_mask(torch.cat([ids[:1000], ids[:1000]]), salt=12345, rate=0.1)
    assert torch.equal(again[:1000], m[:1000]) and torch.equal(again[1000:], m[:1000])  # an id: one decision
    other = cold_start_mask(ids, salt=999, rate=0.1)
    assert 0.15 < float((m ^ other).float().mean()) < 0.2  # a new salt: a new draw (2 r (1 - r) = 0.18)
    assert not cold_start_mask(ids, salt=1, rate=0.0).any()


def _model(tower: str) -> ArgusModel:
    torch.manual_seed(7)
    model = ModelConfig(preset="custom", d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16, side_dim=4,
                        item_tower=tower, item_features=FEAT if tower != "id" else 0)  # fmt: skip
    m = ArgusModel(model, ItemEmbeddings.Config(item_dim=DIM), HeadsConfig())
    if m.items is not None:
        m.items.features = torch.randn(30, FEAT)
        m.items.cold = torch.zeros(30, dtype=torch.bool)
    return m


def _inputs(seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 6])
    n = int(lengths.sum())
    item_ids, neg_ids = torch.randint(0, 30, (n,), generator=g), torch.randint(0, 30, (7,), generator=g)
    side = {k: torch.randint(0, rows, (n,), generator=g) for k, rows in side_table_rows(64).items()}
    tgt = target_index(lengths)
    item = torch.randn(n, DIM, generator=g, requires_grad=True)
    neg = torch.randn(7, DIM, generator=g, requires_grad=True)
    played = torch.randint(0, 100, (n,), generator=g)
    return (item, side, neg, lengths, tgt, torch.arange(3), item_ids, neg_ids, side["event"], played,
            torch.zeros(tgt.numel()), torch.zeros(3 + 7))  # fmt: skip


def test_both_starts_as_the_id_tower():
    """With warm items and no mask (cold_start_mask_rate 0), ``both`` at initialisation is the ID tower: the same
    losses and the same gradients into the looked-up ID rows (its other weights are drawn after the ID model's)."""
    ref, both = _model("id").train(False), _model("both").train(False)
    shared = [(k, v) for k, v in both.named_parameters() if "items." not in k]
    for (k, a), (_, b) in zip(ref.named_parameters(), shared):
        assert torch.equal(a, b), k
    args_a, args_b = _inputs(), _inputs()
    out_a, out_b = ref(*args_a), both(*args_b)
    for key in ("loss/next_item", "loss/feedback", "loss"):
        torch.testing.assert_close(out_a[key], out_b[key], rtol=0, atol=0)
    out_a["loss"].backward()
    out_b["loss"].backward()
    torch.testing.assert_close(args_a[0].grad, args_b[0].grad)  # the history's ID rows
    torch.testing.assert_close(args_a[2].grad, args_b[2].grad)  # the negatives' ID rows
    masked = (torch.ones(14, dtype=torch.bool), torch.ones(7, dtype=torch.bool))  # every ID row swapped for OOV
    assert not torch.allclose(both(*_inputs(), masked=masked)["loss"], out_b["loss"])


@pytest.mark.parametrize("tower", ["semantic", "both"])
def test_the_planner_counts_the_tower(tower):
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.config import from_dict
    from trainer.flops import item_tower_flops
    from trainer.job import JobConfig
    from trainer.memory import dense_params
    from trainer.model.build import build_dense

    raw = {"model": {"preset": "nano", "item_tower": tower, "item_features": 12}, "embeddings": {"item_dim": 24}}
    cfg = from_dict(JobConfig, raw)
    base = from_dict(JobConfig, {"model": {"preset": "nano"}, "embeddings": {"item_dim": 24}})
    built = sum(p.numel() for p in build_dense(cfg).parameters())
    assert dense_params(cfg).total == built
    tower_params = sum(p.numel() for p in build_dense(cfg).items.parameters())
    assert dense_params(cfg).total - dense_params(base).total == tower_params
    t = build_dense(cfg).items
    t.features, t.cold = torch.randn(10, 12), torch.zeros(10, dtype=torch.bool)
    with FlopCounterMode(display=False) as fc:
        t(torch.randn(50, 24), torch.randint(0, 10, (50,)))
    assert fc.get_total_flops() == 50 * item_tower_flops(cfg, training=False)
    assert item_tower_flops(base) == 0
    # the item data on every rank, as the training dtype holds them
    from cluster.planner import PlanRequest, plan
    from trainer.memory import item_data_bytes

    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cfg.deepspeed.precision = precision
        t.to(dtype)
        assert item_data_bytes(cfg, 10) == t.features.nbytes + t.cold.nbytes
    assert item_data_bytes(base, 10) == 0
    assert plan(cfg, PlanRequest(items=1000))["memory"]["item_data"] == item_data_bytes(cfg, 1000) > 0


def test_tower_settings_are_checked_in_one_line():
    for model, msg in [
        ({"item_tower": "text"}, "model.item_tower: must be one of id, semantic, both"),
        ({"item_tower": "both"}, "model.item_features: item_tower both needs the width"),
        ({"item_tower": "both", "item_features": 4, "cold_start_mask_rate": 1.0}, "model.cold_start_mask_rate: must"),
        ({"cold_start_mask_rate": 0.1}, "model.cold_start_mask_rate: masks ID rows for the OOV vector"),
    ]:
        with pytest.raises(ValueError, match="^" + msg.replace(".", r"\.")):
            ModelConfig(**model).validate()


@pytest.fixture(scope="module")
def cold_data(tmp_path_factory):
    from trainer.data.synth import synthesize

    root = tmp_path_factory.mktemp("cold") / "data"
    synthesize(root, users=80, items=150, mean_len=40, shards=2, seed=3, holdout="temporal", workers=1, days=30,
               val_days=0, test_days=6, item_features=FEAT, new_items=0.2, impressions=2)  # fmt: skip
    return root


def test_attach_refuses_data_that_cannot_describe_the_model(cold_data, data):
    from trainer.data.manifest import Manifest
    from trainer.model.item_tower import attach_item_data

    m = _model("both")
    with pytest.raises(ValueError, match="^embeddings.item_rows: model.item_tower=both needs one table row per item"):
        attach_item_data(m, Manifest.load(cold_data), 100)
    with pytest.raises(ValueError, match="no item_features"):
        attach_item_data(m, Manifest.load(data), Manifest.load(data).num_items)
    wide = ModelConfig(preset="nano", item_tower="both", item_features=FEAT + 1)
    with pytest.raises(ValueError, match=f"^model.item_features: {FEAT + 1}, but the item features of .* have dim"):
        wide_model = ArgusModel(wide, ItemEmbeddings.Config(item_dim=DIM), HeadsConfig())
        attach_item_data(wide_model, Manifest.load(cold_data), 150)
    attach_item_data(m, Manifest.load(cold_data), 150)
    assert m.items.features.shape == (150, FEAT) and int(m.items.cold.sum()) > 0


@pytest.mark.slow
def test_cold_items_train_export_and_eval(tmp_path, cold_data):
    """`argus train` with item_tower both and a mask rate, then `argus finetune` from it. `argus export` of each: a
    cold item's vector is oov + psi(its metadata) (through the ranker's item MLP after fine-tuning), recomputed here
    from the checkpoint's tower weights and the metadata alone (no ID row read). `argus eval --items cold`: exactly
    the test targets on cold items (counted here from the shards), each ranked as the report over all targets
    ranks it."""
    from helpers import TINY_MODEL, argus_own_process, argus_ranks, read_samples

    from trainer.checkpoint import dense_weights, resolve_checkpoint, saved_job
    from trainer.data.item_features import load_item_features
    from trainer.data.manifest import Manifest
    from trainer.export import load_export
    from trainer.model.build import build_dense

    run, out = tmp_path / "run", tmp_path / "export"
    tower = ["model.item_tower=both", f"model.item_features={FEAT}", "heads.next_item.normalize=false"]
    argus_ranks("train", "configs/mini.yaml", f"data.path={cold_data}", *TINY_MODEL, "data.num_workers=0",
                "train.steps=4", f"out={run}", *tower, "model.cold_start_mask_rate=0.2", nproc=1)  # fmt: skip
    code, _, err = argus_own_process("export", str(run), "--data", str(cold_data), "--out", str(out), "--split", "test")
    assert code == 0, err[-2000:]
    users, user_vecs, _, item_ids, item_vecs = load_export(out)
    manifest = Manifest.load(cold_data)
    counts = np.asarray(manifest.item_counts("train"))
    cold = np.flatnonzero(counts == 0)
    assert cold.size and np.array_equal(np.sort(item_ids), np.arange(manifest.num_items))  # cold items have rows

    ckpt = resolve_checkpoint(run)
    assert np.array_equal(np.load(ckpt / "item_cold.npy"), counts == 0)  # the flags the run trained with
    dense = build_dense(saved_job(ckpt))
    dense.load_state_dict(dense_weights(ckpt))
    t = dense.items
    z = torch.from_numpy(np.array(load_item_features(manifest)))[torch.from_numpy(cold)]
    with torch.no_grad():
        ref = t.oov.weight[0] + t.fc2(F.gelu(t.fc1(t.norm(z))))
    by_id = dict(zip(item_ids.tolist(), range(item_ids.size)))
    np.testing.assert_allclose(item_vecs[[by_id[i] for i in cold.tolist()]], ref.numpy(), rtol=1e-5, atol=1e-6)

    code, stdout, err = argus_own_process("eval", str(run), "--data", str(cold_data), "--items", "cold", "--json")
    assert code == 0, err[-2000:]
    rep = json.loads(stdout)
    assert rep["items"] == "cold"
    # the cold targets, counted from the test samples independently of the loader
    want, every = [], 0
    context = saved_job(resolve_checkpoint(run)).interactions_per_sample()
    for s in sorted(read_samples(cold_data, "test"), key=lambda s: (s.user, s.offset)):
        if s.target_start <= max(s.n - context, 0):  # the loader keeps a sample's last `context`: no history left
            continue
        for item in s.cols["item"][s.target_start :].tolist():
            every += 1
            if counts[item] == 0:
                want.append((int(s.user), int(item)))
    assert want and math.isclose(rep["cold_share"], len(want) / every)
    from trainer.evaluate import evaluate

    per = evaluate(run, cold_data, items="cold", per_target=True, device="cpu")["per_target"]
    assert list(zip(per["user"], per["item"])) == want  # positions: inside the loaded (context-cut) samples
    every_target = evaluate(run, cold_data, per_target=True, device="cpu")["per_target"]
    rank_of = {(u, p): r for u, p, r in zip(every_target["user"], every_target["position"], every_target["rank"])}
    assert per["rank"] == [rank_of[(u, p)] for u, p in zip(per["user"], per["position"])]  # ranked as among all

    # fine-tuning from it: the two-tower ranker's item side reads the pre-trained tower (cold items included)
    ft, ft_out = tmp_path / "ft", tmp_path / "ft_export"
    argus_ranks("finetune", "configs/mini.yaml", "--init", str(run), f"data.path={cold_data}", *TINY_MODEL, *tower,
                "data.num_workers=0", "finetune.item_mlp=16", "train.steps=2", f"out={ft}", nproc=1)  # fmt: skip
    code, _, err = argus_own_process("export", str(ft), "--data", str(cold_data), "--out", str(ft_out))
    assert code == 0, err[-2000:]
    _, _, _, ft_ids, ft_vecs = load_export(ft_out)
    ckpt = resolve_checkpoint(ft)
    two = build_dense(saved_job(ckpt))
    two.load_state_dict(dense_weights(ckpt))
    t = two.argus.items
    with torch.no_grad():
        ref = two.item_tower(t.oov.weight[0] + t.fc2(F.gelu(t.fc1(t.norm(z)))))
    ft_by_id = dict(zip(ft_ids.tolist(), range(ft_ids.size)))
    np.testing.assert_allclose(ft_vecs[[ft_by_id[i] for i in cold.tolist()]], ref.numpy(), rtol=1e-5, atol=1e-6)


def test_two_tower_training_scores_are_the_served_ones():
    """A fine-tuning step's scores (TwoTower.forward, the tower applied to the lookups there) equal the dot products
    of the served vectors export writes (served_vectors, the tower applied there), cold items included."""
    from trainer.export import History, served_vectors
    from trainer.job import JobConfig
    from trainer.model.two_tower import FinetuneConfig, TwoTower

    torch.manual_seed(3)
    model = ModelConfig(preset="custom", d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16, side_dim=4,
                        item_tower="both", item_features=FEAT)  # fmt: skip
    emb = ItemEmbeddings.Config(item_dim=DIM)
    two = TwoTower(model, emb, HeadsConfig(), FinetuneConfig(item_mlp=12)).eval()
    with torch.no_grad():
        for p in two.parameters():
            p.normal_(0.0, 0.3)
    two.argus.items.features, two.argus.items.cold = torch.randn(30, FEAT), torch.rand(30) < 0.3
    item, side, _, lengths, *_ = _inputs()
    g = torch.Generator().manual_seed(1)
    ids, shown = torch.randint(0, 30, (14,), generator=g), torch.randint(0, 30, (9,), generator=g)
    shown_emb, last = torch.randn(9, DIM, generator=g), torch.tensor([3, 6, 12])
    shown_imp = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    none = torch.zeros(0, dtype=torch.long)
    with torch.no_grad():
        scores = two(item, side, lengths, last, shown_emb, shown_imp, none, none, ids, shown)["scores"]
        cfg = JobConfig(model=model, embeddings=emb)
        users, items = served_vectors(cfg, two, History(item, side, lengths, last, None, ids), shown_emb, shown)
    torch.testing.assert_close(scores, (users[shown_imp] * items).sum(-1))
    with torch.no_grad():  # and the tower matters: the same lookups without it score otherwise
        bare = two.item_vectors(shown_emb)
    assert not torch.allclose(items, bare)


def test_a_run_on_data_without_fitting_features_is_refused_in_one_line(capsys, tmp_path, data, cold_data):
    from helpers import argus_inproc, one_line_error

    base = ["train", "configs/mini.yaml", f"out={tmp_path / 'run'}", "model.item_tower=both"]
    code, _, err = argus_inproc(capsys, *base, f"data.path={data}", f"model.item_features={FEAT}")
    assert code == 4 and "manifest.json: no item_features (write them with `argus data synth" in one_line_error(err)
    code, _, err = argus_inproc(capsys, *base, f"data.path={cold_data}", "model.item_features=5")
    assert code == 2 and one_line_error(err).startswith(
        f"argus: error: model.item_features: 5, but the item features of {cold_data} have dim {FEAT}"
    )
    assert not (tmp_path / "run").exists()


def test_rank_split_slices_cold_items_and_stale_states_like_a_loop(cold_data):
    """rank_split (the reference models' ranking) with items="cold" and state_before: the users it ranks and the
    states it asks for, against a loop over the test samples."""
    from helpers import read_samples

    from trainer.data.manifest import Manifest
    from trainer.evaluate import eval_loader, rank_split

    m = Manifest.load(cold_data)
    counts = np.asarray(m.item_counts("train"))
    at = m.holdout_start("test") - 86400
    seen: list[tuple[int, int]] = []

    def scores_fn(batch, t, last=None):
        seen.extend(zip(batch.users.tolist(), last.tolist()))
        return torch.zeros(batch.size, m.num_items)

    r = rank_split(eval_loader(cold_data, m, "test", 7, 10_000), scores_fn, counts, [10], state_before=at, items="cold")
    want_users, want_last = 0, {}
    for s in read_samples(cold_data, "test"):
        ts, items = s.cols["timestamp"], s.cols["item"]
        last = min(int((ts <= at).sum()), s.target_start) - 1
        want_last[int(s.user)] = last
        if s.target_start > 0 and last >= 0 and (counts[items[s.target_start :]] == 0).any():
            want_users += 1
    assert r.users == want_users > 0
    assert all(want_last[u] == last for u, last in seen)


def test_a_checkpoints_cold_flags_replace_the_datasets(tmp_path, cold_data):
    """The cold flags are the trained model's: saved beside its weights and read back over those of the dataset a
    later eval / export / fine-tuning attaches (which may have seen more items); a wrong length is one line."""
    from trainer.data.manifest import Manifest
    from trainer.model.item_tower import attach_item_data, load_item_cold, save_item_cold

    m, trained = _model("both"), torch.rand(150) < 0.5
    m.items.cold = trained
    save_item_cold(m, tmp_path)
    later = _model("both")
    attach_item_data(later, Manifest.load(cold_data), 150)
    assert not torch.equal(later.items.cold, trained)
    load_item_cold(later, tmp_path)
    assert torch.equal(later.items.cold, trained)
    load_item_cold(_model("id"), tmp_path)  # the ID tower has none to replace
    np.save(tmp_path / "item_cold.npy", np.zeros(7, bool))
    with pytest.raises(ValueError, match="item_cold.npy: cold flags for 7 items, but the dataset attached has 150"):
        load_item_cold(later, tmp_path)


def _mask_worker(rank: int, job: dict, port: int, out: str) -> None:
    from helpers import single_rank_engine

    cfg, manifest, engine = single_rank_engine(job, port)
    got = []
    for step, batch in zip(range(3), cfg.loader_config().build(0, 1, manifest)):
        args, _ = engine.inputs(batch, step)
        item_ids, neg_ids, (m_item, m_neg) = args[6], args[7], args[-1]
        got.append([item_ids.tolist(), neg_ids.tolist(), m_item.tolist(), m_neg.tolist()])
        engine.train_step(batch, step)
    Path(out).write_text(json.dumps(got))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_training_masks_the_same_ids_on_both_sides_at_its_rate(tmp_path, cold_data):
    """What a training step hands the model (Engine.inputs): uniform negatives drawn among the warm items only (a
    full softmax: all of them);
    with model.cold_start_mask_rate, a mask over the history's and the negatives' ids, one decision per id and
    step, covering about the rate of the distinct ids, redrawn every step."""
    from helpers import free_port, start_ranks

    rate = 0.3
    job = {
        "data": {"path": str(cold_data), "batch_size": 8, "num_workers": 0},
        "model": {"preset": "custom", "d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32, "max_seq_len": 24,
                  "item_tower": "both", "item_features": FEAT, "cold_start_mask_rate": rate},
        "embeddings": {"item_dim": DIM},
        "heads": {"next_item": {"uniform_negatives": 64, "in_batch_negatives": 8, "full_softmax": False}},
        "train": {"steps": 3, "seed": 3, "device": "cpu", "timeout_s": 120},
        "out": str(tmp_path / "run"),
    }  # fmt: skip
    out = tmp_path / "masks.json"
    start_ranks(_mask_worker, (job, free_port(), str(out)), nprocs=1)
    from trainer.data.manifest import Manifest

    counts = np.asarray(Manifest.load(cold_data).item_counts("train"))
    decisions = []
    for item_ids, neg_ids, m_item, m_neg in json.loads(out.read_text()):
        assert (counts[neg_ids] > 0).all()  # uniform negatives: never a cold item
        step: dict[int, bool] = {}
        for i, m in zip(item_ids + neg_ids, m_item + m_neg):
            assert step.setdefault(i, m) == m  # an id: masked everywhere in the step or nowhere
        decisions.append(step)
        assert 0.1 < sum(step.values()) / len(step) < 0.5
    common = set(decisions[0]) & set(decisions[1])
    assert any(decisions[0][i] != decisions[1][i] for i in common)  # a new draw each step
    # a full softmax scores every warm item once, and no cold one
    job["heads"]["next_item"]["full_softmax"] = True
    job["out"] = str(tmp_path / "run-full")
    start_ranks(_mask_worker, (job, free_port(), str(out)), nprocs=1)
    for _, neg_ids, _, _ in json.loads(out.read_text()):
        assert neg_ids == np.flatnonzero(counts > 0).tolist()
