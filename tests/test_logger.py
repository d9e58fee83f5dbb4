"""MetricsLogger outputs, StepTimer, peak memory, and the FLOP/MFU formulas against counted FLOPs."""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from trainer.flops import GPU_SPECS, detect_gpu, encoder_flops_per_token, head_flops_per_token, match_gpu_name, mfu
from trainer.logger import STABLE_NAMES, MetricsLogger, StepTimer, peak_memory_bytes


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_records(tmp_path: Path) -> None:
    before = time.time()
    with MetricsLogger(tmp_path, total_steps=10, enabled_tensorboard=False, progress=False) as log:
        log.log(1, {"loss/total": 2.5, "tps": torch.tensor(1000.0), "mfu(%)": None})
        log.log(2, {"loss/total": 2.25, "lr": 1e-3})
    rows = _read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss/total"] == 2.5 and rows[0]["tps"] == 1000.0 and rows[0]["mfu(%)"] is None
    assert rows[1] == {"step": 2, "time": rows[1]["time"], "loss/total": 2.25, "lr": 1e-3}
    assert before <= rows[0]["time"] <= rows[1]["time"] <= time.time()

    # A resumed run appends to the same file.
    with MetricsLogger(tmp_path, enabled_tensorboard=False, progress=False) as log:
        log.log(3, {"loss/total": 2.0})
    assert [r["step"] for r in _read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_tensorboard_scalars_readable(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, progress=False) as log:
        for step, loss in [(10, 3.0), (20, 1.5)]:
            log.log(step, {"loss/total": loss, "eval/hr@10": 0.25})
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    events = acc.Scalars("loss/total")
    assert [(e.step, e.value) for e in events] == [(10, 3.0), (20, 1.5)]
    assert acc.Scalars("eval/hr@10")[0].value == pytest.approx(0.25)


def test_nonzero_rank_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with MetricsLogger(out, rank=1, total_steps=5) as log:
        log.log(1, {"loss/total": 1.0, "not_a_stable_name": 1.0})
    assert not out.exists()


def test_progress_line_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Under pytest stderr is not a terminal: one plain line per log call.
    with MetricsLogger(tmp_path, total_steps=100, enabled_tensorboard=False, progress=True) as log:
        log.log(7, {"loss/total": 1.25, "tps": 123456.0})
    err = capsys.readouterr().err
    assert "step 7/100" in err and "loss 1.25" in err and "tps 123,456" in err


def test_progress_line_shows_the_fine_tuning_loss(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Fine-tuning logs loss/pairwise (no loss/total): its progress line shows it as pre-training shows its loss."""
    with MetricsLogger(tmp_path, total_steps=3, enabled_tensorboard=False, progress=True) as log:
        log.log(2, {"loss/pairwise": 0.6931, "pairwise_acc/train": 0.5, "lr": 1e-05})
    assert capsys.readouterr().err.strip() == "step 2/3  loss 0.693  lr 1e-05"


def test_unknown_name_warns_once(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, enabled_tensorboard=False, progress=False) as log:
        with pytest.warns(UserWarning, match="losss"):
            log.log(1, {"losss": 1.0})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            log.log(2, {"losss": 1.0})  # second time: silent
            log.log(3, {name: 1.0 for name in STABLE_NAMES})
            log.log(4, {"loss/anything": 1.0, "ne/x": 1.0, "memory/x": 1.0, "time/x": 1.0, "eval/ndcg@10": 1.0})
        with pytest.raises(ValueError):
            log.log(5, {"step": 1.0})


def test_step_timer_shares(tmp_path: Path) -> None:
    timer = StepTimer(torch.device("cpu"))
    time.sleep(0.05)  # before the first block: not part of the window
    for _ in range(2):
        with timer.data():
            time.sleep(0.03)
        with timer.compute():
            time.sleep(0.09)
    s = timer.summary()
    assert s["time/data_share"] + s["time/compute_share"] == pytest.approx(1.0, abs=0.05)
    assert s["time/data_share"] == pytest.approx(0.25, abs=0.08)
    assert s["time/step_s"] == pytest.approx(0.12, abs=0.04)
    # The window resets.
    with timer.data():
        time.sleep(0.02)
    with timer.compute():
        pass
    s2 = timer.summary()
    assert s2["time/data_share"] > 0.8


def test_peak_memory_cpu() -> None:
    x = torch.ones(16 * 2**20, dtype=torch.float32)  # 64 MiB, touched
    assert peak_memory_bytes(torch.device("cpu")) >= x.numel() * 4


class _OneLayer(nn.Module):
    """One transformer layer, bias-free, full (non-causal) softmax attention written as matmuls."""

    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, f, bias=False)
        self.down = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.out(a @ v)
        return x + self.down(torch.relu(self.up(x)))


def test_encoder_flops_match_counted_matmuls() -> None:
    d, f, t = 16, 64, 12
    model = _OneLayer(d, f)
    n = sum(p.numel() for p in model.parameters())
    assert n == 3 * d * d + d * d + 2 * d * f
    # By hand, one sequence forward, 2 FLOPs per multiply-add:
    hand = (
        2 * t * d * 3 * d  # QKV projection
        + 2 * t * t * d  # QK^T
        + 2 * t * t * d  # AV
        + 2 * t * d * d  # output projection
        + 2 * t * d * f * 2
    )  # FFN up and down
    x = torch.randn(1, t, d, requires_grad=True)
    with FlopCounterMode(display=False) as fwd_counter:
        model(x)
    assert fwd_counter.get_total_flops() == hand
    assert encoder_flops_per_token(n, 1, d, t, training=False, causal=False) * t == hand

    with FlopCounterMode(display=False) as train_counter:
        model(x).sum().backward()
    # Backward = grads w.r.t. inputs and weights = 2x forward, so training is 3x.
    assert train_counter.get_total_flops() == 3 * hand
    assert encoder_flops_per_token(n, 1, d, t, training=True, causal=False) * t == 3 * hand

    # Causal: half the score/value work, 2*N + 2*L*T*d forward, 6*N + 6*L*T*d training per token.
    assert encoder_flops_per_token(n, 1, d, t, training=False) == 2 * n + 2 * t * d
    assert encoder_flops_per_token(n, 3, d, t) == 6 * n + 6 * 3 * t * d


def test_head_flops_match_counted_matmul() -> None:
    d, k, t = 8, 33, 5
    h = torch.randn(t, d, requires_grad=True)
    cand = torch.randn(k, d, requires_grad=True)
    with FlopCounterMode(display=False) as c:
        (h @ cand.T).logsumexp(-1).sum().backward()
    assert c.get_total_flops() == head_flops_per_token(d, k, training=True) * t
    assert head_flops_per_token(d, k, training=False) == 2 * d * k


def test_peak_table_and_mfu() -> None:
    h100 = GPU_SPECS["h100"]
    assert {k: h100.peak_flops(k) for k in ("bf16", "fp16", "tf32", "fp32")} == {
        "bf16": 989e12,
        "fp16": 989e12,
        "tf32": 494.5e12,
        "fp32": 66.9e12,
    }
    assert GPU_SPECS["h200"].peak_flops("bf16") == h100.peak_flops("bf16")
    assert (GPU_SPECS["a100"].bf16_flops, GPU_SPECS["a100"].tf32_flops, GPU_SPECS["a100"].fp32_flops) == (
        312e12,
        156e12,
        19.5e12,
    )
    assert (GPU_SPECS["b200"].bf16_flops, GPU_SPECS["b200"].tf32_flops) == (2.25e15, 1.1e15)
    for name in ("h100", "h200", "a100", "b200", "l40s", "a10g"):
        s = GPU_SPECS[name]
        assert s.name == name and s.memory_bytes > 0 and s.hbm_bytes_per_s > 0
        assert s.bf16_flops >= s.tf32_flops >= s.fp32_flops
    with pytest.raises(dataclasses.FrozenInstanceError):
        GPU_SPECS["h100"].bf16_flops = 1.0  # frozen

    assert mfu(494.5e12, GPU_SPECS["h100"], "bf16") == pytest.approx(50.0)
    assert mfu(156e12, GPU_SPECS["a100"], torch.float32) == pytest.approx(800.0)  # fp32 = CUDA-core peak
    assert mfu(78e12, GPU_SPECS["a100"], "tf32") == pytest.approx(50.0)
    assert mfu(1e12, None, "bf16") is None
    assert mfu(1e12, detect_gpu(torch.device("cpu")), "bf16") is None
    with pytest.raises(ValueError):
        mfu(1e12, GPU_SPECS["h100"], "int8")


@pytest.mark.parametrize(
    "device_name, key",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100_pcie"),
        ("NVIDIA H100 NVL", "h100_nvl"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA H200 NVL", "h200_nvl"),
        ("NVIDIA GH200 480GB", "gh200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA A100 80GB PCIe", "a100"),
        ("NVIDIA A100-SXM4-40GB", "a100_40gb"),
        ("NVIDIA B200", "b200"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA A10G", "a10g"),
        ("NVIDIA A10", "a10"),
        ("NVIDIA L40", None),
        ("Tesla V100-SXM2-16GB", None),
    ],
)
def test_gpu_name_matching(device_name: str, key: str | None) -> None:
    spec = match_gpu_name(device_name)
    assert (spec.name if spec else None) == key


def test_detect_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert detect_gpu(torch.device("cpu")) is None

    class Props:
        total_memory = 85_520_000_000

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props())
    spec = detect_gpu(torch.device("cuda", 0))
    assert spec is not None and spec.name == "h100" and spec.bf16_flops == 989e12
    assert spec.memory_bytes == Props.total_memory  # what the driver reports, not the datasheet
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert detect_gpu(torch.device("cuda", 0)) is None
