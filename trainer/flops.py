"""Model FLOPs per token, device peaks and MFU.

Peaks are dense (no 2:4 sparsity) tensor-core numbers from the vendor
datasheets, i.e. half the "with sparsity" figure NVIDIA prints first. ``fp32``
is the non-tensor-core CUDA-core rate; ``tf32`` is what fp32 matmuls get with
``torch.backends.cuda.matmul.allow_tf32`` (or ``set_float32_matmul_precision("high")``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `argus --help` lists GPU_SPECS without it
    import torch

    from trainer.job import JobConfig

_GB = 10**9
_TB = 10**12


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator model; ``memory_bytes`` is the datasheet capacity in decimal GB (see detect_gpu)."""

    name: str
    memory_bytes: int
    bf16_flops: float
    fp32_flops: float
    tf32_flops: float
    hbm_bytes_per_s: float

    def peak_flops(self, dtype: str | torch.dtype) -> float:
        """Dense peak FLOP/s for matmuls in ``dtype`` (fp16 runs at the bf16 rate on all of these)."""
        key = _dtype_key(dtype)
        return {"bf16": self.bf16_flops, "fp16": self.bf16_flops, "tf32": self.tf32_flops, "fp32": self.fp32_flops}[key]


GPU_SPECS: dict[str, GpuSpec] = {
    s.name: s
    for s in (
        # Hopper, SXM5 (the "NVIDIA H100 80GB HBM3" of DGX/HGX H100).
        GpuSpec("h100", 80 * _GB, 989e12, 66.9e12, 494.5e12, 3.35 * _TB),
        GpuSpec("h100_pcie", 80 * _GB, 756.5e12, 51e12, 378e12, 2.0 * _TB),
        GpuSpec("h100_nvl", 94 * _GB, 835.5e12, 60e12, 417.5e12, 3.9 * _TB),
        # Same GH100 compute as H100 SXM, larger and faster HBM3e.
        GpuSpec("h200", 141 * _GB, 989e12, 66.9e12, 494.5e12, 4.8 * _TB),
        GpuSpec("h200_nvl", 141 * _GB, 835.5e12, 60e12, 417.5e12, 4.8 * _TB),
        # Grace Hopper superchip, 96 GB HBM3 variant (the 144 GB HBM3e one is faster memory, same compute).
        GpuSpec("gh200", 96 * _GB, 989e12, 66.9e12, 494.5e12, 4.0 * _TB),
        # Ampere; the 80 GB SXM4 bandwidth (PCIe 80 GB: 1.935 TB/s).
        GpuSpec("a100", 80 * _GB, 312e12, 19.5e12, 156e12, 2.039 * _TB),
        GpuSpec("a100_40gb", 40 * _GB, 312e12, 19.5e12, 156e12, 1.555 * _TB),
        # HGX/DGX B200: 1440 GB / 8 usable per GPU, 64 TB/s / 8.
        GpuSpec("b200", 180 * _GB, 2.25e15, 80e12, 1.1e15, 8.0 * _TB),
        # Ada, GDDR6 (not HBM; the field is the memory bandwidth either way).
        GpuSpec("l40s", 48 * _GB, 362.05e12, 91.6e12, 183e12, 0.864 * _TB),
        GpuSpec("l4", 24 * _GB, 121e12, 30.3e12, 60e12, 0.3 * _TB),
        # AWS-only part without an NVIDIA datasheet: the commonly quoted dense rates
        # (consistent with measured ~69 TFLOP/s bf16 GEMMs), well below the A10's 125.
        GpuSpec("a10g", 24 * _GB, 70e12, 31.52e12, 35e12, 0.6 * _TB),
        GpuSpec("a10", 24 * _GB, 125e12, 31.2e12, 62.5e12, 0.6 * _TB),
    )
}

# First match wins, so the specific variants precede the generic names. Word
# boundaries keep "GH200" from matching h200 and "A100" from matching a10.
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bgh200\b", "gh200"),
    (r"\bh200\b.*\bnvl\b", "h200_nvl"),
    (r"\bh200\b", "h200"),
    (r"\bh100\b.*\bnvl\b", "h100_nvl"),
    (r"\bh100\b.*\bpcie\b", "h100_pcie"),
    (r"\bh100\b", "h100"),
    (r"\ba100\b.*\b80gb\b", "a100"),
    (r"\ba100\b", "a100_40gb"),
    (r"\bb200\b", "b200"),
    (r"\bl40s\b", "l40s"),
    (r"\bl4\b", "l4"),
    (r"\ba10g\b", "a10g"),
    (r"\ba10\b", "a10"),
)


def _dtype_key(dtype: str | torch.dtype) -> str:
    aliases = {
        "bf16": "bf16",
        "bfloat16": "bf16",
        "torch.bfloat16": "bf16",
        "fp16": "fp16",
        "float16": "fp16",
        "half": "fp16",
        "torch.float16": "fp16",
        "tf32": "tf32",
        "fp32": "fp32",
        "float32": "fp32",
        "float": "fp32",
        "torch.float32": "fp32",
    }
    key = aliases.get(str(dtype).lower())
    if key is None:
        raise ValueError(f"unknown dtype for peak FLOPs: {dtype!r} (expected bf16, fp16, tf32 or fp32)")
    return key


def match_gpu_name(device_name: str) -> GpuSpec | None:
    """Table entry for a ``torch.cuda.get_device_name()`` string, or None if unknown."""
    low = device_name.lower().replace("_", " ")
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, low):
            return GPU_SPECS[key]
    return None


def detect_gpu(device: torch.device) -> GpuSpec | None:
    """Spec of the GPU behind ``device``; None on CPU or an unknown GPU.

    memory_bytes is replaced by what the driver reports, which is what a
    capacity plan can actually use (datasheet GB and usable bytes differ).
    """
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    spec = match_gpu_name(torch.cuda.get_device_name(device))
    if spec is None:
        return None
    return dataclasses.replace(spec, memory_bytes=int(torch.cuda.get_device_properties(device).total_memory))


def encoder_flops_per_token(
    n_params_dense: int, n_layers: int, d_model: int, context: int, training: bool = True, causal: bool = True
) -> float:
    """Matmul FLOPs per token of a transformer encoder (one multiply-add = 2 FLOPs).

    Weights: 2*N forward, 6*N with backward (grads w.r.t. activations and weights).
    N counts the dense matmul weights only; embedding lookups are excluded (no matmul).
    Attention scores QK^T and the weighted sum AV cost 2*T*d each per token and
    layer, 4*L*T*d forward. ``causal`` halves it because fused kernels skip the
    masked half; that is Kaplan et al. 2020 (Table 1, C_forward = 2N + 2*L*T*d) and
    PaLM's appendix B 6N + 12*L*T*d with the causal halving, giving 6N + 6*L*T*d for
    training. T/2 rather than the exact (T+1)/2 average keys per query.
    """
    attn_fwd = 4.0 * n_layers * context * d_model * (0.5 if causal else 1.0)
    fwd = 2.0 * n_params_dense + attn_fwd
    return 3.0 * fwd if training else fwd


def head_flops_per_token(d_model: int, num_candidates: int, training: bool = True) -> float:
    """Scoring one token against ``num_candidates`` item embeddings (sampled softmax): 2*d*K, x3 to train."""
    fwd = 2.0 * d_model * num_candidates
    return 3.0 * fwd if training else fwd


def encoder_flops_per_interaction(cfg: JobConfig) -> float:
    """Training FLOPs of the encoder tokens of one interaction of a JobConfig (6N + causal attention at
    the configured context); N is the dense matmul weights (the position and side tables are lookups)."""
    from trainer.memory import dense_params

    enc = cfg.model.resolved()
    k = cfg.tokens_per_interaction()
    p = dense_params(cfg)
    tokens = cfg.model.summary.tokens
    if not tokens:  # model.windows: causal attention within each window of the context
        context = cfg.interactions_per_sample()
        if cfg.model.windows:
            context = min(context, cfg.window())
        return k * encoder_flops_per_token(p.matmul, enc.n_layers, enc.d_model, context * k)
    # Windows of the context after `tokens` summary tokens: a query sees every summary token and, causally, half
    # the window on average (context 2P + W with the causal halving), and the summary tokens run through the
    # blocks too ((W + P) / W rows per interaction token).
    from trainer.model.summary import (
        cached_summary_flops,
        reconstruction_param_count,
        summary_flops,
        summary_param_count,
    )

    sm = cfg.model.summary
    w = cfg.window() * k
    # the summariser's and the reconstruction head's weights are counted by summary_flops / reconstruction_head_flops
    matmul = p.matmul - summary_param_count(sm, enc.d_model, enc.d_model)
    if sm.reconstruction_weight > 0:
        matmul -= reconstruction_param_count(enc.d_model, cfg.embeddings.item_dim)
    per_token = encoder_flops_per_token(matmul, enc.n_layers, enc.d_model, w + 2 * tokens)
    if sm.read == "memory":  # the summary tokens are only keys and values: each layer's fused qkv of them, x3 to train
        blocks = k * (per_token + 6.0 * enc.n_layers * 3 * enc.d_model**2 * tokens / w)
    else:  # they run through the blocks beside the window: (W + P) / W rows per interaction token
        blocks = k * per_token * (w + tokens) / w
    if cfg.data.summary_cache:  # the summaries come from a cache: no summariser in the step, only its projection
        return blocks + cached_summary_flops(sm, enc.d_model, w) * k
    return blocks + summary_flops(sm, enc.d_model, enc.d_model, w, sm.grad_windows(w, k)) * k


def flops_per_interaction(cfg: JobConfig, item_rows: int) -> float:
    """Training FLOPs per interaction of a JobConfig: the encoder's tokens, the next-item head
    (:func:`next_item_head_flops`) and the semantic item tower. Embedding lookups are excluded.

    The trainer's tflops/mfu(%) and the capacity planner both use this.
    """
    return (
        encoder_flops_per_interaction(cfg)
        + next_item_head_flops(cfg, item_rows)
        + item_tower_flops(cfg)
        + reconstruction_head_flops(cfg, item_rows)
    )


def reconstruction_head_flops(cfg: JobConfig, item_rows: int) -> float:
    """``model.summary.reconstruction_weight > 0``: the reconstruction decoder on every token, and its predictions
    scored against the next-item head's candidates; 0 otherwise."""
    sm = cfg.model.summary
    if not (sm.tokens and sm.reconstruction_weight > 0):
        return 0.0
    from trainer.model.summary import reconstruction_flops

    k = cfg.tokens_per_interaction()
    d = cfg.model.resolved().d_model
    decoder = k * reconstruction_flops(d, cfg.embeddings.item_dim, sm.tokens, cfg.window() * k)
    return decoder + next_item_head_flops(cfg, item_rows)


def next_item_head_flops(cfg: JobConfig, item_rows: int) -> float:
    """Training FLOPs per interaction of the next-item head: the state against its candidates (at
    ``embeddings.item_dim``, the projected width), once per predicted interaction (``heads.next_item.horizon`` of
    them under multi-token prediction; fewer at a history's end)."""
    ni = cfg.heads.next_item
    candidates = item_rows if ni.full(item_rows) else ni.uniform_negatives + ni.in_batch_negatives
    return ni.horizon * head_flops_per_token(cfg.embeddings.item_dim, 1 + candidates, training=True)


def item_tower_flops(cfg: JobConfig, training: bool = True) -> float:
    """The semantic item tower's matmuls for one interaction's item (``model.item_tower`` semantic / both; the
    batch's shared negatives, a few hundred vectors per step, are left out); 0 for the ID tower."""
    from trainer.model.item_tower import tower_hidden

    m, dim = cfg.model, cfg.embeddings.item_dim
    if m.item_tower == "id":
        return 0.0
    hidden = tower_hidden(dim)
    fwd = 2.0 * (m.item_features * hidden + hidden * dim)
    return 3.0 * fwd if training else fwd


def mfu(achieved_flops_per_s: float, spec: GpuSpec | None, dtype: str | torch.dtype) -> float | None:
    """Model FLOPs utilisation in percent of the dense peak; None without a spec (CPU, unknown GPU)."""
    if spec is None:
        return None
    return 100.0 * achieved_flops_per_s / spec.peak_flops(dtype)
