"""The hardware a plan is made for: GPU type (memory, peak FLOP/s, HBM bandwidth from
``trainer.flops.GPU_SPECS``), node count and shape, interconnect bandwidths, price."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from trainer.config import ConfigError
from trainer.flops import GPU_SPECS, GpuSpec

GB = 10**9

# Per-GPU, one direction, GB/s: (within a node, between nodes). Within: NVLink (H100/H200 SXM NVLink4
# 900 GB/s bidirectional, A100 NVLink3 600, B200 NVLink5 1800) or PCIe (Gen5 x16 64 GB/s, Gen4 32).
# Between: one NIC per GPU (DGX/HGX H100, H200, B200: ConnectX-7 400 Gb/s = 50 GB/s; A100: HDR
# 200 Gb/s = 25 GB/s; PCIe cards: a 100 Gb/s NIC, 12.5 GB/s).
INTERCONNECT_GBPS: dict[str, tuple[float, float]] = {
    "h100": (450, 50),
    "h100_nvl": (300, 50),
    "h100_pcie": (64, 50),
    "h200": (450, 50),
    "h200_nvl": (450, 50),
    "gh200": (450, 50),
    "a100": (300, 25),
    "a100_40gb": (300, 25),
    "b200": (900, 50),
    "l40s": (32, 12.5),
    "l4": (32, 12.5),
    "a10g": (32, 12.5),
    "a10": (32, 12.5),
}

# The `argus plan` flag that sets each field: the one a message about the field names.
FLAGS: dict[str, str] = {
    "gpu": "--gpu",
    "nodes": "--nodes",
    "gpus_per_node": "--gpus-per-node",
    "intra_node_gbps": "--intra-node-gbps",
    "inter_node_gbps": "--inter-node-gbps",
    "memory_gb": "--memory-gb",
    "price_per_gpu_hour": "--price",
}


@dataclass
class Hardware:
    """Nodes x GPUs of one type. Bandwidths in GB/s per GPU per direction (0 = the type's default)."""

    gpu: str = "h100"
    nodes: int = 1
    gpus_per_node: int = 8
    intra_node_gbps: float = 0.0
    inter_node_gbps: float = 0.0
    memory_gb: float = 0.0  # 0 = the datasheet capacity
    price_per_gpu_hour: float = 0.0  # 0 = no cost shown

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def validate(self) -> None:
        if self.gpu not in GPU_SPECS:
            raise ConfigError(f"--gpu: unknown GPU {self.gpu!r}; known: {', '.join(sorted(GPU_SPECS))}")
        for key in ("nodes", "gpus_per_node"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{FLAGS[key]}: must be >= 1, got {getattr(self, key)}")
        for key in ("intra_node_gbps", "inter_node_gbps", "memory_gb", "price_per_gpu_hour"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{FLAGS[key]}: must be >= 0, got {getattr(self, key)}")

    def spec(self) -> GpuSpec:
        s = GPU_SPECS[self.gpu]
        return dataclasses.replace(s, memory_bytes=int(self.memory_gb * GB)) if self.memory_gb else s

    def bandwidths(self) -> tuple[float, float]:
        """(intra-node, inter-node) in bytes/s per GPU per direction."""
        intra, inter = INTERCONNECT_GBPS.get(self.gpu, (32, 12.5))
        return (self.intra_node_gbps or intra) * GB, (self.inter_node_gbps or inter) * GB

    def with_world(self, gpus: int) -> "Hardware":
        """The same machines, ``gpus`` of them (whole nodes when gpus >= gpus_per_node)."""
        if gpus < self.gpus_per_node:
            return dataclasses.replace(self, nodes=1, gpus_per_node=gpus)
        if gpus % self.gpus_per_node:
            raise ConfigError(f"--sweep: {gpus} GPUs is not a whole number of {self.gpus_per_node}-GPU nodes")
        return dataclasses.replace(self, nodes=gpus // self.gpus_per_node)
