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


def measure(base: Topology, group=None, nbytes: int = 64 << 20, repeats: int = 5) -> Topology:
    """`base` with bandwidths measured here: a large copy on this rank's device, and
    send/recv between rank 0 and rank 1 (same node) and rank 0 and the first rank of the next
    node (when there is one), over the refit's transport (gloo for CPU tensors, NCCL through
    torch for CUDA). Collective over `group`; every rank returns the same Topology."""
    import statistics
    import time

    import torch
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size(group)
    cuda = "nccl" in dist.get_backend(group) and torch.cuda.is_available()
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"

    def timed(fn):
        samples = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    a = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    b = torch.empty_like(a)
    copy_gbps = 2 * nbytes / timed(lambda: b.copy_(a)) / 1e9

    def pair_gbps(peer: int) -> float | None:
        if peer >= world:
            return None
        seconds = 0.0
        if rank in (0, peer):
            other = peer if rank == 0 else 0

            def ping():  # one message each way, so both directions are measured
                if rank == 0:
                    dist.send(a, other, group=group)
                    dist.recv(b, other, group=group)
                else:
                    dist.recv(b, other, group=group)
                    dist.send(a, other, group=group)
            seconds = timed(ping)
        t = torch.tensor([seconds], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return 2 * nbytes / float(t.item()) / 1e9 if t.item() > 0 else None

    intra = pair_gbps(1) if base.gpus_per_node > 1 else None
    inter = pair_gbps(base.gpus_per_node)
    copies = torch.tensor([copy_gbps], dtype=torch.float64, device=device)
    dist.all_reduce(copies, op=dist.ReduceOp.MIN, group=group)
    return replace(base, copy_gbps=float(copies.item()),
                   intra_node_gbps=intra or base.intra_node_gbps,
                   inter_node_gbps=inter or base.inter_node_gbps,
                   name=f"{base.name}, measured")
