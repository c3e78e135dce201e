"""A plan's own channel to its peers: a private gloo group with a deadline on every wait.

`refit_engine.plan` builds one `Channel` per plan over the caller's group, and every wait of
planning and refitting (layout exchange, per-refit checks, CPU transfers, verification) goes
through it. So:

- every wait is bounded by the plan's `timeout_s`, not the caller's process-group timeout
  (30 minutes by default in torch);
- a late, stopped or dead rank is named: each rank records its progress in the store, and a
  timeout reports which ranks are behind and where they are;
- a failure poisons only this channel, never the caller's groups: the caller can still
  `dist.barrier()` and build a new plan.

The group is a `ProcessGroupGloo` built directly on a prefix of the default store (not
registered with torch.distributed), so creating it involves only the group's ranks.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import pickle
import threading
import time

import torch
import torch.distributed as dist

from refit_engine.errors import RefitError

# Plans built so far per group (ranks tuple): every rank of a group numbers its plans the same
# way, so the n-th plan of a group gets the same store prefix on every rank.
_plans_per_group: dict[tuple, itertools.count] = {}
_plans_lock = threading.Lock()


def group_ranks(group) -> list[int]:
    """Global ranks of `group` (None: the default group), in group order."""
    try:
        if group is None:
            return list(range(dist.get_world_size()))
        return list(dist.get_process_group_ranks(group))
    except (KeyError, ValueError, RuntimeError) as exc:  # destroyed, or not a group of ours
        raise RefitError("the group passed to refit_engine is not a live process group of this "
                         f"process (destroyed, or not created here; {type(exc).__name__})",
                         ranks=_world_ranks()) from exc


def _world_ranks() -> list[int]:
    """The default group's ranks: what every rank can name when its own group is unknown."""
    try:
        return list(range(dist.get_world_size()))
    except Exception:  # no default group either
        return []


def _default_store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception as exc:  # a private API: say what is missing rather than crash
        raise RefitError(f"refit_engine needs torch.distributed's default store ({exc})") from exc


class Channel:
    """Collectives among a group's ranks with a deadline, on the plan's own gloo group."""

    def __init__(self, group, timeout_s: float, what: str = "plan"):
        self.ranks = group_ranks(group)
        self.rank = dist.get_rank()
        if self.rank not in self.ranks:
            raise RefitError(f"rank {self.rank} is not in the refit group {self.ranks}",
                             ranks=[self.rank])
        self.index = self.ranks.index(self.rank)
        self.index_of = {r: i for i, r in enumerate(self.ranks)}
        self.timeout_s = float(timeout_s)
        self.timeout = datetime.timedelta(seconds=self.timeout_s)
        self.broken: str | None = None
        self._step, self._what, self._started = 0, "arrival", time.monotonic()
        # Channels are numbered per (group, what): the n-th plan named `what` of a group meets
        # the other ranks' n-th one; differently named plans never meet.
        key = (tuple(self.ranks), what)
        with _plans_lock:
            self.number = next(_plans_per_group.setdefault(key, itertools.count()))
        tag = hashlib.blake2b(repr(key).encode(), digest_size=6).hexdigest()
        self.name = f"{what} {self.number} of group {tag}"
        self.store = dist.PrefixStore(f"refit_engine/{tag}/{self.number}/", _default_store())
        self._arrive()
        try:
            self.pg = dist.ProcessGroupGloo(self.store, self.index, len(self.ranks), self.timeout)
        except Exception as exc:
            raise self._failure("connecting the plan's group", exc) from exc

    # Progress, for naming late ranks -------------------------------------------------------

    # NOTE: a step that completes within _QUIET_S records nothing: a store round trip per
    # collective is what a fast refit would otherwise pay (about half a millisecond). A rank
    # that waits longer records where it waits, so a peer that times out can name it; a rank
    # that never gets there is named by the older step it last recorded.
    _QUIET_S = 0.02

    def _enter(self, what: str, record: bool = False) -> None:
        """This rank starts collective step n (`what`)."""
        if self.broken:
            raise RefitError(f"the plan's channel is unusable after an earlier failure "
                             f"({self.broken}); build a new plan", ranks=[self.rank])
        self._step += 1
        self._what, self._started = what, time.monotonic()
        if record:
            self._record()

    def _record(self) -> None:
        """Publishes this rank's step, for `_behind` on the other ranks."""
        self.store.set(f"step/{self.index}", f"{self._step}:{self._what}")

    def _behind(self) -> dict[int, str]:
        """Global rank -> where it is, for every rank that has not reached this rank's step."""
        out = {}
        for i, r in enumerate(self.ranks):
            if i == self.index:
                continue
            try:
                if not self.store.check([f"step/{i}"]):
                    out[r] = "has not arrived"
                    continue
                step, what = self.store.get(f"step/{i}").decode().split(":", 1)
            except Exception:  # the store itself is gone: nothing more to learn
                out[r] = "unknown (store unreachable)"
                continue
            if int(step) < self._step:
                out[r] = f"last seen at step {step} ({what})"
            elif what != self._what:
                out[r] = f"at step {step} ({what}), not ({self._what})"
        return out

    # How long a failing rank waits for its live peers to report the same step before it names
    # the ranks still behind (a live peer that fails records its step in `_failure` too).
    _SETTLE_S = 1.0

    def _failure(self, doing: str, exc: BaseException) -> RefitError:
        elapsed = time.monotonic() - self._started
        self.broken = f"{doing} failed"
        try:
            self._record()
        except Exception:  # the store is gone: _behind says so
            pass
        timed_out = elapsed >= 0.9 * self.timeout_s
        behind = self._behind()
        # A fast failure (a connection reset) reaches every live rank at about the same time:
        # give them a moment to record it, so that only the dead or stopped ones stay behind.
        # After a real timeout, whoever is behind now is the answer.
        settle_until = time.monotonic() + (0.0 if timed_out else self._SETTLE_S)
        while behind and time.monotonic() < settle_until:
            time.sleep(0.05)
            behind = self._behind()
        what = (f"did not complete within {self.timeout_s:g} s" if timed_out else
                f"failed after {elapsed:.2f} s ({type(exc).__name__}: {str(exc)[:160]})")
        if behind:
            who = "; ".join(f"rank {r} {where}" for r, where in sorted(behind.items()))
            cause = ("late, stopped or dead, or running plans in another order" if timed_out
                     else "dead, or gave up on this plan")
            reason = f"{doing} {what}: {who} ({cause})"
            ranks = [self.rank, *behind]
        else:
            reason = f"{doing} {what}"
            ranks = self.ranks
        return RefitError(f"{self.name}: {reason}", ranks=ranks)

    def _arrive(self) -> None:
        self._enter("arrival", record=True)  # the store keys are the arrival barrier
        keys = [f"step/{i}" for i in range(len(self.ranks))]
        try:
            self.store.wait(keys, self.timeout)
        except Exception as exc:
            raise self._failure("waiting for every rank to plan", exc) from exc

    # Collectives ---------------------------------------------------------------------------

    def wait(self, work, doing: str) -> None:
        try:
            if not work.is_completed():
                quiet_until = time.monotonic() + self._QUIET_S
                while not work.is_completed() and time.monotonic() < quiet_until:
                    time.sleep(0.0001)
                if not work.is_completed():
                    self._record()  # a slow step: say where this rank waits
            work.wait(self.timeout)
        except Exception as exc:
            raise self._failure(doing, exc) from exc

    def gather(self, obj, what: str = "exchange") -> list:
        """Every rank's `obj`, in group order (pickled)."""
        self._enter(what)
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in self.ranks]
        self.wait(self.pg.allgather([sizes], [torch.tensor([payload.numel()])]), what)
        longest = max(int(s) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[:payload.numel()] = payload
        out = [torch.empty(longest, dtype=torch.uint8) for _ in self.ranks]
        self.wait(self.pg.allgather([out], [padded]), what)
        return [pickle.loads(o[:int(s)].numpy().tobytes()) for o, s in zip(out, sizes)]

    def union(self, bits: int, what: str) -> int:
        """The bitwise OR of every rank's `bits` (one all-reduce of one int64: small gloo
        all-reduces cost per element, ~0.2 ms each on a loaded 2-core machine)."""
        self._enter(what)
        t = torch.tensor([bits], dtype=torch.int64)
        self.wait(self.pg.allreduce([t], _BOR), what)
        return int(t.item())

    def close(self) -> None:
        """Stops the group's threads; pending waits end with an error."""
        pg, self.pg = getattr(self, "pg", None), None
        if pg is not None:
            for stop in ("abort", "shutdown"):
                try:
                    getattr(pg, stop)()
                    break
                except Exception:
                    continue


def _bor_option():
    options = dist.AllreduceOptions()
    options.reduceOp = dist.ReduceOp.BOR
    return options


_BOR = _bor_option()
