"""`argus plan` against reality: instantiated models, DeepSpeed's estimators, what autograd saves,
TorchRec's plan as training builds it (see also test_train_cli), and its own searches."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import argus_inproc

from cluster.hardware import Hardware
from cluster.planner import PlanRequest, full_plan, min_gpus, plan, plan_config
from trainer.config import ConfigError, load_config
from trainer.job import JobConfig
from trainer.memory import block_saved_bytes_per_token, dense_params, dense_states

REPO = Path(__file__).resolve().parents[1]
ARGUS = [sys.executable, "-m", "launch.cli"]


def job(preset: str, *overrides: str) -> JobConfig:
    return load_config(JobConfig, REPO / "configs" / f"{preset}.yaml", list(overrides), validate=False)


@pytest.mark.parametrize("preset", ["mini", "small", "medium", "large"])
@pytest.mark.parametrize("layout", ["merged", "interleaved"])
def test_param_counts_equal_the_instantiated_model(preset, layout):
    from trainer.model.argus import ArgusModel
    from trainer.model.encoder import encoder_param_count

    cfg = job(preset, f"model.token_layout={layout}", "heads.feedback.hidden=96")
    with torch.device("meta"):
        model = ArgusModel(cfg.model, cfg.embeddings, cfg.heads)
    p = dense_params(cfg)
    assert p.total == sum(x.numel() for x in model.parameters())
    assert (
        p.encoder
        == encoder_param_count(cfg.model)
        == sum(x.numel() for x in model.encoder.blocks.parameters())
        + sum(x.numel() for x in model.encoder.norm.parameters())
    )
    assert p.positions == model.encoder.pos.weight.numel()
    assert p.side_tables == sum(x.numel() for x in model.interaction.side.parameters())
    assert p.interaction + p.side_tables == sum(x.numel() for x in model.interaction.parameters())
    assert p.largest_layer == max(sum(x.numel() for x in m.parameters(recurse=False)) for m in model.modules())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_activation_bytes_equal_what_autograd_saves(seed, dtype):
    from trainer.model.encoder import Block

    g = torch.Generator().manual_seed(seed)
    heads = int(torch.randint(1, 5, (1,), generator=g))
    d = heads * int(torch.randint(4, 33, (1,), generator=g))
    f = int(torch.randint(8, 300, (1,), generator=g))
    b, t = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 70, (1,), generator=g))
    block = Block(d, heads, f, 0.0, 0.02).to(dtype)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        storage = x.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return x

    x = torch.randn(b, t, d, dtype=dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        block(x)
    # (CPU keeps LayerNorm statistics in the input dtype; CUDA in fp32, the planner's default)
    assert sum(saved.values()) == b * t * block_saved_bytes_per_token(
        d, f, heads, x.element_size(), ln_stat_bytes=x.element_size()
    )


@pytest.mark.parametrize("preset", ["small", "medium"])
def test_dense_states_equal_deepspeeds_estimators(preset):
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_live,
        model_to_params,
    )
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs,
        estimate_zero2_model_states_mem_needs_all_live,
    )

    from trainer.model.argus import ArgusModel

    cfg = job(preset)
    model = ArgusModel(cfg.model, cfg.embeddings, cfg.heads)  # real tensors: DeepSpeed dedups by data_ptr
    total, largest = model_to_params(model)
    p = dense_params(cfg)
    assert (p.total, p.largest_layer) == (total, largest)
    for gpn, nodes in [(1, 1), (8, 1), (8, 4), (4, 16)]:
        world = gpn * nodes
        ours2 = dense_states(p.total, p.largest_layer, 2, "bf16", False, world, gpn)
        assert ours2.gpu == estimate_zero2_model_states_mem_needs(total, gpn, nodes, cpu_offload=False)[1]
        ours3 = dense_states(p.total, p.largest_layer, 3, "bf16", False, world, gpn)
        assert ours3.gpu == estimate_zero3_model_states_mem_needs(total, largest, gpn, nodes, cpu_offload=False)[1]
        off = dense_states(p.total, p.largest_layer, 3, "bf16", True, world, gpn)
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total, largest, gpn, nodes, cpu_offload=True, cpu_offload_params=True, zero_init=True
        )
        assert (off.host, off.gpu) == (cpu, gpu)
        # and the same numbers as DeepSpeed's printed tables for the live model
        for estimate, ours, option in (
            (estimate_zero2_model_states_mem_needs_all_live, ours2, "offload_optimizer=none"),
            (
                estimate_zero3_model_states_mem_needs_all_live,
                ours3,
                "offload_param=none, offload_optimizer=none, zero_init=1",
            ),
        ):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                estimate(model, num_gpus_per_node=gpn, num_nodes=nodes)
            line = next(x for x in out.getvalue().splitlines() if x.rstrip().endswith(option))
            printed_gpu = float(re.findall(r"([\d.]+)GB", line)[1])
            assert printed_gpu == pytest.approx(ours.gpu / 2**30, abs=0.006)


def test_large_plan_terms_add_up():
    r = plan(job("large"), PlanRequest(items=10**9, hardware=Hardware("h100", nodes=8, gpus_per_node=8)))
    assert r["params"]["encoder"] == 1_007_169_536
    m = r["memory"]
    parts = ("embeddings", "dense_params", "dense_grads", "dense_optimizer", "activations", "comm_buffers")
    assert m["total"] == sum(m[k] for k in parts)
    assert m["activations"] == m["activations_layers"] + m["activations_other"] + m["activations_working"]
    # the item table row-wise over 64 GPUs: 10^9 x 256 fp32 + one fp32 row-wise Adagrad state per row
    item = r["embedding_plan"]["tables"]
    item = next(t for t in item if t["table"] == "item")
    assert (item["sharding_type"], item["shards"]) == ("row_wise", 64)
    assert item["hbm_per_shard"] >= 10**9 * (256 * 4 + 4) // 64
    s, t = r["step"], r["time"]
    assert s["interactions"] == 64 * 4 * 8192
    assert t["steps"] == -(-3e11 // s["interactions"])
    assert t["days"] == pytest.approx(t["steps"] * s["seconds"] / 86400)
    assert s["seconds"] >= s["compute_s"] > 0 and s["bound"] == "compute"
    assert r["flops"]["per_interaction"] == pytest.approx(
        6 * (r["params"]["dense_total"] - r["params"]["positions"] - r["params"]["side_tables"])
        + 6 * 20 * 8192 * 2048
        + 6 * 256 * 16385
    )


def test_too_big_config_gets_changes_that_fit():
    cfg = job("large", "deepspeed.stage=2", "model.activation_checkpointing=false", "data.batch_size=8")
    req = PlanRequest(items=10**8, hardware=Hardware("a100_40gb", nodes=1, gpus_per_node=8), torchrec=False)
    r = full_plan(cfg, req)
    assert not r["memory"]["fits"]
    assert r["suggestions"], "some single change must fit"
    for s in r["suggestions"]:
        c, rq = copy.deepcopy(cfg), req
        for change in s["change"].split():
            if change.startswith("--gpus"):
                continue
            key, value = change.split("=")
            section, field = key.split(".")
            setattr(
                getattr(c, section),
                field,
                type(getattr(getattr(c, section), field))(
                    value == "true" if value in ("true", "false") else int(value)
                ),
            )
        if s["change"].startswith("--gpus"):
            rq = dataclasses.replace(req, hardware=req.hardware.with_world(int(s["change"].split()[1])))
        assert plan(c, rq)["memory"]["fits"], s
    assert min_gpus(cfg, req) is None  # activations don't shrink with more GPUs
    # an embedding-bound job: 10^9 items x (256 fp32 + row-wise Adagrad) = 1.03 TB; the fewest GPUs
    # fit there and not one node below
    cfg = job("large")
    req = dataclasses.replace(req, items=10**9)
    r = full_plan(cfg, req)
    assert not r["memory"]["fits"] and r["suggestions"][0]["change"].startswith("--gpus")
    g = min_gpus(cfg, req)
    assert g is not None and g > 8 and g % 8 == 0
    assert plan(cfg, dataclasses.replace(req, hardware=req.hardware.with_world(g)))["memory"]["fits"]
    assert not plan(cfg, dataclasses.replace(req, hardware=req.hardware.with_world(g - 8)))["memory"]["fits"]


def test_plan_cli_json_sweep_and_plot(tmp_path, capsys):
    # --json from a real process: nothing printed at import time may corrupt stdout
    png = tmp_path / "plan.png"
    out = subprocess.run(
        [
            *ARGUS,
            "plan",
            "--preset",
            "medium",
            "--items",
            "1e8",
            "--interactions",
            "1e10",
            "--gpu",
            "h200",
            "--nodes",
            "1",
            "--gpus-per-node",
            "8",
            "--price",
            "3",
            "--sweep",
            "gpus=2,4,8,16",
            "--plot",
            str(png),
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["inputs"]["gpu"] == "h200" and r["inputs"]["world"] == 8
    assert r["params"]["encoder"] == 100_771_840
    assert r["time"]["cost"] == pytest.approx(r["time"]["gpu_hours"] * 3)
    days = [s["time"]["days"] for s in r["sweep"]]
    assert [s["gpus"] for s in r["sweep"]] == [2, 4, 8, 16] and days == sorted(days, reverse=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, text, _ = argus_inproc(capsys, "plan", "--preset", "mini", "--items", "1e6")
    assert code == 0 and "Memory per rank" in text and "days" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "mini", "--mfu", "2"], "--mfu"),
        (["--preset", "mini", "--sweep", "gpus=a"], "--sweep"),
        (["--preset", "mini", "--sweep", "gpus=12"], "whole number of 8-GPU nodes"),
        (["--preset", "mini", "--zero-stage", "2", "--offload"], "deepspeed.offload"),
        (["--preset", "mini", "model.n_heads=7"], "model.d_model"),
        ([], "CONFIG file or --preset"),
    ],
)
def test_plan_bad_input_is_one_line(args, message, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    code, _, err = argus_inproc(capsys, "plan", *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_plan_config_needs_no_data_or_run_directory():
    cfg = job("large")
    assert cfg.data.path == "" and cfg.out == ""
    planned = plan_config(cfg, 64)
    assert planned.interactions_per_sample() == 8192 and cfg.data.path == ""  # a validated copy; the original untouched
    with pytest.raises(ConfigError, match="model.preset"):
        plan_config(job("large", "model.preset=huge"), 8)


def test_mfu_comes_from_our_measurement_when_there_is_one(tmp_path, monkeypatch):
    import cluster.planner as planner

    cfg, req = job("medium"), PlanRequest(items=10**6, hardware=Hardware("h100"), torchrec=False)
    monkeypatch.setattr(planner, "MEASURED_MFU_FILE", tmp_path / "mfu.json")
    assumed = plan(cfg, req)
    assert assumed["inputs"]["mfu"] == planner.ASSUMED_MFU and "assumed" in assumed["inputs"]["mfu_source"]
    (tmp_path / "mfu.json").write_text(json.dumps({"h100": {"mfu": 0.2, "source": "bench run X"}}))
    measured = plan(cfg, req)
    assert measured["inputs"]["mfu"] == 0.2 and measured["inputs"]["mfu_source"] == "bench run X"
    assert measured["step"]["compute_s"] == pytest.approx(2 * assumed["step"]["compute_s"])
    given = plan(cfg, dataclasses.replace(req, mfu=0.5))
    assert given["inputs"]["mfu"] == 0.5


def test_deepspeed_buckets_are_what_zero_allocates():
    from trainer.memory import ds_buffers

    z2 = {
        "zero_optimization": {
            "stage": 2,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": 3e7,
            "allgather_bucket_size": 9e8,
        }
    }
    assert ds_buffers(z2, "bf16") == 2 * 3e7 * 2  # double-buffered reduce bucket; no all-gather bucket
    z2["zero_optimization"]["overlap_comm"] = False
    assert ds_buffers(z2, "fp32") == 3e7 * 4
    z3 = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 1e7, "stage3_prefetch_bucket_size": 2e7}}
    assert ds_buffers(z3, "bf16") == 3e7 * 2
    assert ds_buffers({"zero_optimization": {"stage": 0}}, "fp32") == 0


def test_token_budget_plan_counts_full_packed_rows():
    """A packed batch of `batch_tokens` is `batch_tokens // context` full rows: the same activations and FLOPs per
    step as that many full-context samples, whatever `--fill` says (packed rows are full)."""
    req = PlanRequest(items=10**6, hardware=Hardware("h100", nodes=1, gpus_per_node=8), torchrec=False, fill=0.3)
    padded = plan(job("medium", "model.max_seq_len=2048", "data.batch_size=6"), dataclasses.replace(req, fill=1.0))
    packed = plan(job("medium", "model.max_seq_len=2048", "data.batch_tokens=13000"), req)  # 6 rows of 2048
    assert packed["inputs"]["micro_batch"] == 6
    assert packed["step"]["interactions_per_rank"] == 6 * 2048 == padded["step"]["interactions_per_rank"]
    assert packed["memory"]["activations"] == padded["memory"]["activations"]
    assert packed["flops"]["per_step_per_rank"] == padded["flops"]["per_step_per_rank"]
    half = plan(job("medium", "model.max_seq_len=2048", "data.batch_size=6"), req)  # padded: fill applies
    assert half["step"]["interactions_per_rank"] == pytest.approx(0.3 * 6 * 2048)
