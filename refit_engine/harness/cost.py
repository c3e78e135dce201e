"""Cost model: predicted refit time of a compiled plan on a topology, beside its floor.

Per rank, from what its plan moves (`memory.RankFigures`):
- pack and unpack: every sent byte is read and written once into staging, every received byte
  once out of it; local copies read and write once: bytes x 2 over the copy bandwidth;
- transfer: the node's links (NVLink) and the network run side by side, each direction at full
  duplex, or both directions sharing one link's figure where `Topology.duplex` is False (CPU
  ranks: see `RankFigures.link_seconds`); one message latency per bucket (a bucket's messages
  go out together in one NCCL group);
- pipelining: pack, transfer and unpack (with local copies) overlap across buckets, so the
  slowest of the three sets the pace, plus one bucket's pack and unpack to fill and drain;
  where they share the same cores (CPU ranks: `Topology.overlap` False) they add up instead.
A refit ends with its slowest rank, after the collective check every refit starts with
(`Topology.check_us`). The floor (memory.floor) drops the staging copies, the latency and the
check: it is what no executor can beat.
"""

from __future__ import annotations

from refit_engine.harness.dry_run import RankFigures
from refit_engine.harness.topology import Topology


def predict_rank(f: RankFigures, topo: Topology, buckets: int) -> dict:
    copy = topo.copy_gbps * 1e9
    sent, received = f.sent_intra + f.sent_inter, f.received_intra + f.received_inter
    pack = 2 * sent / copy
    unpack = 2 * received / copy
    local = 2 * f.local_bytes / copy
    transfer = max(f.link_seconds(topo).values()) + buckets * topo.latency_us * 1e-6
    stages = {"pack": pack, "transfer": transfer, "unpack + local": unpack + local}
    term, pace = max(stages.items(), key=lambda kv: kv[1])
    if not topo.overlap:
        return {"seconds": sum(stages.values()), "term": "pack + transfer + unpack", **stages}
    fill_drain = (pack + unpack) / max(buckets, 1)
    return {"seconds": pace + fill_drain, "term": term, **stages}


def predict(ranks: list[RankFigures], topo: Topology, buckets: dict[int, int]) -> dict:
    """Predicted seconds of the whole refit: the slowest rank, and what bounds it."""
    worst = {"seconds": 0.0, "rank": None, "term": None}
    for f in ranks:
        p = predict_rank(f, topo, buckets.get(f.rank, 1))
        if p["seconds"] > worst["seconds"]:
            worst = {"seconds": p["seconds"], "rank": f.rank, "term": p["term"]}
    worst["seconds"] += topo.check_us * 1e-6
    return worst


def predict_loopback(bytes_local: int, bytes_remote: int, copy_gbps: float, staged: bool) -> float:
    """One GPU playing every rank: everything goes through its memory, one pass for local
    copies, three (pack, exchange, unpack) for remote bytes when staged, one when direct."""
    passes = 3 if staged else 1
    return 2 * (bytes_local + passes * bytes_remote) / (copy_gbps * 1e9)

