"""Per-rank memory of a training job, from its JobConfig alone (no model is built).

The trainer and the capacity planner (`cluster/planner.py`) share these functions, so a plan and a
run never disagree about what the dense side needs. Every term is in bytes, per rank.

Sources:
- Dense model states follow DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs``,
  ``estimate_zero3_model_states_mem_needs``) for bf16 mixed precision, and the same bookkeeping with
  4-byte weights for fp32 (tests compare both with DeepSpeed and with measured runs).
- Activations are counted tensor by tensor for this encoder block (what autograd saves), the way
  Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") do it,
  with SDPA/flash attention (no T x T score matrix is stored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainer.data.schema import NUM_PLAYED_BUCKETS, EventType
from trainer.model.interaction import FEEDBACK_SIDE, ITEM_SIDE, SIDE_FEATURES, side_table_rows

if TYPE_CHECKING:
    from trainer.job import JobConfig

FEEDBACK_OUTPUTS = len(EventType) + NUM_PLAYED_BUCKETS


def _linear(d_in: int, d_out: int) -> int:
    return d_in * d_out + d_out


@dataclass(frozen=True)
class DenseParams:
    """Parameter counts of the DeepSpeed-trained (dense) model, by part."""

    encoder: int  # blocks + final LayerNorm (the preset's size)
    positions: int
    side_tables: int  # the small side tables (context, event, played, hour, gap): lookups, not matmuls
    interaction: int  # the MLP(s) turning looked-up embeddings into tokens
    heads: int  # projection to item space + feedback head
    # the most parameters one module owns directly on a rank (DeepSpeed's ZeRO-3 term; a block layer's 1/tp shard)
    largest_layer: int
    sharded: int = 0  # of the total, what parallel.tp splits: the block weights, biases of column-parallel layers
    tp: int = 1

    @property
    def total(self) -> int:
        return self.encoder + self.positions + self.side_tables + self.interaction + self.heads

    @property
    def per_rank(self) -> int:
        """Parameters a rank holds before ZeRO partitions them: its 1/tp of the sharded ones, the rest whole."""
        return self.total - self.sharded + self.sharded // self.tp

    @property
    def matmul(self) -> int:
        """Parameters that are matmul weights (FLOPs count these; tables are lookups)."""
        return self.total - self.positions - self.side_tables


def dense_params(cfg: JobConfig) -> DenseParams:
    """Counts for ``build_dense(cfg)`` (pre-training's ``ArgusModel``) from the sizes alone."""
    from trainer.model.encoder import encoder_param_count

    model, emb = cfg.model, cfg.embeddings
    enc = model.resolved()
    d, f, side = enc.d_model, enc.d_ff, model.side_dim
    hidden = d  # InteractionEmbedding's default hidden width
    if model.token_layout == "merged":
        d_ins = [emb.item_dim + side * (len(ITEM_SIDE) + len(FEEDBACK_SIDE))]
    else:
        d_ins = [emb.item_dim + side * len(ITEM_SIDE), side * len(FEEDBACK_SIDE)]
    fb_hidden = cfg.heads.feedback.hidden or d
    tables = [rows * side for rows in side_table_rows(model.num_contexts).values()]
    interaction = [_linear(d_in, hidden) for d_in in d_ins] + [_linear(hidden, d)] * len(d_ins)
    heads = [_linear(d, emb.item_dim), _linear(d + emb.item_dim, fb_hidden), _linear(fb_hidden, FEEDBACK_OUTPUTS)]
    interaction += item_tower_params(cfg)  # the item tower makes the interaction token's item vectors
    if model.summary.tokens:  # the summariser makes the encoder's prefix tokens
        from trainer.model.summary import reconstruction_param_count, summary_param_count

        interaction.append(summary_param_count(model.summary, d, d))
        if model.summary.reconstruction_weight > 0:
            heads.append(reconstruction_param_count(d, emb.item_dim))
    tp = cfg.parallel.tp
    block = [split // tp + whole for split, whole in _block_linears(d, f)]  # a rank's share of each
    return DenseParams(
        encoder=encoder_param_count(enc),
        positions=enc.max_seq_len * d,
        side_tables=sum(tables),
        interaction=sum(interaction),
        heads=sum(heads),
        largest_layer=max(interaction + heads + block + tables + [enc.max_seq_len * d]),
        sharded=tensor_parallel_params(enc.n_layers, d, f),
        tp=tp,
    )


def item_tower_params(cfg: JobConfig) -> list[int]:
    """``model.item_tower`` semantic / both (trainer/model/item_tower.py): psi's LayerNorm and two linear layers,
    and (both) the OOV vector; none for the ID tower."""
    from trainer.model.item_tower import tower_hidden

    m, dim = cfg.model, cfg.embeddings.item_dim
    if m.item_tower == "id":
        return []
    hidden = tower_hidden(dim)
    out = [2 * m.item_features, _linear(m.item_features, hidden), _linear(hidden, dim)]
    return out + ([dim] if m.item_tower == "both" else [])


def _block_linears(d: int, f: int) -> list[tuple[int, int]]:
    """A block's linear layers (qkv, attention output, ff1, ff2) as (parameters parallel.tp splits, parameters it
    keeps whole): AutoTP (trainer/model/tensor_parallel.py) splits qkv and ff1 by rows, biases included, and the
    attention output and ff2 by columns, their biases whole."""
    return [(_linear(d, 3 * d), 0), (d * d, d), (_linear(d, f), 0), (f * d, d)]


def tensor_parallel_params(n_layers: int, d_model: int, d_ff: int) -> int:
    """The encoder parameters parallel.tp splits: every block's split parameters (:func:`_block_linears`)."""
    return n_layers * sum(split for split, _ in _block_linears(d_model, d_ff))


def weight_bytes(precision: str) -> int:
    return 2 if precision == "bf16" else 4


@dataclass(frozen=True)
class DenseStates:
    """Dense parameters, gradients and optimizer states on each GPU, and what offload puts in host memory."""

    params: int
    grads: int
    optimizer: int  # fp32 master copy (when one exists) + Adam moments
    host: int  # CPU memory per node taken by offloaded states (0 without offload)

    @property
    def gpu(self) -> int:
        return self.params + self.grads + self.optimizer


def dense_states(
    n: int,
    largest_layer: int,
    stage: int,
    precision: str,
    offload: bool,
    world: int,
    gpus_per_node: int = 1,
    buffer_factor: float = 1.5,
    tp: int = 1,
) -> DenseStates:
    """Per-rank dense model states for ZeRO ``stage`` with AdamW.

    bf16 (DeepSpeed's mixed precision): 2-byte weights and gradients, fp32 master weights, fp32
    gradient partition and two fp32 moments; stage 2 = 2N + 18N/G and stage 3 = 4*largest_layer +
    18N/G, exactly DeepSpeed's estimators. fp32: 4-byte weights and gradients, the fp32 partition
    copy ZeRO keeps for its optimizer (stages 1-3) and two moments. ``buffer_factor`` is DeepSpeed's
    own margin on host memory with offload. ``world``: the ranks ZeRO partitions over (world / tp under
    parallel.tp, whose ranks hold ``n`` parameters each: their own shards).
    """
    g = max(world, 1)
    if offload:  # ZeRO-3 with optimizer and parameters offloaded (ds_configs/zero3_offload.json)
        # per node: its ranks (up to gpus_per_node of the g x tp) each offload 1/g of their n parameters' states
        per_node = n * min(max(gpus_per_node, 1), g * tp) / g
        host = int(per_node * (18 if precision == "bf16" else 20) * buffer_factor)
        return DenseStates(params=4 * largest_layer, grads=0, optimizer=0, host=host)
    if precision == "bf16":
        per = {
            0: (2 * n, 2 * n, 16 * n),  # BF16_Optimizer: fp32 master + fp32 grads + m + v, unpartitioned
            1: (2 * n, 2 * n, 16 * n // g),
            2: (2 * n, 0, 18 * n // g),  # DeepSpeed: 2 params + 18/G (2 grad16 + 4 grad32 + 4 master + 8 m,v)
            3: (4 * largest_layer, 0, 18 * n // g),
        }[stage]
    else:
        per = {
            0: (4 * n, 4 * n, 8 * n),  # torch AdamW: weights, grads, m, v
            1: (4 * n, 4 * n, 12 * n // g),  # + the fp32 partition ZeRO steps
            2: (4 * n, 0, 16 * n // g),  # grads partitioned as they are reduced
            3: (4 * largest_layer, 0, 20 * n // g),
        }[stage]  # weights, grads, copy, m, v all partitioned
    return DenseStates(params=per[0], grads=per[1], optimizer=per[2], host=0)


@dataclass(frozen=True)
class Activations:
    """Saved activations of one micro-batch (the full context), and the transient working set."""

    per_layer_token: int  # bytes one block saves per token without checkpointing
    layers: int  # all blocks, as configured (checkpointed or not)
    other: int  # interaction MLP, final norm, heads, sampled-softmax logits
    working: int  # one block's activations + their gradients while it runs backward (or recomputes)

    @property
    def total(self) -> int:
        return self.layers + self.other + self.working


def activations(cfg: JobConfig, batch_size: int | None = None) -> Activations:
    """Bytes of activations for a micro-batch of ``batch_size`` rows (default: the config's samples, or
    packed rows of a token budget), each filling the whole context.

    Per block and token, autograd keeps (elements, in the training dtype): LN1 input d, LN1 output
    d, qkv 3d (q, k, v are views of it), attention output d (the head merge is a view of it), LN2
    input d, LN2 output d, FF1 output f, GELU output f: 8d + 2f; plus fp32 mean and rstd of both
    LayerNorms and the attention's log-sum-exp per head: (4 + heads) x 4 bytes. A test checks this
    against what autograd saves. Dropout, when on, adds its masks. With activation checkpointing a
    block keeps only its input (d) and one block at a time is recomputed. Under ``parallel.sp`` the
    blocks hold 1/sp of the tokens; under ``parallel.tp`` 1/tp of the heads and FF units.
    """
    enc, emb, ni = cfg.model.resolved(), cfg.embeddings, cfg.heads.next_item
    w = weight_bytes(cfg.deepspeed.precision)
    d, f = enc.d_model, enc.d_ff
    k = cfg.tokens_per_interaction()
    tokens = (batch_size or cfg.rows_per_batch()) * cfg.interactions_per_sample() * k
    targets = tokens // k
    per_layer_token = block_saved_bytes_per_token(d, f, enc.n_heads, w, tp=cfg.parallel.tp)
    # parallel.sp: a rank's blocks hold its 1/sp of every row's tokens (the all-to-all'd q, k, v and attention
    # output are the same size as the chunk's own); the heads below run on the whole rows
    block_tokens = -(-tokens // cfg.parallel.sp)
    if cfg.model.windowed():
        # a sample fills whole windows of the context, and every window's summary tokens (if any) run through the
        # blocks beside it (the summariser's own activations, a few windows of per-token MLPs, are not counted)
        # (read: memory, they only give keys and values: not counted, a layer keeps P x 4d values of them, its norm
        # and projection, little beside the window's own)
        rows = (batch_size or cfg.rows_per_batch()) * cfg.windows_per_sample()
        prefix = cfg.model.summary.tokens if cfg.model.summary.read == "tokens" else 0
        block_tokens = -(-rows * (cfg.window() * k + prefix) // cfg.parallel.sp)
    if enc.activation_checkpointing:
        layers = enc.n_layers * block_tokens * d * w
    else:
        layers = enc.n_layers * block_tokens * per_layer_token
    rows = emb.item_rows or None  # the catalog, when the config pins it (a full softmax scores all of it)
    candidates = 1 + ((rows or 0) if ni.full(rows) else ni.uniform_negatives + ni.in_batch_negatives)
    fb_hidden = cfg.heads.feedback.hidden or d
    other = (
        targets
        * (
            emb.item_dim * 4  # looked-up item vectors (fp32, from TorchRec)
            + cfg.model.side_dim * len(SIDE_FEATURES) * w
        )  # side-table rows, in the training dtype
        + tokens * (2 * d + d + 2 * d) * w  # interaction MLP hidden + GELU, tokens + positions, final norm
        + targets * (d + emb.item_dim) * 4  # state rows, projected user vectors (fp32)
        # multi-token prediction: every target is predicted by up to `horizon` states (pairs): per extra pair its
        # gathered user and positive vectors (fp32), and its logits, softmax and their gradient
        + targets * (ni.horizon - 1) * 2 * emb.item_dim * 4
        + targets * ni.horizon * candidates * 4 * 3  # logits, softmax, their gradient (fp32)
        + targets * (d + emb.item_dim + 2 * fb_hidden) * w
    )  # feedback head
    # backward of one block: its activation gradients (same size as what it saved), plus, when
    # checkpointed, the block's recomputed activations
    working = block_tokens * per_layer_token * (2 if enc.activation_checkpointing else 1)
    return Activations(per_layer_token=per_layer_token, layers=layers, other=other, working=working)


def block_saved_bytes_per_token(
    d_model: int, d_ff: int, n_heads: int, dtype_bytes: int, ln_stat_bytes: int = 4, tp: int = 1
) -> int:
    """What one encoder block's autograd graph holds per token (see :func:`activations`).

    LayerNorm statistics are fp32 on CUDA for any input dtype (``ln_stat_bytes``); CPU keeps them in
    the input dtype. The attention log-sum-exp is fp32 on both. Under parallel.tp a rank holds its 1/tp of
    qkv, the attention output, FF1's output and the GELU's (and of the heads' log-sum-exp); the LayerNorms'
    inputs and outputs stay whole on every rank."""
    return (4 * d_model + (4 * d_model + 2 * d_ff) // tp) * dtype_bytes + 4 * ln_stat_bytes + n_heads // tp * 4


def ds_buffers(ds_config: dict[str, Any], precision: str) -> int:
    """DeepSpeed's gradient-reduction buckets (sizes are elements in the JSON, in the training dtype).

    ZeRO-1/2 (DeepSpeed 0.19.8, ``stage_1_and_2.py: setup_buckets``): with contiguous gradients one
    ``reduce_bucket_size`` buffer, two with ``overlap_comm`` (double-buffered); parameters are
    all-gathered straight into their flat buffer, so ``allgather_bucket_size`` allocates nothing.
    ZeRO-3: the reduce bucket plus the parameter prefetch bucket. Sizes default to DeepSpeed's.
    """
    z = ds_config.get("zero_optimization", {})
    stage = z.get("stage", 0)
    w = weight_bytes(precision)
    reduce = int(z.get("reduce_bucket_size", 5e8))
    if stage in (1, 2):
        copies = 2 if z.get("overlap_comm", False) and z.get("contiguous_gradients", True) else 1
        return copies * reduce * w
    if stage == 3:
        return (reduce + int(z.get("stage3_prefetch_bucket_size", 5e7))) * w
    return 0


HEADROOM_FRACTION = 0.10  # allocator fragmentation, NCCL and CUDA context, kernels' workspaces
HEADROOM_MIN = 2 * 2**30


def headroom(capacity: int, fraction: float = HEADROOM_FRACTION) -> int:
    return int(max(capacity * fraction, HEADROOM_MIN))


def rank_dense_states(cfg: JobConfig, world: int, gpus_per_node: int = 1) -> DenseStates:
    """:func:`dense_states` of ``cfg`` on ``world`` ranks: a rank's 1/tp of the tensor-parallel weights, ZeRO
    partitioned over the data-parallel group DeepSpeed's AutoTP builds (world / tp). Under parallel.sp ZeRO
    partitions over the whole world (dp x sp), whose ranks all hold the same parameters."""
    p, ds = dense_params(cfg), cfg.deepspeed
    world_zero = world // cfg.parallel.tp
    return dense_states(
        p.per_rank, p.largest_layer, ds.stage, ds.precision, ds.offload, world_zero, gpus_per_node, tp=cfg.parallel.tp
    )


def item_data_bytes(cfg: JobConfig, item_rows: int) -> int:
    """``model.item_tower`` semantic / both: the item metadata vectors (in the weights' dtype) and the cold flags,
    whole on every rank (trainer/model/item_tower.py); 0 for the ID tower."""
    if cfg.model.item_tower == "id":
        return 0
    return item_rows * (cfg.model.item_features * weight_bytes(cfg.deepspeed.precision) + 1)


def non_embedding_bytes(cfg: JobConfig, world: int, gpus_per_node: int = 1, item_rows: int = 0) -> int:
    """Everything on a GPU except the embedding shards: dense states + activations + DeepSpeed buckets + a
    semantic item tower's item data (for ``item_rows`` items)."""
    states = rank_dense_states(cfg, world, gpus_per_node)
    buffers = ds_buffers(cfg.deepspeed_config(world), cfg.deepspeed.precision)
    return states.gpu + activations(cfg).total + buffers + item_data_bytes(cfg, item_rows)


def embedding_hbm_budget(
    cfg: JobConfig,
    world: int,
    capacity: int,
    gpus_per_node: int = 1,
    headroom_fraction: float = HEADROOM_FRACTION,
    item_rows: int = 0,
) -> int:
    """HBM per GPU that TorchRec may plan embedding shards into (its ``Topology.hbm_cap``)."""
    rest = non_embedding_bytes(cfg, world, gpus_per_node, item_rows)
    return max(capacity - headroom(capacity, headroom_fraction) - rest, 0)


def embedding_lookups(cfg: JobConfig, num_items: int | None = None) -> tuple[float, float]:
    """(item lookups, negative lookups) per sample: TorchRec's pooling factors for our features (a full
    context: training and the planner size TorchRec's buffers for the worst case). A full softmax looks up
    the whole catalog of ``num_items`` once per batch."""
    ni = cfg.heads.next_item
    rows = num_items or cfg.embeddings.item_rows or None
    negatives = rows if ni.full(rows) and rows else ni.uniform_negatives
    return float(cfg.interactions_per_sample()), negatives / cfg.rows_per_batch()
