"""Ulysses sequence parallelism (trainer/model/sequence_parallel.py) against the plain encoder on one process: over
2 and 4 gloo ranks, random shapes, one history per row and packed rows (both attention layouts), with and without
activation checkpointing, each rank's chunk of the output and of the input gradient equals the reference's, and the
parameter gradients summed over the group equal the reference's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import free_port, rank_env, start_ranks

from trainer.model.encoder import Encoder

REPO = Path(__file__).resolve().parents[1]

CASES = [  # (sp, rows, tokens, heads, attention, packed, activation checkpointing)
    (2, 3, 12, 2, "segments", False, False),
    (2, 2, 16, 4, "segments", True, False),
    (2, 3, 8, 2, "mask", True, True),
    (4, 2, 16, 4, "segments", True, True),
    (4, 2, 8, 4, "mask", False, False),
]


def _inputs(seed: int, rows: int, tokens: int, packed: bool) -> tuple[torch.Tensor, ...]:
    """x (R, T, 16), mask, positions, segments (None for one history per row): right-padded rows; packed rows hold
    several histories of random lengths."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, tokens, 16, generator=g)
    segments = torch.full((rows, tokens), -1, dtype=torch.long)
    positions = torch.zeros(rows, tokens, dtype=torch.long)
    sid = 0
    for r in range(rows):
        t = 0
        end = tokens - int(torch.randint(0, tokens // 3, (1,), generator=g))  # padding at the end
        while t < end:
            n = int(torch.randint(1, end - t + 1, (1,), generator=g)) if packed else end - t
            segments[r, t : t + n], positions[r, t : t + n] = sid, torch.arange(n)
            sid, t = sid + 1, t + n
    return x, segments >= 0, positions, (segments if packed else None)


def twin_encoders(
    seed: int, heads: int, tokens: int, attention: str, ckpt: bool
) -> tuple[Encoder.Config, Encoder, Encoder]:
    """A small encoder (d_model 16, 2 layers, d_ff 32) and an identical copy to split over ranks."""
    cfg = Encoder.Config(
        preset="custom", d_model=16, n_layers=2, n_heads=heads, d_ff=32, max_seq_len=tokens, dropout=0.0,
        attention=attention, activation_checkpointing=ckpt,
    )  # fmt: skip
    torch.manual_seed(seed)
    ref = Encoder(cfg)
    par = Encoder(cfg)
    par.load_state_dict(ref.state_dict())
    return cfg, ref, par


def _count_bytes(par, x, mask, pos, seg, weights, cfg, sp) -> tuple[float, float]:
    """Bytes the sequence-parallel encoder hands to all-to-all and all-gather in one forward and backward of whole
    rows (trainer/model/sequence_parallel.py: encode), and the planner's count of them."""
    import deepspeed.comm as ds_comm

    from cluster.planner import sequence_parallel_bytes
    from trainer.model.sequence_parallel import encode

    counted = [0]
    a2a, gather = ds_comm.all_to_all_single, torch.distributed.all_gather

    def count_a2a(output, tensor, *a, **k):
        counted[0] += tensor.numel() * tensor.element_size()
        return a2a(output, tensor, *a, **k)

    def count_gather(parts, tensor, *a, **k):
        counted[0] += tensor.numel() * tensor.element_size()
        return gather(parts, tensor, *a, **k)

    ds_comm.all_to_all_single, torch.distributed.all_gather = count_a2a, count_gather
    try:
        (encode(par, x, mask, pos, seg) * weights).sum().backward()
    finally:
        ds_comm.all_to_all_single, torch.distributed.all_gather = a2a, gather
    tokens = x.shape[0] * (x.shape[1] + -x.shape[1] % sp)  # whole rows, padded to a multiple of sp
    planned = sequence_parallel_bytes(cfg.n_layers, cfg.d_model, tokens, sp, 4, cfg.activation_checkpointing)
    return counted[0], planned


def _rank(rank: int, world: int, port: int, out: str) -> None:
    rank_env(rank, world, port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from trainer.model.sequence_parallel import enable_sequence_parallel, gather_chunks, local_chunk

    group = torch.distributed.new_group(list(range(world)))
    results = []
    for i, (sp, rows, tokens, heads, attention, packed, ckpt) in enumerate(CASES):
        if sp != world:
            continue
        cfg, ref, par = twin_encoders(i, heads, tokens, attention, ckpt)
        enable_sequence_parallel(par, group)
        x, mask, pos, seg = _inputs(i, rows, tokens, packed)
        weights = torch.randn(rows, tokens, 16, generator=torch.Generator().manual_seed(100 + i))

        xr = x.clone().requires_grad_()
        yr = ref(xr, mask, pos if packed else None, seg)
        (yr * weights).sum().backward()

        xl = local_chunk(x, group).clone().requires_grad_()
        yl = par(xl, local_chunk(mask, group), local_chunk(pos, group) if packed else None, seg)
        (yl * local_chunk(weights, group)).sum().backward()
        grads = {}
        for name, p in par.named_parameters():
            g = p.grad.clone()
            torch.distributed.all_reduce(g, group=group)  # each rank's share: its own tokens
            grads[name] = (g - ref.get_parameter(name).grad).abs().max().item()
        results.append(
            {
                "case": i,
                "out": (gather_chunks(yl.detach(), group) - yr.detach()).abs().max().item(),
                "x_grad": (gather_chunks(xl.grad, group) - xr.grad).abs().max().item(),
                "param_grad": max(grads.values()),
                "params": len(grads),
            }
        )
        if i > 0:  # what the planner counts for the collectives: the bytes handed to them, one step
            results[-1]["bytes"], results[-1]["planned"] = _count_bytes(par, x, mask, pos, seg, weights, cfg, sp)
    errors = []  # what cannot be split: one line naming the setting
    for bad in (
        lambda: enable_sequence_parallel(Encoder(Encoder.Config(preset="custom", d_model=24, n_layers=1, n_heads=3,
                                                                d_ff=8, max_seq_len=8)), group),
        lambda: local_chunk(torch.zeros(1, 6 * world + 1), group),
    ):  # fmt: skip
        try:
            bad()
        except ValueError as e:
            errors.append(str(e))
    if rank == 0:
        Path(out).write_text(json.dumps({"results": results, "errors": errors}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_attention_equals_the_one_process_encoder(world, tmp_path):
    """Also: heads or a sequence that do not divide by sp are refused with one line naming the setting."""
    out = tmp_path / "r.json"
    start_ranks(_rank, (world, free_port(), str(out)), nprocs=world, timeout=300)
    got = json.loads(out.read_text())
    results = got["results"]
    assert got["errors"] == [
        f"parallel.sp: {world} does not divide model.n_heads 3",
        f"parallel.sp: {world} does not divide the sequence length {6 * world + 1}",
    ]
    assert [r["case"] for r in results] == [i for i, c in enumerate(CASES) if c[0] == world]
    for r in results:
        assert r["params"] == 2 * 12 + 3  # every parameter has a gradient: 2 blocks of 12, positions, final norm
        assert r["out"] < 1e-5 and r["x_grad"] < 1e-5 and r["param_grad"] < 1e-5, r
        if "bytes" in r:
            assert r["bytes"] == r["planned"] > 0, r
