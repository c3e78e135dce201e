"""The one exception of refit_engine."""

from __future__ import annotations

from typing import Iterable


class RefitError(RuntimeError):
    """A refit that cannot be planned or run, raised before any byte moves.

    Attributes:
        tensor: canonical name of the tensor at fault ("*" when the fault is not one tensor's).
        ranks: the global ranks involved, ascending.
        reason: what is wrong, in words.
    """

    def __init__(self, reason: str, tensor: str = "*", ranks: Iterable[int] = ()):
        self.tensor = tensor
        self.ranks = sorted({int(r) for r in ranks})
        self.reason = reason
        super().__init__(f"tensor '{tensor}' (ranks {self.ranks}): {reason}")

    def __reduce__(self):  # keep the fields when pickled across processes
        return (_rebuild, (self.reason, self.tensor, self.ranks))


def _rebuild(reason, tensor, ranks):
    return RefitError(reason, tensor=tensor, ranks=ranks)


def status_of(exc: Exception):
    """What a rank reports of its own failure for `raise_first`: the RefitError itself, or
    the exception in words (any other exception, which may not pickle)."""
    return exc if isinstance(exc, RefitError) else f"{type(exc).__name__}: {exc}"


def raise_first(statuses, what: str):
    """Raise on every rank the first rank's error (statuses gathered from all ranks)."""
    for rank, status in statuses:
        if isinstance(status, RefitError):
            if not status.ranks:  # found in one rank's own tensors: that rank is the culprit
                raise RefitError(status.reason, tensor=status.tensor, ranks=[rank])
            raise status
        if status is not None:
            raise RefitError(f"{what} failed on rank {rank}: {status}", ranks=[rank])

