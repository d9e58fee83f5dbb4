"""Tensor parallelism (DeepSpeed's AutoTP with trainer/model/tensor_parallel.py's layer specs) against the plain
encoder on one process: on 2 gloo ranks, random shapes, one history per row and packed rows (both attention
layouts), with and without activation checkpointing, the output and the input gradient equal the reference's, and
each rank's parameter gradients equal its Megatron shard of the reference's (whole heads of q, k and v; ff1's
units; the matching input columns of the attention output and ff2), sliced here independently of DeepSpeed. The
planner's collective bytes and saved activations are checked against what the sharded blocks do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import free_port, rank_env, start_ranks
from test_sequence_parallel import _inputs, twin_encoders

from trainer.model.encoder import Encoder

CASES = [  # (rows, tokens, heads, attention, packed, activation checkpointing)
    (3, 12, 2, "segments", False, False),
    (2, 16, 4, "segments", True, False),
    (3, 8, 4, "mask", True, True),
]
D, FF = 16, 32


def _shard(name: str, full: torch.Tensor, heads: int, rank: int, tp: int) -> torch.Tensor:
    """Rank ``rank``'s Megatron shard of parameter (or gradient) ``full`` named ``name``."""
    if ".attn.qkv." in name:  # [q | k | v], each (heads, head_dim, ...): whole heads of each
        per = heads // tp
        return full.view(3, heads, -1, *full.shape[1:])[:, rank * per : (rank + 1) * per].reshape(-1, *full.shape[1:])
    if ".ff1." in name:
        return full.chunk(tp, dim=0)[rank]
    if (".attn.out." in name or ".ff2." in name) and name.endswith("weight"):
        return full.chunk(tp, dim=1)[rank]
    return full  # row-parallel biases, LayerNorms, positions: whole on every rank


def _count_bytes(par: Encoder, x, mask, pos, seg, weights) -> float:
    """Bytes the sharded blocks hand to all-reduce in one forward and backward."""
    import deepspeed.comm as ds_comm

    counted = [0]
    all_reduce = ds_comm.all_reduce

    def count(tensor, *a, **k):
        counted[0] += tensor.numel() * tensor.element_size()
        return all_reduce(tensor, *a, **k)

    ds_comm.all_reduce = count
    try:
        (par(x.clone().requires_grad_(), mask, pos, seg) * weights).sum().backward()
    finally:
        ds_comm.all_reduce = all_reduce
    return counted[0]


def _saved_block_bytes(block: torch.nn.Module, rows: int, tokens: int) -> int:
    """What one (sharded) block's autograd graph saves for a forward of (rows, tokens) whole rows."""
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        if x.untyped_storage().data_ptr() not in params:
            saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    x = torch.randn(rows, tokens, D, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        block(x)
    return sum(saved.values())


def _rank(rank: int, world: int, port: int, out: str) -> None:
    rank_env(rank, world, port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed

    from cluster.planner import tensor_parallel_bytes
    from trainer.memory import block_saved_bytes_per_token, tensor_parallel_params
    from trainer.model.encoder import encoder_param_count
    from trainer.model.tensor_parallel import TP_LAYER_SPECS, whole_weights

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as trainer/engine.py: gloo is enough
    results = []
    for i, (rows, tokens, heads, attention, packed, ckpt) in enumerate(CASES):
        cfg, ref, par = twin_encoders(i, heads, tokens, attention, ckpt)  # d_model D, d_ff FF
        tp_config = {
            "autotp_size": world,
            "partition_config": {"use_default_specs": False, "layer_specs": TP_LAYER_SPECS},
        }
        engine, *_ = deepspeed.initialize(
            model=par, config={"train_micro_batch_size_per_gpu": 1, "tensor_parallel": tp_config}
        )
        engine.first_dataloader_check.remove()  # as trainer/engine.py (it cannot compare None inputs either)
        whole = whole_weights(par)
        x, mask, pos, seg = _inputs(i, rows, tokens, packed)
        pos = pos if packed else None
        weights = torch.randn(rows, tokens, D, generator=torch.Generator().manual_seed(100 + i))

        xr = x.clone().requires_grad_()
        yr = ref(xr, mask, pos, seg)
        (yr * weights).sum().backward()
        xp = x.clone().requires_grad_()
        yp = par(xp, mask, pos, seg)
        (yp * weights).sum().backward()
        grads, shapes = {}, {}
        for name, p in par.named_parameters():
            want = _shard(name, ref.get_parameter(name).grad, heads, rank, world)
            shapes[name] = p.shape == want.shape
            grads[name] = (p.grad - want).abs().max().item() if shapes[name] else float("inf")
        res = {
            "case": i,
            "out": (yp - yr).abs().max().item(),
            "x_grad": (xp.grad - xr.grad).abs().max().item(),
            "param_grad": max(grads.values()),
            "shapes": all(shapes.values()),
            "params": len(grads),
            "heads": [b.attn.n_heads for b in par.blocks],
            # what a rank holds: the planner's count (trainer/memory.py: DenseParams.per_rank)
            "rank_params": sum(p.numel() for p in par.parameters()),
            "planned_params": encoder_param_count(cfg)
            + tokens * D
            - (sharded := tensor_parallel_params(2, D, FF))
            + sharded // world,
            "whole": whole.keys() == ref.state_dict().keys()
            and all(torch.equal(whole[k], v) for k, v in ref.state_dict().items()),
            "bytes": _count_bytes(par, x, mask, pos, seg, weights),
            "planned": tensor_parallel_bytes(2, D, rows * tokens, world, 4, ckpt),
        }
        if not ckpt:  # what a sharded block saves for backward, against the planner's count (layout: plain rows)
            res["saved"] = _saved_block_bytes(par.blocks[0], rows, tokens)
            res["saved_planned"] = rows * tokens * block_saved_bytes_per_token(D, FF, heads, 4, tp=world)
        results.append(res)
    # residual dropout saves its mask after ff2's all-reduce: a recomputed block redoes both forward all-reduces
    rows, tokens, heads = CASES[0][:3]
    cfg = Encoder.Config(preset="custom", d_model=D, n_layers=2, n_heads=heads, d_ff=FF, max_seq_len=tokens,
                         dropout=0.1, activation_checkpointing=True)  # fmt: skip
    torch.manual_seed(0)
    par = Encoder(cfg)
    engine, *_ = deepspeed.initialize(
        model=par, config={"train_micro_batch_size_per_gpu": 1, "tensor_parallel": tp_config}
    )
    engine.first_dataloader_check.remove()
    x, mask, _, _ = _inputs(0, rows, tokens, False)
    dropout_bytes = _count_bytes(par, x, mask, None, None, torch.ones(rows, tokens, D))
    planned = tensor_parallel_bytes(2, D, rows * tokens, world, 4, True, dropout=True)
    results.append({"case": "dropout", "bytes": dropout_bytes, "planned": planned})
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_autotp_blocks_equal_the_one_process_encoder(tmp_path):
    out = tmp_path / "r.json"
    start_ranks(_rank, (2, free_port(), str(out)), nprocs=2, timeout=300)
    results = json.loads(out.read_text())
    assert [r["case"] for r in results] == [*range(len(CASES)), "dropout"]
    assert results[-1]["bytes"] == results[-1]["planned"] > 0, results[-1]
    for r, (_, _, heads, *_) in zip(results, CASES):
        assert r["params"] == 2 * 12 + 3 and r["shapes"], r  # every parameter: 2 blocks of 12, positions, norm
        assert r["heads"] == [heads // 2] * 2, r  # the attention's head count is the rank's
        assert r["rank_params"] == r["planned_params"], r
        assert r["out"] < 1e-5 and r["x_grad"] < 1e-5 and r["param_grad"] < 1e-5, r
        assert r["whole"], r  # whole_weights: the reference's weights, gathered from the shards
        assert r["bytes"] == r["planned"] > 0, r
        if "saved" in r:
            assert r["saved"] == r["saved_planned"], r
