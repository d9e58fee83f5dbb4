"""Ulysses sequence parallelism for the encoder (DeepSpeed's ``DistributedAttention``).

A row's T tokens are split in ``sp`` contiguous chunks over the ranks of a sequence-parallel group: rank j holds
tokens ``[j*T/sp, (j+1)*T/sp)``. Everything in a block but attention works token by token, so it runs on the local
chunk as it is. Attention needs every token: DeepSpeed's ``DistributedAttention`` all-to-alls q, k and v from
(R, T/sp, H, Dh) to (R, T, H/sp, Dh), so each rank attends over the whole row with H/sp of the heads, and all-to-alls
the output back; the ``AttnLayout`` (packed histories, causal) is the whole row's, built from the full ``segments``
that every rank of the group holds. Parameters are replicated over the group and each rank's gradients are those of
its own tokens: the sum over the group is the gradient of the whole row (what data parallelism over dp x sp ranks
sums anyway, ZeRO's reduction included).

Heads must divide by ``sp`` and T by ``sp``. Written here, not taken whole from DeepSpeed: its Ulysses path in
``deepspeed.initialize`` expects a Megatron-style model; this module only swaps the attention core of our blocks.

In training (``parallel.sp``, :func:`encode`): every rank of an sp group gets the same batch and looks up the same
rows; the encoder runs on this rank's chunk; its output is gathered back to whole rows, and the heads and losses
run on them, the same on every rank of the group. The gather's backward hands each rank its chunk's gradient times
sp: DeepSpeed averages dense gradients, and TorchRec embedding gradients, over all dp x sp ranks, and the sum over
the group of the encoder's partial gradients, times sp, over dp x sp, is the data-parallel mean over dp; the
heads' gradients are the same on every rank of the group, so their average is too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer.model.encoder import AttnLayout, Encoder, attend


class _LocalAttention(nn.Module):
    """The attention DistributedAttention calls on each rank: the whole row, this rank's heads."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.dropout = dropout

    def forward(self, q: Tensor, k: Tensor, v: Tensor, layout: AttnLayout | None = None) -> Tensor:
        """(R, T, h, Dh) each -> (R, T, h, Dh); ``layout`` None: one history per row, plain causal."""
        return attend(torch.stack((q, k, v), dim=2), layout, self.dropout if self.training else 0.0)


class SequenceParallelAttention(nn.Module):
    """``Attention.core`` under sequence parallelism: (R, T/sp, 3, H, Dh) local qkv -> (R, T/sp, H, Dh)."""

    def __init__(self, group: dist.ProcessGroup, dropout: float) -> None:
        super().__init__()
        import deepspeed.comm as ds_comm
        from deepspeed.sequence.layer import DistributedAttention

        if not ds_comm.is_initialized():  # DeepSpeed's comm wraps the torch process group already there
            ds_comm.init_distributed(dist_backend=dist.get_backend(group), auto_mpi_discovery=False)
        self.inner = DistributedAttention(_LocalAttention(dropout), group, scatter_idx=2, gather_idx=1)

    def forward(self, qkv: Tensor, layout: AttnLayout | None) -> Tensor:
        q, k, v = (t.contiguous() for t in qkv.unbind(2))
        return self.inner(q, k, v, 0, None, layout)


def enable_sequence_parallel(encoder: Encoder, group: dist.ProcessGroup, device: torch.device | None = None) -> None:
    """Switch every block's attention to :class:`SequenceParallelAttention` over ``group`` (its size must divide
    the head count). The encoder then takes each rank's chunk of the rows: :func:`local_chunk`. ``auto``
    attention, flex on GPUs, becomes ``mask`` (flex under sp is not tested yet)."""
    sp, device = dist.get_world_size(group), device or torch.device("cpu")
    if encoder.cfg.n_heads % sp:
        raise ValueError(f"parallel.sp: {sp} does not divide model.n_heads {encoder.cfg.n_heads}")
    if encoder.cfg.attention == "auto" and encoder.attention_mode(device) == "flex":
        encoder.cfg = dataclasses.replace(encoder.cfg, attention="mask")
    if encoder.attention_mode(device) == "flex" or encoder.compiled:
        raise ValueError("parallel.sp: needs model.attention mask or segments, and no train.compile (yet)")
    for block in encoder.blocks:
        block.attn.core = SequenceParallelAttention(group, block.attn.dropout)
    encoder.sequence_group = group


@contextlib.contextmanager
def sequence_parallel_off(encoder: Encoder) -> Iterator[None]:
    """The encoder as a whole-row model on each rank for a while (validation during training: every rank ranks its
    own users), its sequence-parallel attention back after. The parameters are the same either way."""
    group, cores = encoder.sequence_group, [b.attn.core for b in encoder.blocks]
    encoder.sequence_group = None
    for b in encoder.blocks:
        b.attn.core = None
    try:
        yield
    finally:
        encoder.sequence_group = group
        for b, core in zip(encoder.blocks, cores):
            b.attn.core = core


def sequence_groups(sp: int, timeout_s: float = 600.0) -> dist.ProcessGroup:
    """This rank's sequence-parallel group: ranks ``[k*sp, (k+1)*sp)`` (every rank creates every group, in order,
    as ``new_group`` requires), with the run's collective timeout (``train.timeout_s``)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for k in range(world // sp):
        group = dist.new_group(list(range(k * sp, (k + 1) * sp)), timeout=datetime.timedelta(seconds=timeout_s))
        if k == rank // sp:
            mine = group
    assert mine is not None
    return mine


class _GatherChunks(torch.autograd.Function):
    """Forward: whole rows from every rank's chunk (dim 1). Backward: this rank's chunk of the gradient times
    ``sp`` (every rank of the group computes the same loss from the whole rows; see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return gather_chunks(t, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        sp = dist.get_world_size(ctx.group)
        return local_chunk(grad, ctx.group) * sp, None


def encode(
    encoder: Encoder, x: Tensor, mask: Tensor, positions: Tensor | None = None, segments: Tensor | None = None
) -> Tensor:
    """``encoder(x, mask, positions, segments)`` on whole rows (R, T, d), under sequence parallelism: rows padded
    to a multiple of sp, this rank's chunk encoded, the whole rows gathered back (trimmed to T)."""
    group = encoder.sequence_group
    assert group is not None
    sp, T = dist.get_world_size(group), mask.shape[1]
    pad = -T % sp
    if pad:
        x = nn.functional.pad(x, (0, 0, 0, pad))
        mask = nn.functional.pad(mask, (0, pad), value=False)
        if positions is not None:
            positions = nn.functional.pad(positions, (0, pad))
        if segments is not None:
            segments = nn.functional.pad(segments, (0, pad), value=-1)
    if positions is None:  # one history per row: the encoder's own arange, offset by the chunk
        y = encoder(local_chunk(x, group), local_chunk(mask, group), None, segments)
    else:
        y = encoder(local_chunk(x, group), local_chunk(mask, group), local_chunk(positions, group), segments)
    return _GatherChunks.apply(y, group)[:, :T]


def local_chunk(t: Tensor, group: dist.ProcessGroup, dim: int = 1) -> Tensor:
    """This rank's contiguous chunk of ``t`` along ``dim`` (the sequence): rank j of the group gets chunk j."""
    sp, j = dist.get_world_size(group), dist.get_rank(group)
    if t.shape[dim] % sp:
        raise ValueError(f"parallel.sp: {sp} does not divide the sequence length {t.shape[dim]}")
    return t.chunk(sp, dim=dim)[j]


def gather_chunks(t: Tensor, group: dist.ProcessGroup, dim: int = 1) -> Any:
    """The whole of ``t`` from every rank's chunk along ``dim`` (no gradient: for checks and evaluation)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
