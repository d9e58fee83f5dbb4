"""``embeddings.backend: torch``: the whole item table on every rank as a plain ``nn.Embedding``.

- 2 gloo ranks under the torch backend == the one-process plain-PyTorch reference of
  ``test_sharded_equivalence.py`` (the same reference the TorchRec DMP path is held to);
- its optimizers against hand computations and torch's own optimizers;
- its lookup builds no KeyedJaggedTensor and calls no fbgemm op;
- resume is bitwise; checkpoints of either backend load into the other (tables and optimizer state: a run
  continues across backends), into ``argus eval``'s plain ``SparseArch`` and into ``argus export``;
- ``argus plan`` counts the whole table, its gradient and its optimizer state on every rank;
- the config check names ``embeddings.backend``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL, argus_ranks, free_port, losses, start_ranks
from test_sharded_equivalence import _sharded_worker, reference, small_data, tiny_job  # noqa: F401 (fixture)

from embeddings.replicated import ReplicatedItemTables, ReplicatedOptimizer
from embeddings.tables import ItemEmbeddings
from trainer.config import ConfigError, from_dict, to_dict
from trainer.job import JobConfig

KEY = "items.embeddings.item.weight"


# ---- 1. two ranks == the plain-PyTorch reference ------------------------------------------------------------------
@pytest.mark.slow
def test_two_ranks_torch_backend_equal_the_unsharded_reference(small_data, tmp_path):  # noqa: F811 (fixture)
    # row-wise Adagrad (the default) hardly sees the gradient's scale (g / sqrt(mean g^2)); SGD does: together
    # they check the update and the averaging over ranks. ZeRO-2 and ZeRO-3 (the reference is the same for both).
    jobs = []
    for opt, stage in (("rowwise_adagrad", 2), ("sgd", 3)):
        job = tiny_job(small_data, tmp_path / opt, stage=stage)
        job.embeddings.backend, job.embeddings.optimizer = "torch", opt
        job.validate(2, "cpu")
        jobs.append(job)
    out = tmp_path / "replicated.json"
    start_ranks(_sharded_worker, (2, [to_dict(j) for j in jobs], free_port(), str(out)), nprocs=2)
    from embeddings.tables import init_rows

    init = init_rows("item", 0, 120, jobs[0].embeddings.item_dim, jobs[0].train.seed, jobs[0].embeddings.init_std)
    for job, got in zip(jobs, json.loads(out.read_text())):
        opt = job.embeddings.optimizer
        ref = reference(job, world=2)  # the reference knows no backend: the same one the DMP path is held to
        assert ref["losses"][-1] != ref["losses"][0]
        # the tolerances of test_sharded_equivalence (see the reasons there)
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6), opt
        torch.testing.assert_close(
            torch.tensor(got["tables"]["item"]),
            ref["tables"]["item"],
            rtol=1e-5,
            atol=1e-6,
            msg=lambda m, opt=opt: f"{opt}: {m}",
        )
        for name, p in ref["dense"].items():
            g = torch.tensor(got["dense"][name])
            if name.endswith("attn.qkv.bias"):  # the key bias has an identically zero gradient: left out
                d = p.shape[0] // 3
                g, p = torch.cat([g[:d], g[2 * d :]]), torch.cat([p[:d], p[2 * d :]])
            torch.testing.assert_close(
                g, p, rtol=1e-4, atol=2e-5, msg=lambda m, n=name, opt=opt: f"{opt}: dense {n}: {m}"
            )
        assert not torch.allclose(ref["tables"]["item"], init)  # the table really moved


# ---- the optimizer and the lookup, in this process ----------------------------------------------------------------
def _steps(opt: str, grads: list[torch.Tensor], w0: torch.Tensor, lr: float, eps: float):
    cfg = ItemEmbeddings.Config(item_dim=w0.shape[1], optimizer=opt, lr=lr, eps=eps)
    tables = ReplicatedItemTables(cfg, w0.shape[0])
    with torch.no_grad():
        tables.weight.copy_(w0)
    optim = ReplicatedOptimizer(tables, cfg)
    for g in grads:
        tables.weight.grad = g.clone()
        optim.step()
        assert tables.weight.grad is None
    return tables.weight.detach(), optim.state_dict()


@pytest.mark.parametrize("opt", ["rowwise_adagrad", "adagrad", "sgd", "adam"])
def test_replicated_optimizer_equals_hand_computation_and_torch(opt):
    gen = torch.Generator().manual_seed(0)
    rows, dim, lr, eps = 6, 4, 0.3, 1e-8
    w0 = torch.randn(rows, dim, generator=gen)
    grads = [torch.randn(rows, dim, generator=gen) for _ in range(3)]
    for g in grads:
        g[5] = 0.0  # a row no rank looked up
    got, state = _steps(opt, grads, w0, lr, eps)

    w, ref_state = w0.clone(), None
    if opt == "rowwise_adagrad":  # by hand: one accumulator per row, the mean of the squared gradient
        s = torch.zeros(rows)
        for g in grads:
            s = s + (g * g).sum(1) / dim
            w = w - lr * g / (s.sqrt()[:, None] + eps)
        ref_state = s
        # and TorchRec's own (plain torch) RowWiseAdagrad
        from torchrec.optim import RowWiseAdagrad

        p = torch.nn.Parameter(w0.clone())
        o = RowWiseAdagrad([p], lr=lr, eps=eps)
        for g in grads:
            p.grad = g.clone()
            o.step()
        torch.testing.assert_close(got, p.detach(), rtol=1e-6, atol=1e-7)
    elif opt == "adagrad":  # by hand: one accumulator per element
        s = torch.zeros(rows, dim)
        for g in grads:
            s = s + g * g
            w = w - lr * g / (s.sqrt() + eps)
        ref_state = s
    else:
        p = torch.nn.Parameter(w0.clone())
        o = torch.optim.SGD([p], lr=lr) if opt == "sgd" else torch.optim.Adam([p], lr=lr, eps=eps, betas=(0.9, 0.999))
        for g in grads:
            p.grad = g.clone()
            o.step()
        w = p.detach()
    torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-7)
    assert not torch.equal(got[:5], w0[:5])
    # TorchRec's fused optimizer state layout: {"state": {param key: {"<table>.<state>": tensor}}}
    names = {"rowwise_adagrad": ["item.momentum1"], "adagrad": ["item.momentum1"], "sgd": []}
    assert sorted(state["state"][KEY]) == names.get(opt, ["item.momentum1", "item.momentum2", "item.step"])
    if ref_state is not None:
        torch.testing.assert_close(state["state"][KEY]["item.momentum1"], ref_state, rtol=1e-6, atol=1e-7)
    if opt != "adam":  # dense Adam moves a row with zero gradient by its momentum; the others leave it
        assert torch.equal(got[5], w0[5])


def test_torch_lookup_builds_no_kjt_and_calls_no_fbgemm_op(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode
    from torchrec.sparse import jagged_tensor

    from embeddings.features import lookup_batch, lookup_ids
    from embeddings.tables import SparseArch, init_sparse_weights
    from trainer.engine import dummy_batch

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.namespaces: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.namespaces.add(func.namespace)
            return func(*args, **(kwargs or {}))

    kjts = []
    init = jagged_tensor.KeyedJaggedTensor.__init__

    def record(self, *a, **k):
        kjts.append(1)
        init(self, *a, **k)

    monkeypatch.setattr(jagged_tensor.KeyedJaggedTensor, "__init__", record)
    cfg = ItemEmbeddings.Config(item_dim=8, item_rows=50)
    batch, extra = dummy_batch(), torch.tensor([3, 70, 49])  # 70: outside the table, hashed on the host
    plain = SparseArch(cfg, 50, device="cpu")
    init_sparse_weights(plain, cfg, seed=1)
    with Ops() as ops:  # the checks can fail: TorchRec's lookup builds a KJT; an fbgemm op is seen
        want = lookup_batch(plain, batch, cfg, 50, extra, torch.device("cpu"))
        torch.ops.fbgemm.asynchronous_complete_cumsum(torch.tensor([1, 2]))
    assert kjts and "fbgemm" in ops.namespaces

    kjts.clear()
    tables = ReplicatedItemTables(cfg, 50)
    init_sparse_weights(tables, cfg, seed=1)
    with Ops() as ops:
        got = lookup_batch(tables, batch, cfg, 50, extra, torch.device("cpu"))
        ids = lookup_ids(tables, torch.tensor([0, 7]), torch.device("cpu"))
    assert not kjts and ops.namespaces == {"aten"}, ops.namespaces
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(ids, tables.weight[[0, 7]])


# ---- 2 + 3. resume under the torch backend; checkpoints across backends -------------------------------------------
TINY = [*TINY_MODEL, "data.num_workers=0", "optim.warmup_steps=0", "optim.schedule=constant", "deepspeed.stage=2"]


def _tables(path: Path, cfg: ItemEmbeddings.Config, num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(item table, row-wise Adagrad state) of checkpoint ``path``, read into a torch-backend table."""
    from trainer.checkpoint import load_tables

    tables = ReplicatedItemTables(cfg, num_items)
    optim = ReplicatedOptimizer(tables, cfg)
    load_tables(path, tables, optim)
    return tables.weight.detach().clone(), optim.state_dict()["state"][KEY]["item.momentum1"].clone()


@pytest.mark.slow
def test_torch_backend_resumes_bitwise_and_checkpoints_load_across_backends(data, tmp_path):
    from cluster.hardware import Hardware
    from cluster.planner import PlanRequest, plan
    from trainer import checkpoint
    from trainer.export import load_export

    num_items = json.loads((data / "manifest.json").read_text())["num_items"]
    common = ["configs/mini.yaml", f"data.path={data}", *TINY]
    on_torch = [*common, "embeddings.backend=torch"]
    full, part, to_torchrec, to_torch = (tmp_path / n for n in ("full", "part", "to_torchrec", "to_torch"))

    # 3. bitwise resume: 4 steps straight == 2 steps + resume to 4 (losses, tables, optimizer state, dense weights)
    argus_ranks("train", *on_torch, f"out={full}", "train.steps=4", "train.checkpoint_every=2")
    argus_ranks("train", *on_torch, f"out={part}", "train.steps=2")
    shutil.copytree(part, to_torchrec)
    argus_ranks("train", *on_torch, f"out={part}", "train.steps=4", "resume=true")
    lf, lp = losses(full), losses(part)
    assert sorted(lf) == sorted(lp) == [1, 2, 3, 4]
    assert [lf[s] for s in range(1, 5)] == [lp[s] for s in range(1, 5)], "bitwise equal loss curve"
    cfg = checkpoint.saved_job(full / "checkpoints" / "step_00000004")
    assert cfg.embeddings.backend == "torch"
    ends = [p / "checkpoints" / "step_00000004" for p in (full, part)]
    (w_full, s_full), (w_part, s_part) = (_tables(p, cfg.embeddings, num_items) for p in ends)
    assert torch.equal(w_full, w_part) and torch.equal(s_full, s_part)
    w2, s2 = _tables(full / "checkpoints" / "step_00000002", cfg.embeddings, num_items)
    assert not torch.equal(w2, w_full) and not torch.equal(s2, s_full) and bool((s2 > 0).any())
    d_full, d_part = (checkpoint.dense_weights(p) for p in ends)
    assert d_full.keys() == d_part.keys() and all(torch.equal(d_full[k], d_part[k]) for k in d_full)
    # the layout training wrote is the one `argus plan` reports: the table whole on both ranks
    written = json.loads((full / "sharding_plan.json").read_text())
    planned = plan(cfg, PlanRequest(items=num_items, hardware=Hardware("h100", nodes=1, gpus_per_node=2)))
    assert written == planned["embedding_plan"]["plan"]
    assert [s[0] for s in written["item"]["shards"]] == [0, 1] and written["item"]["sharding_type"] == "replicated"

    # 2. torch-written tables into `argus eval`'s plain TorchRec SparseArch: the same bytes
    _, sparse, _ = checkpoint.load_model(ends[0], num_items)
    assert torch.equal(sparse.state_dict()[KEY], w_full)
    # `argus export` on 2 ranks under the run's backend (torch: each rank reads the whole table) == the same
    # checkpoint exported through a TorchRec DMP
    as_torchrec = tmp_path / "as_torchrec"
    shutil.copytree(ends[0], as_torchrec)
    yaml_path = as_torchrec / "config.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("backend: torch\n", "backend: torchrec\n"))
    assert checkpoint.saved_job(as_torchrec).embeddings.backend == "torchrec"
    for ck, name in ((ends[0], "ex_torch"), (as_torchrec, "ex_torchrec")):
        argus_ranks("export", str(ck), "--data", str(data), "--out", str(tmp_path / name), nproc=2)
    (u1, uv1, _, i1, iv1), (u2, uv2, _, i2, iv2) = (load_export(tmp_path / n) for n in ("ex_torch", "ex_torchrec"))
    assert len(u1) > 0 and sorted(i1.tolist()) == list(range(num_items))
    o1, o2, p1, p2 = np.argsort(u1), np.argsort(u2), np.argsort(i1), np.argsort(i2)
    assert np.array_equal(u1[o1], u2[o2]) and np.array_equal(i1[p1], i2[p2])
    np.testing.assert_allclose(uv1[o1], uv2[o2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(iv1[p1], iv2[p2], rtol=1e-5, atol=1e-6)

    # 2. torch-written (step 2) -> TorchRec: a row-wise DMP over 2 ranks resumes it (tables and row-wise Adagrad
    # state resharded by DCP) and continues as the torch backend does (the two backends agree to fp32 rounding)
    argus_ranks("train", *common, f"out={to_torchrec}", "train.steps=4", "resume=true")
    lt = losses(to_torchrec)
    assert [lt[s] for s in (3, 4)] == pytest.approx([lf[s] for s in (3, 4)], rel=1e-5, abs=1e-6)
    w_t, s_t = _tables(to_torchrec / "checkpoints" / "step_00000004", cfg.embeddings, num_items)
    torch.testing.assert_close(w_t, w_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_t, s_full, rtol=1e-5, atol=1e-9)

    # 2. TorchRec-written (2 steps) -> the torch backend resumes it
    argus_ranks("train", *common, f"out={to_torch}", "train.steps=2")
    argus_ranks("train", *on_torch, f"out={to_torch}", "train.steps=4", "resume=true")
    lr_ = losses(to_torch)
    assert [lr_[s] for s in range(1, 5)] == pytest.approx([lf[s] for s in range(1, 5)], rel=1e-5, abs=1e-6)
    w_r, s_r = _tables(to_torch / "checkpoints" / "step_00000004", cfg.embeddings, num_items)
    torch.testing.assert_close(w_r, w_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_r, s_full, rtol=1e-5, atol=1e-9)


# ---- argus plan -------------------------------------------------------------------------------------------------
def test_planner_counts_the_whole_table_its_gradient_and_state_on_every_rank():
    from cluster.hardware import Hardware
    from cluster.planner import PlanRequest, plan
    from trainer.config import load_config

    repo = Path(__file__).resolve().parents[1]
    items, dim = 10**8, 64

    def per_rank(backend: str, optimizer: str, gpus: int) -> int:
        cfg = load_config(
            JobConfig,
            repo / "configs" / "small.yaml",
            [f"embeddings.backend={backend}", f"embeddings.optimizer={optimizer}", f"embeddings.item_dim={dim}"],
            validate=False,
        )
        hw = Hardware("h100", nodes=1, gpus_per_node=gpus)
        return plan(cfg, PlanRequest(items=items, hardware=hw, torchrec=False))["memory"]["embeddings"]

    table = items * dim * 4  # 25.6 GB
    for gpus in (1, 8):
        assert per_rank("torch", "rowwise_adagrad", gpus) == 2 * table + items * 4  # + gradient + one fp32 a row
        assert per_rank("torch", "adagrad", gpus) == 3 * table
        assert per_rank("torch", "sgd", gpus) == 2 * table
    assert per_rank("torchrec", "rowwise_adagrad", 8) == -(-(table + items * 4) // 8)  # sharded: 1/8 each


# ---- 4. the config check ----------------------------------------------------------------------------------------
def test_backend_is_checked_in_one_line():
    def job(**emb) -> JobConfig:
        return from_dict(JobConfig, {"out": "/tmp/x", "data": {"path": "/tmp/d"}, "embeddings": emb})

    with pytest.raises(ConfigError) as e:
        job(backend="fbgemm").validate(1, "cpu")
    assert str(e.value) == "embeddings.backend: must be one of torchrec, torch, got 'fbgemm'"
    job(backend="torch").validate(1, "cpu")
    job(backend="torch", optimizer="adam").validate(1, "cpu")  # plain torch: adam runs on CPU
    with pytest.raises(ConfigError, match="embeddings.optimizer: adam is not supported"):
        job(backend="torchrec", optimizer="adam").validate(1, "cpu")
