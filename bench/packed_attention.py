"""Packed-row attention on CPU: forward+backward step time of `mask` vs `segments` vs unpacked padded rows.

    OMP_NUM_THREADS=1 python bench/packed_attention.py [--context 512] [--rows 8] [--repeats 5]

Heavy-tailed history lengths (lognormal, mean about context/4, clipped to [1, context]) are packed into rows of
`--context` tokens by first-fit decreasing; the baseline runs the same histories one per row, padded to the
longest (`segments=None`, plain causal SDPA). One `Encoder` (default: mini's width, 2 layers), dropout off.
Prints ms per step and real tokens per second; `model.attention: auto` on CPU is set from these figures.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.model.encoder import Encoder  # noqa: E402


def history_lengths(context: int, tokens: int, gen: torch.Generator) -> list[int]:
    """Lognormal(sigma=1) lengths with mean about context/4, drawn until they hold `tokens` tokens."""
    mu = math.log(context / 4) - 0.5
    lengths: list[int] = []
    while sum(lengths) < tokens:
        z = torch.randn(1, generator=gen).item()
        lengths.append(int(min(context, max(1.0, round(math.exp(mu + z))))))
    return lengths


def first_fit(lengths: list[int], context: int) -> list[list[int]]:
    """Histories (indices into ``lengths``) per row, longest first, each into the first row with room."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
        if r is None:
            rows.append([])
            free.append(context)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= lengths[i]
    return rows


def packed_inputs(lengths: list[int], rows: list[list[int]], context: int, d_model: int) -> tuple[torch.Tensor, ...]:
    x = torch.randn(len(rows), context, d_model)
    mask = torch.zeros(len(rows), context, dtype=torch.bool)
    positions = torch.zeros(len(rows), context, dtype=torch.long)
    segments = torch.full((len(rows), context), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for s, i in enumerate(row):
            n = lengths[i]
            mask[r, start : start + n] = True
            positions[r, start : start + n] = torch.arange(n)
            segments[r, start : start + n] = s
            start += n
    return x, mask, positions, segments


def padded_inputs(lengths: list[int], d_model: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(lengths)
    mask = torch.arange(T) < torch.tensor(lengths)[:, None]
    return torch.randn(len(lengths), T, d_model), mask


def step_ms(runs: dict[str, tuple[Encoder, tuple]], repeats: int) -> dict[str, float]:
    """Median ms of forward + backward per run, after one warm-up step; runs take turns so that load from other
    processes hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(repeats + 1):
        for name, (enc, args) in runs.items():
            t0 = time.perf_counter()
            enc(*args).square().mean().backward()
            if i:
                times[name].append((time.perf_counter() - t0) * 1e3)
            enc.zero_grad(set_to_none=True)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--context", type=int, default=512, help="row length T of the packed rows")
    p.add_argument("--rows", type=int, default=8, help="about this many packed rows of histories")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--modes", default="mask,segments,padded")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    gen = torch.Generator().manual_seed(a.seed)
    lengths = history_lengths(a.context, int(0.95 * a.rows * a.context), gen)
    rows = first_fit(lengths, a.context)
    tokens = sum(lengths)
    print(
        f"d_model={a.d_model} heads={a.heads} layers={a.layers} context={a.context} threads={torch.get_num_threads()}"
        f" | {len(lengths)} histories, {tokens} tokens, lengths mean {tokens / len(lengths):.0f} max {max(lengths)}"
        f" | packed: {len(rows)} rows, fill {tokens / (len(rows) * a.context):.0%}"
        f" | padded: {len(lengths)} x {max(lengths)}"
    )
    cfg = dict(preset="custom", d_model=a.d_model, n_heads=a.heads, n_layers=a.layers, d_ff=4 * a.d_model)
    packed = packed_inputs(lengths, rows, a.context, a.d_model)
    padded = padded_inputs(lengths, a.d_model)
    runs = {}
    for mode in a.modes.split(","):
        torch.manual_seed(a.seed)
        attention = "auto" if mode == "padded" else mode
        enc = Encoder.Config(**cfg, max_seq_len=a.context, dropout=0.0, attention=attention).build().train()
        runs[mode] = (enc, padded if mode == "padded" else packed)
    for mode, ms in step_ms(runs, a.repeats).items():
        print(f"{mode:>9}: {ms:9.1f} ms/step  {tokens / ms * 1e3:9.0f} real tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
