"""The run config: one dataclass tree (data, model, embeddings, heads, optimizer, DeepSpeed, loop, eval).

It is validated before any process group exists, saved beside every checkpoint,
and is the object the capacity planner reads, so planning and training use
the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from embeddings.tables import ItemEmbeddings
from trainer.checkpoint_store import Retention
from trainer.config import ConfigError
from trainer.data.loader import ShardLoader
from trainer.model.argus import HeadsConfig, ModelConfig
from trainer.model.encoder import MAX_CONTEXT
from trainer.model.tensor_parallel import TP_LAYER_SPECS
from trainer.model.two_tower import FinetuneConfig
from trainer.optim import OptimConfig

DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"


@dataclass
class DeepSpeedSection:
    stage: int = 2  # ZeRO stage 0..3
    config: str = ""  # a DeepSpeed JSON; "" = ds_configs/zero{stage}.json (zero3_offload.json when offload)
    offload: bool = False  # ZeRO-3 optimizer + parameter offload to CPU (GPU only: needs DeepSpeedCPUAdam)
    precision: str = "fp32"  # fp32 | bf16
    gradient_clipping: float = 1.0  # always explicit (DeepSpeed 0.19.8 otherwise clips at 1.0 silently)

    def path(self) -> Path:
        if self.config:
            return Path(self.config)
        return DS_CONFIG_DIR / ("zero3_offload.json" if self.offload else f"zero{self.stage}.json")


@dataclass
class TrainSection:
    steps: int = 100
    epochs: float = 0  # > 0: train this many passes over the training split instead of `steps`
    max_seconds: float = 0  # > 0: stop (with a checkpoint) at the first log step past this much training time
    gradient_accumulation_steps: int = 1
    global_batch_size: int = 0  # 0 = data.batch_size x world size; set it to have the world size checked
    log_every: int = 10
    checkpoint_every: int = 0  # 0 = only at the end
    # Retention (trainer/checkpoint_store.py): keep the keep_last newest checkpoints, every milestone (a step that is
    # a multiple of keep_every; 0 = none), and what checkpoints/latest and checkpoints/best name; delete the rest.
    keep_last: int = Retention.keep_last  # 3
    keep_every: int = Retention.keep_every  # 0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    timeout_s: float = 600.0  # process-group timeout: a rank-0-only error must not hang the others
    log_sample_keys: bool = False  # audit trail: RUN/sample_keys/rank*.jsonl, the keys each step consumed
    compile: bool = False  # torch.compile the encoder blocks (Encoder.compile_blocks)
    # Pre-training from another run's weights (its best, else latest checkpoint; or a checkpoint directory), tables
    # and dense model, instead of a fresh init: e.g. a model that reads data.summary_cache, started from the run
    # whose summariser wrote it. The model must have that run's shapes; optimizer state and step start afresh.
    init_from: str = ""
    # Start over in an `out` that holds a run: its checkpoints, metrics, TensorBoard logs ... are removed first
    # (trainer/rundir.py). Without it (or resume=true) such an `out` is refused. Always saved as false.
    overwrite: bool = False


@dataclass
class EvalSection:
    split: str = "test"
    ks: list[int] = field(default_factory=lambda: [10, 100])
    batch_size: int = 256  # users per step of the user pass; targets per score block of the item pass
    max_users: int = 0  # 0 = all; else exactly that many (the lowest user ids with a target)
    # Full ranking scores the catalog in blocks of `item_block` rows per rank (trainer/ranking.py): a
    # batch_size x item_block float64 block is the largest temporary (17 bytes per entry with its copies).
    item_block: int = 65536
    full_ranking_max_items: int = 5_000_000  # larger catalogs use sampled ranking (labelled "sampled_")
    sampled_negatives: int = 1000  # per target, scored alone (never the whole catalog)
    # Validation during training (model selection): every `every` steps the run writes a checkpoint, ranks
    # the `val_split` with it (trainer/evaluate.py, the code `argus eval` runs) and points checkpoints/best at
    # the best one by `select`; `patience` validations without improvement stop the run (0 = never).
    every: int = 0  # steps; 0 = no validation
    every_epochs: float = 0  # or in passes over the training split (set one of the two)
    select: str = "ndcg@10"  # hr@K | ndcg@K | recall@K, K in eval.ks
    patience: int = 0
    val_split: str = "val"
    val_max_users: int = 0  # 0 = every validation user
    # A run on cached summaries (data.summary_cache) validates after the val split's cached summaries: a cache that
    # the same summariser wrote (argus summarize SUMMARISER --split val; checked when training starts)
    val_summary_cache: str = ""

    def validate(self, where: str = "eval") -> None:
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"{where}.ks: expected positive cutoffs, got {self.ks}")
        if self.every < 0 or self.patience < 0 or self.val_max_users < 0 or self.max_users < 0:
            raise ValueError(f"{where}.every, patience, max_users and val_max_users must be >= 0")
        if self.item_block < 1 or self.batch_size < 1 or self.sampled_negatives < 1:
            raise ValueError(f"{where}.item_block, batch_size and sampled_negatives must be >= 1")
        name, _, k = self.select.partition("@")
        if name not in ("hr", "ndcg", "recall") or not k.isdigit() or int(k) not in self.ks:
            raise ValueError(
                f"{where}.select: expected hr@K, ndcg@K or recall@K with K in {where}.ks {self.ks}, got {self.select!r}"
            )
        if self.every and self.every_epochs:
            raise ValueError(f"{where}.every and {where}.every_epochs: set one of the two")
        if self.every_epochs < 0:
            raise ValueError(f"{where}.every_epochs: must be >= 0, got {self.every_epochs}")
        if self.patience and not (self.every or self.every_epochs):
            raise ValueError(f"{where}.patience: needs {where}.every > 0 (early stopping watches validation)")


@dataclass
class ParallelSection:
    """How the encoder is split beyond data parallelism (docs/parallelism.md). ``tp`` ranks share each block's
    weights (Megatron-style tensor parallelism through DeepSpeed's AutoTP: trainer/model/tensor_parallel.py);
    ``sp`` ranks share each row's tokens (Ulysses sequence parallelism, trainer/model/sequence_parallel.py). One
    of the two at a time: world = dp x tp or dp x sp, consecutive ranks form a group and see the same batch."""

    tp: int = 1
    sp: int = 1

    @property
    def group(self) -> int:
        """Ranks that share one batch (a tensor- or sequence-parallel group): the world is ``group`` x dp."""
        return self.tp * self.sp

    def validate(self, cfg: "JobConfig", world_size: int | None) -> None:
        for key in ("tp", "sp"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key}: must be >= 1, got {getattr(self, key)}")
        if self.tp > 1 and self.sp > 1:
            raise ConfigError(
                f"parallel.tp={self.tp} with parallel.sp={self.sp}: one of the two at a time (not tested together)"
            )
        if self.group == 1:
            return
        key, n = ("tp", self.tp) if self.tp > 1 else ("sp", self.sp)
        enc = cfg.model.resolved()
        if enc.n_heads % n:
            raise ConfigError(f"parallel.{key}: {n} does not divide model.n_heads {enc.n_heads}")
        if world_size is not None and world_size % n:
            raise ConfigError(f"parallel.{key}: {n} does not divide the world size {world_size}")
        if cfg.data.on_error != "raise":  # a rank that skips a sample its group read would pair other rows
            raise ConfigError(
                f"parallel.{key}: needs data.on_error=raise (every rank of a group must read the same rows)"
            )
        if self.tp > 1:
            if enc.d_ff % self.tp:
                raise ConfigError(f"parallel.tp: {self.tp} does not divide model.d_ff {enc.d_ff}")
            if cfg.train.compile:
                raise ConfigError("parallel.tp: needs train.compile=false (compiled AutoTP blocks are not tested)")
            if cfg.deepspeed.stage == 0:  # a ZeRO-0 checkpoint has no optimizer partitions to convert
                raise ConfigError(
                    "parallel.tp: needs deepspeed.stage >= 1 (its checkpoints merge their shards through "
                    "DeepSpeed's universal checkpoint)"
                )
            return
        if enc.max_seq_len % self.sp:
            raise ConfigError(f"parallel.sp: {self.sp} does not divide model.max_seq_len {enc.max_seq_len}")
        if enc.attention == "flex" or cfg.train.compile:
            raise ConfigError("parallel.sp: needs model.attention auto, mask or segments and train.compile=false")
        if cfg.finetune.enabled:
            raise ConfigError("parallel.sp: fine-tuning with sequence parallelism is not supported yet")


@dataclass
class JobConfig:
    data: ShardLoader.Config = field(default_factory=ShardLoader.Config)
    model: ModelConfig = field(default_factory=ModelConfig)
    embeddings: ItemEmbeddings.Config = field(default_factory=ItemEmbeddings.Config)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # set by `argus finetune --init RUN`
    parallel: ParallelSection = field(default_factory=ParallelSection)
    out: str = ""
    resume: bool = False

    # Keys that moved (old dotted key -> new one, or None: no longer used). Old configs and the
    # config.yaml saved in old runs still load; trainer.config.from_dict prints one note per key.
    MOVED_KEYS: ClassVar[dict[str, str | None]] = {
        "embeddings.token_layout": "model.token_layout",
        "embeddings.side_dim": "model.side_dim",
        "embeddings.num_contexts": "model.num_contexts",
        "embeddings.side_sharding": None,  # the side tables are dense parameters now, never sharded by TorchRec
    }
    # Second names, documented: the projected decoding head's width is the item vectors' (docs/production.md)
    ALIASES: ClassVar[dict[str, str]] = {"heads.next_item.projection": "embeddings.item_dim"}

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the run: ``train.steps``, or ``train.epochs`` passes of ``batches_per_epoch``."""
        if self.train.epochs > 0:
            return max(1, math.ceil(self.train.epochs * batches_per_epoch))
        return self.train.steps

    def eval_every(self, batches_per_epoch: int) -> int:
        """Steps between validations (0 = none): ``eval.every``, or ``eval.every_epochs`` passes."""
        if self.eval.every_epochs > 0:
            return max(1, math.ceil(self.eval.every_epochs * batches_per_epoch))
        return self.eval.every

    def tokens_per_interaction(self) -> int:
        return self.model.tokens_per_interaction

    def interactions_per_sample(self) -> int:
        """Interactions of a sample the model reads: ``data.max_seq_len``, or (0) all the context holds."""
        return self.data.max_seq_len or self.model.resolved().max_seq_len // self.tokens_per_interaction()

    def rows_per_batch(self) -> int:
        """Rows of a micro-batch the encoder runs over: ``data.batch_size`` samples, or, with token-budget
        batches, ``data.batch_tokens // interactions_per_sample()`` packed rows (each nearly full)."""
        if self.data.batch_tokens:
            return max(1, self.data.batch_tokens // self.interactions_per_sample())
        return self.data.batch_size

    def train_split(self) -> str:
        """The split training reads: fine-tuning reads impressions unless data.split names another."""
        if self.finetune.enabled and self.data.split == "train":
            return self.finetune.split
        return self.data.split

    def loader_config(self) -> ShardLoader.Config:
        """The training loader's config: ``data`` with the split and sample length resolved (a copy)."""
        return dataclasses.replace(self.data, split=self.train_split(), max_seq_len=self.interactions_per_sample())

    def window(self) -> int:
        """Interactions of the encoder's context: with ``model.summary`` (or ``model.windows``) a sample longer than
        this is encoded window by window, each window after the summary of the older ones (or on its own)."""
        return self.model.resolved().max_seq_len // self.tokens_per_interaction()

    def windows_per_sample(self) -> int:
        """``model.summary`` / ``model.windows``: windows of the context the longest sample fills (each is a row of
        the encoder)."""
        return -(-self.interactions_per_sample() // self.window())

    def _validate_summary(self, k: int) -> None:
        """``model.summary`` on: what the in-line summaries (or the cached ones) need from the rest of the config."""
        if self.data.summary_cache:
            for bad, why in (
                (self.data.max_seq_len * k > self.model.resolved().max_seq_len and not self.finetune.enabled,
                 f"data.max_seq_len: {self.data.max_seq_len} interactions exceed the {self.window()}-interaction "
                 "window (a sample read after cached summaries is one window; fine-tuning cuts one per impression)"),
                (self.model.summary.reconstruction_weight > 0,
                 "model.summary.reconstruction_weight: the reconstruction loss trains the summariser in-line; "
                 "set it to 0 with data.summary_cache"),
                ((self.eval.every > 0 or self.eval.every_epochs > 0) and not self.eval.val_summary_cache
                 and not self.finetune.enabled,  # fine-tuning does not validate during training (refused below)
                 "eval.val_summary_cache: validation during training on cached summaries reads the val split's "
                 f"cache (argus summarize SUMMARISER --split {self.eval.val_split}); or set eval.every and "
                 "eval.every_epochs to 0"),
            ):  # fmt: skip
                if bad:
                    raise ConfigError(why)
        elif not self.data.max_seq_len:
            raise ConfigError(
                "data.max_seq_len: model.summary needs it set to the interactions of a sample (the summary covers "
                f"what is older than the model.max_seq_len context of {self.window()} interactions)"
            )
        # packed rows read each sample's cached summary as its own memory (trainer/model/encoder.py: AttnLayout)
        packed_cache = (
            bool(self.data.summary_cache) and self.model.summary.read == "memory" and not self.finetune.enabled
        )
        if self.data.batch_tokens > 0 and not packed_cache:
            raise ConfigError(
                "data.batch_tokens: with model.summary, token-budget batches need pre-training on a summary cache "
                "read as memory (data.summary_cache, model.summary.read=memory)"
            )
        if self.parallel.sp > 1:
            raise ConfigError("parallel.sp: sequence parallelism is not supported with model.summary yet")

    def _validate_windows(self) -> None:
        """``model.windows`` without a summary: what encoding a sample window by window needs."""
        for bad, why in (
            (not self.data.max_seq_len, "data.max_seq_len: model.windows needs it set to the interactions of a sample "
             f"(cut into windows of the model.max_seq_len context of {self.window()} interactions)"),
            (self.finetune.enabled, "model.windows: pre-training only (not in fine-tuning); set it to false"),
            (self.data.batch_tokens > 0, "data.batch_tokens: token-budget batches are not supported with "
             "model.windows"),
            (self.parallel.sp > 1, "parallel.sp: sequence parallelism is not supported with model.windows"),
        ):  # fmt: skip
            if bad:
                raise ConfigError(why)

    def validate(self, world_size: int | None = None, device: str | None = None) -> None:
        """Every check that needs no process group; raises ConfigError naming the key. Changes nothing."""
        try:
            self._validate(world_size, device)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _validate(self, world_size: int | None, device: str | None) -> None:
        if not self.out:
            raise ConfigError("out: the run directory is required (out=RUN_DIR)")
        self.data.validate("data")
        if self.data.batch_format != "jagged":
            raise ConfigError("data.batch_format: training reads jagged batches (set data.batch_format=jagged)")
        self.model.validate("model", MAX_CONTEXT * max(1, self.parallel.sp))
        dev = device or ("cpu" if self.train.device == "cpu" else self.train.device)
        self.embeddings.validate("embeddings", device="cpu" if dev in ("cpu", "auto") and not _has_cuda() else "cuda")
        self.heads.validate("heads")
        self.finetune.validate("finetune")
        ctx = self.model.resolved().max_seq_len
        k = self.tokens_per_interaction()
        if ctx < k:
            raise ConfigError(f"model.max_seq_len: {ctx} tokens hold no interaction of {k} tokens")
        if self.model.summary.tokens:
            self._validate_summary(k)
        elif self.data.summary_cache:
            raise ConfigError("data.summary_cache: needs model.summary.tokens > 0 (the model reads the cached tokens)")
        elif self.model.windows:
            self._validate_windows()
        elif self.interactions_per_sample() * k > ctx:
            raise ConfigError(
                f"data.max_seq_len: {self.data.max_seq_len} interactions x {k} tokens exceed model.max_seq_len {ctx}"
            )
        if self.eval.val_summary_cache and not self.data.summary_cache:
            raise ConfigError("eval.val_summary_cache: only a run on data.summary_cache validates after cached "
                              "summaries (a model.summary run computes its own in-line)")  # fmt: skip
        if self.data.batch_tokens and self.data.batch_tokens < self.interactions_per_sample():
            raise ConfigError(
                f"data.batch_tokens: {self.data.batch_tokens} is less than one row of "
                f"{self.interactions_per_sample()} interactions (model.max_seq_len / tokens per interaction)"
            )
        t = self.train
        if t.init_from and self.finetune.enabled:
            raise ConfigError("train.init_from: fine-tuning starts from finetune.init (argus finetune --init RUN)")
        if t.steps < 1:
            raise ConfigError(f"train.steps: must be >= 1, got {t.steps}")
        if t.epochs < 0 or t.max_seconds < 0:
            raise ConfigError(f"train.epochs and train.max_seconds: must be >= 0, got {t.epochs}, {t.max_seconds}")
        self.eval.validate("eval")
        if self.finetune.enabled and (self.eval.every or self.eval.every_epochs):
            raise ConfigError(
                "eval.every: validation during fine-tuning is not supported yet (it ranks next items); "
                "evaluate fine-tuning runs with `argus eval RUN`"
            )
        if t.gradient_accumulation_steps != 1:
            raise ConfigError(
                "train.gradient_accumulation_steps: must be 1 — the TorchRec fused optimizer updates "
                "embeddings on every micro-batch, so accumulation would apply sparse updates "
                "early; raise data.batch_size or the world size instead"
            )
        if t.compile and self.model.attention == "segments":
            raise ConfigError(
                "train.compile: model.attention 'segments' recompiles for every new set of history lengths; "
                "use mask, flex or auto"
            )
        if t.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device: must be auto, cpu or cuda, got {t.device!r}")
        if t.log_every < 1 or t.checkpoint_every < 0:
            raise ConfigError("train.log_every must be >= 1 and train.checkpoint_every >= 0")
        if t.keep_last < 1 or t.keep_every < 0:
            raise ConfigError(
                f"train.keep_last must be >= 1 (the newest checkpoint is always kept) and train.keep_every >= 0 "
                f"(0: no milestones), got {t.keep_last} and {t.keep_every}"
            )
        self.parallel.validate(self, world_size)
        if (
            world_size is not None
            and t.global_batch_size
            and t.global_batch_size
            != self.data.batch_size * t.gradient_accumulation_steps * (world_size // self.parallel.group)
        ):
            p = self.parallel
            raise ConfigError(
                f"train.global_batch_size: {t.global_batch_size} != data.batch_size "
                f"{self.data.batch_size} x gradient_accumulation_steps {t.gradient_accumulation_steps}"
                f" x world size {world_size}"
                + (f" / parallel.{'tp' if p.tp > 1 else 'sp'} {p.group}" if p.group > 1 else "")
            )
        ds = self.deepspeed
        if ds.stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.stage: must be 0, 1, 2 or 3, got {ds.stage}")
        if ds.precision not in ("fp32", "bf16"):
            raise ConfigError(f"deepspeed.precision: must be fp32 or bf16, got {ds.precision!r}")
        if ds.offload and ds.stage != 3:
            raise ConfigError("deepspeed.offload: needs deepspeed.stage=3")
        if ds.gradient_clipping < 0:
            raise ConfigError(f"deepspeed.gradient_clipping: must be >= 0, got {ds.gradient_clipping}")
        self.optim.validate("optim")
        self.deepspeed_config(world_size or 1)  # the JSON must agree with the run

    def deepspeed_config(self, world_size: int) -> dict[str, Any]:
        """The stock JSON with batch sizes, clipping and precision filled from this config.

        A batch-size field the JSON sets to something else is a contradiction, not an override.
        """
        path = self.deepspeed.path()
        if not path.is_file():
            raise ConfigError(f"deepspeed.config: {path} not found")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from None
        want = {
            "train_micro_batch_size_per_gpu": self.data.batch_size,
            "gradient_accumulation_steps": self.train.gradient_accumulation_steps,
            "train_batch_size": self.data.batch_size * self.train.gradient_accumulation_steps * world_size,
        }
        for key, value in want.items():
            if key in ds and ds[key] not in (value, "auto"):
                raise ConfigError(
                    f"{path}: {key}={ds[key]} contradicts the run config ({value}); "
                    f"remove it from the JSON, the trainer fills it"
                )
            ds[key] = value
        stage_in_json = ds.get("zero_optimization", {}).get("stage", 0)
        if self.deepspeed.config and stage_in_json != self.deepspeed.stage:
            raise ConfigError(
                f"{path}: zero_optimization.stage={stage_in_json} but deepspeed.stage={self.deepspeed.stage}"
            )
        ds.setdefault("zero_optimization", {})["stage"] = self.deepspeed.stage
        ds["gradient_clipping"] = self.deepspeed.gradient_clipping
        ds["bf16"] = {"enabled": self.deepspeed.precision == "bf16"}
        ds["zero_allow_untested_optimizer"] = True
        if "tensor_parallel" in ds:
            raise ConfigError(f"{path}: tensor_parallel is set from parallel.tp; remove it from the JSON")
        if self.parallel.tp > 1:  # DeepSpeed's AutoTP shards the blocks' Linear layers by our layer specs
            # DeepSpeed derives its world from the whole group in one place and from the tp mesh's data-parallel
            # group in another (ZeRO-3's Init); without train_batch_size each derives a consistent one
            del ds["train_batch_size"]
            ds["tensor_parallel"] = {
                "autotp_size": self.parallel.tp,
                "partition_config": {"use_default_specs": False, "layer_specs": TP_LAYER_SPECS},
            }
        ds.setdefault("steps_per_print", 10**9)
        return ds


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
