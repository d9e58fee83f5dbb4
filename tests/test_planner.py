"""`argus plan` against reality: instantiated models, DeepSpeed's estimators, what autograd saves,
TorchRec's plan as training builds it (see also test_train_cli), and its own searches."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import argus_inproc, one_line_error

from cluster.hardware import Hardware
from cluster.planner import PlanRequest, min_gpus, plan, plan_config, suggestions
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
    parts = ("embeddings", "dense_params", "dense_grads", "dense_optimizer", "activations", "comm_buffers", "item_data")
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


def _plan_command(*argv: str) -> tuple[JobConfig, PlanRequest]:
    """What `argus plan ARGV` plans for (the analytic estimate: TorchRec's planner is slow): parsed as `argus` parses
    it, so a flag that does not exist is argparse's usage error (SystemExit 2)."""
    from launch.cli import parse_args
    from launch.plan_cli import plan_inputs

    cfg, req = plan_inputs(parse_args(["plan", *argv]))
    return cfg, dataclasses.replace(req, torchrec=False)


# Commands that do not fit, and every kind of change the planner suggests for them.
TOO_BIG = {
    "dense states, activations": ["--preset", "large", "--items", "1e6", "--gpu", "l4", "--zero-stage", "0",
                                  "--micro-batch", "2", "--context", "1024", "--no-activation-checkpointing"],
    "micro-batch": ["--preset", "large", "--items", "1e8", "--gpu", "a100_40gb", "--zero-stage", "2",
                    "--no-activation-checkpointing", "--micro-batch", "8"],
    "token budget": ["--preset", "large", "--items", "1e8", "--gpu", "a100_40gb", "--no-activation-checkpointing",
                     "data.batch_tokens=65536"],
    "embedding backend": ["--preset", "large", "--items", "1e8", "--gpu", "a100_40gb", "embeddings.backend=torch"],
    "nodes": ["--preset", "large", "--items", "1e9", "--gpu", "a100_40gb"],
}  # fmt: skip
SUGGESTED = {
    "dense states, activations": ["--zero-stage 3", "--zero-stage 3 --offload", "--activation-checkpointing"],
    "micro-batch": ["--micro-batch 1"],
    "token budget": ["data.batch_tokens=8192"],
    "embedding backend": ["embeddings.backend=torchrec"],
}


@pytest.mark.parametrize("case", list(TOO_BIG))
def test_every_suggestion_is_a_plan_command_line_that_fits(case):
    """Each suggestion appended to the command that did not fit parses (every flag it names is one of `argus
    plan`'s) and the plan of that command fits, on the GPU count the suggestion names."""
    base = TOO_BIG[case]
    cfg, req = _plan_command(*base)
    r = plan(cfg, req)
    assert not r["memory"]["fits"]
    fewest = min_gpus(cfg, req) if case == "nodes" else None  # the search is slow for a replicated table
    got = suggestions(cfg, req, r, fewest)
    if case == "nodes":  # an embedding-bound job: the fewest GPUs fit there and not one node below
        assert fewest is not None and fewest > 8 and fewest % 8 == 0
        assert got[0]["change"] == f"--nodes {fewest // 8}" and got[0]["gpus"] == fewest
        fewer = _plan_command(*base, "--nodes", str(fewest // 8 - 1))
        assert not plan(*fewer)["memory"]["fits"]
    else:
        assert sorted(s["change"] for s in got) == sorted(SUGGESTED[case])
    for s in got:
        c, rq = _plan_command(*base, *shlex.split(s["change"]))
        assert rq.hardware.world == s["gpus"]
        fitted = plan(c, rq)
        assert fitted["memory"]["fits"], s
        assert fitted["memory"]["total"] == pytest.approx(s["memory_per_rank"])
    if case == "micro-batch":
        assert min_gpus(cfg, req) is None  # activations don't shrink with more GPUs


def _flags_named(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


def test_every_flag_plan_names_is_one_of_its_flags(capsys, monkeypatch):
    """The flags in the planner's messages (errors, suggestions, notes) are real flags of `argus plan`: read from
    the source of every module that writes them, and from the one-line error each bad input gets."""
    from launch.cli import build_parser

    plan_parser = build_parser()._subparsers._group_actions[0].choices["plan"]
    flags = {o for action in plan_parser._actions for o in action.option_strings}
    for path in ("cluster/planner.py", "cluster/hardware.py", "launch/plan_cli.py"):
        named = _flags_named((REPO / path).read_text())
        assert named and named <= flags, (path, named - flags)
    monkeypatch.chdir(REPO)
    bad = [
        ["--nodes", "0"],
        ["--gpus-per-node", "0"],
        ["--intra-node-gbps", "-1"],
        ["--inter-node-gbps", "-1"],
        ["--memory-gb", "-1"],
        ["--price", "-1"],
        ["--items", "0"],
        ["--items", "abc"],
        ["--interactions", "0"],
        ["--interactions", "lots"],
        ["--mfu", "2"],
        ["--fill", "0"],
        ["--headroom", "1"],
        ["--sweep", "gpus=a"],
        ["--sweep", "nodes=2"],
        ["--sweep", "gpus=12"],
    ]
    for argv in bad:
        code, _, err = argus_inproc(capsys, "plan", "--preset", "mini", *argv)
        named = _flags_named(err)
        assert code == 2 and argv[0] in named and named <= flags, (argv, err)


def test_plan_exit_code_when_it_does_not_fit(capsys):
    """Scripts tell "does not fit" (PLAN_DOES_NOT_FIT, 3) from an error (2) and from a plan that fits (0)."""
    from launch.exit_codes import PLAN_DOES_NOT_FIT

    assert PLAN_DOES_NOT_FIT == 3  # documented: docs/capacity-planning.md, docs/reliability.md
    too_big = ["plan", "--preset", "mini", "--items", "1e10", "--gpu", "l4", "--gpus-per-node", "1"]
    code, out, _ = argus_inproc(capsys, *too_big)
    assert code == PLAN_DOES_NOT_FIT
    assert "does NOT fit: 2,601.28 GB + 2.40 GB headroom of 24.00 GB per GPU" in out
    assert "  would fit with --nodes 128 (128 GPUs): 21.53 GB per rank, 0.05 days" in out.splitlines()
    code, out, _ = argus_inproc(capsys, *too_big, "--json")
    assert code == PLAN_DOES_NOT_FIT and json.loads(out)["memory"]["fits"] is False
    assert argus_inproc(capsys, *too_big, "--nodes", "128")[0] == 0  # what it suggested


def test_plan_number_flags_name_themselves(capsys):
    code, _, err = argus_inproc(capsys, "plan", "--preset", "mini", "--items", "abc")
    assert code == 2 and one_line_error(err) == "argus: error: --items: expected a number like 1e9, got 'abc'"
    code, _, err = argus_inproc(capsys, "plan", "--preset", "mini", "--interactions", "inf")
    assert code == 2 and one_line_error(err) == "argus: error: --interactions: expected a number like 3e11, got 'inf'"
    code, _, err = argus_inproc(capsys, "plan", "--preset", "mini", "--price", "-1")
    assert code == 2 and one_line_error(err) == "argus: error: --price: must be >= 0, got -1.0"


def test_piped_plan_is_not_cut_to_80_columns(capsys, monkeypatch):
    """stdout is not a terminal under capsys, as in a pipe: every line whole, however wide (rich would cut to 80)."""
    import launch.console

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(launch.console.console, "_width", None)  # as made without COLUMNS set
    code, out, _ = argus_inproc(capsys, "plan", "--preset", "mini", "--items", "1e6", "--sweep", "gpus=1,2,4",
                                "--price", "3")  # fmt: skip
    assert code == 0
    lines = out.splitlines()
    header = [line for line in lines if "GPUs" in line and "cost" in line]
    assert header and all(c in header[0] for c in ("GPU mem / rank", "host mem / rank", "GPU-hours")), out
    assert any(line.startswith("│    4 │") and line.rstrip().endswith("│") and "$" in line for line in lines)
    assert max(map(len, lines)) > 80
    assert any(line.startswith("fits: ") and "Fewest GPUs with every table in HBM: 1." in line for line in lines)
    monkeypatch.setenv("COLUMNS", "60")  # asked for: cut
    out = argus_inproc(capsys, "plan", "--preset", "mini", "--items", "1e6")[1]
    assert max(map(len, out.splitlines())) <= 60


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


def test_sequence_parallelism_in_the_plan(capsys):
    """parallel.sp on the same GPUs: the blocks' activations split over the sp group, the encoder's FLOPs too
    (the heads run on every rank), an sp group trains one batch (twice the steps for sp=2), and the step pays
    the all-to-alls (their bytes: tests/test_sequence_parallel.py checks the count against the encoder)."""
    from cluster.planner import sequence_parallel_bytes
    from trainer.flops import encoder_flops_per_interaction, flops_per_interaction

    req = PlanRequest(items=10**7, hardware=Hardware(gpu="h100", gpus_per_node=8), torchrec=False)
    cfg = job("large", "model.max_seq_len=4096")
    one, two = plan(cfg, req), plan(job("large", "model.max_seq_len=4096", "parallel.sp=2"), req)
    assert (one["inputs"]["dp"], one["inputs"]["sp"], two["inputs"]["dp"], two["inputs"]["sp"]) == (8, 1, 4, 2)
    assert two["memory"]["activations_layers"] * 2 == one["memory"]["activations_layers"]
    assert two["memory"]["activations_other"] == one["memory"]["activations_other"]
    assert two["time"]["steps"] == pytest.approx(2 * one["time"]["steps"], abs=1)
    c = plan_config(cfg, 8)
    f_enc, f_int = encoder_flops_per_interaction(c), flops_per_interaction(c, 10**7)
    recompute = f_enc / 3  # activation checkpointing (large): one more forward of the encoder
    ratio = two["flops"]["per_step_per_rank"] / one["flops"]["per_step_per_rank"]
    assert ratio == pytest.approx(((f_enc + recompute) / 2 + f_int - f_enc) / (f_int + recompute))
    tokens = one["step"]["interactions_per_rank"]
    sp_bytes = sequence_parallel_bytes(20, 2048, tokens, 2, 2, True) / 2
    assert one["step"]["sp_comm_bytes"] == 0 and two["step"]["sp_comm_bytes"] == pytest.approx(sp_bytes)
    assert two["step"]["seconds"] > two["step"]["compute_s"] + two["step"]["sp_comm_s"] - 1e-12
    with pytest.raises(ConfigError, match="parallel.sp: 3 does not divide the world size 8"):
        plan(job("large", "model.max_seq_len=4096", "parallel.sp=3", "model.n_heads=24", "model.d_model=2064"), req)
    _group_sizes_sweep(capsys, "sp", req)


def _group_sizes_sweep(capsys, key: str, req: PlanRequest) -> None:
    """`parallel.KEY` (tp or sp): the fewest GPUs are whole groups, `--sweep KEY=1,2,4` plans each size, and a size
    the heads do not divide is one line."""
    assert min_gpus(job("large", f"parallel.{key}=8"), req) % 8 == 0
    code, out, _ = argus_inproc(
        capsys, "plan", "--preset", "large", "--items", "1e7", "--sweep", f"{key}=1,2,4", "--json"
    )
    assert code == 0 and [r[key] for r in json.loads(out)["sweep"]] == [1, 2, 4]
    code, _, err = argus_inproc(capsys, "plan", "--preset", "large", "--items", "1e7", "--sweep", f"{key}=3")
    assert code == 2 and f"--sweep {key}=3: parallel.{key}: 3 does not divide model.n_heads 16" in err


def test_tensor_parallelism_in_the_plan(capsys):
    """parallel.tp on the same GPUs: a rank holds 1/tp of the sharded block weights (ZeRO partitions the rest of
    its states over dp = world / tp), 1/tp of the blocks' head and FF activations, 1/tp of the encoder's FLOPs; a
    tp group trains one batch, and the step pays the all-reduces (their bytes and the per-rank parameters are
    checked against AutoTP's blocks: tests/test_tensor_parallel.py)."""
    from cluster.planner import tensor_parallel_bytes
    from trainer.flops import encoder_flops_per_interaction, flops_per_interaction
    from trainer.memory import rank_dense_states, tensor_parallel_params

    req = PlanRequest(items=10**7, hardware=Hardware(gpu="h100", gpus_per_node=8), torchrec=False)
    one, two = plan(job("large"), req), plan(job("large", "parallel.tp=2"), req)
    assert (one["inputs"]["dp"], one["inputs"]["tp"], two["inputs"]["dp"], two["inputs"]["tp"]) == (8, 1, 4, 2)
    p = dense_params(plan_config(job("large", "parallel.tp=2"), 8))
    sharded = tensor_parallel_params(20, 2048, 8192)
    assert p.per_rank == p.total - sharded // 2 and two["params"]["dense_per_rank"] == p.per_rank
    ds = job("large").deepspeed
    assert rank_dense_states(plan_config(job("large", "parallel.tp=2"), 8), 8) == dense_states(
        p.per_rank, p.largest_layer, ds.stage, ds.precision, ds.offload, 4
    )
    # large checkpoints its blocks: a rank keeps each block's (whole) input; the working block is 1/tp of heads/FF
    d, f, w = 2048, 8192, 2
    tokens = one["step"]["interactions_per_rank"]
    assert two["memory"]["activations_layers"] == one["memory"]["activations_layers"]
    assert one["memory"]["activations_working"] - two["memory"]["activations_working"] == pytest.approx(
        tokens * 2 * (4 * d + 2 * f) // 2 * w + tokens * 2 * 16 // 2 * 4, rel=1e-9
    )
    assert two["time"]["steps"] == pytest.approx(2 * one["time"]["steps"], abs=1)
    c = plan_config(job("large"), 8)
    f_enc, f_int = encoder_flops_per_interaction(c), flops_per_interaction(c, 10**7)
    recompute = f_enc / 3
    ratio = two["flops"]["per_step_per_rank"] / one["flops"]["per_step_per_rank"]
    assert ratio == pytest.approx(((f_enc + recompute) / 2 + f_int - f_enc) / (f_int + recompute))
    tp_bytes = tensor_parallel_bytes(20, 2048, tokens, 2, 2, True) * 2 * (2 - 1) / 2
    assert one["step"]["tp_comm_bytes"] == 0 and two["step"]["tp_comm_bytes"] == pytest.approx(tp_bytes)
    assert two["step"]["seconds"] > two["step"]["compute_s"] + two["step"]["tp_comm_s"] - 1e-12
    with pytest.raises(ConfigError, match="parallel.tp: 3 does not divide the world size 8"):
        plan(job("large", "parallel.tp=3", "model.n_heads=24", "model.d_model=2064", "model.d_ff=8256"), req)
    _group_sizes_sweep(capsys, "tp", req)
