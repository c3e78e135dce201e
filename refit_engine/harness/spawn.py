"""Rank processes on this machine: start N ranks (spawn context, a free local port, the
launcher's environment variables), collect each rank's result, and name every rank that failed,
crashed or stayed silent. Used by the main job and the sweep without a launcher, and by the
tests' multi-rank helper (tests/multiproc.py)."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import random
import signal
import socket
import time
import traceback

# Spawned gloo ranks see no GPU: megatron-core then builds every tensor on CPU (and four ranks
# do not each open a CUDA context on one GPU).
GLOO_ENV = {"CUDA_VISIBLE_DEVICES": ""}


def free_port() -> int:
    """A local port free now, for a process group's store that binds it a moment later.

    Drawn at random below the kernel's ephemeral range (Linux: 32768 and up), not from it: a
    port handed out by bind(0) is an ephemeral one, which any process's next outgoing connection
    may take before the store binds it (seen with 8 pytest-xdist workers on one machine)."""
    rng = random.SystemRandom()
    for _ in range(64):
        port = rng.randrange(15000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(target, world: int, *args, env: dict | None = None) -> list:
    """Starts `world` processes (spawn context) running target(rank, world, port, *args), with
    a free local port for their process group; `env`: variables set in their environment from
    the start (before they import anything)."""
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})  # spawned children copy this process's environment
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return procs


def rank_environment(rank: int, world: int, port: int) -> None:
    """This process as rank `rank` of `world` on this machine, as torchrun would set it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                      RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))


def _reporting_rank(rank, world, port, fn, args, queue):
    """One spawned rank: fn(rank, world, *args) with the launcher's environment; its value or
    its traceback goes to `queue`."""
    rank_environment(rank, world, port)
    try:
        value = fn(rank, world, *args)
    except BaseException as exc:  # report everything to the parent
        queue.put((rank, None, traceback.format_exc()))
        raise SystemExit(1) from exc
    queue.put((rank, value, None))


def exit_text(code: int | None) -> str:
    """A process's exit code in words: "exit code 1", "killed by signal 9 (SIGKILL)"."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        return f"killed by signal {-code} ({name})"
    return f"exit code {code}"


def wait_for_ranks(procs: list, queue, timeout: float | None, grace: float = 2.0,
                   poll: float = 0.2, dying=()) -> tuple[dict, dict]:
    """Every spawned rank's report (rank, value, error) from `queue`, watching the processes
    meanwhile. A rank whose process ends without reporting (a crash, a signal, os._exit) is
    named with its exit code or signal `grace` seconds after it ended (time for a report
    already on its way to arrive); the ranks still running are then stopped, since they would
    wait on it until their own timeout. Nothing at all within `timeout` (None: no limit): the
    silent ranks are named and stopped. Ranks in `dying` are expected to end without
    reporting: not waited for, not failures. Returns ({rank: value}, {rank: error text})."""
    values, failures, ended = {}, {}, {}
    deadline = None if timeout is None else time.monotonic() + timeout
    waited = [r for r in range(len(procs)) if r not in dying]
    while len(values) + len(failures) < len(waited):
        try:
            rank, value, error = queue.get(timeout=poll)
            if error:
                failures[rank] = error
            else:
                values[rank] = value
            continue
        except queue_mod.Empty:
            pass
        now = time.monotonic()
        silent = [r for r in waited if r not in values and r not in failures]
        for r in silent:
            if procs[r].exitcode is not None:
                ended.setdefault(r, now)
        dead = [r for r in silent if r in ended and now - ended[r] >= grace]
        if dead:
            for r in dead:
                failures[r] = (f"process {procs[r].pid} died without reporting: "
                               f"{exit_text(procs[r].exitcode)}\n")
            others = ", ".join(map(str, dead))
            for r in silent:
                if r not in dead:
                    failures[r] = (f"stopped: rank{'s' if len(dead) > 1 else ''} {others} "
                                   f"died without reporting\n")
            break
        if deadline is not None and now > deadline:
            for r in silent:
                failures[r] = f"did not report within {timeout:g} s: stopped\n"
            break
    for p in procs:  # the ones still running: stopped (they wait on a dead or silent rank)
        if p.is_alive() and p.pid is not None:
            p.terminate()
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join(timeout=10)
    return values, failures


def run_ranks(fn, world: int, *args, env: dict | None = None, timeout: float | None = None,
              dying=()) -> tuple[dict, dict]:
    """fn(rank, world, *args) on `world` fresh processes (each with RANK, WORLD_SIZE,
    MASTER_ADDR / MASTER_PORT ... set, and `env`); fn must be importable (spawn pickles it by
    name) and its value picklable. Returns wait_for_ranks' ({rank: value}, {rank: error})."""
    queue = mp.get_context("spawn").Queue()
    procs = spawn_ranks(_reporting_rank, world, fn, args, queue, env=env)
    return wait_for_ranks(procs, queue, timeout, dying=dying)


def failure_report(failures: dict[int, str]) -> str:
    """Every failed rank's traceback, those ending in the same error printed once."""
    groups: dict[str, list[int]] = {}
    for rank in sorted(failures):
        groups.setdefault(failures[rank], []).append(rank)
    out = []
    for text, ranks in groups.items():
        out.append(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}:\n{text}")
    return "\n".join(out)
