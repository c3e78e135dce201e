"""The cluster a refit runs on: nodes x GPUs, link bandwidths, latency, copy bandwidth.

Defaults are datasheet-level figures for H100 / H200 SXM nodes (NVLink 4 through NVSwitch,
8 x 400 Gb/s InfiniBand per node) and device copy bandwidths measured on this project's
machines; `measure` takes them on the machine at hand, with every rank busy at once as in a
refit (so CPU ranks sharing cores and memory see what they get during a refit).
"""

from __future__ import annotations

import datetime
import statistics
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from refit_engine.executors.cpu import default_threads
from refit_engine.harness.launch import ranks_per_node
from refit_engine.harness.timing import slowest as slowest_rank
from refit_engine.harness.timing import time_ranks


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
    # Whether packing, transfers and unpacking run side by side (GPUs: copy kernels, NVLink
    # and NICs are separate engines) or take turns on the same cores (CPU ranks, where gloo's
    # TCP stack and the copies share the processors).
    overlap: bool = True
    # Per refit, besides moving bytes: the collective check that no rank's tensors were
    # replaced since planning (one small all-reduce).
    check_us: float = 50.0
    # What the links are (labels of the floor's and the prediction's terms).
    intra_link: str = "NVLink"
    inter_link: str = "network"
    # Whether a rank's sending and receiving each get the link's bandwidth (GPUs: NVLink and
    # NICs are full duplex) or share it (CPU ranks: gloo's TCP copies on both ends run on the
    # same processors, so one direction alone goes about twice as fast as the figure
    # `measure` takes with both busy).
    duplex: bool = True

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    @property
    def cpu_ranks(self) -> bool:
        """CPU ranks over gloo (the cpu preset), whose links are loopback TCP, not GPUs'."""
        return self.intra_link == "loopback"

    def peer_transport(self, rank: int, peer: int, transport: str = "auto") -> str:
        """How `rank` exchanges with `peer` under the plan's `transport` option, by the
        library's rule (refit_engine.peers): on GPUs, "auto" and "ipc" read a peer of the same
        node over CUDA IPC and reach one on another node over NCCL ("ipc" in the library
        refuses such a peer; the dry run shows what it would cost); "nccl" stages every peer.
        CPU ranks go over gloo whatever "auto" says."""
        check_transport(self, transport)
        if self.cpu_ranks:
            return "gloo"
        if transport == "nccl" or self.node_of(peer) != self.node_of(rank):
            return "nccl"
        return "ipc"

    def with_world(self, gpus: int) -> "Topology":
        """The same kind of node, as many as `gpus` needs."""
        per = self.gpus_per_node
        return replace(self, nodes=max(1, -(-gpus // per)))

    def describe(self, gpus: int | None = None) -> str:
        """e.g. "H100 SXM, 128 GPUs on 16 nodes of 8" (`gpus`: where fewer than the nodes
        hold)."""
        gpus = self.nodes * self.gpus_per_node if gpus is None else gpus
        unit = "ranks" if self.cpu_ranks else "GPUs"
        return (f"{self.name}, {gpus} {unit} on {self.nodes} node{'s' if self.nodes != 1 else ''}"
                f" of {self.gpus_per_node}")


# The plan's transport option (refit_engine.plan(..., transport=)): "auto" is the library's
# default.
TRANSPORTS = ("auto", "nccl", "ipc")


def check_transport(topo: Topology, transport: str) -> None:
    """Refuse (ValueError) a transport the topology's ranks cannot use: CUDA IPC and NCCL need
    GPUs, so CPU ranks take "auto" (gloo) only."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport '{transport}' (known: {', '.join(TRANSPORTS)})")
    if topo.cpu_ranks and transport != "auto":
        raise ValueError(f"transport '{transport}' needs GPUs: {topo.name} ranks go over gloo "
                         "(use auto)")


def describe_transport(topo: Topology, transport: str) -> str:
    """e.g. "auto: same-node peers over CUDA IPC, other nodes over NCCL"."""
    check_transport(topo, transport)
    if topo.cpu_ranks:
        return f"{transport}: every peer over gloo (CPU ranks)"
    if transport == "nccl":
        return "nccl: every peer over NCCL (pack, send/recv, unpack through staging)"
    return (f"{transport}: same-node peers over CUDA IPC (read in place, no staging), other "
            "nodes over NCCL")


PRESETS = {
    "h100": Topology(16, 8, 450.0, 50.0, 10.0, 2980.0, 80.0, "H100 SXM"),
    "h200": Topology(16, 8, 450.0, 50.0, 10.0, 4300.0, 141.0, "H200 SXM"),
    # CPU / gloo over loopback TCP: a few GB/s between processes, memcpy for local copies.
    "cpu": Topology(1, 4, 2.0, 2.0, 50.0, 10.0, 16.0, "CPU (gloo)", overlap=False,
                    intra_link="loopback", duplex=False),
}


def gpu_preset(device_name: str) -> str:
    """The preset whose datasheet figures fit a GPU named `device_name` (as
    torch.cuda.get_device_name gives it): h200 for H200s, h100 for H100s and any other GPU
    (whose measured figures replace the bandwidths; callers name the topology after the real
    device)."""
    return "h200" if "H200" in device_name.upper() else "h100"


def preset(name: str, gpus: int | None = None) -> Topology:
    try:
        topo = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown topology '{name}' (known: {', '.join(PRESETS)})") from None
    return topo.with_world(gpus) if gpus else topo


def measure(base: Topology, group=None, nbytes: int = 64 << 20, repeats: int = 5,
            timeout_s: float = 120.0) -> Topology:
    """`base` with bandwidths and latency measured here, every rank at once: a large copy on
    each rank's device; full-duplex exchanges (sending and receiving at once, as a refit does)
    among all ranks of a node and between the first two nodes (rank r and r + gpus_per_node),
    over the refit's transport (gloo for CPU tensors, NCCL through torch for CUDA); a 1-byte
    exchange for the per-message latency; the per-refit collective check (a 1-element
    all-reduce). The slowest rank's figure is kept. Collective over `group`; every rank
    returns the same Topology."""
    timeout = datetime.timedelta(seconds=timeout_s)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    cuda = "nccl" in dist.get_backend(group) and torch.cuda.is_available()
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    per_node = max(1, base.gpus_per_node)

    sync = torch.cuda.synchronize if cuda else None

    def timed(fn):  # all ranks start together: contention as in a refit
        return statistics.median(time_ranks(fn, repeats, group, sync))

    def slowest(seconds: float | None) -> float | None:
        """The largest of every rank's time (None where no rank measured)."""
        return slowest_rank(seconds or 0.0, group, device) or None

    a = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    b = torch.empty_like(a)
    torch_threads = torch.get_num_threads()
    if not cuda:  # with as many threads as the CPU executor copies with
        torch.set_num_threads(default_threads(world))
    try:
        copy_s = slowest(timed(lambda: b.copy_(a)))
    finally:
        torch.set_num_threads(torch_threads)

    def exchange_seconds(partners: list[int], chunk: int) -> float | None:
        """Time for this rank to send `chunk` bytes to each of `partners` while receiving as
        much from each, everyone at once as in a refit (ranks without partners time a no-op
        so the barriers line up); the slowest rank's."""
        if not partners:
            timed(lambda: None)
            return slowest(None)
        ops = []
        for i, partner in enumerate(partners):
            peer = partner if group is None else dist.get_global_rank(group, partner)
            ops.append(dist.P2POp(dist.isend, a[i * chunk:(i + 1) * chunk], peer, group))
            ops.append(dist.P2POp(dist.irecv, b[i * chunk:(i + 1) * chunk], peer, group))

        def exchange():
            for work in dist.batch_isend_irecv(ops):
                if not work.wait(timeout):
                    raise RuntimeError(f"measuring links: rank {rank} timed out after "
                                       f"{timeout} exchanging with ranks {partners}")
        return slowest(timed(exchange))

    node = rank // per_node
    node_peers = [r for r in range(node * per_node, min(world, (node + 1) * per_node)) if r != rank]
    across = rank + per_node if node == 0 and rank + per_node < world else \
        rank - per_node if node == 1 else None
    intra_chunk = nbytes // max(1, len(node_peers))  # nbytes in all to the node's ranks
    intra_s = exchange_seconds(node_peers, intra_chunk)
    inter_s = exchange_seconds([across] if across is not None else [], nbytes)
    # Pairs that choose each other: neighbours (0, 1), (2, 3), ... on a node, or across nodes
    # when nodes have one rank.
    neighbour = rank ^ 1
    if per_node > 1:
        pair = [neighbour] if neighbour in node_peers else []
    else:
        pair = [across] if across is not None else []
    latency_s = exchange_seconds(pair, 1)
    flag = torch.zeros(1, dtype=torch.int32, device=device)

    def check():  # what execute() does before moving a byte
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        flag.item()
    check_s = slowest(timed(check))
    return replace(base, copy_gbps=2 * nbytes / copy_s / 1e9,
                   intra_node_gbps=intra_chunk * len(node_peers) / intra_s / 1e9 if intra_s
                   else base.intra_node_gbps,
                   inter_node_gbps=nbytes / inter_s / 1e9 if inter_s else base.inter_node_gbps,
                   latency_us=latency_s * 1e6 if latency_s else base.latency_us,
                   check_us=check_s * 1e6 if check_s else base.check_us,
                   name=f"{base.name}, measured")


def device_topology(device: str):
    """The preset for `device`, named after it: cpu for CPU ranks; for a GPU the H100 or H200
    preset chosen by torch.cuda.get_device_name() (any other GPU starts from the H100's
    figures), named with the real device name and its memory."""
    if device == "cpu":
        return preset("cpu")
    name = torch.cuda.get_device_name(device)
    memory_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return replace(preset(gpu_preset(name)), name=name, memory_gib=round(memory_gib, 1))


def measure_here(device: str, world: int):
    """The topology of `device` (device_topology) with this job's nodes, its bandwidths
    measured here (collective): named e.g. "NVIDIA H200, measured" or "CPU (gloo), measured"."""
    per_node = ranks_per_node(world)
    base = device_topology(device)
    return measure(replace(base, gpus_per_node=per_node, nodes=max(1, world // per_node)))
