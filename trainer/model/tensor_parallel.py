"""Megatron-style tensor parallelism for the encoder blocks, through DeepSpeed's AutoTP training.

``parallel.tp = N``: consecutive groups of N ranks share every block's weights. In ``deepspeed.initialize``
(``tensor_parallel.autotp_size`` + :data:`TP_LAYER_SPECS`, set by ``JobConfig.deepspeed_config``) AutoTP replaces
qkv and ff1 with column-parallel layers (each rank holds and computes 1/N of the heads and of ff1's units; the
input's gradient is all-reduced over the group in backward) and the attention output and ff2 with row-parallel ones
(each rank multiplies its 1/N of the inputs, an all-reduce sums the products in forward). LayerNorms, positions,
the interaction token and the heads stay replicated: their inputs and gradients are the same on every rank of the
group. ``Attention.n_heads`` becomes the rank's count (AutoTP divides it when it shards qkv).

Why AutoTP rather than PyTorch's DTensor ``parallelize_module``: DeepSpeed trains the dense model already, and its
AutoTP layers are plain tensors to ZeRO (stages 1-3 shard them over the data-parallel group it builds), its
checkpoints carry the layout, and its universal checkpoint merges the shards (eval, export and resume on another
layout read that; :func:`trainer.checkpoint.dense_weights`). DTensor parameters would need FSDP2, not ZeRO.

The group sees one batch: the loader serves data-parallel ranks (world / N of them) and every rank of a group draws
the same negatives and dropout masks. TorchRec keeps sharding the item tables over the whole world; each rank of a
group looks up the same rows and back-propagates the same gradient, which TorchRec's average over the world turns
into the data-parallel mean.
"""

from __future__ import annotations

from torch import Tensor, nn

# How AutoTP shards a Block, by parameter name (DeepSpeed's layer-spec format). qkv's output is [q | k | v]: each
# third is split alone (shape (3, -1)), so a rank gets whole heads of q, k and v.
TP_LAYER_SPECS: list[dict[str, object]] = [
    {"patterns": [r".*\.attn\.qkv\.(weight|bias)$"], "partition_type": "column", "shape": [3, -1], "partition_dim": 0},
    {"patterns": [r".*\.ff1\.(weight|bias)$"], "partition_type": "column"},
    {"patterns": [r".*\.attn\.out\.(weight|bias)$", r".*\.ff2\.(weight|bias)$"], "partition_type": "row"},
]


def whole_weights(module: nn.Module) -> dict[str, Tensor]:
    """Collective over the tensor-parallel (and, under ZeRO-3, data-parallel) group: copies of ``module``'s full
    parameters on every rank, its shards left as they were (validation during training runs a whole model)."""
    import deepspeed
    from deepspeed.module_inject.layers import GatherReplacedLayerParams

    out = {}
    for name, m in module.named_modules():
        params = list(m.parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params), GatherReplacedLayerParams(params, m):
            for key, p in m.named_parameters(recurse=False):
                out[f"{name}.{key}" if name else key] = p.detach().clone()
    return out
