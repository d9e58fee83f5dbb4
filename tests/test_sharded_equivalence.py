"""2 ranks (TorchRec DMP row-/table-wise + DeepSpeed ZeRO 1/2/3, gloo) == one plain-PyTorch process.

The reference shares no sharding, no DeepSpeed and no fused optimizer with the system under test: it
runs both ranks' batches through an unsharded EmbeddingCollection + the same dense model (whose small
side tables are ordinary dense weights), averages the two losses (what the collectives compute), clips
the dense gradient norm and steps a torch AdamW, and updates the item table with a hand-written
row-wise Adagrad (or SGD, for test_embedding_backend.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import free_port, rank_env, start_ranks

from trainer.config import from_dict, to_dict
from trainer.job import JobConfig

STEPS = 3


def tiny_job(data: Path, out: Path, sharding: str = "row_wise", stage: int = 2) -> JobConfig:
    cfg = from_dict(
        JobConfig,
        {
            "data": {"path": str(data), "batch_size": 4, "num_workers": 0, "shuffle_buffer": 16},
            "model": {
                "preset": "custom",
                "d_model": 32,
                "n_layers": 2,
                "n_heads": 2,
                "d_ff": 64,
                "max_seq_len": 24,
                "side_dim": 8,
            },
            "embeddings": {"item_dim": 16, "sharding": sharding, "lr": 0.1},
            "heads": {
                # sampled + logQ (auto would pick a full softmax for 120 items)
                "next_item": {
                    "uniform_negatives": 16,
                    "in_batch_negatives": 16,
                    "temperature": 0.2,
                    "full_softmax": False,
                },
                "feedback": {"weight": 0.5},
            },
            "optim": {"lr": 0.01, "warmup_steps": 0, "schedule": "constant"},
            "deepspeed": {"stage": stage, "gradient_clipping": 0.5},
            "train": {"steps": STEPS, "seed": 3, "device": "cpu", "timeout_s": 120},
            "out": str(out),
        },
    )
    cfg.validate(2, "cpu")
    return cfg


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    from trainer.data.synth import synthesize

    root = tmp_path_factory.mktemp("equiv") / "data"
    synthesize(root, users=64, items=120, mean_len=30, shards=3, seed=1, holdout="loo", workers=1)
    return root


# ---- the system under test: 2 gloo ranks -----------------------------------------------------------------------
def _sharded_worker(rank: int, world: int, jobs: list[dict], port: int, out: str) -> None:
    rank_env(rank, world, port)
    from embeddings.tables import gather_full_tables
    from trainer.data.manifest import Manifest
    from trainer.dist import init_distributed
    from trainer.engine import Engine

    info = init_distributed("cpu", timeout_s=120)
    results = []
    for job in jobs:
        cfg = from_dict(JobConfig, job)
        cfg.validate(world, "cpu")
        manifest = Manifest.load(cfg.data.path)
        loader = cfg.loader_config().build(rank, world, manifest)
        engine = Engine(cfg, info, manifest)
        losses = []
        for step, batch in zip(range(STEPS), loader):
            o = engine.train_step(batch, step)
            losses.append(engine.all_reduce_mean({"loss": o.loss})["loss"])
        tables = {k: v.tolist() for k, v in gather_full_tables(engine.tables).items()}
        import deepspeed

        params = dict(engine.ds.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), enabled=cfg.deepspeed.stage == 3):
            dense = {k: v.detach().clone().tolist() for k, v in params.items()}
        results.append({"losses": losses, "tables": tables, "dense": dense})
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ---- the reference: one process, plain PyTorch ----------------------------------------------------------------------
def reference(cfg: JobConfig, world: int) -> dict:
    from embeddings.features import featurize
    from embeddings.tables import ITEM_FEATURES, SparseArch, init_sparse_weights, jagged_values
    from trainer.data.manifest import Manifest
    from trainer.engine import _generator
    from trainer.model.argus import ArgusModel, target_index
    from trainer.model.heads import CandidateLogQ
    from trainer.model.interaction import side_features

    manifest = Manifest.load(cfg.data.path)
    sparse = SparseArch(cfg.embeddings, manifest.num_items, device="cpu")
    init_sparse_weights(sparse, cfg.embeddings, cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    dense = ArgusModel(cfg.model, cfg.embeddings, cfg.heads)
    # weight decay on the weight matrices of linear layers only, written out here independently of trainer/optim.py
    linear = {id(m.weight) for m in dense.modules() if isinstance(m, torch.nn.Linear)}
    groups = [
        {"params": [p for p in dense.parameters() if id(p) in linear], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in dense.parameters() if id(p) not in linear], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    state = {name: torch.zeros(p.shape[0]) for name, p in sparse.named_parameters()}
    log_q = CandidateLogQ(manifest.item_counts("train"), sparse.item_rows)
    loaders = [cfg.loader_config().build(r, world, manifest) for r in range(world)]
    iters = [iter(ld) for ld in loaders]
    ni = cfg.heads.next_item
    losses = []
    for step in range(STEPS):
        total = 0.0
        opt.zero_grad()
        sparse.zero_grad()
        for rank in range(world):
            batch = next(iters[rank])
            g = _generator(cfg.train.seed, step, rank)
            neg_ids = torch.randint(0, sparse.item_rows, (ni.uniform_negatives,), generator=g)
            iv = jagged_values(
                sparse.items(featurize(batch, cfg.embeddings, sparse.item_rows, neg_ids, torch.device("cpu")))
            )
            side = side_features(batch, cfg.model.num_contexts, torch.device("cpu"))
            lengths = batch.lengths
            tgt = target_index(lengths)
            k_b = min(ni.in_batch_negatives, int(tgt.numel()))
            sel = torch.randperm(int(tgt.numel()), generator=g)[:k_b]
            item_ids = batch.values["item"].long()
            pos = item_ids[tgt]
            out = dense(
                iv[ITEM_FEATURES[0]],
                side,
                iv[ITEM_FEATURES[1]],
                lengths,
                tgt,
                sel,
                item_ids,
                neg_ids,
                batch.values["event"].long(),
                batch.values["played"].long(),
                log_q(pos, k_b, ni.uniform_negatives),
                log_q(torch.cat([pos[sel], neg_ids]), k_b, ni.uniform_negatives),
            )
            (out["loss"] / world).backward()
            total += float(out["loss"]) / world
        losses.append(total)
        torch.nn.utils.clip_grad_norm_(dense.parameters(), cfg.deepspeed.gradient_clipping)
        opt.step()
        with torch.no_grad():  # row-wise Adagrad: one accumulator per row, mean of the squared gradient
            for name, p in sparse.named_parameters():
                if p.grad is None:
                    continue
                if cfg.embeddings.optimizer == "sgd":  # (test_embedding_backend: sees the gradient's scale)
                    p -= cfg.embeddings.lr * p.grad
                    continue
                assert cfg.embeddings.optimizer == "rowwise_adagrad", cfg.embeddings.optimizer
                state[name] += p.grad.pow(2).mean(dim=1)
                p -= cfg.embeddings.lr * p.grad / (state[name].sqrt()[:, None] + cfg.embeddings.eps)
    tables = {name.split(".")[-2]: p.detach() for name, p in sparse.named_parameters()}
    return {"losses": losses, "tables": tables, "dense": {k: v.detach() for k, v in dense.named_parameters()}}


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["row_wise", "table_wise"])
def test_two_ranks_equal_unsharded_reference(small_data, tmp_path, sharding):
    jobs = [tiny_job(small_data, tmp_path / f"run{s}", sharding, s) for s in (1, 2, 3)]
    out = tmp_path / "sharded.json"
    # both ranks forked from the session's fork server (helpers.start_ranks: project modules already imported)
    start_ranks(_sharded_worker, (2, [to_dict(j) for j in jobs], free_port(), str(out)), nprocs=2)
    results = json.loads(out.read_text())
    ref = reference(jobs[0], world=2)  # the reference has no ZeRO: the same for every stage
    assert ref["losses"][-1] != ref["losses"][0]
    for job, got in zip(jobs, results):
        where = f"{sharding}, ZeRO-{job.deepspeed.stage}"
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6), where
        for name, table in ref["tables"].items():
            torch.testing.assert_close(
                torch.tensor(got["tables"][name]),
                table,
                rtol=1e-5,
                atol=1e-6,
                msg=lambda m, where=where, name=name: f"{where}: table {name}: {m}",
            )
        # Adam normalises each element's update (lr 0.01 per step), so elements whose gradient is ~0 can
        # differ by fp32 reduction order; 2e-5 is 0.2% of one step's update.
        # The key bias (middle third of qkv.bias) has an identically zero gradient (softmax is
        # shift-invariant), so Adam turns fp noise into +-lr steps there: not comparable, left out.
        for name, p in ref["dense"].items():
            g = torch.tensor(got["dense"][name])
            if name.endswith("attn.qkv.bias"):
                d = p.shape[0] // 3
                g, p = torch.cat([g[:d], g[2 * d :]]), torch.cat([p[:d], p[2 * d :]])
            torch.testing.assert_close(
                g, p, rtol=1e-4, atol=2e-5, msg=lambda m, where=where, name=name: f"{where}: dense {name}: {m}"
            )
        # the tables really moved: a no-op optimizer would also "match" an un-stepped reference
        from embeddings.tables import init_rows

        init = init_rows(
            "item", 0, ref["tables"]["item"].shape[0], job.embeddings.item_dim, job.train.seed, job.embeddings.init_std
        )
        assert not torch.allclose(ref["tables"]["item"], init)
