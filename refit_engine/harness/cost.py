"""Cost model: what a compiled plan moves per rank (`RankFigures`, split by link and by
transport), its floor and its predicted refit time on a topology.

Per rank, from what its plan moves (`RankFigures`):
- pack and unpack: every byte sent to or received from an NCCL (or gloo) peer is read and
  written once into staging, or once out of it; local copies read and write once: bytes x 2
  over the copy bandwidth;
- CUDA IPC peers (same node): the receiving rank's fused copy kernel reads the peer's source in
  place and writes its destination, in the same pass as its local copies: (local + IPC bytes)
  x 2 over the copy bandwidth, no pack, no unpack, no staging, no message latency; reads from
  another GPU cross NVLink, so they also count on the transfer stage's link (both ends: the
  peer's outgoing direction carries what this rank reads);
- transfer: the node's links (NVLink) and the network run side by side, each direction at full
  duplex, or both directions sharing one link's figure where `Topology.duplex` is False (CPU
  ranks: see `RankFigures.link_seconds`); one message latency per bucket (a bucket's messages
  go out together in one NCCL group);
- pipelining: pack, transfer and unpack (with local copies) overlap across buckets, so the
  slowest of the three sets the pace, plus one bucket's pack and unpack to fill and drain;
  where they share the same cores (CPU ranks: `Topology.overlap` False) they add up instead.
A refit ends with its slowest rank, after the collective check every refit starts with
(`Topology.check_us`). The floor (`floor`) drops the staging copies, the latency and the
check: it is what no executor can beat, whatever the transport (an all-IPC rank's prediction
is above it by at most its IPC bytes' copy pass, 2 x IPC bytes over the copy bandwidth).
"""

from __future__ import annotations

from dataclasses import dataclass

from refit_engine.harness.topology import Topology


@dataclass
class RankFigures:
    """One rank's memory (weights of each side, staging) and what a refit moves there, in
    bytes: local copies, sent and received over the node's links and over the network.
    `received_ipc` / `sent_ipc`: the part of `received_intra` / `sent_intra` that goes over
    CUDA IPC (read in place by the receiver: as execute()'s "bytes_ipc", a part of what it
    receives), so neither packed nor unpacked; the rest is staged (NCCL, gloo).
    `aliased_bytes`: destination bytes sharing the source's storage (plan(alias=True)),
    counted once in `total_bytes`; they are in no local copy."""

    rank: int
    src_bytes: int = 0
    dst_bytes: int = 0
    staging_bytes: int = 0
    local_bytes: int = 0
    sent_intra: int = 0
    sent_inter: int = 0
    received_intra: int = 0
    received_inter: int = 0
    messages: int = 0
    received_ipc: int = 0
    sent_ipc: int = 0
    aliased_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.src_bytes + self.dst_bytes - self.aliased_bytes + self.staging_bytes

    @property
    def sent_staged(self) -> int:
        """Bytes packed into staging for NCCL / gloo peers (everything but IPC)."""
        return self.sent_intra + self.sent_inter - self.sent_ipc

    @property
    def received_staged(self) -> int:
        return self.received_intra + self.received_inter - self.received_ipc

    def link_seconds(self, topo: Topology) -> dict[str, float]:
        """Time on each kind of link at full bandwidth, keyed by the link's name (nvlink,
        network, loopback): on full-duplex links the busier direction; where both directions
        share the link (`Topology.duplex` False: CPU ranks) everything this rank sends and
        receives, at twice the per-direction figure measured with both directions busy. The
        two agree for a rank that sends as much as it receives (collocated); a rank that only
        sends or only receives (non-collocated) gets the whole link."""
        def seconds(sent: int, received: int, gbps: float) -> float:
            if topo.duplex:
                return max(sent, received) / (gbps * 1e9)
            return (sent + received) / (2 * gbps * 1e9)
        return {topo.intra_link.lower(): seconds(self.sent_intra, self.received_intra,
                                                 topo.intra_node_gbps),
                topo.inter_link.lower(): seconds(self.sent_inter, self.received_inter,
                                                 topo.inter_node_gbps)}


def rank_figures(rank: int, bytes_local: int, per_peer: dict, topo: Topology,
                 transports: dict | None = None, **fields) -> RankFigures:
    """A rank's bytes split by link: peers on its node over NVLink, the others over the
    network. per_peer: {peer: {"sent": bytes, "received": bytes}}, as RankPlan.bytes_per_peer()
    and execute()'s statistics give it. transports: {peer: "ipc" | "nccl" | ...}, as
    plan.peer_transports or `Topology.peer_transport` give it; peers it leaves out are staged
    (None: every peer, the figures before IPC)."""
    f = RankFigures(rank, local_bytes=bytes_local, **fields)
    transports = transports or {}
    for peer, b in per_peer.items():
        peer = int(peer)  # JSON'd statistics key peers by string
        where = "intra" if topo.node_of(peer) == topo.node_of(rank) else "inter"
        setattr(f, f"sent_{where}", getattr(f, f"sent_{where}") + b["sent"])
        setattr(f, f"received_{where}", getattr(f, f"received_{where}") + b["received"])
        if transports.get(peer) == "ipc":
            if where == "inter":  # the library refuses it too: IPC handles are node-local
                raise ValueError(f"rank {rank}: peer {peer} is on another node, out of CUDA "
                                 "IPC's reach")
            f.sent_ipc += b["sent"]
            f.received_ipc += b["received"]
    return f


def floor(ranks: list[RankFigures], topo: Topology) -> dict:
    """Lower bound of the refit time: per rank, the slowest of its traffic on each link
    (`RankFigures.link_seconds`: full duplex or shared) and its local copies; the largest over
    ranks. Seconds, and which rank and term (the link's name, or "local copy") set it."""
    best = {"seconds": 0.0, "rank": None, "term": None}
    for f in ranks:
        terms = {**f.link_seconds(topo), "local copy": 2 * f.local_bytes / (topo.copy_gbps * 1e9)}
        term, seconds = max(terms.items(), key=lambda kv: kv[1])
        if seconds > best["seconds"]:
            best = {"seconds": seconds, "rank": f.rank, "term": term}
    return best



def predict_rank(f: RankFigures, topo: Topology, buckets: int) -> dict:
    """Seconds of one rank's refit and what bounds it. buckets: how many buckets its staged
    (NCCL, gloo) messages take, 0 where every peer is IPC (IPC reads are one pass, unbucketed)."""
    copy = topo.copy_gbps * 1e9
    pack = 2 * f.sent_staged / copy
    unpack = 2 * f.received_staged / copy
    # Local copies and IPC reads are one fused kernel: an IPC byte is read once and written
    # once, like a local one. Its NVLink time is in the transfer, on the link it shares with
    # the node's NCCL bytes.
    local = 2 * (f.local_bytes + f.received_ipc) / copy
    transfer = max(f.link_seconds(topo).values()) + buckets * topo.latency_us * 1e-6
    copy_stage = "unpack + local + ipc" if f.received_ipc else "unpack + local"
    stages = {"pack": pack, "transfer": transfer, copy_stage: unpack + local}
    term, pace = max(stages.items(), key=lambda kv: kv[1])
    if not topo.overlap:
        return {"seconds": sum(stages.values()), "term": "pack + transfer + unpack", **stages}
    fill_drain = (pack + unpack) / max(buckets, 1)
    return {"seconds": pace + fill_drain, "term": term, **stages}


def predict(ranks: list[RankFigures], topo: Topology, buckets: dict[int, int]) -> dict:
    """Predicted seconds of the whole refit: the slowest rank, and what bounds it. buckets:
    per rank, as `predict_rank` takes them."""
    worst = {"seconds": 0.0, "rank": None, "term": None}
    for f in ranks:
        p = predict_rank(f, topo, buckets.get(f.rank, 1))
        if p["seconds"] > worst["seconds"]:
            worst = {"seconds": p["seconds"], "rank": f.rank, "term": p["term"]}
    worst["seconds"] += topo.check_us * 1e-6
    return worst


def predict_loopback(bytes_local: int, bytes_remote: int, copy_gbps: float, staged: bool) -> float:
    """One GPU playing every rank: everything goes through its memory, one pass for local
    copies, three (pack, exchange, unpack) for remote bytes when staged, one when direct (as
    CUDA IPC between processes on one GPU: the receiver's fused kernel reads the sender's
    tensor, no link in between). Every rank's bytes, as they share the GPU's memory."""
    passes = 3 if staged else 1
    return 2 * (bytes_local + passes * bytes_remote) / (copy_gbps * 1e9)

