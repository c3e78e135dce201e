"""Where the harness's ranks run and how they meet: the backend (NCCL with one GPU per rank,
else gloo with every tensor on CPU) decided alone or agreed by every rank of a launched job
before any process group exists, and the process group from torchrun's or srun's environment."""

from __future__ import annotations

import datetime
import json
import os
import time

import torch
import torch.distributed as dist


def choose_backend(requested: str, ranks: int, gpus: int) -> tuple[str, str]:
    """(backend, why) for `ranks` processes on a node with `gpus` GPUs: NCCL with one GPU per
    rank where there are enough GPUs, gloo on CPU otherwise (NCCL cannot put several ranks on
    one GPU). `requested`: auto, gloo or nccl; nccl without enough GPUs raises ValueError."""
    if requested == "gloo":
        return "gloo", "asked for (--backend gloo)"
    if gpus >= ranks:
        return "nccl", (f"{gpus} GPU{'s' if gpus != 1 else ''} for {ranks} "
                        f"rank{'s' if ranks != 1 else ''}: one GPU per rank")
    if requested == "nccl":
        raise ValueError(f"--backend nccl needs one GPU per rank: {ranks} ranks on this node "
                         f"but {gpus} GPU(s) visible (NCCL cannot put several ranks on one GPU)")
    if requested != "auto":
        raise ValueError(f"unknown backend {requested!r} (auto, gloo, nccl)")
    if gpus == 0:
        return "gloo", "no GPU visible"
    return "gloo", (f"{ranks} ranks but {gpus} GPU{'s' if gpus != 1 else ''}: NCCL cannot put "
                    "several ranks on one GPU")


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def decide_backend(requested: str, ranks_here: int) -> tuple[str, str]:
    """Where the main job and the sweep run `ranks_here` ranks on this node: choose_backend
    with this node's GPUs (none counted when gloo is asked for). ValueError as choose_backend."""
    return choose_backend(requested, ranks_here, 0 if requested == "gloo" else _gpu_count())


def where_text(backend: str) -> str:
    return "one GPU each" if backend == "nccl" else "every tensor on CPU"


def launched() -> bool:
    """Whether this process is one rank started by torchrun or srun."""
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def ranks_per_node(world: int) -> int:
    """Ranks on this node, from the launcher (all `world` ranks when it says nothing)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", world)))


def rank_device() -> str:
    """This rank's device: its GPU under NCCL (init_from_env set it), else cpu."""
    if "nccl" in dist.get_backend():
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def _map_slurm_env() -> None:
    """srun without torchrun: RANK / WORLD_SIZE / LOCAL_RANK from SLURM's variables."""
    if "RANK" not in os.environ:
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))


def init_from_env(backend: str, timeout: float, store=None) -> None:
    """init_process_group from torchrun's or srun's environment (RANK / SLURM_PROCID, ...);
    `store`: the rendezvous store already made (init_launched), else env:// makes one."""
    _map_slurm_env()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))))
        # NCCL for CUDA tensors (megatron-core's refit), gloo for the small CPU collectives
        # (layout gathering, timing reductions).
        backend = "cpu:gloo,cuda:nccl"
    td = datetime.timedelta(seconds=timeout)
    if store is None:
        dist.init_process_group(backend, timeout=td)
    else:  # as init_process_group does with the store env:// gives it
        dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store),
                                rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=td)


def agree_backend(decisions: list[dict]) -> tuple[str, str]:
    """(backend, why) that every rank of a launched job uses, from each rank's own decision
    ({"rank", "backend", "why"}, or {"rank", "error"} where choose_backend refused): NCCL only
    where every rank chose it; gloo everywhere as soon as one rank cannot have a GPU of its own
    (nodes with fewer GPUs than ranks), naming that rank; ValueError with the first refusal
    (--backend nccl on a node without enough GPUs) when any rank refused. Pure: every rank
    that sees the same decisions decides the same."""
    decisions = sorted(decisions, key=lambda d: d["rank"])
    refused = [d for d in decisions if d.get("error")]
    if refused:
        more = f" and {len(refused) - 1} more" if len(refused) > 1 else ""
        raise ValueError(f"{refused[0]['error']} (rank {refused[0]['rank']}{more})")
    gloo = [d for d in decisions if d["backend"] != "nccl"]
    if not gloo:
        return "nccl", decisions[0]["why"]
    if len(gloo) == len(decisions):
        return "gloo", decisions[0]["why"]
    return "gloo", (f"rank {gloo[0]['rank']}: {gloo[0]['why']} ({len(gloo)} of "
                    f"{len(decisions)} ranks), so every rank uses gloo")


def exchange_decisions(store, rank: int, world: int, decision: dict, prefix: str,
                       timeout: float = 300.0) -> tuple[str, str]:
    """agree_backend over `store` before any process group exists: every rank posts its
    decision, rank 0 reads them all and posts the agreed one, every rank reads that (2 x world
    store operations in all). Every rank returns the same (backend, why) or raises the same
    ValueError; rank 0 (the store's host under srun) waits until every rank has read it."""
    store.set(f"{prefix}/{rank}", json.dumps({**decision, "rank": rank}))
    if rank == 0:
        decisions = [json.loads(store.get(f"{prefix}/{r}")) for r in range(world)]
        try:
            agreed = dict(zip(("backend", "why"), agree_backend(decisions)))
        except ValueError as exc:
            agreed = {"error": str(exc)}
        store.set(f"{prefix}/agreed", json.dumps(agreed))
    agreed = json.loads(store.get(f"{prefix}/agreed"))
    read = store.add(f"{prefix}/read", 1)
    if rank == 0:
        deadline = time.monotonic() + timeout
        while read < world and time.monotonic() < deadline:
            time.sleep(0.02)
            read = store.add(f"{prefix}/read", 0)
    if "error" in agreed:
        raise ValueError(agreed["error"])
    return agreed["backend"], agreed["why"]


def agree_launched(requested: str, timeout: float):
    """One rank of a torchrun / srun job: decide the backend with every other rank. Each rank
    decides for its own node (decide_backend with the node's ranks and GPUs); the ranks agree
    over the rendezvous store before any process group or NCCL state exists, so nodes with
    different GPU counts never pick different backends (which hangs). Returns (backend, why,
    store); ValueError on every rank where one refused."""
    _map_slurm_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    td = datetime.timedelta(seconds=timeout)
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=td))
    store.set_timeout(td)
    try:
        backend, why = decide_backend(requested, ranks_per_node(world))
        decision = {"backend": backend, "why": why}
    except ValueError as exc:
        decision = {"error": str(exc)}
    # A torchrun restart keeps the agent's store: one set of keys per attempt.
    prefix = f"refit_engine/backend/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    backend, why = exchange_decisions(store, rank, world, decision, prefix, timeout)
    return backend, why, store


def init_launched(requested: str, timeout: float) -> tuple[str, str]:
    """agree_launched, then init_process_group with the agreed backend: (backend, why)."""
    backend, why, store = agree_launched(requested, timeout)
    init_from_env(backend, timeout, store=store)
    return backend, why
