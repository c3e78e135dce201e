"""The cluster a refit runs on: nodes x GPUs, link bandwidths, latency, copy bandwidth.

Defaults are datasheet-level figures for H100 / H200 SXM nodes (NVLink 4 through NVSwitch,
8 x 400 Gb/s InfiniBand per node) and device copy bandwidths measured on this project's
machines; measure your own (NCCL send/recv, a large device copy) and pass them in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GB = 1e9


@dataclass(frozen=True)
class Topology:
    nodes: int
    gpus_per_node: int
    intra_node_gbps: float = 450.0   # GB/s per GPU per direction (NVLink 4)
    inter_node_gbps: float = 50.0    # GB/s per GPU per direction (400 Gb/s NIC per GPU)
    latency_us: float = 10.0         # per message
    copy_gbps: float = 2980.0        # device copy, bytes read + written per second
    memory_gib: float = 80.0         # per GPU
    name: str = "custom"

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def with_world(self, gpus: int) -> "Topology":
        """The same kind of node, as many as `gpus` needs."""
        per = self.gpus_per_node
        return replace(self, nodes=max(1, -(-gpus // per)))


PRESETS = {
    "h100": Topology(16, 8, 450.0, 50.0, 10.0, 2980.0, 80.0, "H100 SXM (16 x 8)"),
    "h200": Topology(16, 8, 450.0, 50.0, 10.0, 4300.0, 141.0, "H200 SXM (16 x 8)"),
    # CPU / gloo over loopback TCP: a few GB/s between processes, memcpy for local copies.
    "cpu": Topology(1, 4, 2.0, 2.0, 50.0, 10.0, 16.0, "CPU (gloo)"),
}


def preset(name: str, gpus: int | None = None) -> Topology:
    try:
        topo = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown topology '{name}' (known: {', '.join(PRESETS)})") from None
    return topo.with_world(gpus) if gpus else topo
