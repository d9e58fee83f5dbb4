"""Elastic resume: a checkpoint written on N ranks continues on M ranks (2 -> 1, 1 -> 2; ZeRO-0 to ZeRO-3).

For each direction and stage three runs, each its own process group (in-process ranks, gloo):

- *saved*: N ranks train ``K`` steps and checkpoint; right after, every rank assembles the full fp32 dense
  weights and the AdamW state with DeepSpeed's ``safe_get_full_*`` (no checkpoint file involved);
- *elastic*: M ranks ``resume=true`` from that checkpoint (the path under test: universal conversion + load),
  assemble the same right after loading, and train to the end of the epoch;
- *reference*: M ranks that never read the dense checkpoint: the saved weights go into the dense module
  before DeepSpeed takes it (``Engine.init_weights``, the fine-tuning path), the AdamW state, step and group
  hyperparameters through ``safe_set_full_optimizer_state`` and the optimizer's own state, the lr scheduler
  from the saved ``lr_scheduler`` state; tables and loader as any resume; then the same steps.

(a) weights, exp_avg, exp_avg_sq, step and every group's hyperparameters right after the elastic load equal the
saved ones exactly; (b) every continued step's loss and the final dense state of elastic and reference runs are
equal within fp32 tolerance (a wrong step count, moment, weight decay or learning rate moves them well past
it); the item tables and their optimizer state (DCP, re-saved after the load) equal the saved ones; the
sample keys of the saved steps and of the continuation cover the epoch's samples exactly once; rank 0 logs
the one global-batch line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import free_port, rank_env, read_samples, start_ranks

from trainer.config import from_dict, to_dict
from trainer.job import JobConfig

K = 2  # steps before the checkpoint
BATCH = 2  # data.batch_size (per rank)
SAMPLES = 48  # the dataset's training samples (holdout none): one epoch = K steps + the continuation


def job(data: Path, out: Path, stage: int, steps: int, resume: bool = False) -> dict:
    cfg = from_dict(
        JobConfig,
        {
            "data": {"path": str(data), "batch_size": BATCH, "num_workers": 0, "shuffle_buffer": 16},
            "model": {
                "preset": "custom",
                "d_model": 32,
                "n_layers": 2,
                "n_heads": 2,
                "d_ff": 64,
                "max_seq_len": 32,
                "side_dim": 8,
            },
            "embeddings": {"item_dim": 16, "lr": 0.1},
            "heads": {"next_item": {"uniform_negatives": 16, "in_batch_negatives": 16}},
            # weight decay and a warm-up the step count moves: a wrong step or decay shows in the losses
            "optim": {"lr": 0.01, "weight_decay": 0.1, "warmup_steps": 8, "schedule": "constant"},
            "deepspeed": {"stage": stage, "gradient_clipping": 1.0},
            "train": {
                "steps": steps,
                "seed": 3,
                "device": "cpu",
                "timeout_s": 120,
                "log_every": 1,
                "log_sample_keys": True,
            },
            "out": str(out),
            "resume": resume,
        },
    )
    return to_dict(cfg)


def _relink(opt) -> None:
    """ZeRO-1/2 link each parameter to its AdamW state at init, before AdamW creates that state lazily on the first
    step: link again so that ``safe_{get,set}_full_optimizer_state`` find it."""
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 (ZeRO-3 reads the state directly)
        opt._link_all_hp_params()
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _adam(opt) -> torch.optim.Optimizer:
    """The torch AdamW under DeepSpeed's ZeRO wrapper (ZeRO-0: DeepSpeed hands it over as it is)."""
    return getattr(opt, "optimizer", opt)


def _init_adam_state(opt, step: float) -> None:
    """Create the AdamW state a fresh ZeRO optimizer does not have yet (zeros, overwritten next) at ``step``."""
    flats = getattr(opt, "fp32_partitioned_groups_flat", None) or opt.single_partition_of_fp32_groups
    for p in flats:
        state = opt.optimizer.state[p]
        state.setdefault("exp_avg", torch.zeros_like(p))
        state.setdefault("exp_avg_sq", torch.zeros_like(p))
        state["step"] = torch.tensor(step)
    _relink(opt)


def snapshot(engine) -> dict:
    """Full fp32 weights, AdamW moments, steps and group hyperparameters of the live engine (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    plain = engine.ds.zero_optimization_stage() == 0  # no partitions: the module's parameters and AdamW's own state
    if not plain:
        _relink(engine.ds.optimizer)
    out: dict = {"weights": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, p in engine.ds.module.named_parameters():
        out["weights"][name] = (p if plain else safe_get_full_fp32_param(p)).detach().cpu().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            state = engine.ds.optimizer.state[p][key] if plain else safe_get_full_optimizer_state(p, key)
            out[key][name] = state.detach().cpu().clone()
    out["steps"] = sorted({float(s["step"]) for s in _adam(engine.ds.optimizer).state.values() if "step" in s})
    out["groups"] = [{k: v for k, v in g.items() if k != "params"} for g in engine.ds.optimizer.param_groups]
    out["scheduler"] = engine.scheduler.state_dict()
    return out


_SAVED: dict = {}  # the reference engine's weights (set in its rank before the Trainer is built)


def _rank(rank: int, world: int, port: int, cfg_dict: dict, mode: str, out: str) -> None:
    rank_env(rank, world, port)
    import logging

    from trainer import checkpoint
    from trainer.engine import Engine
    from trainer.train import Trainer

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("trainer.elastic").addHandler(Keep())
    cfg = from_dict(JobConfig, cfg_dict)
    outdir = Path(out)

    if mode == "saved":
        t = Trainer(cfg)
        t.run()
        snap = snapshot(t.engine)
    elif mode == "elastic":
        t = Trainer(cfg)
        t.maybe_resume()
        snap = snapshot(t.engine)
        # the tables as loaded, re-saved by this world size (DCP), for the comparison
        checkpoint.save(t.engine, t.loader, t.step, cfg, outdir / "resaved", rank)
        t.run()
    else:  # reference: the dense state set through DeepSpeed's public setters, never from the dense checkpoint
        from deepspeed.utils import safe_set_full_optimizer_state

        saved = torch.load(outdir / "saved.pt", weights_only=False)
        path = Path(saved["run"]) / "checkpoints" / f"step_{K:08d}"  # the elastic run has gone on from it since

        class RefEngine(Engine):
            def init_weights(self, dense: torch.nn.Module) -> None:
                super().init_weights(dense)
                missing, _ = dense.load_state_dict(saved["weights"], strict=False)
                assert not [m for m in missing if m in dict(dense.named_parameters())], missing

        class RefTrainer(Trainer):
            engine_class = RefEngine

        t = RefTrainer(cfg)
        e = t.engine
        (step,) = saved["steps"]
        if e.ds.zero_optimization_stage() == 0:
            for name, p in e.ds.module.named_parameters():
                e.ds.optimizer.state[p] = {
                    "step": torch.tensor(step),
                    **{key: saved[key][name].clone() for key in ("exp_avg", "exp_avg_sq")},
                }
        else:
            _init_adam_state(e.ds.optimizer, step)
            for name, p in e.ds.module.named_parameters():
                for key in ("exp_avg", "exp_avg_sq"):
                    safe_set_full_optimizer_state(p, saved[key][name].clone(), key)
        for group, hyper in zip(e.ds.optimizer.param_groups, saved["groups"]):
            group.update(hyper)
        e.scheduler.load_state_dict(saved["scheduler"])
        checkpoint.load_tables(path, e.tables, e.sparse_optimizer)
        t.loader.load_state_dict(json.loads((path / "loader.json").read_text()))
        t.step, t._restored = int(json.loads((path / "meta.json").read_text())["step"]), True
        snap = snapshot(e)
        t.run()
    final = snapshot(t.engine)
    if rank == 0:
        torch.save({**snap, "run": cfg.out, "final": final, "log": records}, outdir / f"{mode}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def launch(cfg: dict, mode: str, world: int, out: Path) -> dict:
    start_ranks(_rank, (world, free_port(), cfg, mode, str(out)), world, timeout=300)
    return torch.load(out / f"{mode}.pt", weights_only=False)


@pytest.fixture(scope="module")
def elastic_data(tmp_path_factory) -> Path:
    from trainer.data.synth import synthesize

    root = tmp_path_factory.mktemp("elastic") / "data"
    synthesize(root, users=SAMPLES, items=100, mean_len=25, shards=3, seed=2, holdout="none", workers=1)
    return root


def sample_keys(run: Path, steps: range) -> list[str]:
    keys = []
    for path in sorted((run / "sample_keys").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec["step"] in steps:
                keys += rec["keys"]
    return keys


def run_losses(run: Path) -> dict[int, float]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss/total"] for r in records if "loss/total" in r}


def dcp_tensors(sparse_dir: Path, tmp: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(sparse_dir), str(tmp))
    flat: dict = {}

    def walk(prefix: str, obj) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, torch.Tensor):
            flat[prefix] = obj

    walk("", torch.load(tmp, weights_only=False))
    return flat


@pytest.mark.slow
@pytest.mark.parametrize(
    "saved_world,world,stage",
    # ZeRO-2 and 3 both ways; ZeRO-1 (the partitioned optimizer of ZeRO-2) and ZeRO-0 (DeepSpeed's own load: nothing
    # partitioned) one way each, where a case costs ~10 s of the suite (both ways of each pass: tried 2026-12-02)
    [(2, 1, 2), (1, 2, 2), (2, 1, 3), (1, 2, 3), (1, 2, 1), (2, 1, 0)],
)
def test_resume_on_another_world_size(elastic_data, tmp_path, stage, saved_world, world):
    data, work = elastic_data, tmp_path
    run, ref_run = work / "run", work / "ref"
    steps = K + (SAMPLES - K * BATCH * saved_world) // (BATCH * world)  # to the end of the epoch
    saved = launch(job(data, run, stage, K), "saved", saved_world, work)
    ckpt = run / "checkpoints" / f"step_{K:08d}"
    elastic = launch(job(data, run, stage, steps, resume=True), "elastic", world, work)
    reference = launch(job(data, ref_run, stage, steps), "reference", world, work)

    # the one line, on rank 0
    (line,) = [m for m in elastic["log"] if m.startswith("resuming")]
    assert line.startswith(
        f"resuming step_{K:08d} written on {saved_world} rank{'s' * (saved_world > 1)} on {world} "
        f"rank{'s' * (world > 1)}: global batch {BATCH * saved_world} -> {BATCH * world} samples per step "
        f"(data.batch_size {BATCH} per rank)"
    ), line
    assert not list(run.glob("checkpoints/.universal-*")), "the conversion is removed once loaded"

    # (a) right after loading: exactly the saved dense state
    for key in ("weights", "exp_avg", "exp_avg_sq"):
        assert saved[key].keys() == elastic[key].keys()
        for name in saved[key]:
            assert torch.equal(saved[key][name], elastic[key][name]), (key, name)
    assert saved["steps"] == elastic["steps"] == [float(K)]
    assert saved["groups"] == elastic["groups"]  # per group: the no-decay group keeps weight_decay 0
    assert [g["weight_decay"] for g in elastic["groups"]] == [0.1, 0.0]
    assert saved["scheduler"]["last_epoch"] == elastic["scheduler"]["last_epoch"] == K
    for key in ("weights", "exp_avg", "exp_avg_sq"):  # and the reference starts from the same state
        for name in saved[key]:
            assert torch.equal(saved[key][name], reference[key][name]), (key, name)

    # (b) the continuation: the same losses and final state as the reference of the new size
    le, lr = run_losses(run), run_losses(ref_run)
    assert sorted(s for s in le if s > K) == list(range(K + 1, steps + 1)) == sorted(lr)
    for s in range(K + 1, steps + 1):
        assert le[s] == pytest.approx(lr[s], rel=1e-6, abs=1e-7), s
    for key in ("weights", "exp_avg", "exp_avg_sq"):
        for name in saved[key]:
            torch.testing.assert_close(elastic["final"][key][name], reference["final"][key][name], rtol=1e-5, atol=1e-7)
    moved = max((elastic["final"]["weights"][n] - saved["weights"][n]).abs().max().item() for n in saved["weights"])
    assert moved > 1e-3, "the continuation trained"

    # the item tables and their optimizer state: resharded by DCP, unchanged
    before = dcp_tensors(ckpt / "sparse", work / "before.pt")
    after = dcp_tensors(work / "resaved" / "checkpoints" / f"step_{K:08d}" / "sparse", work / "after.pt")
    assert before.keys() == after.keys() and any("momentum" in k or "optimizer" in k for k in before)
    for k in before:
        assert torch.equal(before[k], after[k]), k

    # the loader: the saved steps and the continuation cover the epoch exactly once
    keys = sample_keys(run, range(1, steps + 1))
    all_keys = sorted(s.key for s in read_samples(data, "train"))
    assert len(all_keys) == SAMPLES
    assert sorted(keys) == all_keys, "every sample once"
    assert len(sample_keys(run, range(1, K + 1))) == K * BATCH * saved_world
