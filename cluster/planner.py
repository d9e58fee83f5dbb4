"""`argus plan`: GPUs, memory per rank and days to train, for the sharded-embedding + ZeRO model.

Inputs are the run's own JobConfig (what `argus train` reads) plus catalog size, interactions to
train and the hardware. Memory per rank joins two halves no other tool puts together:
- embedding shards and their fused-optimizer state, from TorchRec's planner run offline on a
  meta-device copy of the tables with a hypothetical Topology (``embeddings.sharding.plan_offline``,
  the same call `argus train` makes), given the HBM the dense side leaves; under
  ``embeddings.backend: torch`` the whole table, its dense gradient and its optimizer state on every
  rank (``replicated_embedding_bytes``);
- dense parameters, gradients and optimizer states for the ZeRO stage, activations and DeepSpeed's
  buckets, from ``trainer.memory`` (which the trainer also uses to size TorchRec's budget).
Time per step is the larger of compute (FLOPs at an assumed MFU), memory traffic (at HBM
bandwidth) and ZeRO collectives (which DeepSpeed overlaps with compute), plus the embedding
all-to-all (on the critical path between lookup and encoder). docs/capacity-planning.md gives
every formula and its source.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.hardware import Hardware
from embeddings.replicated import replicated_summary
from embeddings.tables import table_rows
from trainer.config import ConfigError
from trainer.flops import encoder_flops_per_interaction, flops_per_interaction
from trainer.memory import (
    HEADROOM_FRACTION,
    activations,
    dense_params,
    ds_buffers,
    embedding_hbm_budget,
    embedding_lookups,
    headroom,
    item_data_bytes,
    rank_dense_states,
    weight_bytes,
)

if TYPE_CHECKING:
    from trainer.job import JobConfig

DEFAULT_INTERACTIONS = 3e11
ASSUMED_MFU = 0.40  # used when no GPU measurement of ours exists for the chosen GPU
MEASURED_MFU_FILE = Path(__file__).resolve().parents[1] / "bench" / "results" / "mfu.json"
OPTIMIZER_STATE_BYTES_PER_ROW = {
    "rowwise_adagrad": lambda dim: 4,
    "adagrad": lambda dim: 4 * dim,
    "adam": lambda dim: 8 * dim,
    "sgd": lambda dim: 0,
}


@dataclass
class PlanRequest:
    """Everything a plan depends on besides the JobConfig."""

    items: int = 1_000_000_000
    interactions: float = DEFAULT_INTERACTIONS
    hardware: Hardware = field(default_factory=Hardware)
    mfu: float = 0.0  # 0 = ours measured for this GPU (bench/results/mfu.json), else ASSUMED_MFU
    fill: float = 1.0  # average fraction of the context a sample fills (histories shorter than it)
    headroom_fraction: float = HEADROOM_FRACTION
    torchrec: bool = True  # run TorchRec's planner (False: the analytic estimate only, for fast searches)

    def validate(self) -> None:
        self.hardware.validate()
        if self.items < 1:
            raise ConfigError(f"--items: must be >= 1, got {self.items}")
        if self.interactions <= 0:
            raise ConfigError(f"--interactions: must be > 0, got {self.interactions:g}")
        if not 0 <= self.mfu <= 1:
            raise ConfigError(f"--mfu: a fraction in (0, 1], got {self.mfu}")
        if not 0 < self.fill <= 1:
            raise ConfigError(f"--fill: a fraction in (0, 1], got {self.fill}")
        if not 0 <= self.headroom_fraction < 1:
            raise ConfigError(f"--headroom: a fraction in [0, 1), got {self.headroom_fraction}")


def measured_mfu(gpu: str, path: Path | None = None) -> tuple[float, str] | None:
    """(mfu, source) from our own GPU benchmark results, when bench/train_throughput.py has recorded one."""
    path = path or MEASURED_MFU_FILE
    if not path.is_file():
        return None
    entry = json.loads(path.read_text()).get(gpu)
    return (float(entry["mfu"]), str(entry.get("source", path.name))) if entry else None


def plan_config(cfg: JobConfig, world: int) -> JobConfig:
    """A validated copy of ``cfg`` for planning: no data directory or run directory needed."""
    cfg = copy.deepcopy(cfg)
    cfg.out = cfg.out or "(plan)"
    cfg.data.path = cfg.data.path or "(plan)"
    cfg.validate(world, "cuda")
    return cfg


def embedding_tables(cfg: JobConfig, items: int) -> dict[str, dict[str, int]]:
    """table -> rows, dim, weight bytes and fused-optimizer state bytes (fp32 tables)."""
    state = OPTIMIZER_STATE_BYTES_PER_ROW[cfg.embeddings.optimizer]
    return {
        name: {"rows": rows, "dim": dim, "weight_bytes": rows * dim * 4, "optimizer_bytes": rows * state(dim)}
        for name, (rows, dim) in table_rows(cfg.embeddings, items).items()
    }


def replicated_embedding_bytes(cfg: JobConfig, items: int) -> int:
    """Per-rank embedding bytes under ``embeddings.backend: torch`` (whatever the world size): every table
    whole, its dense gradient (as large as the table: ``backward`` writes one for every row) and its
    optimizer state."""
    return sum(2 * t["weight_bytes"] + t["optimizer_bytes"] for t in embedding_tables(cfg, items).values())


def analytic_embedding_bytes(cfg: JobConfig, items: int, world: int) -> int:
    """Per-rank embedding bytes without TorchRec's planner: the item table split evenly, any other TorchRec
    table whole on one rank (an upper bound for the busiest rank); under the torch backend every table whole
    on every rank (:func:`replicated_embedding_bytes`)."""
    if cfg.embeddings.backend == "torch":
        return replicated_embedding_bytes(cfg, items)
    tables = embedding_tables(cfg, items)
    item = tables.pop("item")
    return math.ceil((item["weight_bytes"] + item["optimizer_bytes"]) / world) + sum(
        t["weight_bytes"] + t["optimizer_bytes"] for t in tables.values()
    )


def torchrec_plan(
    cfg: JobConfig, items: int, hw: Hardware, hbm_cap: int | None, compute_device: str = "cuda"
) -> dict[str, Any]:
    """TorchRec's plan for this world: per-table rows and per-rank HBM / host bytes (max over ranks).

    The call is the one `argus train` makes (same constraints, batch size, lookups, HBM budget and
    TorchRec's default bandwidths), so the plan is the one training will use."""
    from torchrec.distributed.planner.types import PlannerError

    from embeddings.sharding import plan_offline, plan_summary

    try:
        plan, options = plan_offline(
            cfg.embeddings,
            items,
            hw.world,
            compute_device,
            batch_size=cfg.rows_per_batch(),
            local_world_size=hw.gpus_per_node if compute_device == "cuda" else None,
            hbm_cap=hbm_cap,
            lookups=embedding_lookups(cfg, items),
        )
    except PlannerError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return {"error": f"TorchRec planner: {first}"}
    hbm, ddr, perf = [0] * hw.world, [0] * hw.world, [0.0] * hw.world
    tables = []
    for o in options:
        for s in o.shards:
            if s.rank is not None and s.storage is not None:
                hbm[s.rank] += s.storage.hbm
                ddr[s.rank] += s.storage.ddr
            if s.rank is not None and s.perf is not None:
                perf[s.rank] += s.perf.total / 1000  # TorchRec's perf model works in milliseconds
        tables.append(
            {
                "table": o.name,
                "sharding_type": o.sharding_type,
                "compute_kernel": o.compute_kernel,
                "shards": len(o.shards),
                "hbm_per_shard": max((s.storage.hbm for s in o.shards if s.storage), default=0),
                "host_per_shard": max((s.storage.ddr for s in o.shards if s.storage), default=0),
            }
        )
    return {
        "tables": sorted(tables, key=lambda t: t["table"]),
        "hbm_per_rank": max(hbm),
        "host_per_rank": max(ddr),
        "seconds_per_step": max(perf),
        "plan": plan_summary(plan),
    }


def sequence_parallel_bytes(
    n_layers: int, d_model: int, tokens: float, sp: int, dtype_bytes: int, recompute: bool = False
) -> float:
    """Bytes a rank hands to ``parallel.sp``'s collectives per step for ``tokens`` tokens of whole rows (0 when
    sp = 1): per block 4 all-to-alls (q, k, v, the output) of its chunk forward, 4 backward (4 more forward when
    the blocks are recomputed: activation checkpointing), and the all-gather of the encoder's output. Each sends
    (sp - 1)/sp of its bytes off the rank (the caller applies that). Checked against what the encoder hands to
    them: tests/test_sequence_parallel.py."""
    if sp == 1:
        return 0.0
    chunk = tokens / sp * d_model * dtype_bytes
    return n_layers * (12 if recompute else 8) * chunk + chunk


def tensor_parallel_bytes(
    n_layers: int,
    d_model: int,
    tokens: float,
    tp: int,
    dtype_bytes: int,
    recompute: bool = False,
    dropout: bool = False,
) -> float:
    """Bytes a rank hands to ``parallel.tp``'s all-reduces per step for ``tokens`` tokens (0 when tp = 1): per block
    2 forward (the row-parallel attention output and ff2), 2 backward (the column-parallel qkv's and ff1's input
    gradients) and, when the blocks are recomputed, the forward ones again: both with residual ``dropout`` (its mask
    after ff2 is saved), else only the first (torch's checkpoint stops recomputing once the saved tensors are back,
    before ff2's all-reduce). Each is of the whole (tokens, d_model) activation, padding included; a ring all-reduce
    sends 2 (tp - 1)/tp of its bytes off the rank (the caller applies that). Checked against what AutoTP's layers
    hand to them: tests/test_tensor_parallel.py."""
    if tp == 1:
        return 0.0
    return n_layers * (4 + (2 if dropout else 1) * recompute) * tokens * d_model * dtype_bytes


def plan(cfg: JobConfig, req: PlanRequest) -> dict[str, Any]:
    """The whole plan as a JSON-ready dict (bytes, seconds, FLOPs; see docs/capacity-planning.md)."""
    req.validate()
    hw = req.hardware
    world, gpn = hw.world, hw.gpus_per_node
    cfg = plan_config(cfg, world)
    tp, sp = cfg.parallel.tp, cfg.parallel.sp
    dp = world // cfg.parallel.group
    spec = hw.spec()
    enc, ds, ni = cfg.model.resolved(), cfg.deepspeed, cfg.heads.next_item
    capacity = spec.memory_bytes

    # ---- parameters
    p = dense_params(cfg)
    tables = embedding_tables(cfg, req.items)

    # ---- memory per rank
    states = rank_dense_states(cfg, world, gpn)
    act = activations(cfg)
    buffers = ds_buffers(cfg.deepspeed_config(world), ds.precision)
    item_data = item_data_bytes(cfg, tables["item"]["rows"])  # a semantic item tower's metadata, every rank
    reserve = headroom(capacity, req.headroom_fraction)
    dense_side = states.gpu + act.total + buffers + item_data
    # the HBM TorchRec may fill: the very function `argus train` gives TorchRec on GPUs
    emb_budget = embedding_hbm_budget(cfg, world, capacity, gpn, req.headroom_fraction, tables["item"]["rows"])
    replicated = cfg.embeddings.backend == "torch"
    emb: dict[str, Any] = {
        "backend": cfg.embeddings.backend,
        "analytic_per_rank": analytic_embedding_bytes(cfg, req.items, world),
        "budget_per_rank": emb_budget,
    }
    if replicated:  # no TorchRec plan: every table whole on every rank (what `argus train` writes then)
        emb["plan"] = replicated_summary(cfg.embeddings, req.items, world)
        emb["tables"] = [
            {
                "table": name,
                "sharding_type": "replicated",
                "compute_kernel": "torch",
                "shards": world,
                "hbm_per_shard": 2 * t["weight_bytes"] + t["optimizer_bytes"],  # table + gradient + state
                "host_per_shard": 0,
            }
            for name, t in sorted(tables.items())
        ]
    elif req.torchrec:
        emb.update(torchrec_plan(cfg, req.items, hw, emb_budget))
    emb_hbm = emb.get("hbm_per_rank", emb["analytic_per_rank"])
    total = emb_hbm + dense_side
    fits = "error" not in emb and total + reserve <= capacity
    memory = {
        "embeddings": emb_hbm,
        "embeddings_host": emb.get("host_per_rank", 0),
        "dense_params": states.params,
        "dense_grads": states.grads,
        "dense_optimizer": states.optimizer,
        "dense_host_offload": states.host,
        "activations": act.total,
        "activations_layers": act.layers,
        "activations_other": act.other,
        "activations_working": act.working,
        "comm_buffers": buffers,
        "item_data": item_data,
        "headroom": reserve,
        "total": total,
        "capacity": capacity,
        "fits": fits,
    }

    # ---- FLOPs and bytes per step, per rank
    k = cfg.tokens_per_interaction()
    # Packed (token-budget) rows are full; padded ones hold req.fill of the context on average.
    interactions_rank = (
        cfg.rows_per_batch() * cfg.interactions_per_sample() * (1.0 if cfg.data.batch_tokens else req.fill)
    )
    f_int = flops_per_interaction(cfg, req.items)
    f_enc = encoder_flops_per_interaction(cfg)
    recompute = f_enc / 3 if enc.activation_checkpointing else 0.0  # one more forward of the encoder
    # parallel.tp / sp: the encoder's FLOPs (and their recompute) split over the group; the heads run on every rank
    flops_step = ((f_enc + recompute) / (tp * sp) + f_int - f_enc) * interactions_rank
    peak = spec.peak_flops(ds.precision)
    if req.mfu:
        mfu, mfu_source = req.mfu, "given (--mfu)"
    else:
        mfu, mfu_source = measured_mfu(hw.gpu) or (ASSUMED_MFU, "assumed: no GPU measurement of ours yet")
    compute_s = flops_step / (peak * mfu)

    item_dim = cfg.embeddings.item_dim
    item_lookups = interactions_rank + (req.items if ni.full(req.items) else ni.uniform_negatives)
    # the side tables are dense weights now: their reads are in the dense term below
    lookup_bytes = item_lookups * item_dim * 4
    opt_row = OPTIMIZER_STATE_BYTES_PER_ROW[cfg.embeddings.optimizer]
    # HBM traffic: rows read forward, read + written by the fused update (with their optimizer state);
    # dense weights read by forward and twice by backward; optimizer states read and written once;
    # saved activations written and read once.
    w = weight_bytes(ds.precision)
    table_bytes = sum(t["weight_bytes"] for t in tables.values())
    table_state = sum(t["optimizer_bytes"] for t in tables.values())
    if replicated:
        # torch backend: rows read forward and their gradients scattered backward into a zeroed table-sized
        # gradient; the update reads table + gradient + state and writes table + state, every row
        sparse_bytes = 2 * lookup_bytes + 4 * table_bytes + 2 * table_state
    else:
        sparse_bytes = 3 * lookup_bytes + 2 * item_lookups * opt_row(item_dim)
    hbm_bytes = sparse_bytes + 3 * p.per_rank * w + 2 * (states.optimizer + states.grads) + 2 * act.layers
    memory_s = hbm_bytes / spec.hbm_bytes_per_s

    intra, inter = hw.bandwidths()
    ring = (world - 1) / world if world > 1 else 0.0
    zero_passes = {0: 2, 1: 2, 2: 2, 3: 3}[ds.stage]  # all-reduce = reduce-scatter + all-gather; ZeRO-3 gathers twice
    # ZeRO reduces over the data-parallel group AutoTP builds (world / tp; the whole world under sp), a rank's share
    zero_world = world // tp
    zero_bytes = zero_passes * ((zero_world - 1) / zero_world) * p.per_rank * w
    zero_s = zero_bytes / (inter if hw.nodes > 1 else intra) if zero_world > 1 else 0.0
    a2a_bytes = 2 * lookup_bytes * ring  # embeddings out forward, their gradients back
    local = (gpn - 1) / world if world > 1 else 0.0
    remote = (world - gpn) / world if world > 1 else 0.0
    a2a_s = 2 * lookup_bytes * (local / intra + remote / inter)
    if replicated:  # torch backend: no all-to-all; the whole table's gradient is all-reduced every step
        a2a_bytes = 2 * ring * table_bytes
        a2a_s = a2a_bytes / (inter if hw.nodes > 1 else intra) if world > 1 else 0.0
    # TorchRec rates its own plan (lookups, updates, all-to-alls; slower for rows left in host memory):
    # that is the embedding time when it ran; the bandwidth estimate above otherwise.
    emb_s = emb.get("seconds_per_step", a2a_s)
    # parallel.sp: the attention all-to-alls and the gather of the encoder's output, on the step's critical path;
    # an sp group is consecutive ranks: within a node when sp <= GPUs per node
    # the collectives move the whole grid, padding included (interactions_rank counts only the real ones)
    grid_tokens = cfg.rows_per_batch() * cfg.interactions_per_sample() * k
    sp_bytes = (
        sequence_parallel_bytes(
            enc.n_layers,
            enc.d_model,
            grid_tokens,
            sp,
            weight_bytes(ds.precision),
            enc.activation_checkpointing,
        )
        * (sp - 1)
        / sp
    )
    sp_s = sp_bytes / (intra if sp <= gpn else inter)  # 0 bytes when sp = 1
    # parallel.tp: two all-reduces per block forward and two backward, on the critical path (AutoTP's are
    # synchronous); a tp group is consecutive ranks, within a node when tp <= GPUs per node
    tp_bytes = tensor_parallel_bytes(
        enc.n_layers,
        enc.d_model,
        grid_tokens,
        tp,
        weight_bytes(ds.precision),
        enc.activation_checkpointing,
        enc.dropout > 0,
    ) * (2 * (tp - 1) / tp)
    tp_s = tp_bytes / (intra if tp <= gpn else inter)
    parts = {
        "compute": compute_s,
        "memory": memory_s,
        "communication": zero_s + a2a_s + sp_s + tp_s,
        "embeddings": emb_s,
    }
    step_s = max(compute_s, memory_s, zero_s) + emb_s + sp_s + tp_s

    interactions_step = interactions_rank * dp  # a tp or sp group trains on one batch
    steps = math.ceil(req.interactions / interactions_step)
    seconds = steps * step_s
    gpu_hours = seconds / 3600 * world
    out: dict[str, Any] = {
        "inputs": {
            "preset": cfg.model.preset,
            "d_model": enc.d_model,
            "n_layers": enc.n_layers,
            "n_heads": enc.n_heads,
            "d_ff": enc.d_ff,
            "context": cfg.interactions_per_sample() * k,
            "summary_tokens": cfg.model.summary.tokens,  # model.summary: windows of window_tokens after them
            # a summary cache (argus summarize) stores tokens x model.summary.dim values per summary, bf16 bytes: one
            # summary per user to serve (an eval split), one per sample to train on (the train split)
            "summary_cache_bytes_per_summary": cfg.model.summary.tokens * cfg.model.summary.dim * 2,
            "summary_cache": bool(cfg.data.summary_cache),
            "window_tokens": cfg.window() * k,
            "windows": cfg.model.windowed(),  # model.windows / model.summary: a sample encoded window by window
            "tokens_per_interaction": k,
            "micro_batch": cfg.rows_per_batch(),
            "zero_stage": ds.stage,
            "offload": ds.offload,
            "precision": ds.precision,
            "activation_checkpointing": enc.activation_checkpointing,
            "item_dim": item_dim,
            "embedding_optimizer": cfg.embeddings.optimizer,
            "negatives": ni.uniform_negatives + ni.in_batch_negatives,
            "items": req.items,
            "interactions": req.interactions,
            "fill": req.fill,
            "gpu": hw.gpu,
            "nodes": hw.nodes,
            "gpus_per_node": gpn,
            "world": world,
            "tp": tp,
            "sp": sp,
            "dp": dp,
            "gpu_memory": capacity,
            "peak_flops": peak,
            "hbm_bytes_per_s": spec.hbm_bytes_per_s,
            "intra_node_bytes_per_s": intra,
            "inter_node_bytes_per_s": inter,
            "mfu": mfu,
            "mfu_source": mfu_source,
            "price_per_gpu_hour": hw.price_per_gpu_hour,
        },
        "params": {
            "encoder": p.encoder,
            "positions": p.positions,
            "side_tables": p.side_tables,
            "interaction": p.interaction,
            "heads": p.heads,
            "dense_total": p.total,
            "dense_per_rank": p.per_rank,
            "largest_layer": p.largest_layer,
            "embedding": sum(t["rows"] * t["dim"] for t in tables.values()),
            "tables": tables,
        },
        "memory": memory,
        "embedding_plan": emb,
        "flops": {
            "per_interaction": f_int,
            "encoder_per_interaction": f_enc,
            "head_per_interaction": f_int - f_enc,
            "recompute_per_interaction": recompute,
            "per_step_per_rank": flops_step,
            "embedding_bytes_per_interaction": lookup_bytes / interactions_rank,
        },
        "step": {
            "interactions_per_rank": interactions_rank,
            "interactions": interactions_step,
            "compute_s": compute_s,
            "memory_s": memory_s,
            "zero_comm_s": zero_s,
            "embedding_comm_s": a2a_s,
            "embedding_s": emb_s,
            "sp_comm_s": sp_s,
            "sp_comm_bytes": sp_bytes,
            "tp_comm_s": tp_s,
            "tp_comm_bytes": tp_bytes,
            "zero_comm_bytes": zero_bytes,
            "embedding_comm_bytes": a2a_bytes,
            "hbm_bytes": hbm_bytes,
            "seconds": step_s,
            "bound": max(parts, key=parts.get),
        },
        "time": {
            "steps": steps,
            "days": seconds / 86400,
            "gpu_hours": gpu_hours,
            "cost": gpu_hours * hw.price_per_gpu_hour if hw.price_per_gpu_hour else None,
        },
    }
    return out


# ---- searches: the smallest GPU count that fits, and the smallest change that makes a config fit ----
def _fits_fast(cfg: JobConfig, req: PlanRequest, scale: float = 1.0) -> dict[str, Any] | None:
    """Plan without TorchRec; ``scale`` corrects the analytic embedding bytes toward TorchRec's."""
    r = dataclasses.replace(req, torchrec=False)
    try:
        out = plan(cfg, r)
    except ConfigError:
        return None
    m = out["memory"]
    emb = m["embeddings"] * scale
    return out if emb + m["total"] - m["embeddings"] + m["headroom"] <= m["capacity"] else None


def _scale(result: dict[str, Any]) -> float:
    emb = result["embedding_plan"]
    if "hbm_per_rank" in emb and emb["analytic_per_rank"]:
        return max(emb["hbm_per_rank"] / emb["analytic_per_rank"], 1.0)
    return 1.0


def min_gpus(cfg: JobConfig, req: PlanRequest, scale: float = 1.0, limit: int = 1 << 16) -> int | None:
    """Fewest GPUs (whole nodes past one node) with which ``cfg`` fits, or None up to ``limit``."""
    hw = req.hardware
    counts = [g for g in (1, 2, 4) if g < hw.gpus_per_node] + [hw.gpus_per_node * n for n in range(1, limit + 1)]
    counts = [g for g in counts if g % cfg.parallel.group == 0]  # world = dp x tp (or sp)

    def ok(g: int) -> bool:
        return _fits_fast(cfg, dataclasses.replace(req, hardware=hw.with_world(g)), scale) is not None

    # memory per rank falls as GPUs are added: double until it fits, then bisect
    lo, hi = -1, 0
    while hi < len(counts) - 1 and not ok(counts[hi]):
        lo, hi = hi, min(2 * hi + 1, len(counts) - 1)
    if not ok(counts[hi]):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(counts[mid]):
            hi = mid
        else:
            lo = mid
    return counts[hi]


def suggestions(
    cfg: JobConfig, req: PlanRequest, result: dict[str, Any], fewest_gpus: int | None
) -> list[dict[str, Any]]:
    """Single changes that make a config fit, each with its days to train (fewest days first).

    Each ``change`` is what to append to the `argus plan` command line that made ``cfg`` and ``req``: its
    flags (``--zero-stage 3``, ``--nodes 4``: a flag given last wins over an earlier one), or a ``key=value``
    override where no flag sets the key; ``gpus`` is the GPU count it plans for.
    ``fewest_gpus``: :func:`min_gpus` for this config, already computed by the caller."""
    scale = _scale(result)
    enc, ds, hw = cfg.model, cfg.deepspeed, req.hardware

    def variant(edit: Any) -> Any:
        c = copy.deepcopy(cfg)
        edit(c)
        return c

    candidates: list[tuple[str, Any, PlanRequest]] = []
    if cfg.embeddings.backend == "torch":  # shard the table instead of a full copy on every rank
        candidates.append(
            ("embeddings.backend=torchrec", variant(lambda c: setattr(c.embeddings, "backend", "torchrec")), req)
        )
    if not enc.activation_checkpointing:
        candidates.append(
            (
                "--activation-checkpointing",
                variant(lambda c: setattr(c.model, "activation_checkpointing", True)),
                req,
            )
        )
    if ds.stage < 3:
        candidates.append(("--zero-stage 3", variant(lambda c: setattr(c.deepspeed, "stage", 3)), req))
    if not ds.offload:
        candidates.append(
            (
                "--zero-stage 3 --offload",
                variant(lambda c: (setattr(c.deepspeed, "stage", 3), setattr(c.deepspeed, "offload", True))),
                req,
            )
        )
    if fewest_gpus is not None and fewest_gpus > hw.world:  # more than one node's worth: whole nodes (min_gpus)
        more = hw.with_world(fewest_gpus)
        candidates.append((f"--nodes {more.nodes}", cfg, dataclasses.replace(req, hardware=more)))
    out = []
    for change, c, r in candidates:
        fitted = _fits_fast(c, r, scale)
        if fitted:
            out.append(
                {
                    "change": change,
                    "gpus": r.hardware.world,
                    "days": fitted["time"]["days"],
                    "memory_per_rank": fitted["memory"]["total"],
                }
            )
    b = cfg.rows_per_batch() // 2  # the largest micro-batch that fits
    while b >= 1:
        fitted = _fits_fast(_with_batch(cfg, b), req, scale)
        if fitted:
            change = (
                f"data.batch_tokens={b * cfg.interactions_per_sample()}"
                if cfg.data.batch_tokens
                else f"--micro-batch {b}"
            )
            out.append(
                {
                    "change": change,
                    "gpus": hw.world,
                    "days": fitted["time"]["days"],
                    "memory_per_rank": fitted["memory"]["total"],
                }
            )
            break
        b //= 2
    return sorted(out, key=lambda s: s["days"])


def _with_batch(cfg: JobConfig, batch: int) -> JobConfig:
    c = copy.deepcopy(cfg)
    if c.data.batch_tokens:
        c.data.batch_tokens = batch * c.interactions_per_sample()
    else:
        c.data.batch_size = batch
    c.train.global_batch_size = 0
    return c


def full_plan(cfg: JobConfig, req: PlanRequest) -> dict[str, Any]:
    """plan() plus the minimum GPU count that fits and, when it doesn't fit, what would."""
    result = plan(cfg, req)
    result["min_gpus"] = min_gpus(cfg, req, _scale(result))
    result["suggestions"] = [] if result["memory"]["fits"] else suggestions(cfg, req, result, result["min_gpus"])
    return result


def sweep_parallel(cfg: JobConfig, req: PlanRequest, key: str, sizes: list[int]) -> list[dict[str, Any]]:
    """One plan per ``parallel.<key>`` size (``tp`` or ``sp``) on the same GPUs (world = dp x tp or dp x sp: dp
    shrinks as the group grows)."""
    out = []
    for v in sizes:
        c = copy.deepcopy(cfg)
        setattr(c.parallel, key, v)
        try:
            out.append(plan(c, req))
        except ConfigError as e:
            raise ConfigError(f"--sweep {key}={v}: {e}") from None
    return out


def sweep(cfg: JobConfig, req: PlanRequest, gpus: list[int]) -> list[dict[str, Any]]:
    """One plan per GPU count (same nodes' shape)."""
    return [plan(cfg, dataclasses.replace(req, hardware=req.hardware.with_world(g))) for g in gpus]
